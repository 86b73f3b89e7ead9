"""Issue 11, finding 12: the key ceremony's traffic was plain, unauthenticated HTTP.

Every test runs real members (node/keygen.py over node/keygen_transport.py's sealed
Pool, real aiohttp servers on loopback) and attacks them from the network:

- a passive observer: a TCP proxy in front of every member records every byte both
  ways, and the test searches the recording for the key material that crossed it;
- an active one: unsigned and forged requests, requests replayed byte for byte, bytes
  flipped in transit, a genuine sender's frame with its ciphertext altered.

The fast tests run the conversion (hello, degree reduction, verification keys,
self-test) over the sealed channels on TNO shares made in-process with known primes
(tests/test_keygen.simulate_tno); the slow one runs the whole 3-process ceremony,
TNO's modulus search included, through the recording proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgpack
import pytest

from crypto import dkg, paillier
from crypto.identity import Hotkey
from node import keygen
from node.keygen_transport import REFUSED_HEADER, SealedPool
from protocol.epistula import Envelope, seal as epistula_seal
from protocol.keygen_channel import KeygenChannel
from tests.test_keygen import BITS, CONTEXT, HOTKEYS, ROSTER, simulate_tno

OUTSIDER = Hotkey.from_uri("//keygen-outsider")


# ---------------------------------------------------------------------------------------
# The observer: a recording TCP proxy in front of each member


@dataclass
class Recording:
    to_server: list[bytearray] = field(default_factory=list)  # one per connection
    to_client: list[bytearray] = field(default_factory=list)

    @property
    def everything(self) -> bytes:
        return b"".join(bytes(b) for b in self.to_server + self.to_client)

    def request_bodies(self) -> list[bytes]:
        """The bodies of the HTTP requests it saw (aiohttp sends Content-Length)."""
        bodies = []
        for stream in self.to_server:
            data, pos = bytes(stream), 0
            while (end := data.find(b"\r\n\r\n", pos)) != -1:
                head = data[pos:end].decode("latin-1")
                length = re.search(r"(?im)^content-length:\s*(\d+)", head)
                size = int(length.group(1)) if length else 0
                bodies.append(data[end + 4:end + 4 + size])
                pos = end + 4 + size
        return bodies


async def _proxy(listen_port: int, target_port: int, recording: Recording) -> asyncio.Server:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   log: bytearray) -> None:
        try:
            while chunk := await reader.read(65536):
                log += chunk
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        up, down = bytearray(), bytearray()
        recording.to_server.append(up)
        recording.to_client.append(down)
        await asyncio.gather(pipe(client_r, server_w, up), pipe(server_r, client_w, down))

    return await asyncio.start_server(connection, "127.0.0.1", listen_port)


def encodings(value: int) -> list[bytes]:
    """Every way the ceremony's serializers could put an integer on the wire."""
    size = (value.bit_length() + 8) // 8
    return [value.to_bytes(size, "little", signed=True), value.to_bytes(size, "big", signed=True),
            str(value).encode(), f"{value:x}".encode()]


def found(value: int, haystack: bytes) -> bool:
    return any(e in haystack for e in encodings(value))


# ---------------------------------------------------------------------------------------
# Three members in one event loop, each behind its recording proxy


@dataclass
class Members:
    settings: dict[int, keygen.KeygenSettings]
    pools: dict[int, SealedPool]
    recording: Recording
    servers: list[asyncio.Server]

    def url(self, member: int) -> str:
        host, port = self.settings[member].listen
        return f"http://{host}:{port}"


def _plain_tno_pool(listen: int, advertised: list[int], me: int) -> Any:
    """The transport before the fix: TNO's own Pool, plain HTTP, senders told apart by
    source IP and port cookie (the advertised port, since a proxy sits in front)."""
    import warnings

    from tno.mpc.communication import Pool

    pool = Pool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pool.add_http_server(port=listen, addr="127.0.0.1", external_port=advertised[me - 1])
    for j in (1, 2, 3):
        if j != me:
            pool.add_http_client(keygen._name(j), "127.0.0.1", advertised[j - 1])
    return pool


