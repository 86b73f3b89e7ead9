"""Content-addressed blobs: a blob's id is the sha256 of its bytes, checked on every read."""

from node.storage.local import (BlobCorrupt, BlobNotFound, BlobStore, LocalBlobStore, content_id,
                                is_content_id)

__all__ = ["BlobCorrupt", "BlobNotFound", "BlobStore", "LocalBlobStore", "content_id", "is_content_id"]
