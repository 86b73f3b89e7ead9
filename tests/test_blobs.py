"""Blobs by content id over the stream protocol: authenticated, verified on receipt."""

import os

import pytest
import trio

from crypto.identity import Hotkey
from node.blobs import BLOB_PROTOCOL, BlobFetchError, BlobService, fetch_blob
from node.mesh import Mesh, MeshConfig
from node.storage import BlobCorrupt, BlobNotFound, LocalBlobStore, content_id
from protocol.epistula import EnvelopeVerifier
from protocol.membership import Member, Role, StaticDirectory

HOLDER, ASKER, STRANGER = (Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Eve"))
DIRECTORY = StaticDirectory((Member(HOLDER.ss58_address, frozenset({Role.VALIDATOR})),
                             Member(ASKER.ss58_address, frozenset({Role.TRAINER}))))


def test_local_store_verifies_every_read(tmp_path):
    store = LocalBlobStore(tmp_path)
    cid = store.put(b"adapter bytes")
    assert cid == content_id(b"adapter bytes") and store.get(cid) == b"adapter bytes"
    (tmp_path / cid[:2] / cid).write_bytes(b"tampered")
    with pytest.raises(BlobCorrupt):
        store.get(cid)
    with pytest.raises(BlobNotFound):
        store.get("0" * 64)
    with pytest.raises(ValueError, match="content id"):
        store.get("../../etc/passwd")


async def _pair(store, serve):
    holder_cfg = MeshConfig(mesh_id="blobs")
    async with Mesh.open(holder_cfg, os.urandom(32)) as holder:
        holder.set_stream_handler(BLOB_PROTOCOL, serve, max_request_bytes=1024)
        async with Mesh.open(MeshConfig(mesh_id="blobs", bootstrap=(holder.listen_addrs[0],)),
                             os.urandom(32)) as asker:
            return await _run_cases(holder, asker, store)


async def _run_cases(holder, asker, store):
    results = {}
    big = os.urandom(3 * 1024 * 1024)
    cid = store.put(big)
    results["big"] = await fetch_blob(asker, ASKER, peer_id=holder.peer_id,
                                      peer_hotkey=HOLDER.ss58_address, cid=cid, max_bytes=8 << 20)
    for name, signer, want in (("missing", ASKER, "0" * 64), ("stranger", STRANGER, cid)):
        try:
            await fetch_blob(asker, signer, peer_id=holder.peer_id, peer_hotkey=HOLDER.ss58_address,
                             cid=want, max_bytes=8 << 20)
        except BlobFetchError as exc:
            results[name] = exc.reason
    return results, big


def test_blob_fetch_over_the_mesh(tmp_path):
    store = LocalBlobStore(tmp_path)
    rejects = []
    service = BlobService(store, EnvelopeVerifier(DIRECTORY, HOLDER.ss58_address), rejects.append)
    results, big = trio.run(_pair, store, service.handle)
    assert results["big"] == big
    assert results["missing"] == "not_found"
    assert results["stranger"] == "unknown_signer" and rejects == ["unknown_signer"]


def test_asker_detects_a_holder_that_sends_the_wrong_bytes(tmp_path):
    store = LocalBlobStore(tmp_path)

    async def lying_holder(peer_id, payload):
        return b"\x00" + b"not what you asked for"

    async def run():
        async with Mesh.open(MeshConfig(mesh_id="blobs"), os.urandom(32)) as holder:
            holder.set_stream_handler(BLOB_PROTOCOL, lying_holder, max_request_bytes=1024)
            async with Mesh.open(MeshConfig(mesh_id="blobs", bootstrap=(holder.listen_addrs[0],)),
                                 os.urandom(32)) as asker:
                try:
                    await fetch_blob(asker, ASKER, peer_id=holder.peer_id,
                                     peer_hotkey=HOLDER.ss58_address, cid=store.put(b"real"),
                                     max_bytes=1024)
                except BlobCorrupt as exc:
                    return exc

    assert "has sha256" in str(trio.run(run))
