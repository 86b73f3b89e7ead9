"""Chunked blob transfers on real libp2p hosts: several holders at once, a lying holder
dropped at its first bad chunk, a cut stream and a restarted fetcher resumed from the
partial file, small blobs still in one request (docs/storage.md "Chunked transfers")."""

import dataclasses
import io
import logging
import os
import socket
import sys

import pytest
import trio

from crypto.identity import Hotkey
from node.blobs import (BLOB_PROTOCOL, MAX_BLOB_REQUEST_BYTES, BlobFetchError, BlobService, Holder, TransferStats,
                        TransferTiming, fetch_from_holders)
from node.mesh import Mesh, MeshConfig
from node.storage import LocalBlobStore, content_id as _cid
from protocol.blob_messages import CHUNK_BYTES, BadManifest, BlobChunkRequest, BlobManifest, manifest_of
from protocol.epistula import EnvelopeVerifier
from protocol.epistula import Envelope
from protocol.messages import decode
from protocol.membership import Member, Role, StaticDirectory

ALICE, CHARLIE, ASKER = (Hotkey.from_uri(u) for u in ("//Alice", "//Charlie", "//Bob"))
DIRECTORY = StaticDirectory(tuple(Member(k.ss58_address, frozenset({Role.VALIDATOR}))
                                  for k in (ALICE, CHARLIE, ASKER)))
FAST = TransferTiming(request_floor_s=2.0, retry_backoff_s=(0.2, 0.5, 1.0, 1.0, 1.0))
PATIENT = TransferTiming(request_floor_s=2.0, retry_backoff_s=(0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0))  # a holder restarting


def _service(root, hotkey, cls=BlobService):
    return cls(LocalBlobStore(root), EnvelopeVerifier(DIRECTORY, hotkey.ss58_address))


class _Counting:
    """A holder's handler that counts the chunk bytes asked of it (served or not)."""

    def __init__(self, service):
        self.service, self.asked = service, []

    async def __call__(self, peer_id, payload):
        message = decode(Envelope.from_gossip_bytes(payload).body)
        if isinstance(message, BlobChunkRequest):
            self.asked.append(message.index)
            await self.before_chunk(message.index)
        return await self.service.handle(peer_id, payload)

    async def before_chunk(self, index):
        pass


async def _holder(handler):
    mesh_cm = Mesh.open(MeshConfig(mesh_id="chunks"), os.urandom(32))
    mesh = await mesh_cm.__aenter__()
    mesh.set_stream_handler(BLOB_PROTOCOL, handler, MAX_BLOB_REQUEST_BYTES)
    return mesh, mesh_cm


def _blob(n_chunks, tail=12345):
    return os.urandom(n_chunks * CHUNK_BYTES + tail)


def test_manifest_decoding_is_strict():
    manifest = manifest_of(_blob(2))
    assert BlobManifest.decode(manifest.encode(), max_size=1 << 30) == manifest
    import msgpack
    for bad in ({"size": manifest.size, "chunk_bytes": 4096, "hashes": list(manifest.chunk_hashes)},
                {"size": manifest.size, "chunk_bytes": CHUNK_BYTES, "hashes": list(manifest.chunk_hashes)[:2]},
                {"size": manifest.size, "chunk_bytes": CHUNK_BYTES, "hashes": [b"x"] * 3},
                {"size": -1, "chunk_bytes": CHUNK_BYTES, "hashes": []},
                {"size": manifest.size, "chunk_bytes": CHUNK_BYTES, "hashes": list(manifest.chunk_hashes), "x": 1}):
        with pytest.raises(BadManifest):
            BlobManifest.decode(msgpack.packb(bad, use_bin_type=True), max_size=1 << 30)
    with pytest.raises(BadManifest, match="over the"):
        BlobManifest.decode(manifest.encode(), max_size=manifest.size - 1)


def _run_with_holders(tmp_path, blob, handlers_for, body):
    """Open a holder per handler factory (each with the blob in its store), then the asker."""

    async def main():
        async with trio.open_nursery() as nursery:
            opened, holders = [], []
            for i, (hotkey, make) in enumerate(handlers_for):
                service = _service(tmp_path / f"holder{i}", hotkey, make[0])
                service.store.put(blob)
                handler = make[1](service)
                mesh, cm = await _holder(handler)
                opened.append(cm)
                holders.append((Holder(mesh.peer_id, hotkey.ss58_address), service, handler, mesh))
            try:
                config = MeshConfig(mesh_id="chunks", bootstrap=tuple(h[3].listen_addrs[0] for h in holders))
                async with Mesh.open(config, os.urandom(32)) as asker:
                    return await body(asker, holders)
            finally:
                for cm in reversed(opened):
                    await cm.__aexit__(None, None, None)

    return trio.run(main)


