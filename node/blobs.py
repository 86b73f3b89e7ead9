"""Blobs between peers over a libp2p stream protocol, by content id.

Large payloads (adapters, ciphertext batches, Concrete-ML evaluation keys of ~100 MB)
never ride on gossip: gossip carries the sha256, and whoever needs the bytes asks the
holder on `/sealmesh/blob/1`. Every request is an Epistula envelope signed for the
holder (so a holder knows who asks and replays are refused); the response is one status
byte then the bytes or a reason. The asker checks every byte before using it.

A blob of one chunk (protocol/blob_messages.py CHUNK_BYTES) comes in one request; a
bigger one as a manifest then chunks, from every holder at once, into a partial file that
a cut stream or a restart resumes from (docs/storage.md "Chunked transfers").
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from node.clock import now_ms
from node.mesh import Mesh, MeshRequestError, request_started_ms
from node.progress import Progress
from node.storage.local import (BlobCorrupt, BlobNotFound, BlobStore, LocalBlobStore, PartialBlobFile, StorageError,
                                content_id, is_content_id, verified)
from protocol.blob_messages import (MAX_MANIFEST_BYTES, BadChunk, BlobChunkRequest,
                                    BlobManifest, BlobManifestRequest, manifest_of)
from protocol.epistula import EnvelopeVerifier, Signer
from protocol.errors import RemoteProtocolError
from protocol.inbound import open_direct, seal_message
from protocol.messages import BlobRequest, Message

log = logging.getLogger("sealmesh.blobs")

BLOB_PROTOCOL = "/sealmesh/blob/1"
PROBE_PROTOCOL = "/sealmesh/probe/1"  # one-hop latency probe: the bare stream baseline
MAX_BLOB_REQUEST_BYTES = 1024
_OK, _ERROR, _MANIFEST = b"\x00", b"\x01", b"\x02"
_MANIFEST_CACHE = 64  # manifests kept by a holder: a chunk is served without hashing the whole blob


class BlobFetchError(Exception):
    """The peer refused or failed; `reason` is its stable label."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason = reason


class BlobService:
    """The holder's side: a whole blob, a manifest, or one chunk, as the request asks."""

    def __init__(self, store: BlobStore, verifier: EnvelopeVerifier,
                 on_reject: Callable[[str], None] = lambda reason: None) -> None:
        self.store, self.verifier, self.on_reject = store, verifier, on_reject
        self.served: Counter[str] = Counter()  # "whole", "manifest", "chunk", "chunk_bytes"
        self._manifests: OrderedDict[str, BlobManifest] = OrderedDict()
        self._last_blob: tuple[str, bytes] | None = None  # stores without read_range: one blob at a time

    async def handle(self, peer_id: str, payload: bytes) -> bytes:
        # Freshness from when the request began to arrive, as for every stream request.
        arrived_ms = request_started_ms() or now_ms()
        try:
            request = open_direct(payload, verifier=self.verifier, now_ms=arrived_ms,
                                  max_bytes=MAX_BLOB_REQUEST_BYTES)
        except RemoteProtocolError as exc:
            self.on_reject(exc.reason)
            return _ERROR + f"{exc.reason}: {exc.hint}".encode()
        message = request.message
        if not isinstance(message, (BlobRequest, BlobManifestRequest, BlobChunkRequest)) \
                or not is_content_id(message.cid):
            self.on_reject("bad_request")
            return _ERROR + b"bad_request: expected a blob request with a sha256 hex id"
        try:
            return self._answer(message, request.member.hotkey)
        except BlobNotFound:
            return _ERROR + f"not_found: no blob {message.cid}".encode()
        except BlobCorrupt as exc:
            log.error("local blob is corrupt, refusing to serve it: %s", exc)
            return _ERROR + f"not_found: blob {message.cid} is damaged here".encode()
        except StorageError as exc:  # a remote store that is down or refuses: say why
            log.warning("cannot serve blob %s: %s", message.cid[:12], exc)
            return _ERROR + f"{exc.reason}: blob {message.cid} is not readable here now".encode()

    def _answer(self, message: Message, asker: str) -> bytes:
        if isinstance(message, BlobChunkRequest):
            manifest = self.manifest(message.cid)
            if not 0 <= message.index < manifest.chunks:
                self.on_reject("bad_request")
                return _ERROR + f"bad_request: no chunk {message.index} in {manifest.chunks}".encode()
            chunk = self.chunk(message.cid, message.index)
            self.served["chunk"] += 1
            self.served["chunk_bytes"] += len(chunk)
            return _OK + chunk
        if isinstance(message, BlobManifestRequest):
            manifest = self.manifest(message.cid)
            if manifest.chunks > 1:
                self.served["manifest"] += 1
                log.info("serving blob %s to %s in %d chunks (%d bytes)", message.cid[:12], asker,
                         manifest.chunks, manifest.size)
                return _MANIFEST + manifest.encode()
        data = self.store.get(message.cid)
        self.served["whole"] += 1
        log.info("serving blob %s (%d bytes) to %s", message.cid[:12], len(data), asker)
        return _OK + data

    def manifest(self, cid: str) -> BlobManifest:
        if cid in self._manifests:
            self._manifests.move_to_end(cid)
            return self._manifests[cid]
        manifest = manifest_of(self._whole(cid))  # get() verifies the whole against the id
        self._manifests[cid] = manifest
        while len(self._manifests) > _MANIFEST_CACHE:
            self._manifests.popitem(last=False)
        return manifest

    def chunk(self, cid: str, index: int) -> bytes:
        """Chunk `index`, checked against the manifest made from the verified whole."""
        manifest = self.manifest(cid)
        start, end = manifest.chunk_range(index)
        if isinstance(self.store, LocalBlobStore):
            data = self.store.read_range(cid, start, end - start)
        else:
            data = self._whole(cid)[start:end]
        if not manifest.chunk_is_good(index, data):
            self._manifests.pop(cid, None)
            raise BlobCorrupt(f"chunk {index} of blob {cid} changed on disk since it was verified", cid=cid)
        return data

    def _whole(self, cid: str) -> bytes:
        if self._last_blob is not None and self._last_blob[0] == cid:
            return self._last_blob[1]
        data = self.store.get(cid)
        if not isinstance(self.store, LocalBlobStore):
            self._last_blob = (cid, data)
        return data