@contextlib.asynccontextmanager
async def members(tmp_path: Path, *, proxied: bool = True, sealed: bool = True):
    listen = keygen.free_ports(3)
    advertised = keygen.free_ports(3) if proxied else listen
    recording = Recording()
    servers = [await _proxy(a, b, recording) for a, b in zip(advertised, listen)] if proxied else []
    member_list = tuple(("127.0.0.1", p) for p in advertised)
    settings, pools = {}, {}
    for i in (1, 2, 3):
        settings[i] = keygen.KeygenSettings(
            index=i, members=member_list, threshold=2, bits=BITS, out_dir=tmp_path / f"m{i}",
            allow_weak=True, hotkeys=ROSTER, hotkey=HOTKEYS[i - 1],
            listen=("127.0.0.1", listen[i - 1]))
        if not sealed:
            pools[i] = _plain_tno_pool(listen[i - 1], advertised, i)
            continue
        pool = SealedPool(KeygenChannel(HOTKEYS[i - 1], settings[i].roster, i))
        pool.add_http_server(port=listen[i - 1], addr="127.0.0.1")
        for j in (1, 2, 3):
            if j != i:
                pool.add_member(keygen._name(j), j, "127.0.0.1", advertised[j - 1])
        pools[i] = pool
    await asyncio.sleep(0.2)  # the servers' start tasks
    for pool in pools.values():
        if sealed:
            pool.start_announcing()
    try:
        yield Members(settings, pools, recording, servers)
    finally:
        for pool in pools.values():
            await pool.shutdown()
        for server in servers:
            server.close()


