"""Exhaustive exploration of the Python challenge machines, TLC-style, for small bounds.

2 validators and 2 miners; each step is one action of specs/FheChallenge.tla applied to
a copy of the world: the validators' ChallengeMachines, the miners' MinerKeyrings, and
what each miner did with each challenge it was sent. Outcomes reach ok, wrong, timeout
and error (failed key upload, broken stream, a refusal by the miner's keyring); a miner
may try to run a challenge under another validator's key (its keyring must refuse, and
the garbage it computes anyway is judged wrong), and a miner may restart and lose its
keys (the validator learns unknown_key and uploads again).

BFS over states, deduplicated by a hash of their snapshot. Every invariant is checked
in every state, and from every state a state with every epoch closed must stay
reachable: the liveness half of ExactlyOneOutcome, nothing is left without an outcome.

Two bounds, both with 2 challenges per validator and miner pair:
- one epoch of 2 challenges per miner, one restart of miner m2, and miner m1 still holding
  v1's key from an earlier epoch (so a foreign-key attempt meets a key it does hold);
- two epochs of 1 challenge per miner: the split swaps, so keys of both validators meet
  on each miner, windows span epochs, and the keyring's per-epoch count restarts.

To keep this under a few seconds, actions whose states another path reaches anyway are
left to tests/test_challenge.py: Error in READY (the shell sends at once), a late answer
and a timeout after the miner computed (both recorded as TIMEOUT, unit-tested).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from protocol.errors import LocalProtocolError
from protocol.challenge import (
    ChallengeConfig, ChallengeMachine, ChallengePhase, EpochPhase, ExactlyOneOutcome, IN_FLIGHT,
    IterationsBounded, KeyNotOwned, KeyringError, KeysUsedOnlyByOwner, MinerKeyring, RecordOutcome, TypeOK,
    UnknownKey, assign_miners,
)

MESH = "explore"
VALIDATORS = ("v1", "v2")
MINERS = ("m1", "m2")
MODEL = "cnn"
KEY_OF = {v: f"key-{v}" for v in VALIDATORS}
TIMEOUT_S = 10.0
RESTARTING = "m2"  # one miner restarting is enough to reach unknown_key; both would double the states


@dataclass(frozen=True)
class Bounds:
    epochs: int
    challenges: int  # per miner per epoch, on both sides
    restarts: int = 0  # how often miner RESTARTING may lose its keys
    preload: tuple[tuple[str, str], ...] = ()  # (miner, validator): keys held from before


class CopyOnAccess(dict):
    """A successor shares its parent's machines until an action looks one up by name; the
    first lookup clones it. Most actions touch one machine and at most one keyring."""

    def __init__(self, parent: dict) -> None:
        super().__init__(parent)
        self._cloned: set = set()

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if name not in self._cloned:
            value = value.clone()
            self[name] = value
            self._cloned.add(name)
        return value


@dataclass
class World:
    machines: dict[str, ChallengeMachine]
    rings: dict[str, MinerKeyring]
    miner_did: dict[str, str] = field(default_factory=dict)  # challenge id -> computed/garbage/refused:<reason>
    restarts: int = 0

    def key(self, snapshots: dict[int, tuple] | None = None) -> tuple:
        """The state's hashable identity. `snapshots` caches each machine's snapshot by
        object: once a world is keyed its objects are only shared, never mutated."""
        machines, rings = dict(self.machines), dict(self.rings)  # read without cloning

        def snap(obj) -> tuple:
            if snapshots is None:
                return obj.snapshot()
            cached = snapshots.get(id(obj))
            if cached is None or cached[0] is not obj:
                cached = snapshots[id(obj)] = (obj, obj.snapshot())  # holding obj keeps its id unique
            return cached[1]

        return (tuple(snap(machines[v]) for v in VALIDATORS), tuple(snap(rings[m]) for m in MINERS),
                tuple(sorted(self.miner_did.items())), self.restarts)

    def clone(self) -> "World":
        return World(CopyOnAccess(self.machines), CopyOnAccess(self.rings), dict(self.miner_did), self.restarts)

    def forget_decided(self) -> None:
        """What a miner did with a decided challenge no longer matters: merge those states."""
        live = {cid for m in self.machines.values() for cid, c in m.challenges.items() if c.phase in IN_FLIGHT}
        self.miner_did = {cid: did for cid, did in self.miner_did.items() if cid in live}


def initial(bounds: Bounds) -> World:
    config = ChallengeConfig(MESH, challenges_per_miner=bounds.challenges, response_timeout_s=TIMEOUT_S)
    world = World({v: ChallengeMachine(config, v) for v in VALIDATORS},
                  {m: MinerKeyring(max_challenges_per_epoch=bounds.challenges) for m in MINERS})
    for miner, validator in bounds.preload:
        world.rings[miner].add_key(validator, KEY_OF[validator], model=MODEL)
    return world


Step = tuple[str, Callable[[World], object]]


def actions(world: World, bounds: Bounds, refusals: Counter) -> Iterator[Step]:
    machines = world.machines
    epoch = max(1, max(m.epoch for m in machines.values()) + 1)
    if all(m.phase is not EpochPhase.OPEN for m in machines.values()) and epoch <= bounds.epochs:
        def start(w: World) -> None:
            for v in VALIDATORS:  # looked up by name: CopyOnAccess clones before we mutate
                w.machines[v].start_epoch(epoch, offers={m: MODEL for m in MINERS},
                                          key_ids={MODEL: KEY_OF[v]}, validators=VALIDATORS, now=0.0)
        yield f"StartEpoch({epoch})", start

    # A restart between challenges: while one is in flight it would only add interleavings
    # that the unknown_key path (restart, then a challenge under the lost key) already covers.
    if world.restarts < bounds.restarts and not any(
            c.phase in IN_FLIGHT and c.miner == RESTARTING for m in machines.values() for c in m.challenges.values()):
        def restart(w: World) -> None:
            w.rings[RESTARTING].forget_all()
            w.restarts += 1
        yield f"MinerRestart({RESTARTING})", restart

    for v, machine in machines.items():
        if machine.phase is not EpochPhase.OPEN:
            continue
        # Offered unguarded: the machine's own guards (LocalProtocolError) decide what is enabled.
        yield f"CloseEpoch({v})", lambda w, v=v: w.machines[v].close_epoch(now=0.0)
        for miner in MINERS:
            yield f"Issue({v},{miner})", lambda w, v=v, miner=miner: w.machines[v].issue(miner, input_seed=1, now=0.0)
        for cid, c in machine.challenges.items():
            yield from _validator_side(world, v, cid, c.phase, c.miner, c.key_id, refusals)


def _validator_side(world: World, v: str, cid: str, phase: ChallengePhase, miner: str, key_id: str,
                    refusals: Counter) -> Iterator[Step]:
    if phase is ChallengePhase.AWAITING_KEY:
        def upload(w: World) -> object:
            w.rings[miner].add_key(v, key_id, model=MODEL)
            return w.machines[v].key_uploaded(cid, now=0.0)
        yield f"KeyUploaded({v},{miner})", upload
        yield f"Error({v},{miner},upload)", lambda w: w.machines[v].error(cid, reason="upload_failed", now=0.0)
    elif phase is ChallengePhase.READY:
        yield f"Sent({v},{miner})", lambda w: w.machines[v].sent(cid, at=0.0)
    elif phase is ChallengePhase.SENT:
        yield from _miner_side(world, v, cid, miner, refusals)


def _miner_side(world: World, v: str, cid: str, miner: str, refusals: Counter) -> Iterator[Step]:
    did = world.miner_did.get(cid)
    if did is None:
        yield f"Timeout({v},{miner})", lambda w: w.machines[v].timeout(cid, now=TIMEOUT_S)
        yield f"Error({v},{miner},stream)", lambda w: w.machines[v].error(cid, reason="stream_reset", now=0.0)

        def evaluate(w: World) -> None:
            try:
                w.rings[miner].evaluate(v, KEY_OF[v], model=MODEL, now=_miner_clock(w, miner, v))
                w.miner_did[cid] = "computed"
            except KeyringError as exc:
                refusals[type(exc).__name__] += 1
                w.miner_did[cid] = f"refused:{exc.reason}"
        yield f"Evaluate({miner},{v})", evaluate

        for other in VALIDATORS:
            if other != v:
                yield (f"ForeignKey({miner},{v},{other})",
                       lambda w, other=other: _foreign(w, v, cid, miner, other, refusals))
    elif did == "computed":
        yield f"ResponseReceived({v},{miner},ok)", lambda w: w.machines[v].response_received(
            cid, at=1.0, argmax_agrees=True, cosine=1.0)
    elif did == "garbage":
        yield f"ResponseReceived({v},{miner},garbage)", lambda w: w.machines[v].response_received(
            cid, at=1.0, argmax_agrees=False, cosine=0.01)
    else:
        reason = did.split(":", 1)[1]
        yield f"Error({v},{miner},{reason})", lambda w: w.machines[v].error(cid, reason=reason, now=1.0)


def _miner_clock(w: World, miner: str, v: str) -> float:
    """The miner's clock at v's challenge: one quota window per epoch, as the spec's
    global epoch (the miner counts on its own clock, never on the request's epoch)."""
    return w.machines[v].epoch * w.rings[miner].window_s


def _foreign(w: World, v: str, cid: str, miner: str, other: str, refusals: Counter) -> None:
    """The miner tries v's challenge under `other`'s key: its keyring must refuse and stay
    unchanged; a miner that computes anyway hands v garbage."""
    before = w.rings[miner].snapshot()
    try:
        w.rings[miner].evaluate(v, KEY_OF[other], model=MODEL, now=_miner_clock(w, miner, v))
    except (KeyNotOwned, UnknownKey) as exc:
        refusals[type(exc).__name__] += 1
    else:
        raise AssertionError(f"{miner} ran {v}'s challenge under {other}'s key")
    assert w.rings[miner].snapshot() == before, "a refused evaluation changed the keyring"
    w.miner_did[cid] = "garbage"


def broken_invariants(world: World) -> list[str]:
    machines, rings = list(world.machines.values()), list(world.rings.values())
    return [name for name, holds in (
        ("TypeOK", all(TypeOK(m) for m in machines)),
        ("ExactlyOneOutcome", all(ExactlyOneOutcome(m) for m in machines)),
        ("KeysUsedOnlyByOwner", KeysUsedOnlyByOwner(rings, machines)),
        ("IterationsBounded", IterationsBounded(machines, rings)),
    ) if not holds]


@dataclass
class Exploration:
    states: int
    transitions: int
    seconds: float
    refusals: Counter
    outcomes: Counter
    error_reasons: Counter


def explore(bounds: Bounds) -> Exploration:
    started = time.perf_counter()
    refusals: Counter = Counter()
    outcomes: Counter = Counter()
    error_reasons: Counter = Counter()
    snapshots: dict[int, tuple] = {}
    start = initial(bounds)
    # States are numbered on first sight: a big key is hashed once per transition.
    index: dict[tuple, int] = {start.key(): 0}
    parent: list[tuple[int, str]] = [(-1, "Init")]
    successors: list[list[int]] = []
    finished: set[int] = set()
    queue: deque[tuple[int, World]] = deque([(0, start)])
    disabled = 0

    def trace(state: int) -> str:
        steps = []
        while state >= 0:
            state, label = parent[state]
            steps.append(label)
        return " -> ".join(reversed(steps))

    while queue:
        state, world = queue.popleft()
        broken = broken_invariants(world)
        assert not broken, f"{broken} broken after {trace(state)}"
        if all(m.phase is EpochPhase.CLOSED and m.epoch == bounds.epochs for m in world.machines.values()):
            finished.add(state)
        assert len(successors) == state  # BFS pops states in the order they were numbered
        successors.append([])
        for label, apply in actions(world, bounds, refusals):
            nxt = world.clone()
            try:
                effects = apply(nxt)
            except LocalProtocolError:
                disabled += 1  # the machine refused: this action is not enabled here
                continue
            for effect in effects or ():
                if isinstance(effect, RecordOutcome):
                    outcomes[effect.record.outcome.value] += 1
                    error_reasons[effect.record.error_reason] += 1
            nxt.forget_decided()
            number = index.setdefault(nxt.key(snapshots), len(index))
            successors[state].append(number)
            if number == len(parent):
                parent.append((state, label))
                queue.append((number, nxt))

    # Liveness on the finite graph: from every state, "every epoch closed" is reachable.
    predecessors: list[list[int]] = [[] for _ in successors]
    for src, dsts in enumerate(successors):
        for dst in dsts:
            predecessors[dst].append(src)
    can_finish, frontier = set(finished), deque(finished)
    while frontier:
        for src in predecessors[frontier.popleft()]:
            if src not in can_finish:
                can_finish.add(src)
                frontier.append(src)
    stuck = [state for state in range(len(successors)) if state not in can_finish]
    assert not stuck, f"{len(stuck)} states never close every epoch, e.g. after {trace(stuck[0])}"
    assert disabled > 0  # the guards were exercised, not just the happy transitions
    return Exploration(len(index), sum(map(len, successors)), time.perf_counter() - started,
                       refusals, outcomes, error_reasons)


def report(name: str, result: Exploration) -> None:
    print(f"\nFheChallenge exploration ({name}): {result.states} distinct states, {result.transitions} "
          f"transitions, {result.seconds:.1f} s; refusals {dict(result.refusals)}; "
          f"outcomes recorded {dict(result.outcomes)}")


def test_one_epoch_two_challenges_per_miner_with_a_restart():
    result = explore(Bounds(epochs=1, challenges=2, restarts=1, preload=(("m1", "v1"),)))
    report("1 epoch x 2 challenges, 1 restart", result)
    assert set(result.outcomes) == {"ok", "wrong", "timeout", "error"}  # the bad paths were taken
    assert result.refusals["KeyNotOwned"] > 0 and result.refusals["UnknownKey"] > 0
    assert result.error_reasons["unknown_key"] > 0  # the restarted miner said so; v1 uploads again
    assert result.states > 500


def test_two_epochs_swap_miners_between_validators():
    plans = [assign_miners(e, MESH, MINERS, VALIDATORS) for e in (1, 2)]
    assert plans[0]["v1"] != plans[1]["v1"]  # the bound is only interesting if the split swaps
    result = explore(Bounds(epochs=2, challenges=1))
    report("2 epochs x 1 challenge", result)
    assert set(result.outcomes) == {"ok", "wrong", "timeout", "error"}
    assert result.refusals["KeyNotOwned"] > 0  # keys of both validators met on one miner
    assert result.states > 500
