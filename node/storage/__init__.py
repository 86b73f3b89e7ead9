"""Content-addressed blobs: a blob's id is the sha256 of its bytes, checked on every read.

Backends: LocalBlobStore (default), S3Store (any S3 API), Storj through its S3 gateway
or the native UplinkStore. `open_store(spec, data_dir)` picks one from a spec string.
The S3 and Storj names load on first use, so a node on local storage never imports boto3.
"""

from importlib import import_module
from typing import Any

from node.storage.local import (DEFAULT_MAX_BLOB_BYTES, BlobCorrupt, BlobNotFound, BlobStore, BlobTooLarge,
                                InvalidContentId, LocalBlobStore, StorageError, StoreConfigError,
                                StoreUnavailable, content_id, is_content_id, verified)

_LAZY = {
    "open_store": "node.storage.factory",
    "S3Location": "node.storage.s3", "S3Store": "node.storage.s3", "S3Tuning": "node.storage.s3",
    "StorjS3Credentials": "node.storage.storj", "UplinkStore": "node.storage.storj",
    "register_access_grant": "node.storage.storj", "storj_gateway_store": "node.storage.storj",
}

__all__ = [
    "DEFAULT_MAX_BLOB_BYTES", "BlobCorrupt", "BlobNotFound", "BlobStore", "BlobTooLarge", "InvalidContentId",
    "LocalBlobStore", "StorageError", "StoreConfigError", "StoreUnavailable", "content_id", "is_content_id",
    "verified", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'node.storage' has no attribute {name!r}")