async def fetch_blob(mesh: Mesh, signer: Signer, *, peer_id: str, peer_hotkey: str, cid: str,
                     max_bytes: int, timeout_s: float = 120) -> bytes:
    """Fetch and verify a blob from one peer; BlobFetchError or BlobCorrupt otherwise."""
    if not is_content_id(cid):
        raise ValueError(f"not a content id: {cid!r}")
    envelope = seal_message(signer, BlobRequest(cid), now_ms=now_ms(),
                            signed_for=peer_hotkey)
    reply = await mesh.request(peer_id, BLOB_PROTOCOL, envelope.to_gossip_bytes(),
                               max_response_bytes=max_bytes + 1, timeout_s=timeout_s)
    if reply[:1] == _OK:
        return verified(cid, reply[1:])
    reason, _, hint = reply[1:].decode(errors="replace").partition(": ")
    raise BlobFetchError(reason or "error", hint)


@dataclass(frozen=True)
class Holder:
    peer_id: str
    hotkey: str


@dataclass(frozen=True)
class TransferTiming:
    """Deadlines that scale with the bytes asked for, not fixed seconds: a request gets
    `request_floor_s` plus its bytes at `min_rate_bytes_per_s`. A holder whose requests
    fail is retried after each of `retry_backoff_s`, then given up."""

    request_floor_s: float = 10.0
    min_rate_bytes_per_s: float = 64 * 1024.0  # 1 MiB chunk: 26 s; a 40 MB blob in all: 10.7 min
    retry_backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 4.0, 8.0, 8.0)
    progress_every_s: float = 5.0
    progress_min_bytes: int = 8 << 20

    def deadline_s(self, n_bytes: int) -> float:
        return self.request_floor_s + n_bytes / self.min_rate_bytes_per_s


@dataclass
class TransferStats:
    chunks: int = 0  # of the blob
    chunks_on_disk: int = 0  # found good in a partial file kept from before: not fetched again
    chunks_fetched: int = 0
    bytes_fetched: int = 0  # chunk bytes received whole, good or bad
    bad_chunks: int = 0
    failed_requests: int = 0
    by_holder: Counter[str] = field(default_factory=Counter)  # hotkey -> good chunks from it
    seconds: float = 0.0


