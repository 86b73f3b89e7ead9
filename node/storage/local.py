"""The embedded blob store: a local directory, one file per blob, named by its sha256.

This module also holds what every backend shares: the BlobStore interface, content
ids, the verify-on-read rule and the typed storage errors.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

# fullmatch, not match with "^...$": "$" also matches before a trailing newline, so 64 hex
# digits + "\n" would pass (issue 11, sound today: blob ids). The class is ASCII by range.
_CID = re.compile(r"[0-9a-f]{64}")

# Concrete-ML evaluation keys are ~100 MB and adapters a few hundred; 1 GiB leaves room
# while still refusing to pull an unbounded object into memory.
DEFAULT_MAX_BLOB_BYTES = 1 << 30


class StorageError(Exception):
    """A blob operation failed. `reason` is a stable label for logs and /metrics."""

    reason = "storage_error"

    def __init__(self, hint: str, *, cid: str | None = None, reason: str | None = None) -> None:
        super().__init__(hint)
        self.cid = cid
        if reason is not None:
            self.reason = reason

    @property
    def hint(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the hint
        return self.hint

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, hint={self.hint!r})"


class BlobNotFound(StorageError, KeyError):
    reason = "not_found"


class BlobCorrupt(StorageError, ValueError):
    """Stored or received bytes whose sha256 is not the id they were asked for."""

    reason = "corrupt"


class BlobTooLarge(StorageError, ValueError):
    reason = "too_large"


class InvalidContentId(StorageError, ValueError):
    reason = "bad_cid"


class StoreUnavailable(StorageError):
    """The backend refused or could not be reached (credentials, bucket, network)."""

    reason = "unavailable"


class StoreConfigError(StorageError, ValueError):
    """The store cannot be opened as configured; the hint says what to set."""

    reason = "bad_config"


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed bytes. `get` returns only bytes whose sha256 is the cid."""

    max_blob_bytes: int

    def put(self, data: bytes) -> str: ...
    def get(self, cid: str) -> bytes: ...
    def has(self, cid: str) -> bool: ...
    def delete(self, cid: str) -> bool: ...


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_content_id(cid: str) -> bool:
    return isinstance(cid, str) and _CID.fullmatch(cid) is not None


def require_content_id(cid: str) -> str:
    if not is_content_id(cid):
        raise InvalidContentId(f"not a content id (64 lowercase hex digits): {cid!r}")
    return cid


def verified(cid: str, data: bytes) -> bytes:
    actual = content_id(data)
    if actual != cid:
        raise BlobCorrupt(f"blob {cid} has sha256 {actual}", cid=cid)
    return data


def check_size(size: int, limit: int, *, cid: str | None = None) -> None:
    if size > limit:
        what = f"blob {cid}" if cid else "blob"
        raise BlobTooLarge(f"{what} is {size} bytes, over this store's limit of {limit}", cid=cid)


class LocalBlobStore:
    def __init__(self, root: Path, *, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_blob_bytes = max_blob_bytes

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, cid: str) -> Path:
        require_content_id(cid)
        return self.root / cid[:2] / cid

    def put(self, data: bytes) -> str:
        check_size(len(data), self.max_blob_bytes)
        cid = content_id(data)
        path = self._path(cid)
        if self._is_intact(path, cid):
            return cid  # a damaged copy is rewritten below: put() also repairs
        path.parent.mkdir(exist_ok=True)
        # Write-then-rename: a crash leaves either no blob or a whole one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return cid

    @staticmethod
    def _is_intact(path: Path, cid: str) -> bool:
        try:
            return content_id(path.read_bytes()) == cid
        except FileNotFoundError:
            return False

    def get(self, cid: str) -> bytes:
        path = self._path(cid)
        try:
            with path.open("rb") as f:
                check_size(os.fstat(f.fileno()).st_size, self.max_blob_bytes, cid=cid)
                data = f.read()
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {cid} in {self.root}", cid=cid) from None
        return verified(cid, data)

    def read_range(self, cid: str, offset: int, length: int) -> bytes:
        """`length` bytes of blob `cid` from `offset`, unverified: the caller checks them
        (a chunk against its manifest hash), so serving a chunk does not hash the whole."""
        try:
            with self._path(cid).open("rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {cid} in {self.root}", cid=cid) from None

    def has(self, cid: str) -> bool:
        return self._path(cid).exists()

    def delete(self, cid: str) -> bool:
        try:
            self._path(cid).unlink()
        except FileNotFoundError:
            return False
        return True


class PartialBlobFile:
    """A blob being fetched chunk by chunk: `<dir>/<cid>`, the bytes so far at their
    offsets (a sparse file of the blob's size), and `<dir>/<cid>.manifest`, the manifest
    they are checked against. Which chunks are done is not recorded: on open each chunk
    on disk is hashed against the manifest, so a torn write or a crash mid-chunk only
    costs that chunk (docs/storage.md "Chunked transfers")."""

    def __init__(self, directory: Path, cid: str, size: int, manifest: bytes) -> None:
        require_content_id(cid)
        self.directory, self.cid, self.size, self.manifest = Path(directory), cid, size, manifest
        self.path = self.directory / cid
        self.manifest_path = self.directory / f"{cid}.manifest"
        self._fd: int | None = None

    def open(self) -> bool:
        """Open for writing; True if a partial file of the same manifest was kept (resume)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            resumed = self.manifest_path.read_bytes() == self.manifest and self.path.stat().st_size == self.size
        except FileNotFoundError:
            resumed = False
        if not resumed:
            self.discard()
            self.manifest_path.write_bytes(self.manifest)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, self.size)
        return resumed

    def read(self, offset: int, length: int) -> bytes:
        assert self._fd is not None, "open() first"
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        assert self._fd is not None, "open() first"
        os.pwrite(self._fd, data, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        for path in (self.path, self.manifest_path):
            path.unlink(missing_ok=True)
