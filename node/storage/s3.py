"""Blobs in an S3 bucket (AWS, MinIO, Storj's S3 gateway, rclone serve s3) through boto3.

One object per blob, keyed `<prefix>/<sha256>`. Big blobs go up in parts (boto3's
managed transfer); transient failures are retried by botocore's standard retry mode.
Every read is checked against its sha256, so a bucket is trusted for availability only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                 PartialCredentialsError, ResponseStreamingError)

from node.storage.local import (DEFAULT_MAX_BLOB_BYTES, BlobNotFound, StorageError, StoreConfigError,
                                StoreUnavailable, check_size, content_id, require_content_id, verified)

MIB = 1 << 20

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "AuthorizationHeaderMalformed"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # None = AWS itself
    region: str = "us-east-1"
    access_key: str | None = None  # None = boto3's own credential chain (~/.aws, instance role)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.bucket or "/" in self.bucket:
            raise StoreConfigError(f"S3 bucket name {self.bucket!r} is empty or has a '/'",
                                   reason="bad_spec")
        if (self.access_key is None) != (self.secret_key is None):
            raise StoreConfigError("S3 access key and secret key must be given together",
                                   reason="missing_credentials")

    def key(self, cid: str) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/{cid}" if prefix else cid

    def describe(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"s3://{self.bucket}/{self.prefix.strip('/')} at {where}"


@dataclass(frozen=True)
class S3Tuning:
    multipart_threshold: int = 16 * MIB
    multipart_chunksize: int = 16 * MIB
    max_concurrency: int = 4
    max_attempts: int = 5  # botocore "standard" mode: backoff with jitter on 5xx, throttling, resets
    connect_timeout_s: float = 10
    read_timeout_s: float = 120


class S3Store:
    def __init__(self, location: S3Location, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
                 tuning: S3Tuning = S3Tuning()) -> None:
        self.location = location
        self.max_blob_bytes = max_blob_bytes
        self.client = _client(location, tuning)
        self.transfer = TransferConfig(multipart_threshold=tuning.multipart_threshold,
                                       multipart_chunksize=tuning.multipart_chunksize,
                                       max_concurrency=tuning.max_concurrency)

    def __repr__(self) -> str:
        return f"S3Store({self.location.describe()!r})"

    def put(self, data: bytes) -> str:
        check_size(len(data), self.max_blob_bytes)
        cid = content_id(data)
        key = self.location.key(cid)
        if self._size(key, cid) == len(data):
            return cid  # same key, same length: already stored (reads still verify)
        with self._mapped_errors(cid):
            self.client.upload_fileobj(io.BytesIO(data), self.location.bucket, key, Config=self.transfer,
                                       ExtraArgs={"ContentType": "application/octet-stream"})
        return cid

    def get(self, cid: str) -> bytes:
        key = self.location.key(require_content_id(cid))
        with self._mapped_errors(cid):
            response = self.client.get_object(Bucket=self.location.bucket, Key=key)
            body = response["Body"]
            try:
                check_size(int(response["ContentLength"]), self.max_blob_bytes, cid=cid)
                data = body.read()  # botocore checks the length it read against Content-Length
            finally:
                body.close()
        return verified(cid, data)

    def has(self, cid: str) -> bool:
        return self._size(self.location.key(require_content_id(cid)), cid) is not None

    def delete(self, cid: str) -> bool:
        key = self.location.key(require_content_id(cid))
        if self._size(key, cid) is None:
            return False
        with self._mapped_errors(cid):
            self.client.delete_object(Bucket=self.location.bucket, Key=key)
        return True

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (setup and tests; production buckets exist)."""
        with self._mapped_errors(None):
            try:
                self.client.head_bucket(Bucket=self.location.bucket)
                return
            except ClientError as exc:
                if _code(exc) not in _NOT_FOUND | {"NoSuchBucket"}:
                    raise
            self.client.create_bucket(Bucket=self.location.bucket)

    def _size(self, key: str, cid: str) -> int | None:
        with self._mapped_errors(cid):
            try:
                head = self.client.head_object(Bucket=self.location.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
        return int(head["ContentLength"])

    def _mapped_errors(self, cid: str | None) -> "_ErrorMap":
        return _ErrorMap(self.location, cid)


class _ErrorMap:
    """Turns boto3/botocore exceptions into StorageError with a reason and a next step."""

    def __init__(self, location: S3Location, cid: str | None) -> None:
        self.location, self.cid = location, cid

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StorageError):
            return False
        mapped = self._map(exc)
        if mapped is None:
            return False
        if self.cid is not None and self.cid not in mapped.hint:
            mapped.args = (f"blob {self.cid}: {mapped.hint}",)
        raise mapped from exc

    def _map(self, exc: BaseException) -> StorageError | None:
        where, cid = self.location.describe(), self.cid
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreConfigError(f"no S3 credentials for {where}: set SEALMESH_S3_ACCESS_KEY and "
                                    "SEALMESH_S3_SECRET_KEY", cid=cid, reason="missing_credentials")
        if isinstance(exc, EndpointConnectionError):
            return StoreUnavailable(f"cannot reach {where}: {exc}", cid=cid, reason="unreachable")
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "NoSuchBucket":
                return StoreUnavailable(f"bucket {self.location.bucket!r} does not exist at {where}",
                                        cid=cid, reason="no_bucket")
            if code in _NOT_FOUND and cid is not None:
                return BlobNotFound(f"no blob {cid} in {where}", cid=cid)
            if code in _DENIED:
                return StoreUnavailable(f"{where} refused our credentials ({code}): check the access "
                                        "key, secret key and bucket permissions", cid=cid,
                                        reason="access_denied")
            return StoreUnavailable(f"{where} answered {code}: {exc}", cid=cid, reason="s3_error")
        if isinstance(exc, ResponseStreamingError):
            # The body stopped short of its Content-Length: a dropped connection, or an
            # object changed under the server. Either way nothing partial is returned.
            return StoreUnavailable(f"{where} sent an incomplete body: {exc}", cid=cid, reason="incomplete_read")
        if isinstance(exc, BotoCoreError):
            return StoreUnavailable(f"S3 request to {where} failed: {exc}", cid=cid, reason="s3_error")
        return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client(location: S3Location, tuning: S3Tuning) -> Any:
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},  # gateways and rclone serve buckets by path, not DNS
        retries={"max_attempts": tuning.max_attempts, "mode": "standard"},
        connect_timeout=tuning.connect_timeout_s,
        read_timeout=tuning.read_timeout_s,
        # Not every S3-compatible server takes boto3's default CRC checksums; integrity is
        # ours anyway: every read is hashed against its id.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(aws_access_key_id=location.access_key,
                                    aws_secret_access_key=location.secret_key,
                                    aws_session_token=location.session_token,
                                    region_name=location.region)
    return session.client("s3", endpoint_url=location.endpoint_url, config=config)