def partial_dir_for(store: BlobStore, fallback: Path) -> Path:
    """Where half-fetched blobs wait: beside a local store's blobs, else under `fallback`."""
    return (store.root if isinstance(store, LocalBlobStore) else Path(fallback)) / "partial"


async def fetch_from_holders(mesh: Mesh, signer: Signer, *, cid: str, holders: list[Holder], max_bytes: int,
                             partial_dir: Path, timeout_s: float = 120, timing: TransferTiming = TransferTiming(),
                             stats: TransferStats | None = None) -> bytes:
    """Blob `cid`, verified, from whichever of `holders` serve it; BlobFetchError otherwise.

    `timeout_s` bounds a blob of one chunk (one request, as fetch_blob) and each holder's
    first answer; a bigger blob's deadline is derived from its size, at least `timeout_s`:
    timing.deadline_s(size). A fetch cut by that deadline or by a cancel keeps its partial
    file, and the next call resumes from it.
    """
    if not is_content_id(cid):
        raise ValueError(f"not a content id: {cid!r}")
    stats = stats if stats is not None else TransferStats()
    errors: list[str] = []
    first: tuple[Holder, BlobManifest] | None = None
    for n, holder in enumerate(holders):  # one at a time: a small blob comes whole from the first
        try:
            answer = await _ask_manifest(mesh, signer, holder, cid, max_bytes, timeout_s)
        except Exception as exc:  # refusal, reset, timeout, a lie: the next holder may do
            errors.append(f"{holder.hotkey[:8]}: {exc}")
            continue
        if isinstance(answer, bytes):
            return answer
        first = (holder, answer)
        break
    if first is None:
        raise BlobFetchError("unavailable", f"blob {cid[:12]} not had from {len(holders)} holders: {errors}")
    groups = await _manifest_groups(mesh, signer, cid, first, holders[n + 1:], max_bytes, timing, errors)
    for manifest, group in groups:
        deadline = max(timeout_s, timing.deadline_s(manifest.size))
        with trio.move_on_after(deadline) as scope:
            try:
                return await _fetch_chunks(mesh, signer, cid, manifest, group, partial_dir, timing, stats, errors)
            except (BlobCorrupt, BlobFetchError) as exc:  # a false manifest, or its holders all failed:
                errors.append(f"{[h.hotkey[:8] for h in group]}: {exc}")  # the next group may do
        if scope.cancelled_caught:
            raise BlobFetchError("timeout", f"blob {cid[:12]} not in within {deadline:.0f}s; "
                                 "its partial file is kept and the next fetch resumes it")
    raise BlobFetchError("unavailable", f"blob {cid[:12]}: every holder failed or lied: {errors}")


async def _manifest_groups(mesh: Mesh, signer: Signer, cid: str, first: tuple[Holder, BlobManifest],
                           others: list[Holder], max_bytes: int, timing: TransferTiming,
                           errors: list[str]) -> list[tuple[BlobManifest, list[Holder]]]:
    """The other holders' manifests, asked at once; holders grouped by the manifest they
    gave, most agreed first. Honest holders all give the true one (it is a function of the
    bytes), so a holder that disagrees is never asked for chunks of another's manifest."""
    answers: dict[Holder, BlobManifest] = {first[0]: first[1]}

    async def ask(holder: Holder) -> None:
        try:
            answer = await _ask_manifest(mesh, signer, holder, cid, max_bytes, timing.request_floor_s)
        except Exception as exc:
            errors.append(f"{holder.hotkey[:8]}: {exc}")
            return
        if isinstance(answer, BlobManifest):
            answers[holder] = answer

    async with trio.open_nursery() as nursery:
        for holder in others:
            nursery.start_soon(ask, holder)
    groups: dict[bytes, list[Holder]] = {}
    for holder, manifest in answers.items():
        groups.setdefault(manifest.encode(), []).append(holder)
    ordered = sorted(groups.values(), key=len, reverse=True)  # stable: the first answer wins a tie
    return [(answers[group[0]], group) for group in ordered]


