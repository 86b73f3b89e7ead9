"""The committee's dealer-free key ceremony: one member per OS process, TNO's protocol.

Each member runs `run_member(settings)`: a hello round (everyone checks everyone's
parameters), TNO's distributed Paillier key generation, then the degree reduction,
verification keys and a self-test decryption (crypto/dkg.py holds the math). Every
message goes through TNO's Pool API over node/keygen_transport.py: signed by the
sender's hotkey, sealed for its one recipient, refused unless it comes from a roster
member (protocol/keygen_channel.py). The result is written atomically under the
member's directory:

    state.json          phase, pid, heartbeats; "finished" only after the key is on disk
    member_key.msgpack  0600: the member's secret share and everything public
    public.msgpack      what the member may publish: public key, verification keys, scale

A ceremony cannot resume mid-protocol (TNO keeps its secrets in memory), so a state left
at "running" by a dead process is reported as crashed, and a finished one is never run
again. TNO's Pool is asyncio + aiohttp, so this module runs one asyncio loop per process;
the node daemon (trio) never hosts it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

from crypto import dkg, paillier
from crypto.identity import is_valid_address
from node.files import write_atomic
from node.progress import PhaseProgress
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.keygen_channel import CeremonyRoster, KeygenChannel

log = logging.getLogger("sealmesh.keygen")

STATE_FILE = "state.json"
KEY_FILE = "member_key.msgpack"
PUBLIC_FILE = "public.msgpack"
RESULT_VERSION = 1
_HELLO = "sealmesh-keygen-hello"
_REDUCE = "sealmesh-keygen-reduce"
_VERIFY = "sealmesh-keygen-verify"
_PROBE_TIMEOUT_S = 5.0
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)


class KeygenError(Exception):
    """A ceremony that did not produce a key; `reason` is a stable label, the message says
    what to do next."""

    reason = "keygen"

    def __init__(self, hint: str, *, reason: str | None = None) -> None:
        super().__init__(hint)
        if reason is not None:
            self.reason = reason


class MemberVanished(KeygenError, RemoteProtocolError):
    reason = "member_vanished"


class MemberMismatch(KeygenError, RemoteProtocolError):
    reason = "parameters_mismatch"


class CeremonyTimeout(KeygenError):
    reason = "timeout"


class CeremonyInterrupted(KeygenError):
    reason = "interrupted"


class CeremonyCrashed(KeygenError, LocalProtocolError):
    reason = "crashed"


class CeremonyBusy(KeygenError, LocalProtocolError):
    reason = "already_running"


# ---------------------------------------------------------------------------------------
# Settings


def parse_members(text: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """"SS58@host:port,..." -> (hotkeys, ((host, port), ...)); member i is entry i (1-based).

    The hotkey is how the other members know a member: its messages must be signed by
    it, and the channel keys are bound to it (protocol/keygen_channel.py)."""
    hotkeys, members = [], []
    for item in (part.strip() for part in text.split(",")):
        hotkey, at, address = item.partition("@")
        host, sep, port = address.rpartition(":")
        if not at or not hotkey:
            raise KeygenError(f"member {item!r} has no hotkey: write SS58@host:port "
                              f"(`sealmesh wallet show` prints a member's SS58 address)",
                              reason="usage")
        if not is_valid_address(hotkey):
            raise KeygenError(f"member {item!r}: {hotkey!r} is not an SS58 address", reason="usage")
        if not sep or not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise KeygenError(f"member {item!r} is not SS58@host:port", reason="usage")
        hotkeys.append(hotkey)
        members.append((host, int(port)))
    if len(set(members)) != len(members):
        raise KeygenError("the member list names one host:port twice", reason="usage")
    if len(set(hotkeys)) != len(hotkeys):
        raise KeygenError("the member list names one hotkey twice", reason="usage")
    return tuple(hotkeys), tuple(members)


@dataclass(frozen=True)
class KeygenSettings:
    index: int  # 1-based position of this member in `members`
    members: tuple[tuple[str, int], ...]
    threshold: int  # members needed to decrypt
    bits: int
    out_dir: Path
    hotkeys: tuple[str, ...] = ()  # member i's SS58 hotkey is hotkeys[i - 1]
    hotkey: Any = field(default=None, repr=False)  # ours (crypto.identity.Hotkey): signs
    listen: tuple[str, int] | None = None  # bind here instead of our entry in `members`
    allow_weak: bool = False  # admits bits below 2048 (tests, measurements)
    timeout_s: float = 7200.0  # the whole ceremony
    stall_timeout_s: float = 60.0  # waiting on a member whose port refuses connections
    join_timeout_s: float = 300.0  # the same, before everybody has said hello
    heartbeat_s: float = 5.0
    batch_size: int = 100  # TNO: p, q candidates per round
    restart: bool = False  # start over after a crashed or failed ceremony

    def __post_init__(self) -> None:
        if not 1 <= self.index <= len(self.members):
            raise KeygenError(f"--index {self.index} not in 1..{len(self.members)}",
                              reason="usage")
        if self.bits not in paillier.SUPPORTED_BITS and not self.allow_weak:
            raise KeygenError(f"--bits {self.bits}: use one of {paillier.SUPPORTED_BITS} "
                              f"(or --allow-weak for tests)", reason="usage")
        self.parameters  # validates n, threshold and bits now, not after the hello
        if len(self.hotkeys) != len(self.members):
            raise KeygenError("every member needs a hotkey (--members SS58@host:port,...)",
                              reason="usage")
        if self.hotkey is None or self.hotkey.ss58_address != self.hotkeys[self.index - 1]:
            mine = getattr(self.hotkey, "ss58_address", None)
            raise KeygenError(f"member {self.index} is {self.hotkeys[self.index - 1]} in "
                              f"--members, but our hotkey is {mine}: check --index and the "
                              f"wallet", reason="usage")

    @property
    def roster(self) -> CeremonyRoster:
        return CeremonyRoster(self.hotkeys, tuple(f"{h}:{p}" for h, p in self.members))

    @property
    def parameters(self) -> dkg.CeremonyParameters:
        return dkg.CeremonyParameters(len(self.members), self.threshold, self.bits)

    def public_view(self) -> dict[str, Any]:
        """What every member must agree on before the protocol starts."""
        return {"members": [f"{k}@{h}:{p}" for k, (h, p) in zip(self.hotkeys, self.members)],
                "threshold": self.threshold,
                "bits": self.bits, "batch_size": self.batch_size,
                "stat_sec": self.parameters.stat_sec}


# ---------------------------------------------------------------------------------------
# Files: atomic writes and the state file


def read_state(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CeremonyCrashed(f"{out_dir / STATE_FILE} is unreadable ({exc}); move it away "
                              f"and start a new ceremony with --restart") from exc


def write_state(out_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(Path(out_dir) / STATE_FILE,
                  json.dumps(state, indent=1, sort_keys=True).encode(), 0o600)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_previous(out_dir: Path, restart: bool) -> dict[str, Any] | None:
    """The finished state if there is one (never redo it); raise if a ceremony is running
    here or died here and `restart` was not asked for; None if a new one may start."""
    state = read_state(out_dir)
    if state is None:
        return None
    status = state.get("status")
    if status == "finished":
        if not (Path(out_dir) / KEY_FILE).exists():
            raise CeremonyCrashed(f"{out_dir}: state says finished but {KEY_FILE} is gone; "
                                  f"restore it from a backup (a new ceremony makes a new key)")
        return state
    here = state.get("host") == socket.gethostname()
    if status == "running" and here and _pid_alive(state.get("pid")):
        raise CeremonyBusy(f"{out_dir}: a ceremony is running there (pid {state['pid']})")
    if restart:
        return None
    if status == "running":
        raise CeremonyCrashed(
            f"{out_dir}: the ceremony (pid {state.get('pid')}) died during phase "
            f"{state.get('phase')!r} after {state.get('elapsed_s', 0):.0f} s. It cannot resume "
            f"mid-protocol: rerun every member with --restart")
    raise CeremonyCrashed(
        f"{out_dir}: the last ceremony ended {status} ({state.get('error')}); rerun every "
        f"member with --restart", reason=f"previous_{status}")


def load_result(out_dir: Path) -> dict[str, Any]:
    """The finished ceremony's result: public key, verification keys, this member's
    dkg.DkgKeyShare, parameters and timings."""
    raw = msgpack.unpackb((Path(out_dir) / KEY_FILE).read_bytes(), raw=False)
    public = paillier.decode_public_key(raw["public_key"])
    vks = paillier.decode_verification_keys(public, raw["verification_keys"])
    return {**raw, "public": public, "verification_keys": vks,
            "key_share": dkg.decode_key_share(raw["key_share"])}


# ---------------------------------------------------------------------------------------
# Progress: TNO's phases, observed through a subclass


# The phases a member goes through, in order (its state file and the progress line name them).
CEREMONY_PHASES = ("hello", "indices", "modulus", "secret-key", "degree-reduction",
                   "verification-keys", "self-test", "writing")


@dataclass
class Progress:
    phase: str = "starting"
    round: int = 0  # TNO candidate rounds (batch_size p, q pairs each)
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    phase_times: dict[str, float] = field(default_factory=dict)
    on_change: Callable[["Progress"], None] | None = None  # a terminal line follows along

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        self.phase_times[self.phase] = round(
            self.phase_times.get(self.phase, 0.0) + now - self.phase_started, 3)
        self.phase, self.phase_started = phase, now
        log.info("keygen phase %s (%.1f s elapsed)", phase, self.elapsed)
        self._changed()

    def next_candidate_round(self) -> None:
        self.round += 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


_progress: contextvars.ContextVar[Progress] = contextvars.ContextVar("keygen_progress")


def _observed_paillier() -> type:
    # Imported here: TNO's import is slow (sympy) and only the ceremony needs it.
    from tno.mpc.protocols.distributed_keygen import DistributedPaillier

    class ObservedPaillier(DistributedPaillier):  # type: ignore[misc, valid-type]
        """TNO's protocol unchanged; its phase entries are reported to Progress."""

        @classmethod
        async def get_indices(cls, pool: Any) -> Any:
            _progress.get().enter("indices")
            return await super().get_indices(pool)

        @classmethod
        async def compute_modulus(cls, *args: Any, **kwargs: Any) -> int:
            _progress.get().enter("modulus")
            modulus = await super().compute_modulus(*args, **kwargs)
            _progress.get().enter("secret-key")  # sharing λ = φ(N) and β, then θ
            return modulus

        @classmethod
        async def _generate_pq(cls, *args: Any, **kwargs: Any) -> Any:
            _progress.get().next_candidate_round()
            return await super()._generate_pq(*args, **kwargs)

    return ObservedPaillier


