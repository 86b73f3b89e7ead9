"""Blobs between peers over a libp2p stream protocol, by content id.

Large payloads (adapters, ciphertext batches, Concrete-ML evaluation keys of ~100 MB)
never ride on gossip: gossip carries the sha256, and whoever needs the bytes asks the
holder on `/sealmesh/blob/1`. The request is an Epistula envelope signed for the
holder (so a holder knows who asks and replays are refused); the response is one status
byte then the blob or a reason. The asker checks the sha256 before using a byte.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from node.mesh import Mesh
from node.storage.local import BlobCorrupt, BlobNotFound, BlobStore, StorageError, is_content_id, verified
from protocol.epistula import EnvelopeVerifier, Signer
from protocol.errors import RemoteProtocolError
from protocol.inbound import open_direct, seal_message
from protocol.messages import BlobRequest

log = logging.getLogger("sealmesh.blobs")

BLOB_PROTOCOL = "/sealmesh/blob/1"
PROBE_PROTOCOL = "/sealmesh/probe/1"  # one-hop latency probe: the bare stream baseline
MAX_BLOB_REQUEST_BYTES = 1024
_OK, _ERROR = b"\x00", b"\x01"


class BlobFetchError(Exception):
    """The peer refused or failed; `reason` is its stable label."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason = reason


class BlobService:
    def __init__(self, store: BlobStore, verifier: EnvelopeVerifier,
                 on_reject: Callable[[str], None] = lambda reason: None) -> None:
        self.store, self.verifier, self.on_reject = store, verifier, on_reject

    async def handle(self, peer_id: str, payload: bytes) -> bytes:
        try:
            request = open_direct(payload, verifier=self.verifier, now_ms=time.time_ns() // 1_000_000,
                                  max_bytes=MAX_BLOB_REQUEST_BYTES)
        except RemoteProtocolError as exc:
            self.on_reject(exc.reason)
            return _ERROR + f"{exc.reason}: {exc.hint}".encode()
        if not isinstance(request.message, BlobRequest) or not is_content_id(request.message.cid):
            self.on_reject("bad_request")
            return _ERROR + b"bad_request: expected a blob_request with a sha256 hex id"
        cid = request.message.cid
        try:
            data = self.store.get(cid)
        except BlobNotFound:
            return _ERROR + f"not_found: no blob {cid}".encode()
        except BlobCorrupt as exc:
            log.error("local blob is corrupt, refusing to serve it: %s", exc)
            return _ERROR + f"not_found: blob {cid} is damaged here".encode()
        except StorageError as exc:  # a remote store that is down or refuses: say why
            log.warning("cannot serve blob %s: %s", cid[:12], exc)
            return _ERROR + f"{exc.reason}: blob {cid} is not readable here now".encode()
        log.info("serving blob %s (%d bytes) to %s", cid[:12], len(data), request.member.hotkey)
        return _OK + data


async def fetch_blob(mesh: Mesh, signer: Signer, *, peer_id: str, peer_hotkey: str, cid: str,
                     max_bytes: int, timeout_s: float = 120) -> bytes:
    """Fetch and verify a blob from one peer; BlobFetchError or BlobCorrupt otherwise."""
    if not is_content_id(cid):
        raise ValueError(f"not a content id: {cid!r}")
    envelope = seal_message(signer, BlobRequest(cid), now_ms=time.time_ns() // 1_000_000,
                            signed_for=peer_hotkey)
    reply = await mesh.request(peer_id, BLOB_PROTOCOL, envelope.to_gossip_bytes(),
                               max_response_bytes=max_bytes + 1, timeout_s=timeout_s)
    if reply[:1] == _OK:
        return verified(cid, reply[1:])
    reason, _, hint = reply[1:].decode(errors="replace").partition(": ")
    raise BlobFetchError(reason or "error", hint)


async def handle_probe(peer_id: str, payload: bytes) -> bytes:
    """Answer with our receive time in ns: the sender computes a one-way latency."""
    return time.time_ns().to_bytes(8, "big")