def test_a_big_blob_comes_in_chunks_from_two_holders_at_once(tmp_path):
    blob = _blob(6)
    stats = TransferStats()

    async def body(asker, holders):
        return await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                        holders=[h[0] for h in holders], partial_dir=tmp_path / "partial",
                                        timing=FAST, stats=stats)

    got = _run_with_holders(tmp_path, blob, [(ALICE, (BlobService, _Counting)), (CHARLIE, (BlobService, _Counting))],
                            body)
    assert got == blob
    assert stats.chunks == 7 and stats.chunks_fetched == 7 and stats.bad_chunks == 0
    assert set(stats.by_holder) == {ALICE.ss58_address, CHARLIE.ss58_address}, stats.by_holder
    assert not list((tmp_path / "partial").iterdir()), "the partial file is removed once the blob is whole"


class _LyingService(BlobService):
    def chunk(self, cid, index):
        data = bytearray(super().chunk(cid, index))
        data[len(data) // 2] ^= 0xFF
        return bytes(data)


def test_a_holder_serving_a_bad_chunk_is_dropped_at_that_chunk_and_the_other_finishes(tmp_path):
    blob = _blob(5)
    stats = TransferStats()

    async def body(asker, holders):
        data = await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                        holders=[h[0] for h in holders], partial_dir=tmp_path / "partial",
                                        timing=FAST, stats=stats)
        return data, [h[2].asked for h in holders]

    got, (liar_asked, honest_asked) = _run_with_holders(
        tmp_path, blob, [(ALICE, (_LyingService, _Counting)), (CHARLIE, (BlobService, _Counting))], body)
    assert got == blob
    assert stats.bad_chunks == 1 and len(liar_asked) == 1, "the liar costs one chunk, then is asked nothing"
    assert ALICE.ss58_address not in stats.by_holder and stats.by_holder[CHARLIE.ss58_address] == 6
    assert sorted(honest_asked) == list(range(6))


class _FalseManifestService(BlobService):
    """Answers the manifest of other bytes of the same size (and serves those bytes)."""

    def manifest(self, cid):
        return manifest_of(self.fake)

    def chunk(self, cid, index):
        start, end = self.manifest(cid).chunk_range(index)
        return self.fake[start:end]


def test_a_holder_with_a_false_manifest_is_outvoted_and_asked_for_no_chunk(tmp_path):
    blob = _blob(3)
    stats = TransferStats()

    def liar(service):
        service.fake = os.urandom(len(blob))
        return _Counting(service)

    async def body(asker, holders):
        data = await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                        holders=[h[0] for h in holders], partial_dir=tmp_path / "partial",
                                        timing=FAST, stats=stats)
        return data, [h[2].asked for h in holders]

    got, (liar_asked, *honest_asked) = _run_with_holders(
        tmp_path, blob, [(ALICE, (_FalseManifestService, liar)), (CHARLIE, (BlobService, _Counting)),
                         (ASKER, (BlobService, _Counting))], body)
    assert got == blob and liar_asked == [] and stats.bad_chunks == 0
    assert sorted(honest_asked[0] + honest_asked[1]) == list(range(4))


def test_a_lone_false_manifest_is_caught_by_the_whole_blob_check(tmp_path):
    blob = _blob(2)

    def liar(service):
        service.fake = os.urandom(len(blob))
        return _Counting(service)

    async def body(asker, holders):
        with pytest.raises(BlobFetchError, match="assembled from its manifest"):
            await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20, holders=[holders[0][0]],
                                     partial_dir=tmp_path / "partial", timing=FAST)
        return holders[0][2].asked

    asked = _run_with_holders(tmp_path, blob, [(ALICE, (_FalseManifestService, liar))], body)
    assert sorted(asked) == [0, 1, 2], "a false manifest costs the whole blob, once"
    assert not list((tmp_path / "partial").iterdir()), "and its partial file is dropped"