async def _ask_manifest(mesh: Mesh, signer: Signer, holder: Holder, cid: str, max_bytes: int,
                        timeout_s: float) -> bytes | BlobManifest:
    reply = await _request(mesh, signer, holder, BlobManifestRequest(cid),
                           max(max_bytes, MAX_MANIFEST_BYTES) + 1, timeout_s)
    if reply[:1] == _OK:
        return verified(cid, reply[1:])
    return BlobManifest.decode(reply[1:], max_size=max_bytes)


async def _request(mesh: Mesh, signer: Signer, holder: Holder, message: Message, max_response: int,
                   timeout_s: float) -> bytes:
    """One signed request; the reply with its status byte, _OK or _MANIFEST, else BlobFetchError."""
    envelope = seal_message(signer, message, now_ms=now_ms(), signed_for=holder.hotkey)
    reply = await mesh.request(holder.peer_id, BLOB_PROTOCOL, envelope.to_gossip_bytes(),
                               max_response_bytes=max_response, timeout_s=timeout_s)
    if reply[:1] in (_OK, _MANIFEST):
        return reply
    reason, _, hint = reply[1:].decode(errors="replace").partition(": ")
    raise BlobFetchError(reason or "error", hint)


class _Schedule:
    """Work stealing over chunk indices: each holder's worker takes the lowest chunk still
    missing that nobody is fetching, so a fast holder simply takes more of them."""

    def __init__(self, missing: set[int], workers: int) -> None:
        self.missing, self.in_flight, self.workers = set(missing), set(), workers
        self.over = trio.Event()  # every chunk is in, or no worker is left
        self._changed = trio.Event()
        if not self.missing or not workers:
            self.over.set()

    def take(self) -> int | None:
        free = self.missing - self.in_flight
        if not free:
            return None
        index = min(free)
        self.in_flight.add(index)
        return index

    def settle(self, index: int, *, done: bool) -> None:
        self.in_flight.discard(index)
        if done:
            self.missing.discard(index)
            if not self.missing:
                self.over.set()
        self._changed.set()
        self._changed = trio.Event()

    def worker_left(self) -> None:
        self.workers -= 1
        if not self.workers:
            self.over.set()

    async def changed(self) -> None:
        await self._changed.wait()


async def _fetch_chunks(mesh: Mesh, signer: Signer, cid: str, manifest: BlobManifest, group: list[Holder],
                        partial_dir: Path, timing: TransferTiming, stats: TransferStats,
                        errors: list[str]) -> bytes:
    partial = PartialBlobFile(partial_dir, cid, manifest.size, manifest.encode())
    resumed = partial.open()
    try:
        on_disk = {i for i in range(manifest.chunks)
                   if resumed and manifest.chunk_is_good(i, partial.read(*_offset_length(manifest, i)))}
        stats.chunks, stats.chunks_on_disk = manifest.chunks, len(on_disk)
        if on_disk:
            log.info("blob %s: resuming, %d of %d chunks already on disk", cid[:12], len(on_disk), manifest.chunks)
        schedule = _Schedule(set(range(manifest.chunks)) - on_disk, len(group))
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for holder in group:
                nursery.start_soon(_chunk_worker, mesh, signer, holder, cid, manifest, partial, schedule, timing,
                                   stats, errors)
            if manifest.size >= timing.progress_min_bytes:
                nursery.start_soon(_log_progress, cid, manifest, schedule, stats, started, timing.progress_every_s)
            await schedule.over.wait()
            nursery.cancel_scope.cancel()  # workers backing off, and the progress line
        stats.seconds = time.monotonic() - started
        if schedule.missing:
            raise BlobFetchError("unavailable", f"blob {cid[:12]}: {len(schedule.missing)} of {manifest.chunks} "
                                 f"chunks missing after every holder failed: {errors}; the partial file is kept")
        data = partial.read(0, manifest.size)
    finally:
        partial.close()
    if content_id(data) != cid:
        partial.discard()
        raise BlobCorrupt(f"blob {cid} assembled from its manifest has sha256 {content_id(data)}", cid=cid)
    partial.discard()
    if manifest.size >= timing.progress_min_bytes:
        log.info("blob %s: %d bytes in %.1fs (%.2f Mbit/s), %d chunks resumed from disk, from %s", cid[:12],
                 manifest.size, stats.seconds, _mbit_s(stats.bytes_fetched, stats.seconds), stats.chunks_on_disk,
                 dict(stats.by_holder))
    return data


