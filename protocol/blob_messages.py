"""Chunked blob transfers: the requests, and the manifest a holder answers with.

A blob's id stays the sha256 of its whole bytes. One over CHUNK_BYTES is fetched as a
manifest (its size and the sha256 of every CHUNK_BYTES slice) and then chunk by chunk,
each chunk checked against the manifest as it arrives and the whole against the id at
the end (docs/storage.md "Chunked transfers" says why that is enough).

The chunk size is fixed here, not chosen by a holder: so the manifest of a blob is a
function of its bytes, every honest holder answers the same one, and a holder whose
manifest differs from another's is lying or damaged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import msgpack

from protocol._wire import unpack_strict
from protocol.errors import RemoteProtocolError
from protocol.messages import Channel, Message, message_type

CHUNK_BYTES = 1 << 20
# 4 GiB at 1 MiB chunks: above any store's limit (1 GiB by default), and it bounds what a
# manifest may make us allocate before a single chunk has been checked.
MAX_CHUNKS = 4096
_HASH_BYTES = 32
MAX_MANIFEST_BYTES = 64 + MAX_CHUNKS * (_HASH_BYTES + 2)  # msgpack: 2 bytes of bin header each


class BadManifest(RemoteProtocolError):
    reason = "bad_manifest"


class BadChunk(RemoteProtocolError):
    """A chunk whose sha256 is not the manifest's: the holder that sent it lied or is damaged."""

    reason = "bad_chunk"


@message_type
@dataclass(frozen=True)
class BlobManifestRequest(Message):
    """Ask a holder for a blob's manifest; a blob of one chunk comes whole instead."""

    TYPE: ClassVar[str] = "blob_manifest_request"
    CHANNEL: ClassVar[Channel | None] = None
    MAX_BYTES: ClassVar[int] = 512
    BROADCAST: ClassVar[bool] = False

    cid: str


@message_type
@dataclass(frozen=True)
class BlobChunkRequest(Message):
    """Ask a holder for chunk `index` (bytes index*CHUNK_BYTES onward) of a blob."""

    TYPE: ClassVar[str] = "blob_chunk_request"
    CHANNEL: ClassVar[Channel | None] = None
    MAX_BYTES: ClassVar[int] = 512
    BROADCAST: ClassVar[bool] = False

    cid: str
    index: int


def chunk_count(size: int) -> int:
    """Chunks of a blob of `size` bytes; an empty blob is one empty chunk."""
    return max(1, -(-size // CHUNK_BYTES))


@dataclass(frozen=True)
class BlobManifest:
    size: int
    chunk_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.chunk_hashes) != chunk_count(self.size):
            raise BadManifest(f"{len(self.chunk_hashes)} chunk hashes for {self.size} bytes; "
                              f"expected {chunk_count(self.size)}")

    @property
    def chunks(self) -> int:
        return len(self.chunk_hashes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk `index` in the blob."""
        if not 0 <= index < self.chunks:
            raise IndexError(f"chunk {index} of a {self.chunks}-chunk blob")
        start = index * CHUNK_BYTES
        return start, min(start + CHUNK_BYTES, self.size)

    def chunk_length(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

    def chunk_is_good(self, index: int, data: bytes) -> bool:
        return hashlib.sha256(data).digest() == self.chunk_hashes[index]

    def check_chunk(self, index: int, data: bytes) -> bytes:
        if len(data) != self.chunk_length(index):
            raise BadChunk(f"chunk {index} is {len(data)} bytes; the manifest says {self.chunk_length(index)}")
        if not self.chunk_is_good(index, data):
            raise BadChunk(f"chunk {index} does not have the manifest's sha256")
        return data

    def encode(self) -> bytes:
        return msgpack.packb({"size": self.size, "chunk_bytes": CHUNK_BYTES, "hashes": list(self.chunk_hashes)},
                             use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes, *, max_size: int) -> "BlobManifest":
        """Strictly: the three keys, our chunk size, one 32-byte hash per chunk, and a size
        no larger than the caller would accept (checked before the hashes are built)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BadManifest(f"manifest of {len(raw)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            top = unpack_strict(raw)
        except Exception as exc:  # msgpack raises several unrelated types
            raise BadManifest(f"not a msgpack manifest: {exc}") from exc
        if not isinstance(top, dict) or set(top) != {"size", "chunk_bytes", "hashes"}:
            raise BadManifest("a manifest is a map with exactly the keys size, chunk_bytes, hashes")
        size, chunk_bytes, hashes = top["size"], top["chunk_bytes"], top["hashes"]
        if type(size) is not int or size < 0:
            raise BadManifest(f"size must be a non-negative integer, not {size!r}")
        if size > max_size:
            raise BadManifest(f"blob of {size} bytes is over the {max_size}-byte limit asked for",
                              reason="too_large")
        if chunk_count(size) > MAX_CHUNKS:
            raise BadManifest(f"blob of {size} bytes is over {MAX_CHUNKS} chunks", reason="too_large")
        if chunk_bytes != CHUNK_BYTES or type(chunk_bytes) is not int:
            raise BadManifest(f"chunk size {chunk_bytes!r}; this protocol's is {CHUNK_BYTES}")
        if not isinstance(hashes, list) or not all(type(h) is bytes and len(h) == _HASH_BYTES for h in hashes):
            raise BadManifest("hashes must be a list of 32-byte sha256 digests")
        return cls(size, tuple(hashes))


def manifest_of(data: bytes) -> BlobManifest:
    hashes = tuple(hashlib.sha256(data[i:i + CHUNK_BYTES]).digest()
                   for i in range(0, max(len(data), 1), CHUNK_BYTES))
    return BlobManifest(len(data), hashes)


__all__ = ["BadChunk", "BadManifest", "BlobChunkRequest", "BlobManifest", "BlobManifestRequest", "CHUNK_BYTES",
           "MAX_CHUNKS", "MAX_MANIFEST_BYTES", "chunk_count", "manifest_of"]