def test_a_small_blob_still_comes_in_one_request(tmp_path):
    blob = os.urandom(CHUNK_BYTES - 100)

    async def body(asker, holders):
        data = await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                        holders=[h[0] for h in holders], partial_dir=tmp_path / "partial")
        return data, holders[0][1].served

    got, served = _run_with_holders(tmp_path, blob, [(ALICE, (BlobService, _Counting)),
                                                     (CHARLIE, (BlobService, _Counting))], body)
    assert got == blob and dict(served) == {"whole": 1}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cut_stream_resumes_from_the_partial_file_with_at_most_one_chunk_resent(tmp_path):
    """The holder goes away while chunk 3 is on its way and comes back on the same address:
    the fetch goes on from chunk 3, and only that chunk is asked for twice."""
    blob, seed, port = _blob(7), os.urandom(32), _free_port()
    root = tmp_path / "holder"
    LocalBlobStore(root).put(blob)
    stats = TransferStats()
    asked = []

    class CutAtThree(_Counting):
        async def before_chunk(self, index):
            if index == 3 and asked.count(3) == 0:
                asked.append(3)
                self.cut.set()
                await trio.sleep_forever()
            asked.append(index)

    async def holder_life(cut, task_status=trio.TASK_STATUS_IGNORED):
        handler = CutAtThree(_service(root, ALICE))
        handler.cut = cut
        async with Mesh.open(MeshConfig(mesh_id="chunks", listen_port=port), seed) as holder:
            holder.set_stream_handler(BLOB_PROTOCOL, handler, MAX_BLOB_REQUEST_BYTES)
            task_status.started(holder)
            await cut.wait()
            await trio.sleep(0.2)  # chunk 3's stream is open and waiting when the host goes

    async def main():
        async with trio.open_nursery() as nursery:
            first_cut = trio.Event()
            holder = await nursery.start(holder_life, first_cut)
            config = MeshConfig(mesh_id="chunks", bootstrap=(holder.listen_addrs[0],))
            async with Mesh.open(config, os.urandom(32)) as asker:
                holders = [Holder(holder.peer_id, ALICE.ss58_address)]

                async def come_back():
                    await first_cut.wait()
                    await trio.sleep(1.0)
                    await nursery.start(holder_life, trio.Event())  # never cut: ends with the nursery
                nursery.start_soon(come_back)
                result.append(await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                                       holders=holders, partial_dir=tmp_path / "partial",
                                                       timing=PATIENT, stats=stats))
            nursery.cancel_scope.cancel()

    result = []
    trio.run(main)
    assert result == [blob]
    assert asked.count(3) == 2 and sorted(set(asked)) == list(range(8))
    resent = sum(manifest_of(blob).chunk_length(i) for i in asked) - len(blob)
    assert resent <= CHUNK_BYTES, f"{resent} bytes asked for twice"
    assert stats.failed_requests >= 1 and stats.chunks_fetched == 8


def test_a_restarted_fetcher_resumes_from_its_partial_file(tmp_path):
    blob = _blob(6)
    partial = tmp_path / "partial"
    first, second = TransferStats(), TransferStats()

    class StopAfterThree(_Counting):
        async def before_chunk(self, index):
            if len(self.asked) == 4:  # chunks 0-2 are in; the fetcher "dies" asking for 3
                self.stop.set()
                await trio.sleep(5)

    async def body(asker, holders):
        (holder, _service_, handler, _mesh) = holders[0]
        handler.stop = trio.Event()
        async with trio.open_nursery() as nursery:
            async def kill_when_told():
                await handler.stop.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(kill_when_told)
            await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20, holders=[holder],
                                     partial_dir=partial, timing=FAST, stats=first)
        asked_before = list(handler.asked)
        assert (partial / _cid(blob)).exists(), "a cancelled fetch keeps its partial file"
        handler.before_chunk = _noop
        data = await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20, holders=[holder],
                                        partial_dir=partial, timing=FAST, stats=second)
        return data, asked_before, handler.asked[len(asked_before):]

    got, before, after = _run_with_holders(tmp_path, blob, [(ALICE, (BlobService, StopAfterThree))], body)
    assert got == blob
    assert before == [0, 1, 2, 3] and first.chunks_fetched == 3
    assert second.chunks_on_disk == 3 and after == [3, 4, 5, 6], "only the missing chunks are asked for again"


async def _noop(index):
    pass


def test_every_holder_failing_is_one_fetch_error(tmp_path):
    blob = _blob(2)

    async def body(asker, holders):
        with pytest.raises(BlobFetchError):
            await fetch_from_holders(asker, ASKER, cid="0" * 64, max_bytes=64 << 20,
                                     holders=[h[0] for h in holders], partial_dir=tmp_path / "partial", timing=FAST)

    _run_with_holders(tmp_path, blob, [(ALICE, (BlobService, _Counting))], body)