async def _keys_exchanged(m: Members, limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        for pool in m.pools.values():
            for client in pool.by_member.values():
                await client.key_arrived.wait()


def _tno_result(ceremony: dict, member: int) -> Any:
    """What TNO's DistributedPaillier leaves a member, from the in-process simulation."""
    share = SimpleNamespace(shares={member: ceremony["tno_shares"][member]})
    return SimpleNamespace(public_key=SimpleNamespace(n=ceremony["modulus"]), index=member,
                           party_indices={"self": member, **{keygen._name(j): j for j in (1, 2, 3)
                                                             if j != member}},
                           secret_key=SimpleNamespace(share=share, theta=ceremony["theta"]))


async def _conversion(m: Members, ceremony: dict, member: int) -> tuple[Any, Any]:
    """hello, degree reduction, verification keys and self-test, as node/keygen.py runs them."""
    settings, pool, progress = m.settings[member], m.pools[member], keygen.Progress()
    keygen._progress.set(progress)
    await keygen._hello(settings, pool, progress)
    scheme = _tno_result(ceremony, member)
    secret = await keygen._reduce_degree(settings, pool, scheme, progress)
    public = paillier.PublicKey(ceremony["modulus"])
    scale = dkg.plaintext_scale(settings.parameters, ceremony["modulus"], ceremony["theta"])
    session = keygen._session_tag(settings, ceremony["modulus"], 7)
    return await keygen._verify(settings, pool, public, secret, scale, session, progress)


@pytest.fixture(scope="module")
def tno_output() -> dict:
    params = dkg.CeremonyParameters(3, 2, BITS)
    modulus, tno_shares, theta = simulate_tno(params)
    return {"params": params, "modulus": modulus, "tno_shares": tno_shares, "theta": theta}


@pytest.fixture
def dealt(monkeypatch) -> list[dict[int, int]]:
    """Spy on crypto/dkg.deal_sub_shares (the real function runs): the sub-shares that
    each dealer sends to the other members."""
    seen: list[dict[int, int]] = []
    real = dkg.deal_sub_shares

    def recording(*args: Any, **kwargs: Any) -> dict[int, int]:
        pieces = real(*args, **kwargs)
        seen.append(dict(pieces))
        return pieces

    monkeypatch.setattr(dkg, "deal_sub_shares", recording)
    return seen


# ---------------------------------------------------------------------------------------
# The passive observer


def test_finding12_passive_observer_finds_no_sub_share_and_the_key_decrypts(
        tmp_path, tno_output, dealt):
    """Before (run here too, over TNO's plain Pool): the sub-shares H_i(j) crossed the
    wire as TNO-serialized integers in plain HTTP bodies, and the recording held every
    one sent to another member (with them the observer computes any member's share).
    After: none is in the recording of the sealed run, and the converted key still
    decrypts with any two members."""
    from tno.mpc.communication.serialization import Serialization

    async def scenario(sealed: bool) -> tuple[dict, Recording]:
        async with members(tmp_path, sealed=sealed) as m:
            results = await asyncio.gather(*(_conversion(m, tno_output, i) for i in (1, 2, 3)))
            return dict(zip((1, 2, 3), results)), m.recording

    # The same conversion over TNO's plain Pool (the transport before the fix): the
    # observer reads every sub-share a dealer sent to another member.
    _, plain = asyncio.run(scenario(sealed=False))
    sent_plain = [piece for pieces in dealt for j, piece in pieces.items()]
    assert len(sent_plain) == 9
    readable = [v for v in sent_plain if found(v, plain.everything)]
    assert len(readable) == 6  # every dealer's pieces for the two others (its own stays home)
    dealt.clear()

    results, recording = asyncio.run(scenario(sealed=True))
    secrets_sent = [piece for pieces in dealt for j, piece in pieces.items()]
    assert len(dealt) == 3 and len(secrets_sent) == 9
    traffic = recording.everything
    assert len(recording.request_bodies()) >= 12  # announces, hellos, sub-shares, keys
    # The search works: the message as TNO would have posted it in the clear is found.
    clear = Serialization.pack({"sub_share": secrets_sent[1]}, msg_id="x", use_pickle=False)
    assert found(secrets_sent[1], clear)
    leaked = [v for v in secrets_sent if found(v, traffic)]
    assert leaked == [], f"{len(leaked)} sub-shares readable on the wire"
    # Nor the members' final shares (never sent, not even sealed; a sanity check).
    assert not any(found(r[0].secret, traffic) for r in results.values())
    # The honest ceremony still works: any 2 of 3 decrypt.
    public = paillier.PublicKey(tno_output["modulus"])
    vks = results[1][1]
    scale = dkg.plaintext_scale(tno_output["params"], tno_output["modulus"], tno_output["theta"])
    m_ = secrets.randbelow(public.n)
    c = public.encrypt(m_)
    partials = {i: paillier.partial_decrypt(r[0], c, CONTEXT) for i, r in results.items()}
    for pair in ((1, 2), (1, 3), (2, 3)):
        assert dkg.combine(public, vks, 2, c, [partials[i] for i in pair], CONTEXT, scale) == m_


# ---------------------------------------------------------------------------------------
# The active attacker


async def _post(url: str, body: bytes, cookies: dict[str, str] | None = None
                ) -> tuple[int, str, str]:
    async with aiohttp.ClientSession(cookies=cookies) as session:
        async with session.post(url, data=body) as resp:
            return resp.status, resp.headers.get(REFUSED_HEADER, ""), await resp.text()


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def _nothing_delivered(pool: SealedPool) -> bool:
    return all(not c.buffer for c in pool.by_member.values())


def test_finding12_unsigned_forged_and_outsider_messages_are_refused(tmp_path):
    """Before (run here too, over TNO's plain Pool): member 1's server filed an outsider's
    POST from 127.0.0.1 with member 2's port cookie as member 2's sub-share. After: that
    and every forgery below is refused with its reason and nothing reaches TNO's
    buffers."""
    from tno.mpc.communication.serialization import Serialization

    async def scenario() -> dict[str, tuple[int, str, str]]:
        async with members(tmp_path, proxied=False) as m:
            await _keys_exchanged(m)
            target, me = m.url(1), m.pools[1].channel
            tno_plain = Serialization.pack({"sub_share": 12345}, msg_id="sealmesh-keygen-reduce",
                                           use_pickle=False)
            # A frame as member 2 would send it, but signed by someone else.
            honest_2 = m.pools[2].channel
            frame = msgpack.packb(honest_2.seal(1, tno_plain), use_bin_type=True)
            outsider = epistula_seal(OUTSIDER, frame, now_ms=_now_ms(), signed_for=ROSTER[0])
            forged = Envelope(outsider.version, outsider.timestamp_ms, outsider.uuid, ROSTER[1],
                              outsider.signed_for, outsider.signature, outsider.body)
            # Member 3 (a real member) claiming to be member 2 inside its frame.
            frame_as_2 = msgpack.packb(honest_2.seal(1, tno_plain), use_bin_type=True)
            impostor = epistula_seal(HOTKEYS[2], frame_as_2, now_ms=_now_ms(), signed_for=ROSTER[0])
            # Another ceremony's channel (same hotkeys, other addresses) talking to us.
            other = KeygenChannel(HOTKEYS[1], keygen.KeygenSettings(
                index=2, members=(("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)),
                threshold=2, bits=BITS, out_dir=tmp_path, allow_weak=True, hotkeys=ROSTER,
                hotkey=HOTKEYS[1]).roster, 2)
            outcomes = {
                "unsigned": await _post(target, tno_plain),
                "outsider": await _post(target, outsider.to_gossip_bytes()),
                "forged": await _post(target, forged.to_gossip_bytes()),
                "impostor": await _post(target, impostor.to_gossip_bytes()),
                "other_ceremony": await _post(target, other.announce(1, now_ms=_now_ms())),
                "stale": await _post(target, honest_2.sign(1, honest_2.seal(1, tno_plain),
                                                           now_ms=_now_ms() - 10 * 60_000)),
            }
            assert _nothing_delivered(m.pools[1])
            assert me.knows(2) and me.knows(3)
            return outcomes

    async def before() -> Any:
        """The same injection against TNO's plain Pool: an outsider on the member's host
        (or spoofing its address) sets member 2's port cookie and speaks for member 2."""
        async with members(tmp_path, proxied=False, sealed=False) as m:
            await asyncio.sleep(0.5)
            injected = Serialization.pack({"sub_share": 12345}, msg_id="sealmesh-keygen-reduce",
                                          use_pickle=False)
            host, port = m.settings[1].listen
            status = (await _post(f"http://{host}:{port}", injected,
                                  cookies={"server_port": str(m.settings[2].listen[1])}))[0]
            got = await asyncio.wait_for(m.pools[1].recv(keygen._name(2),
                                                         msg_id="sealmesh-keygen-reduce"), 5)
            return status, got

    assert asyncio.run(before()) == (200, {"sub_share": 12345})

    outcomes = asyncio.run(scenario())
    expected = {"unsigned": "malformed_envelope", "outsider": "unknown_signer",
                "forged": "bad_signature", "impostor": "wrong_sender",
                "other_ceremony": "wrong_ceremony", "stale": "stale_timestamp"}
    for attack, reason in expected.items():
        status, header, text = outcomes[attack]
        assert (status, header) == (401, reason), (attack, outcomes[attack])
        assert text.startswith(f"refused: {reason}: "), text


def test_finding12_replayed_and_tampered_messages_are_refused(tmp_path):
    """Before: a recorded request posted again was filed again (TNO's buffer takes any
    message id), and flipped bytes were unpacked as they came. After: a byte-for-byte replay is refused (replay), bytes
    flipped in transit break the signature (bad_signature), a ciphertext altered under a
    genuine signature does not authenticate (bad_ciphertext), and a frame re-signed by its
    own sender (a retry) is acknowledged but delivered once."""
    from tno.mpc.communication.serialization import Serialization

    async def scenario() -> dict[str, Any]:
        async with members(tmp_path) as m:
            await _keys_exchanged(m)
            sender, receiver = m.pools[2], m.pools[1]
            target = m.url(1)
            sender.asend(keygen._name(1), {"probe": 1}, msg_id="probe")
            first = await asyncio.wait_for(receiver.recv(keygen._name(2), msg_id="probe"), 10)
            recorded = [b for b in m.recording.request_bodies() if _sealed_for(b, ROSTER[0])]
            body = recorded[-1]
            out: dict[str, Any] = {"first": first, "replay": await _post(target, body)}
            # In transit: a request the receiver has not seen yet, one byte flipped.
            packed = Serialization.pack({"probe": 2}, msg_id="probe-2", use_pickle=False)
            fresh = sender.channel.sign(1, sender.channel.seal(1, packed), now_ms=_now_ms())
            flipped = bytearray(fresh)
            flipped[-3] ^= 0x01
            out["flipped"] = await _post(target, bytes(flipped))
            out["unflipped"] = await _post(target, fresh)  # the flip burnt nothing
            out["second"] = await asyncio.wait_for(
                receiver.recv(keygen._name(2), msg_id="probe-2"), 10)
            # A genuine signature over an altered ciphertext (a stolen hotkey, say).
            frame = sender.channel.seal(1, packed)
            frame["ciphertext"] = bytes([frame["ciphertext"][0] ^ 1]) + frame["ciphertext"][1:]
            out["bad_ciphertext"] = await _post(target, sender.channel.sign(1, frame,
                                                                            now_ms=_now_ms()))
            # The sender's own retry: the same frame under two fresh signatures.
            again = sender.channel.seal(
                1, Serialization.pack({"probe": 3}, msg_id="probe-3", use_pickle=False))
            out["retry"] = [await _post(target, sender.channel.sign(1, again, now_ms=_now_ms()))
                            for _ in range(2)]
            out["third"] = await asyncio.wait_for(
                receiver.recv(keygen._name(2), msg_id="probe-3"), 10)
            out["nothing_left"] = _nothing_delivered(receiver)
            return out

    out = asyncio.run(scenario())
    assert out["first"] == {"probe": 1}
    assert out["replay"][:2] == (401, "replay"), out["replay"]
    assert out["flipped"][:2] == (401, "bad_signature"), out["flipped"]
    assert out["unflipped"][0] == 200 and out["second"] == {"probe": 2}
    assert out["bad_ciphertext"][:2] == (401, "bad_ciphertext"), out["bad_ciphertext"]
    assert [r[0] for r in out["retry"]] == [200, 200]
    assert out["retry"][1][2] == "already received" and out["third"] == {"probe": 3}
    assert out["nothing_left"]  # the duplicate was not filed for a second recv


def _sealed_for(body: bytes, hotkey: str) -> bool:
    try:
        envelope = Envelope.from_gossip_bytes(body)
    except Exception:
        return False
    return envelope.signed_for == hotkey and msgpack.unpackb(envelope.body)["kind"] == "sealed"


# ---------------------------------------------------------------------------------------
# The whole ceremony, TNO's modulus search included, behind the recording proxies


# TNO keeps a per-process registry of session ids, so its members need one process each.
# This wrapper runs the CLI's member with two spies (the real functions run) that write
# every share the member dealt, sent or not, to a file once it exits.
_SPY = r"""
import json, sys
from pathlib import Path
from crypto import dkg
from tno.mpc.encryption_schemes.shamir import ShamirSecretSharingIntegers as IntegerShamir

dealt = []
real_share, real_deal = IntegerShamir.share_secret, dkg.deal_sub_shares

def share_secret(self, secret):
    sharing = real_share(self, secret)  # TNO's shares of lambda = phi(N) and beta
    dealt.extend(int(v) for v in sharing.shares.values())
    return sharing

def deal_sub_shares(*args, **kwargs):
    pieces = real_deal(*args, **kwargs)  # our degree-reduction sub-shares
    dealt.extend(pieces.values())
    return pieces

IntegerShamir.share_secret, dkg.deal_sub_shares = share_secret, deal_sub_shares
from node.keygen_cli import keygen_main
try:
    code = keygen_main(sys.argv[2:])
finally:
    Path(sys.argv[1]).write_text(json.dumps([str(v) for v in dealt]))
sys.exit(code)
"""


@pytest.mark.slow
def test_finding12_real_ceremony_leaks_no_share_to_an_observer(tmp_path):
    """Three member processes (the CLI) at 512 bits, each behind a recording proxy.
    Before: TNO's shares of λ and β and our sub-shares were plain integers in the HTTP
    bodies. After: none of them is in the recording, and the key decrypts."""
    listen, advertised = keygen.free_ports(3), keygen.free_ports(3)
    recording = Recording()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def proxies() -> None:
        asyncio.set_event_loop(loop)
        for a, b in zip(advertised, listen):
            loop.run_until_complete(_proxy(a, b, recording))
        ready.set()
        loop.run_forever()

    threading.Thread(target=proxies, daemon=True).start()
    assert ready.wait(10)
    hotkeys = [keygen.local_hotkey(tmp_path, i).ss58_address for i in (1, 2, 3)]
    member_list = ",".join(f"{k}@127.0.0.1:{p}" for k, p in zip(hotkeys, advertised))
    local = keygen.LocalCeremony(3, 2, BITS, tmp_path, allow_weak=True, heartbeat_s=5.0,
                                 stall_timeout_s=120.0, timeout_s=1500.0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = {}
    for i in (1, 2, 3):
        argv = keygen._member_argv(local, i, member_list)[3:]
        procs[i] = subprocess.Popen(
            [sys.executable, "-c", _SPY, str(tmp_path / f"dealt-{i}.json"), *argv,
             "--listen", f"127.0.0.1:{listen[i - 1]}"], env=env,
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"member-{i}.log", "wb"))
    try:
        codes = {i: p.wait(timeout=1600) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        loop.call_soon_threadsafe(loop.stop)
    assert codes == {1: 0, 2: 0, 3: 0}, codes
    loaded = {i: keygen.load_result(keygen.member_dir(tmp_path, i)) for i in (1, 2, 3)}
    public, vks = loaded[1]["public"], loaded[1]["verification_keys"]
    scale = loaded[1]["key_share"].plaintext_scale
    m_ = secrets.randbelow(public.n)
    c = public.encrypt(m_)
    partials = {i: paillier.partial_decrypt(r["key_share"].share, c, CONTEXT)
                for i, r in loaded.items()}
    for pair in ((1, 2), (1, 3), (2, 3)):
        assert dkg.combine(public, vks, 2, c, [partials[i] for i in pair], CONTEXT, scale) == m_
    traffic = recording.everything
    assert len(traffic) > 100_000  # the modulus search went through the proxies
    dealt = [int(v) for i in (1, 2, 3)
             for v in json.loads((tmp_path / f"dealt-{i}.json").read_text())]
    dealt = [v for v in dealt if v.bit_length() >= 64]
    # λ and β (3 shares each) and 3 sub-shares, from each of the 3 members
    assert len(dealt) >= 27, len(dealt)
    assert [v for v in dealt if found(v, traffic)] == []
    assert not any(found(r["key_share"].share.secret, traffic) for r in loaded.values())


def test_finding12_member_of_another_roster_is_named_promptly(tmp_path):
    """Two members whose --members differ (member 3's address) run different ceremonies:
    each refuses the other's signed frames as wrong_ceremony and stops within seconds
    with MemberMismatch naming the other, instead of waiting out the join timeout."""
    ports = keygen.free_ports(4)
    ours = tuple(("127.0.0.1", p) for p in ports[:3])
    theirs = ours[:2] + (("127.0.0.1", ports[3]),)
    errors: dict[int, BaseException] = {}

    def member(index: int, member_list: tuple) -> None:
        try:
            keygen.run_member(keygen.KeygenSettings(
                index=index, members=member_list, threshold=2, bits=BITS,
                out_dir=tmp_path / f"m{index}", allow_weak=True, heartbeat_s=0.5,
                hotkeys=ROSTER, hotkey=HOTKEYS[index - 1], join_timeout_s=120.0))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[index] = exc

    import time
    started = time.monotonic()
    other = threading.Thread(target=member, args=(2, theirs))
    other.start()
    member(1, ours)
    other.join(60)
    assert time.monotonic() - started < 60
    for me, them in ((1, "member-2"), (2, "member-1")):
        assert isinstance(errors[me], keygen.MemberMismatch), errors
        assert them in str(errors[me]) and "wrong_ceremony" in str(errors[me])
    assert keygen.read_state(tmp_path / "m1")["reason"] == "parameters_mismatch"