# ---------------------------------------------------------------------------------------
# The watchdog: heartbeats, state updates, members that vanished


class _Watchdog:
    def __init__(self, settings: KeygenSettings, progress: Progress, pool: Any,
                 state: dict[str, Any]) -> None:
        self.settings, self.progress, self.pool, self.state = settings, progress, pool, state
        self.waiting_since: dict[str, float] = {}
        self.heard: set[str] = set()

    def _pending(self, name: str) -> bool:
        client = self.pool.pool_handlers[name]
        return any(isinstance(x, asyncio.Future) and not x.done() for x in client.buffer.values())

    async def _probe(self, name: str) -> str | None:
        """None if the member's port accepts a TCP connection; otherwise why not.

        TCP, not HTTP: the kernel accepts for a live process even while its event loop is
        busy in a long synchronous step of TNO's protocol (or starved of CPU), and an
        HTTP request would then time out and call a slow member dead.
        """
        client = self.pool.pool_handlers[name]
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(client.addr, client.port),
                                               _PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"no TCP answer within {_PROBE_TIMEOUT_S:.0f} s"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        writer.close()
        return None

    async def run(self) -> None:
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.settings.heartbeat_s))
            now = time.monotonic()
            self._check_refusals()
            await self._check_members(now)
            if now - last_beat >= self.settings.heartbeat_s:
                last_beat = now
                self._beat()

    async def _check_members(self, now: float) -> None:
        limit = (self.settings.join_timeout_s if self.progress.phase == "hello"
                 else self.settings.stall_timeout_s)
        for name in self.pool.pool_handlers:
            if not self._pending(name):
                self.waiting_since.pop(name, None)
                continue
            since = self.waiting_since.setdefault(name, now)
            if now - since < limit:
                continue
            why = await self._probe(name)
            if why is None:
                continue  # alive, only slow: the overall --timeout still applies
            client = self.pool.pool_handlers[name]
            raise MemberVanished(
                f"{name} ({client.addr}:{client.port}) sent nothing for {now - since:.0f} s "
                f"while we waited in phase {self.progress.phase!r}, and its port is "
                f"unreachable ({why}). The ceremony cannot go on without it: once it is back, "
                f"rerun every member with --restart")

    def _check_refusals(self) -> None:
        """A member whose messages we refuse (or that refuses ours) for a reason no retry
        cures runs another ceremony: stop now and name it, not after the stall timeout."""
        for refusal in getattr(self.pool, "refusals", ()):
            who = _name(refusal.member) if refusal.member else "a member"
            direction = "we refuse its messages" if refusal.by_us else "it refuses ours"
            raise MemberMismatch(f"{who} and we are not in the same ceremony ({direction}: "
                                 f"{refusal.reason}: {refusal.hint})")

    def _beat(self) -> None:
        p = self.progress
        waiting = sorted(self.waiting_since)
        waits = f", waiting for {', '.join(waiting)}" if waiting else ""
        log.info("keygen member %d: phase %s, round %d, %.1f s elapsed%s", self.settings.index,
                 p.phase, p.round, p.elapsed, waits)
        self.state.update(phase=p.phase, round=p.round, elapsed_s=round(p.elapsed, 3),
                          updated_at=time.time(), waiting_for=waiting)
        write_state(self.settings.out_dir, self.state)