# ---- a shaped link between two machines (network namespaces) -------------------------
#
# This file is also the two programs that run there: `python tests/test_blob_chunks.py
# holder ...` and `... fetcher ...`, each in its own namespace (tests/netns.py).

def _shaped_link_case(tmp_path, *, size, rate):
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests import netns

    why = netns.available()
    if why is not None:
        pytest.skip(f"no namespaces: {why}")
    blob = os.urandom(size)
    cid, seed, port = _cid(blob), os.urandom(32).hex(), 4101
    LocalBlobStore(tmp_path / "holder").put(blob)
    asked, ready, result = tmp_path / "asked.txt", tmp_path / "ready.json", tmp_path / "result.json"
    script = os.path.abspath(__file__)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(script))}
    with netns.Lan(["holder", "fetcher"]) as lan:
        # Both directions of the fetcher's link: its own egress (requests, ACKs) in its
        # namespace, and the bridge port's egress towards it, which is where the blob goes.
        shape = ["tc", "qdisc", "add", "dev", "{dev}", "root", "tbf", "rate", rate, "burst", "32kbit",
                 "latency", "400ms"]
        lan.run("fetcher", [a.format(dev="eth0") for a in shape], check=True)
        subprocess.run(["ip", "netns", "exec", lan.hub, *[a.format(dev="v1") for a in shape]], check=True)
        holder_argv = [sys.executable, script, "holder", str(tmp_path / "holder"), seed, lan.ip("holder"), str(port),
                       str(asked), str(ready)]

        def start_holder():
            ready.unlink(missing_ok=True)
            lan.start("holder", holder_argv, tmp_path / "holder.log", env=env)
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert time.monotonic() < deadline, (tmp_path / "holder.log").read_text()[-3000:]
                time.sleep(0.1)
            return json.loads(ready.read_text())

        peer = start_holder()
        fetcher = lan.start("fetcher", [sys.executable, script, "fetcher", peer["addr"], peer["peer_id"], cid,
                                        str(tmp_path / "fetcher-partial"), str(result),
                                        lan.ip("fetcher")], tmp_path / "fetcher.log",
                            env=env)
        chunks = manifest_of(blob).chunks
        deadline = time.monotonic() + size * 8 / 1e5  # 10x the link's time for the blob
        while _asked_count(asked) < chunks // 2:
            assert time.monotonic() < deadline and fetcher.poll() is None, (tmp_path / "fetcher.log").read_text()
            time.sleep(0.05)
        cut_at = time.monotonic()
        asked_at_cut = _asked_count(asked)
        lan.stop("holder", sig=signal.SIGKILL)  # mid-chunk: the stream and the connection die with it
        start_holder()
        outage_s = time.monotonic() - cut_at
        fetcher.wait(timeout=max(1.0, deadline - time.monotonic()))
        log = (tmp_path / "fetcher.log").read_text()
        assert fetcher.returncode == 0, log[-4000:]
    report = json.loads(result.read_text())
    asks = [(int(i), float(t)) for i, t in (line.split() for line in asked.read_text().splitlines())]
    indices = [i for i, _ in asks]
    manifest = manifest_of(blob)
    resent = sum(manifest.chunk_length(i) for i in indices) - size
    assert sorted(set(indices)) == list(range(chunks)) and report["cid_ok"]
    assert 0 <= resent <= CHUNK_BYTES, f"{resent} bytes asked for again after the cut"
    # Throughput on the shaped link, apart from the outage: before the cut, chunks asked
    # one after another (each ask is the previous chunk's end); after it, from the first
    # ask of the restarted holder to the fetcher's end.
    cut = asked_at_cut
    before_bytes = sum(manifest.chunk_length(i) for i, _ in asks[:cut - 1])
    before_mbit = before_bytes * 8 / 1e6 / (asks[cut - 1][1] - asks[0][1])
    after_bytes = sum(manifest.chunk_length(i) for i, _ in asks[cut:])
    after_mbit = after_bytes * 8 / 1e6 / (report["finished"] - asks[cut][1])
    print(f"\nshaped link {rate}: {size / 1e6:.1f} MB in {report['seconds']:.1f}s; before the cut "
          f"{before_mbit:.2f} Mbit/s, after it {after_mbit:.2f} Mbit/s; holder down {outage_s:.1f}s, fetch resumed "
          f"{asks[cut][1] - asks[cut - 1][1]:.1f}s after the cut chunk was asked; resent {resent} bytes "
          f"({resent / CHUNK_BYTES:.2f} chunk); failed requests {report['failed_requests']}")
    print("\n".join(line for line in log.splitlines() if "sealmesh.blobs" in line))
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_a_cut_stream_on_a_shaped_link_resumes_without_starting_over(tmp_path):
    _shaped_link_case(tmp_path, size=6 << 20, rate="16mbit")


