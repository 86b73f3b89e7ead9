"""The embedded blob store: a local directory, one file per blob, named by its sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_CID = re.compile(r"^[0-9a-f]{64}$")


class BlobNotFound(KeyError):
    pass


class BlobCorrupt(ValueError):
    """Stored or received bytes whose sha256 is not the id they were asked for."""


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, cid: str) -> bytes: ...
    def has(self, cid: str) -> bool: ...


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_content_id(cid: str) -> bool:
    return isinstance(cid, str) and bool(_CID.match(cid))


def verified(cid: str, data: bytes) -> bytes:
    actual = content_id(data)
    if actual != cid:
        raise BlobCorrupt(f"blob {cid} has sha256 {actual}")
    return data


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: str) -> Path:
        if not is_content_id(cid):
            raise ValueError(f"not a content id (64 lowercase hex digits): {cid!r}")
        return self.root / cid[:2] / cid

    def put(self, data: bytes) -> str:
        cid = content_id(data)
        path = self._path(cid)
        if path.exists():
            return cid
        path.parent.mkdir(exist_ok=True)
        # Write-then-rename: a crash leaves either no blob or a whole one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cid

    def get(self, cid: str) -> bytes:
        try:
            data = self._path(cid).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(cid) from None
        return verified(cid, data)

    def has(self, cid: str) -> bool:
        return self._path(cid).exists()