# ---------------------------------------------------------------------------------------
# The ceremony


def _name(index: int) -> str:
    return f"member-{index}"


def _session_tag(settings: KeygenSettings, modulus: int, session_id: int) -> bytes:
    view = json.dumps(settings.public_view(), sort_keys=True).encode()
    return hashlib.sha256(b"%d|%d|" % (modulus, session_id) + view).digest()


async def _hello(settings: KeygenSettings, pool: Any, progress: Progress) -> None:
    progress.enter("hello")
    view = settings.public_view()
    sent = asyncio.ensure_future(
        pool.broadcast({"member": settings.index, "view": view}, msg_id=_HELLO))
    try:
        await _check_hellos(settings, pool, view)
    except MemberMismatch:
        # Let our hello reach the others first, so they name the mismatch too.
        await asyncio.wait({sent}, timeout=3.0)
        sent.cancel()
        raise
    except BaseException:
        sent.cancel()
        raise
    # On success `sent` may still be retrying to a member; it finishes on its own.


async def _check_hellos(settings: KeygenSettings, pool: Any, view: dict[str, Any]) -> None:

    async def hello_from(name: str) -> tuple[str, Any]:
        return name, await pool.recv(name, msg_id=_HELLO)

    # Checked as they arrive: a misconfigured member is named even while another is late.
    for arrival in asyncio.as_completed([hello_from(name) for name in pool.pool_handlers]):
        name, message = await arrival
        if not isinstance(message, dict) or message.get("view") != view:
            got = message.get("view") if isinstance(message, dict) else message
            raise MemberMismatch(f"{name} runs with {got!r}, we run with {view!r}: give every "
                                 f"member the same --members, --threshold, --bits and --batch-size")
        if message.get("member") != int(name.split("-")[1]):
            raise MemberMismatch(f"{name} believes it is member {message.get('member')!r}: "
                                 f"check each member's --index against --members")