def _offset_length(manifest: BlobManifest, index: int) -> tuple[int, int]:
    start, end = manifest.chunk_range(index)
    return start, end - start


async def _chunk_worker(mesh: Mesh, signer: Signer, holder: Holder, cid: str, manifest: BlobManifest,
                        partial: PartialBlobFile, schedule: _Schedule, timing: TransferTiming,
                        stats: TransferStats, errors: list[str]) -> None:
    """Chunks from one holder until none is left. A bad chunk drops the holder at once (it
    cost us that chunk); a failed request is retried after a backoff, then the holder is
    given up. Either way the chunk goes back for the other workers."""
    failures = 0
    try:
        while not schedule.over.is_set():
            index = schedule.take()
            if index is None:
                await schedule.changed()
                continue
            offset, length = _offset_length(manifest, index)
            try:
                reply = await _request(mesh, signer, holder, BlobChunkRequest(cid, index), length + 1,
                                       timing.deadline_s(length))
                stats.bytes_fetched += len(reply) - 1
                chunk = manifest.check_chunk(index, reply[1:])
            except BadChunk as exc:
                schedule.settle(index, done=False)
                stats.bad_chunks += 1
                log.warning("blob %s: holder %s sent a bad chunk, dropped: %s", cid[:12], holder.hotkey[:8], exc)
                errors.append(f"{holder.hotkey[:8]}: {exc}")
                return
            except (MeshRequestError, TimeoutError, BlobFetchError) as exc:
                schedule.settle(index, done=False)
                stats.failed_requests += 1
                if failures == len(timing.retry_backoff_s) or getattr(exc, "reason", "") == "not_found":
                    log.warning("blob %s: giving up holder %s: %s", cid[:12], holder.hotkey[:8], exc)
                    errors.append(f"{holder.hotkey[:8]}: {exc}")
                    return
                log.info("blob %s: chunk %d from %s failed, retrying in %.1fs: %s", cid[:12], index,
                         holder.hotkey[:8], timing.retry_backoff_s[failures], exc)
                await trio.sleep(timing.retry_backoff_s[failures])
                mesh.allow_redial(holder.peer_id)  # our backoff, not libp2p's 60 s, decides when
                failures += 1
                continue
            partial.write(offset, chunk)
            failures = 0
            stats.chunks_fetched += 1
            stats.by_holder[holder.hotkey] += 1
            schedule.settle(index, done=True)
    finally:
        schedule.worker_left()


async def _log_progress(cid: str, manifest: BlobManifest, schedule: _Schedule, stats: TransferStats,
                        started: float, every_s: float) -> None:
    """A log line every `every_s`; on a terminal also a bar redrawn twice a second."""
    def have() -> int:
        return manifest.size - sum(manifest.chunk_length(i) for i in schedule.missing)

    bar = Progress(f"blob {cid[:12]}", total=manifest.size, unit="bytes", initial=have())
    logged = started
    try:
        while True:
            await trio.sleep(min(0.5, every_s) if bar.enabled else every_s)
            bar.update(have())
            now = time.monotonic()
            if now - logged < 0.95 * every_s:  # trio's clock and ours differ by a hair
                continue
            logged, elapsed = now, now - started
            rate = stats.bytes_fetched / elapsed if elapsed else 0.0
            left = (manifest.size - have()) / rate if rate else float("inf")
            log.info("blob %s: %.1f of %.1f MiB (%d%%), %.2f Mbit/s, ~%.0fs left, %d holders", cid[:12],
                     have() / 2**20, manifest.size / 2**20, 100 * have() // max(manifest.size, 1),
                     _mbit_s(stats.bytes_fetched, elapsed), left, schedule.workers)
    finally:  # cancelled once the schedule is over: the bar's last state stays on screen
        bar.update(have())
        bar.finish()


def _mbit_s(n_bytes: int, seconds: float) -> float:
    return n_bytes * 8 / 1e6 / seconds if seconds > 0 else 0.0


async def handle_probe(peer_id: str, payload: bytes) -> bytes:
    """Answer with our receive time in ns: the sender computes a one-way latency."""
    return time.time_ns().to_bytes(8, "big")
