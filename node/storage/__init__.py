"""Content-addressed blobs: a blob's id is the sha256 of its bytes, checked on every read.

Backends: LocalBlobStore (default), S3Store (any S3 API), Storj through its S3 gateway
or the native UplinkStore. `open_store(spec, data_dir)` picks one from a spec string.
"""

from node.storage.factory import open_store
from node.storage.local import (DEFAULT_MAX_BLOB_BYTES, BlobCorrupt, BlobNotFound, BlobStore, BlobTooLarge,
                                InvalidContentId, LocalBlobStore, StorageError, StoreConfigError,
                                StoreUnavailable, content_id, is_content_id, verified)
from node.storage.s3 import S3Location, S3Store, S3Tuning
from node.storage.storj import StorjS3Credentials, UplinkStore, register_access_grant, storj_gateway_store

__all__ = [
    "DEFAULT_MAX_BLOB_BYTES", "BlobCorrupt", "BlobNotFound", "BlobStore", "BlobTooLarge", "InvalidContentId",
    "LocalBlobStore", "S3Location", "S3Store", "S3Tuning", "StorageError", "StoreConfigError",
    "StoreUnavailable", "StorjS3Credentials", "UplinkStore", "content_id", "is_content_id", "open_store",
    "register_access_grant", "storj_gateway_store", "verified",
]