async def _run_tno(settings: KeygenSettings, pool: Any, cls: type) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "key_length < 1024" warning; --allow-weak said so
        return await cls.from_security_parameter(
            pool, corruption_threshold=settings.parameters.corruption_threshold,
            key_length=settings.bits, stat_sec_shamir=settings.parameters.stat_sec,
            distributed=True, batch_size=settings.batch_size)


async def _reduce_degree(settings: KeygenSettings, pool: Any, scheme: Any,
                         progress: Progress) -> int:
    """This member's degree-t share s_j (crypto/dkg.py, step 1 and 2)."""
    progress.enter("degree-reduction")
    params, me = settings.parameters, settings.index
    modulus = scheme.public_key.n
    tno_of = {int(name.split("-")[1]) if name != "self" else me: idx
              for name, idx in scheme.party_indices.items()}
    dealers = [j for j, idx in tno_of.items() if idx in params.reduction_set]
    received: dict[int, int] = {}
    if me in dealers:
        own = scheme.secret_key.share.shares[scheme.index]
        pieces = dkg.deal_sub_shares(params, modulus, scheme.index, own)
        received[me] = pieces[me]
        for j in range(1, params.n_parties + 1):
            if j != me:
                pool.asend(_name(j), {"sub_share": pieces[j]}, msg_id=_REDUCE)
    for j in dealers:
        if j != me:
            message = await pool.recv(_name(j), msg_id=_REDUCE)
            received[j] = message.get("sub_share") if isinstance(message, dict) else message
    return dkg.combine_sub_shares(params, modulus, me, received)


