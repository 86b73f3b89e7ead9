"""Storj: the production blob backend, two ways in.

1. Storj's hosted S3 gateway (gateway.storjshare.io) with S3 credentials. Those are
   minted from an access grant by Storj's auth service (`uplink access register`,
   `uplink share --register`, or the web console's "S3 credentials"); this module can
   also register a grant itself over the auth service's HTTP API (POST /v1/access).
2. The native uplink library (uplink-python over libuplinkc.so), which speaks to the
   satellite and storage nodes directly from API key + satellite + passphrase. It needs
   a Go-built shared library, so it is imported lazily and fails with a clear error.

Either way every read is hashed against its id: Storj is trusted for availability only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from node.storage.local import (DEFAULT_MAX_BLOB_BYTES, BlobNotFound, StorageError, StoreConfigError,
                                StoreUnavailable, check_size, content_id, require_content_id, verified)
from node.storage.s3 import S3Location, S3Store, S3Tuning

STORJ_GATEWAY = "https://gateway.storjshare.io"
STORJ_AUTH_SERVICE = "https://auth.storjshare.io"
# Storj stores 64 MiB segments; parts of that size map one to one.
STORJ_TUNING = S3Tuning(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
_CHUNK = 1 << 20
_UPLINK_HELP = ("uplink-python needs libuplinkc.so, built from storj.io/uplink-c with Go; without it "
                "use the S3 gateway: run `uplink access register` (or `uplink share --register`) once "
                "and set SEALMESH_S3_ACCESS_KEY / SEALMESH_S3_SECRET_KEY; see docs/storage.md")


@dataclass(frozen=True)
class StorjS3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    endpoint: str = STORJ_GATEWAY


def register_access_grant(access_grant: str, *, auth_service: str = STORJ_AUTH_SERVICE,
                          public: bool = False, timeout_s: float = 30) -> StorjS3Credentials:
    """Trade a serialized access grant for gateway S3 credentials (Storj auth service API)."""
    if not access_grant or not access_grant.isalnum():
        raise StoreConfigError("a Storj access grant is a non-empty base58 string "
                               "(`uplink access create` or the web console prints one)",
                               reason="bad_access_grant")
    request = urllib.request.Request(
        auth_service.rstrip("/") + "/v1/access", method="POST",
        data=json.dumps({"access_grant": access_grant, "public": public}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2048).decode(errors="replace").strip()
        raise StoreUnavailable(f"Storj auth service {auth_service} refused the access grant "
                               f"(HTTP {exc.code}): {detail}", reason="register_refused") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StoreUnavailable(f"cannot reach Storj auth service {auth_service}: {exc}",
                               reason="unreachable") from exc
    return _parse_registration(body, auth_service)


def _parse_registration(body: bytes, auth_service: str) -> StorjS3Credentials:
    try:
        doc = json.loads(body)
        keys = (doc["access_key_id"], doc["secret_key"], doc.get("endpoint") or STORJ_GATEWAY)
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreUnavailable(f"Storj auth service {auth_service} answered without "
                               f"access_key_id/secret_key: {body[:200]!r}", reason="register_refused") from exc
    if not all(isinstance(k, str) and k for k in keys):
        raise StoreUnavailable(f"Storj auth service {auth_service} answered empty credentials",
                               reason="register_refused")
    return StorjS3Credentials(*keys)


def storj_gateway_store(bucket: str, credentials: StorjS3Credentials, *, prefix: str = "",
                        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
                        tuning: S3Tuning | None = None) -> S3Store:
    """An S3Store on Storj's hosted gateway (or a self-hosted one: credentials.endpoint)."""
    location = S3Location(bucket=bucket, prefix=prefix, endpoint_url=credentials.endpoint,
                          access_key=credentials.access_key, secret_key=credentials.secret_key)
    return S3Store(location, max_blob_bytes=max_blob_bytes, tuning=tuning or STORJ_TUNING)


