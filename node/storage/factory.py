"""Open the blob store a node is configured for, from one spec string and the environment.

Specs:
  local                                   DATA_DIR/blobs (the default)
  file:///abs/path                        a local directory elsewhere
  s3://bucket/prefix?endpoint=URL&region=R
  storj  |  storj://bucket/prefix         Storj (credentials from the environment)

Credentials never sit in a spec (specs end up in logs and config files); they come from
the `env` mapping, which the settings layer passes in (see docs/storage.md for names).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from typing import TYPE_CHECKING

from node.storage.local import DEFAULT_MAX_BLOB_BYTES, BlobStore, LocalBlobStore, StoreConfigError

if TYPE_CHECKING:
    from node.storage.s3 import S3Location

DEFAULT_STORJ_PREFIX = "sealmesh/blobs"
_S3_QUERY = {"endpoint", "region"}


def open_store(spec: str | None, data_dir: Path, *, env: Mapping[str, str] | None = None,
               max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> BlobStore:
    env = os.environ if env is None else env
    spec = (spec or "local").strip()
    scheme = urlsplit(spec).scheme if "://" in spec else spec
    if scheme == "local":
        return LocalBlobStore(Path(data_dir) / "blobs", max_blob_bytes=max_blob_bytes)
    if scheme == "file":
        parts = urlsplit(spec)
        path = parts.path
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise StoreConfigError(f"file store needs an absolute path: file:///abs/path, not {spec!r}",
                                   reason="bad_spec")
        return LocalBlobStore(Path(path), max_blob_bytes=max_blob_bytes)
    if scheme == "s3":
        from node.storage.s3 import S3Store  # boto3 loads only for nodes that use S3

        return S3Store(s3_location(spec, env), max_blob_bytes=max_blob_bytes)
    if scheme == "storj":
        return open_storj(spec, env, max_blob_bytes=max_blob_bytes)
    raise StoreConfigError(f"unknown blob store {spec!r}: use local, file:///path, "
                           "s3://bucket/prefix?endpoint=URL or storj", reason="bad_spec")


def s3_location(spec: str, env: Mapping[str, str]) -> "S3Location":
    from node.storage.s3 import S3Location

    parts = urlsplit(spec)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - _S3_QUERY
    if unknown:
        raise StoreConfigError(f"unknown s3 spec option(s) {sorted(unknown)}; known: {sorted(_S3_QUERY)} "
                               "(credentials go in SEALMESH_S3_ACCESS_KEY / SEALMESH_S3_SECRET_KEY)",
                               reason="bad_spec")
    if not parts.netloc:
        raise StoreConfigError(f"s3 spec needs a bucket: s3://bucket/prefix, not {spec!r}", reason="bad_spec")
    access_key, secret_key = _s3_keys(env)
    return S3Location(bucket=parts.netloc, prefix=parts.path.strip("/"),
                      endpoint_url=query.get("endpoint") or env.get("SEALMESH_S3_ENDPOINT") or None,
                      region=query.get("region") or env.get("SEALMESH_S3_REGION") or "us-east-1",
                      access_key=access_key, secret_key=secret_key)


def _s3_keys(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """SEALMESH_S3_* first, then the AWS names; neither = boto3's own chain (profile, role)."""
    for key_name, secret_name in (("SEALMESH_S3_ACCESS_KEY", "SEALMESH_S3_SECRET_KEY"),
                                  ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        key, secret = env.get(key_name) or None, env.get(secret_name) or None
        if key or secret:
            if not (key and secret):
                missing = secret_name if key else key_name
                raise StoreConfigError(f"{key_name} and {secret_name} go together: {missing} is not set",
                                       reason="missing_credentials")
            return key, secret
    return None, None


def open_storj(spec: str, env: Mapping[str, str], *,
               max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> BlobStore:
    """Gateway with S3 keys, else gateway via an access grant, else native uplink (MY_*)."""
    from node.storage.storj import (STORJ_AUTH_SERVICE, STORJ_GATEWAY, StorjS3Credentials, UplinkStore,
                                    register_access_grant, storj_gateway_store)

    parts = urlsplit(spec) if "://" in spec else None
    bucket = (parts.netloc if parts else "") or env.get("SEALMESH_STORJ_BUCKET") or env.get("MY_BUCKET") or ""
    prefix = (parts.path.strip("/") if parts else "") or env.get("SEALMESH_STORJ_PREFIX") or DEFAULT_STORJ_PREFIX
    if not bucket:
        raise StoreConfigError("Storj needs a bucket: storj://bucket/prefix, or set MY_BUCKET",
                               reason="missing_credentials")
    access_key, secret_key = (env.get("SEALMESH_S3_ACCESS_KEY") or None,
                              env.get("SEALMESH_S3_SECRET_KEY") or None)
    if access_key or secret_key:
        if not (access_key and secret_key):
            raise StoreConfigError("SEALMESH_S3_ACCESS_KEY and SEALMESH_S3_SECRET_KEY go together",
                                   reason="missing_credentials")
        credentials = StorjS3Credentials(access_key, secret_key,
                                         env.get("SEALMESH_S3_ENDPOINT") or STORJ_GATEWAY)
        return storj_gateway_store(bucket, credentials, prefix=prefix, max_blob_bytes=max_blob_bytes)
    if env.get("SEALMESH_STORJ_ACCESS"):
        credentials = register_access_grant(
            env["SEALMESH_STORJ_ACCESS"], auth_service=env.get("SEALMESH_STORJ_AUTH_SERVICE") or STORJ_AUTH_SERVICE)
        return storj_gateway_store(bucket, credentials, prefix=prefix, max_blob_bytes=max_blob_bytes)
    if env.get("MY_API_KEY") or env.get("MY_SATELLITE"):
        return UplinkStore(satellite=env.get("MY_SATELLITE", ""), api_key=env.get("MY_API_KEY", ""),
                           passphrase=env.get("MY_ENCRYPTION_PASSPHRASE", ""), bucket=bucket, prefix=prefix,
                           max_blob_bytes=max_blob_bytes)
    raise StoreConfigError(
        "no Storj credentials: set SEALMESH_S3_ACCESS_KEY and SEALMESH_S3_SECRET_KEY (from "
        "`uplink access register` or the web console's S3 credentials), or SEALMESH_STORJ_ACCESS "
        "(an access grant), or MY_API_KEY, MY_SATELLITE and MY_ENCRYPTION_PASSPHRASE (native uplink)",
        reason="missing_credentials")