async def _verify(settings: KeygenSettings, pool: Any, public: paillier.PublicKey,
                  secret: int, scale: int, session: bytes, progress: Progress
                  ) -> tuple[paillier.KeyShare, paillier.VerificationKeys]:
    """Exchange verification keys and one self-test partial decryption; any inconsistent
    member is named before anyone writes a key."""
    progress.enter("verification-keys")
    params, me = settings.parameters, settings.index
    v = dkg.verification_base(public, session)
    v_i = dkg.verification_key(public, v, secret, params.n_parties)
    share = paillier.KeyShare(public, me, params.threshold, params.n_parties, secret, v, v_i)
    m, c = dkg.self_test_ciphertext(public, session)
    context = b"sealmesh/keygen/self-test/" + session
    mine = paillier.partial_decrypt(share, c, context)
    pool.async_broadcast({"base": v, "key": v_i, "partial": paillier.encode_partial(public, mine)},
                         msg_id=_VERIFY)
    keys, partials = {me: v_i}, {me: mine}
    for name, message in await pool.recv_all(msg_id=_VERIFY):
        j = int(name.split("-")[1])
        if not isinstance(message, dict) or message.get("base") != v:
            raise dkg.BadPeerValue(j, "uses another verification base (another session?)",
                                   reason="verification_base")
        key = message.get("key")
        if type(key) is not int or not public.is_valid_ciphertext(key):
            raise dkg.BadPeerValue(j, "verification key is not in Z*_{n^2}",
                                   reason="verification_key")
        keys[j] = key
        try:
            partials[j] = paillier.decode_partial(public, params.n_parties, message.get("partial"))
        except paillier.PaillierError as exc:
            raise dkg.BadPeerValue(j, f"self-test partial: {exc}", reason="self_test") from exc
    vks = paillier.VerificationKeys(v, tuple(keys[j] for j in range(1, params.n_parties + 1)))
    dkg.check_verification_keys(public, vks, params.threshold)
    progress.enter("self-test")
    ordered = [partials[j] for j in range(1, params.n_parties + 1)]
    # Two different subsets (the first and the last `threshold` members) must both decrypt.
    for subset in (ordered[: params.threshold], ordered[-params.threshold:]):
        got = dkg.combine(public, vks, params.threshold, c, subset, context, scale)
        if got != m:
            raise dkg.DkgError("self-test decryption gave the wrong plaintext: the shares "
                               "do not fit together; rerun the ceremony", reason="self_test")
    return share, vks