@pytest.mark.slow
def test_a_40_mb_blob_over_a_4_mbit_link_cut_halfway_resumes(tmp_path):
    _shaped_link_case(tmp_path, size=40_000_000, rate="4mbit")


def _run_holder(store_dir, seed_hex, host, port, asked_path, ready_path):
    import json
    import time

    class Logging(_Counting):
        async def before_chunk(self, index):
            with open(asked_path, "a") as f:
                f.write(f"{index} {time.time():.3f}\n")

    async def main():
        handler = Logging(_service(store_dir, ALICE))
        async with Mesh.open(MeshConfig(mesh_id="chunks", listen_host=host, listen_port=int(port)),
                             bytes.fromhex(seed_hex)) as holder:
            holder.set_stream_handler(BLOB_PROTOCOL, handler, MAX_BLOB_REQUEST_BYTES)
            tmp = ready_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"addr": holder.listen_addrs[0], "peer_id": holder.peer_id}, f)
            os.replace(tmp, ready_path)
            await trio.sleep_forever()

    trio.run(main)


def _asked_count(path):
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _run_fetcher(addr, peer_id, cid, partial_dir, result_path, host):
    import json
    import logging
    import time
    from pathlib import Path

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sealmesh.blobs").setLevel(logging.INFO)
    stats = TransferStats()

    async def main():
        async with Mesh.open(MeshConfig(mesh_id="chunks", listen_host=host, bootstrap=(addr,)),
                             os.urandom(32)) as fetcher:
            started = time.monotonic()
            data = await fetch_from_holders(fetcher, ASKER, cid=cid, holders=[Holder(peer_id, ALICE.ss58_address)],
                                            max_bytes=1 << 30, partial_dir=Path(partial_dir), stats=stats)
            seconds = time.monotonic() - started
        with open(result_path, "w") as f:
            json.dump({"seconds": seconds, "finished": time.time(), "cid_ok": _cid(data) == cid, "chunks": stats.chunks,
                       "chunks_fetched": stats.chunks_fetched, "bytes_fetched": stats.bytes_fetched,
                       "failed_requests": stats.failed_requests}, f)

    trio.run(main)


if __name__ == "__main__":
    import sys
    {"holder": _run_holder, "fetcher": _run_fetcher}[sys.argv[1]](*sys.argv[2:])


class _Slow(_Counting):
    async def before_chunk(self, index):
        await trio.sleep(0.3)  # a slow link: the transfer lasts long enough to be drawn


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_large_transfer_draws_a_progress_bar_on_a_terminal_and_logs_elsewhere(tmp_path, monkeypatch, caplog):
    blob = _blob(6)
    timing = dataclasses.replace(FAST, progress_min_bytes=0, progress_every_s=0.6)

    async def body(asker, holders):
        return await fetch_from_holders(asker, ASKER, cid=_cid(blob), max_bytes=64 << 20,
                                        holders=[holders[0][0]], partial_dir=tmp_path / "partial", timing=timing)

    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    caplog.set_level(logging.INFO, logger="sealmesh.blobs")
    assert _run_with_holders(tmp_path, blob, [(ALICE, (BlobService, _Slow))], body) == blob
    frames = [f.strip() for f in screen.getvalue().split("\r") if f.strip()]
    assert all(f.startswith(f"blob {_cid(blob)[:12]} [") for f in frames), frames
    assert len(frames) >= 3 and frames[-1].split("]")[1].strip().startswith("100%"), frames
    assert " MiB/s" in frames[0] and screen.getvalue().endswith("\n")
    assert any("MiB (" in r.getMessage() and "Mbit/s" in r.getMessage() for r in caplog.records)  # the log too

    quiet = io.StringIO()  # a daemon's stderr into a file: no bar, only the log lines
    monkeypatch.setattr(sys, "stderr", quiet)
    (tmp_path / "again").mkdir()
    assert _run_with_holders(tmp_path / "again", blob, [(ALICE, (BlobService, _Slow))], body) == blob
    assert quiet.getvalue() == ""