class UplinkStore:
    """Blobs through the native uplink library: end-to-end encrypted with our passphrase."""

    def __init__(self, *, satellite: str, api_key: str, passphrase: str, bucket: str, prefix: str = "",
                 max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        missing = [name for name, value in (("MY_SATELLITE", satellite), ("MY_API_KEY", api_key),
                                            ("MY_ENCRYPTION_PASSPHRASE", passphrase), ("MY_BUCKET", bucket))
                   if not value]
        if missing:
            raise StoreConfigError(f"Storj uplink needs {', '.join(missing)}", reason="missing_credentials")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.max_blob_bytes = max_blob_bytes
        uplink = _load_uplink()
        try:
            access = uplink.request_access_with_passphrase(satellite, api_key, passphrase)
            self.project = access.open_project()
        except Exception as exc:  # uplink raises StorjException subclasses, no common import
            raise StoreUnavailable(f"Storj satellite {satellite} refused access: {_storj_detail(exc)}",
                                   reason="access_denied") from exc

    def __repr__(self) -> str:
        return f"UplinkStore(sj://{self.bucket}/{self.prefix})"

    def _key(self, cid: str) -> str:
        require_content_id(cid)
        return f"{self.prefix}/{cid}" if self.prefix else cid

    def put(self, data: bytes) -> str:
        check_size(len(data), self.max_blob_bytes)
        cid = content_id(data)
        upload = self.project.upload_object(self.bucket, self._key(cid))
        try:
            for start in range(0, len(data), _CHUNK):
                chunk = data[start:start + _CHUNK]
                upload.write(chunk, len(chunk))
            upload.commit()
        except Exception as exc:
            upload.abort()
            raise StoreUnavailable(f"Storj upload of {cid} failed: {_storj_detail(exc)}", cid=cid) from exc
        return cid

    def get(self, cid: str) -> bytes:
        key = self._key(cid)
        try:
            download = self.project.download_object(self.bucket, key)
        except Exception as exc:
            raise self._mapped(exc, cid) from exc
        try:
            size = download.file_size()
            check_size(size, self.max_blob_bytes, cid=cid)
            chunks, remaining = [], size
            while remaining > 0:
                chunk, n = download.read(min(remaining, _CHUNK))
                if n == 0:
                    break
                chunks.append(chunk)
                remaining -= n
        except StorageError:
            raise
        except Exception as exc:
            raise self._mapped(exc, cid) from exc
        finally:
            download.close()
        return verified(cid, b"".join(chunks))

    def has(self, cid: str) -> bool:
        try:
            self.project.stat_object(self.bucket, self._key(cid))
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise self._mapped(exc, cid) from exc
        return True

    def delete(self, cid: str) -> bool:
        if not self.has(cid):
            return False
        try:
            self.project.delete_object(self.bucket, self._key(cid))
        except Exception as exc:
            raise self._mapped(exc, cid) from exc
        return True

    def _mapped(self, exc: Exception, cid: str) -> StorageError:
        if _is_not_found(exc):
            return BlobNotFound(f"no blob {cid} in sj://{self.bucket}/{self.prefix}", cid=cid)
        return StoreUnavailable(f"Storj request for {cid} failed: {_storj_detail(exc)}", cid=cid)


_ERROR_OBJECT_NOT_FOUND = 0x21  # uplink-c error codes, as uplink_python.errors defines them
_ERROR_LIBUPLINK_SO_NOT_FOUND = 0x9999


def _load_uplink() -> Any:
    try:
        from uplink_python.uplink import Uplink  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StoreConfigError(f"uplink-python is not installed ({exc}); {_UPLINK_HELP}",
                               reason="uplink_missing") from exc
    try:
        return Uplink()
    except Exception as exc:
        if getattr(exc, "code", None) == _ERROR_LIBUPLINK_SO_NOT_FOUND or isinstance(exc, OSError):
            raise StoreConfigError(f"uplink-python cannot load its native library; {_UPLINK_HELP}",
                                   reason="uplink_missing") from exc
        raise


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "code", None) == _ERROR_OBJECT_NOT_FOUND


def _storj_detail(exc: Exception) -> str:
    return str(getattr(exc, "details", None) or getattr(exc, "message", None) or exc)