async def _ceremony(settings: KeygenSettings, progress: Progress,
                    state: dict[str, Any]) -> dict[str, Any]:
    from node.keygen_transport import SealedPool

    _progress.set(progress)
    paillier_class = _observed_paillier()  # the slow imports (sympy) count as "starting"
    # Every message from here on is signed by our hotkey and sealed for one member.
    pool = SealedPool(KeygenChannel(settings.hotkey, settings.roster, settings.index))
    host, port = settings.listen or settings.members[settings.index - 1]
    pool.add_http_server(port=port, addr=host)
    for j, (h, p) in enumerate(settings.members, start=1):
        if j != settings.index:
            pool.add_member(_name(j), j, h, p)
    pool.start_announcing()
    watchdog = asyncio.ensure_future(_Watchdog(settings, progress, pool, state).run())
    work = asyncio.ensure_future(_protocol(settings, pool, progress, paillier_class))
    try:
        done, _ = await asyncio.wait({watchdog, work}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog in done:
            work.cancel()
            watchdog.result()  # raises MemberVanished or MemberMismatch
        return work.result()
    finally:
        for task in (watchdog, work):
            task.cancel()
        await asyncio.gather(watchdog, work, return_exceptions=True)
        try:
            await asyncio.wait_for(pool.shutdown(), 5.0)
        except Exception:  # a peer that vanished can make a clean shutdown impossible
            log.debug("pool shutdown incomplete", exc_info=True)


async def _protocol(settings: KeygenSettings, pool: Any, progress: Progress,
                    paillier_class: type) -> dict[str, Any]:
    await _hello(settings, pool, progress)
    scheme = await _run_tno(settings, pool, paillier_class)
    params = settings.parameters
    modulus = scheme.public_key.n
    public = paillier.PublicKey(modulus)
    dkg.check_exponent_room(params, modulus)
    secret = await _reduce_degree(settings, pool, scheme, progress)
    scale = dkg.plaintext_scale(params, modulus, scheme.secret_key.theta)
    session = _session_tag(settings, modulus, scheme.session_id)
    share, vks = await _verify(settings, pool, public, secret, scale, session, progress)
    tno_key = scheme.secret_key
    return {
        "public": public, "share": share, "vks": vks, "scale": scale, "session": session,
        "tno": {"index": scheme.index, "share": tno_key.share.shares[scheme.index],
                "degree": tno_key.share.degree, "scaling": tno_key.share.scaling,
                "theta": _signed_bytes(tno_key.theta), "stat_sec": params.stat_sec,
                "party_indices": dict(scheme.party_indices)},
    }


def _signed_bytes(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 8) // 8, "big", signed=True)


def _save(settings: KeygenSettings, out: dict[str, Any], progress: Progress) -> dict[str, Any]:
    public, vks = out["public"], out["vks"]
    key = dkg.DkgKeyShare(out["share"], out["scale"])
    summary = {
        "version": RESULT_VERSION, "member": settings.index, "parameters": settings.public_view(),
        "n_parties": len(settings.members), "threshold": settings.threshold,
        "modulus_bits": public.bits, "session": out["session"].hex(),
        "plaintext_scale": _signed_bytes(out["scale"]).hex(),
        "elapsed_s": round(progress.elapsed, 3), "tno_rounds": progress.round,
        # From the first protocol message on: without start-up and waiting for members.
        "protocol_s": round(sum(v for k, v in progress.phase_times.items()
                                if k not in ("starting", "hello")), 3),
        "phase_times_s": progress.phase_times, "finished_at": time.time(),
    }
    public_part = {"public_key": paillier.encode_public_key(public),
                   "verification_keys": paillier.encode_verification_keys(public, vks)}
    tno = dict(out["tno"], share=_signed_bytes(out["tno"]["share"]))
    secret_part = {**summary, **public_part, "key_share": dkg.encode_key_share(key), "tno": tno}
    write_atomic(settings.out_dir / KEY_FILE, msgpack.packb(secret_part, use_bin_type=True), 0o600)
    write_atomic(settings.out_dir / PUBLIC_FILE,
                  msgpack.packb({**summary, **public_part}, use_bin_type=True), 0o644)
    return summary


def _new_state(settings: KeygenSettings) -> dict[str, Any]:
    return {"status": "running", "phase": "starting", "pid": os.getpid(),
            "host": socket.gethostname(), "member": settings.index,
            "parameters": settings.public_view(), "started_at": time.time(),
            "updated_at": time.time(), "elapsed_s": 0.0, "round": 0,
            "note": "a ceremony cannot resume mid-protocol; a dead 'running' one needs --restart"}


def run_member(settings: KeygenSettings) -> dict[str, Any]:
    """Run (or find finished) this member's ceremony; returns the result summary.

    Raises KeygenError subclasses: CeremonyCrashed / CeremonyBusy before starting,
    MemberVanished, MemberMismatch, CeremonyTimeout, CeremonyInterrupted while running,
    dkg.DkgError when the shares do not check out. The state file says which.
    """
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    finished = check_previous(out_dir, settings.restart)
    if finished is not None:
        log.info("keygen member %d: already finished in %s at %s; not redoing it",
                 settings.index, out_dir, time.ctime(finished.get("finished_at", 0)))
        return {**finished, "already_finished": True}
    logging.getLogger("tno.mpc.communication").setLevel(logging.CRITICAL)  # retry tracebacks
    state = _new_state(settings)
    write_state(out_dir, state)
    line = PhaseProgress(f"keygen member {settings.index}", CEREMONY_PHASES)  # a terminal only
    progress = Progress(on_change=lambda p: line.enter(p.phase, _round_detail(p.phase, p.round)))
    try:
        out = asyncio.run(_main(settings, progress, state))
        progress.enter("writing")
        summary = _save(settings, out, progress)
        line.finish()
    except BaseException as exc:
        line.finish(f"failed in {progress.phase}")
        error = _as_keygen_error(exc, settings)
        state.update(status="interrupted" if isinstance(error, CeremonyInterrupted) else "failed",
                     phase=progress.phase, elapsed_s=round(progress.elapsed, 3),
                     error=str(error), reason=getattr(error, "reason", "error"),
                     updated_at=time.time())
        write_state(out_dir, state)
        log.error("keygen member %d failed in phase %s: %s", settings.index, progress.phase, error)
        if error is exc:
            raise
        raise error from exc
    state.update(status="finished", phase="finished", elapsed_s=summary["elapsed_s"],
                 finished_at=summary["finished_at"], updated_at=time.time(), waiting_for=[],
                 modulus_bits=summary["modulus_bits"], protocol_s=summary["protocol_s"],
                 tno_rounds=summary["tno_rounds"], round=summary["tno_rounds"],
                 phase_times_s=summary["phase_times_s"])
    write_state(out_dir, state)
    log.info("keygen member %d finished: %d-bit modulus in %.1f s (%d TNO rounds)",
             settings.index, summary["modulus_bits"], summary["elapsed_s"], summary["tno_rounds"])
    return summary


def _round_detail(phase: str, candidate_round: int) -> str:
    # The modulus phase repeats candidate rounds until a biprime turns up: a count of them
    # is the only sign of life a person gets there, and its length is luck.
    return f"candidate round {candidate_round}" if phase == "modulus" and candidate_round else ""


def _as_keygen_error(exc: BaseException, settings: KeygenSettings) -> BaseException:
    if isinstance(exc, (KeygenError, dkg.DkgError)):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return CeremonyInterrupted("interrupted by SIGINT; rerun every member with --restart")
    if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
        host, port = settings.members[settings.index - 1]
        return KeygenError(f"cannot listen on {host}:{port}: {exc.strerror}",
                           reason="address_in_use")
    return exc


async def _main(settings: KeygenSettings, progress: Progress,
                state: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    caught: list[int] = []

    def stop(signum: int) -> None:
        caught.append(signum)
        task.cancel()

    # Only the main thread may own signals (tests run members in threads, too).
    signals = ((signal.SIGINT, signal.SIGTERM)
               if threading.current_thread() is threading.main_thread() else ())
    for signum in signals:
        loop.add_signal_handler(signum, stop, signum)
    try:
        async with asyncio.timeout(settings.timeout_s):
            return await _ceremony(settings, progress, state)
    except TimeoutError as exc:
        raise CeremonyTimeout(
            f"the ceremony took longer than {settings.timeout_s:.0f} s (phase {progress.phase!r}, "
            f"TNO round {progress.round}); raise --timeout or use fewer bits") from exc
    except asyncio.CancelledError:
        if caught:
            name = signal.Signals(caught[0]).name
            raise CeremonyInterrupted(f"stopped by {name} in phase {progress.phase!r}; "
                                      f"rerun every member with --restart") from None
        raise
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


# ---------------------------------------------------------------------------------------
# A local ceremony: n member processes on loopback


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LocalCeremony:
    n_parties: int
    threshold: int
    bits: int
    out_dir: Path
    allow_weak: bool = False
    timeout_s: float = 7200.0
    stall_timeout_s: float = 60.0
    heartbeat_s: float = 5.0
    batch_size: int = 100
    restart: bool = False


def member_dir(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"member-{index}"


LOCAL_WALLET = "keygen"  # --local: member I's hotkey is DIR/member-I/wallet/keygen/hotkeys/member-I


def local_hotkey(out_dir: Path, index: int) -> Any:
    """Member `index`'s hotkey in a --local ceremony: made once, kept with its directory
    (so a finished ceremony is recognised again)."""
    from node.wallet import create_hotkey, hotkey_path, load_hotkey

    wallet = member_dir(out_dir, index) / "wallet"
    if hotkey_path(LOCAL_WALLET, _name(index), wallet).exists():
        return load_hotkey(LOCAL_WALLET, _name(index), wallet)
    return create_hotkey(LOCAL_WALLET, _name(index), wallet)


def _member_argv(local: LocalCeremony, index: int, members: str) -> list[str]:
    wallet = member_dir(local.out_dir, index) / "wallet"
    argv = [sys.executable, "-m", "node.keygen_cli", "--index", str(index), "--members", members,
            "--wallet-path", str(wallet), "--wallet-name", LOCAL_WALLET, "--hotkey", _name(index),
            "--threshold", str(local.threshold), "--bits", str(local.bits),
            "--out", str(member_dir(local.out_dir, index)), "--timeout", str(local.timeout_s),
            "--stall-timeout", str(local.stall_timeout_s), "--heartbeat", str(local.heartbeat_s),
            "--batch-size", str(local.batch_size)]
    return argv + (["--allow-weak"] if local.allow_weak else []) + (
        ["--restart"] if local.restart else [])


def run_local(local: LocalCeremony) -> dict[str, Any]:
    """Spawn every member on 127.0.0.1 (each logs to its member-I/keygen.log), wait for all.

    A finished local ceremony is not redone: its members report "already finished". If a
    member fails, the others are stopped with SIGTERM at once instead of waiting for their
    stall timeout. Returns {"ok": bool, "members": {i: state}}.
    """
    dkg.CeremonyParameters(local.n_parties, local.threshold, local.bits)  # fail before spawning
    if local.bits not in paillier.SUPPORTED_BITS and not local.allow_weak:
        raise KeygenError(f"--bits {local.bits}: use one of {paillier.SUPPORTED_BITS} "
                          f"(or --allow-weak for tests)", reason="usage")
    out_dir = Path(local.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = _previous_members(out_dir, local.n_parties)
    ports = previous or free_ports(local.n_parties)
    hotkeys = [local_hotkey(out_dir, i).ss58_address for i in range(1, local.n_parties + 1)]
    members = ",".join(f"{k}@127.0.0.1:{p}" for k, p in zip(hotkeys, ports))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs = []
    restore = _sigterm_as_interrupt()
    try:
        for i in range(1, local.n_parties + 1):
            member_dir(out_dir, i).mkdir(parents=True, exist_ok=True, mode=0o700)
            logfile = open(member_dir(out_dir, i) / "keygen.log", "ab")
            logs.append(logfile)
            procs[i] = subprocess.Popen(_member_argv(local, i, members), stdout=logfile,
                                        stderr=subprocess.STDOUT, env=env)
        failed = _wait_members(procs, local.heartbeat_s, out_dir)
    except KeyboardInterrupt:
        raise CeremonyInterrupted("local ceremony stopped; its members were stopped too; "
                                  "rerun with --restart") from None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for logfile in logs:
            logfile.close()
        restore()
    states = {i: read_state(member_dir(out_dir, i)) or {} for i in procs}
    return {"ok": not failed and all(s.get("status") == "finished" for s in states.values()),
            "failed": failed, "members": states, "member_list": members}


def _sigterm_as_interrupt() -> Any:
    """SIGTERM stops the runner like SIGINT does, so its members are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _previous_members(out_dir: Path, n: int) -> list[int] | None:
    """Ports of a ceremony already finished here, so its members recognise their own state."""
    ports = []
    for i in range(1, n + 1):
        state = read_state(member_dir(out_dir, i))
        if not state or state.get("status") != "finished":
            return None
        members = state.get("parameters", {}).get("members", [])
        if len(members) != n:
            return None
        ports = [int(m.rpartition(":")[2]) for m in members]
    return ports


def _wait_members(procs: dict[int, subprocess.Popen[bytes]], heartbeat_s: float,
                  out_dir: Path) -> list[int]:
    """Block until every member exits; on the first failure stop the rest."""
    last = last_drawn = time.monotonic()
    with PhaseProgress(f"keygen {len(procs)} members", CEREMONY_PHASES) as line:  # a terminal only
        while True:
            codes = {i: p.poll() for i, p in procs.items()}
            failed = [i for i, code in codes.items() if code not in (None, 0)]
            if failed:
                log.error("keygen member(s) %s failed; stopping the others", failed)
                for p in procs.values():
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                return failed
            if all(code == 0 for code in codes.values()):
                return []
            now = time.monotonic()
            if now - last_drawn >= 1.0 and line.line.enabled:
                last_drawn = now
                line.enter(*_slowest_member(_member_states(procs, out_dir)))
            if now - last >= heartbeat_s:
                last = now
                phases = {i: s.get("phase") for i, s in _member_states(procs, out_dir).items()}
                log.info("local keygen: %s", ", ".join(f"member {i}: {ph}" for i, ph in phases.items()))
            time.sleep(0.2)


def _member_states(procs: dict[int, Any], out_dir: Path) -> dict[int, dict[str, Any]]:
    return {i: read_state(member_dir(out_dir, i)) or {} for i in procs}


def _slowest_member(states: dict[int, dict[str, Any]]) -> tuple[str, str]:
    """The phase of the member furthest behind (the ceremony moves at its pace) and how
    many are there: ('modulus', '3 of 3 here, candidate round 4')."""
    def rank(state: dict[str, Any]) -> int:
        phase = state.get("phase")
        return CEREMONY_PHASES.index(phase) if phase in CEREMONY_PHASES else -1

    slowest = min(states.values(), key=rank, default={})
    phase = slowest.get("phase") or "starting"
    here = sum(1 for s in states.values() if (s.get("phase") or "starting") == phase)
    detail = ", ".join(filter(None, [f"{here} of {len(states)} here",
                                     _round_detail(phase, int(slowest.get("round") or 0))]))
    return phase, detail


def describe(summary: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe view of a summary (for the CLI's stdout)."""
    keep = ("member", "modulus_bits", "n_parties", "threshold", "elapsed_s", "protocol_s",
            "tno_rounds",
            "phase_times_s", "already_finished", "session")
    return {k: summary[k] for k in keep if k in summary}


__all__ = [
    "KeygenSettings", "LocalCeremony", "run_member", "run_local", "load_result", "read_state",
    "check_previous", "parse_members", "free_ports", "member_dir", "KeygenError",
    "MemberVanished", "MemberMismatch", "CeremonyTimeout", "CeremonyInterrupted",
    "CeremonyCrashed", "CeremonyBusy", "STATE_FILE", "KEY_FILE", "PUBLIC_FILE", "local_hotkey",
]
