"""Exhaustive exploration of the secure-aggregation machines (protocol/aggregation/).

A breadth-first search, with state hashing, over every interleaving of a small mesh:
3 trainers (t3 cheats: its proof does not verify), 2 validators, a committee of 3 with
threshold 2 (c3 sends a wrong partial), min_contributors 2, and 2 rounds (round 2
starts from round 1's adapter, or from the same base after an abort). Contributions,
AcceptedSets and partials reach each validator independently, in any order, or never
(loss); a trainer may never finish training and a member may never release (dropouts).
Every reachable state is checked against the spec's invariants (the Python functions
of the same names), exact persistence (to_state -> bytes -> from_state -> to_state),
that every piece of shell work a machine asks for is in its resume_effects(), and that
a rejected message leaves its machine unchanged.

Reductions, stated:
- time: the deadline and the final deadline each fire for every node in one step (they
  are absolute times); a message can arrive before either, not between two nodes'
  timers. After the final deadline every machine is done, so those states are leaves.
- RoundOpen reaches every trainer and member in the step the first validator opens
  (copies from other validators are identical and idempotent: test_aggregation.py).
- local shell work completes in the step that asks for it: verifying a contribution or
  a partial, computing an aggregate, combining. Honest members decrypt substitutes for
  the bad member's blocks in their first partial (blocks_to_decrypt), so no cover step. A member's partial decryption is its
  own step (so a member can drop out after agreeing). A verdict still pending at the
  deadline is covered in test_aggregation.py instead.
- messages that can no longer change their recipient (a contribution after the
  deadline, anything to a finished machine) are dropped from the state's hash.
- ContributionVerdicts go to no machine (settlement reads them); RoundFinal and
  RoundAborted reach the trainers when the round is over, in both orders.
- round 2 states are hashed without round 1's history (fresh machines, same base).
- by default an AcceptedSet reaches the three members in one step (or never); the slow
  test (SEALMESH_SLOW=1) lets each member hear each set on its own: 254,376 states.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from protocol import aggregation as agg
from protocol.aggregation_messages import (
    AcceptedSet, Contribution, PartialDecryption, RoundAborted, RoundFinal, RoundOpen,
)
from protocol.errors import RemoteProtocolError
from protocol.messages import Channel, decode, encode

TRAINERS = ("t1", "t2", "t3")
CHEATERS = frozenset({"t3"})
VALIDATORS = ("v1", "v2")
COMMITTEE = ("c1", "c2", "c3")
BAD_MEMBERS = frozenset({"c3"})
THRESHOLD = 2
MIN_CONTRIBUTORS = 2
ROUNDS = 2
CLOCK_MS = (500, 1000, 2000)  # collect, closed (deadline passed), expired (final deadline passed)


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def blob_of(trainer: str, round_id: int) -> str:
    return h(f"contribution:{trainer}:{round_id}")


HYPERPARAMETERS = {"steps": 20.0, "lr": 1e-4, "batch_size": 8.0, "block_len": 64.0, "adapter_values": 300.0}
MESH = agg.MeshRounds(validators=VALIDATORS, committee=COMMITTEE, threshold=THRESHOLD,
                      public_key_id=h("committee key"), key_bits=2048,
                      policy=agg.RoundPolicy(min_contributors=MIN_CONTRIBUTORS, max_contributors=len(TRAINERS)))
OPENER = agg.scheduled_opener(MESH, 1)
BYZANTINE = ("v1", "vb")  # keys the adversary holds: the scheduled opener's and another validator's


def round_open(round_id: int, base: str, **changes) -> RoundOpen:
    fields = dict(
        round_id=round_id, base_adapter_id=base, public_key_id=h("committee key"),
        hyperparameters=dict(HYPERPARAMETERS), clip_bound=1.0, quant_bits=16,
        max_contributors=len(TRAINERS), key_bits=2048, ciphertexts_per_contribution=4,
        max_contribution_bytes=1 << 20, deadline_ms=CLOCK_MS[1], final_deadline_ms=CLOCK_MS[2],
        min_contributors=MIN_CONTRIBUTORS, committee=list(COMMITTEE), threshold=THRESHOLD,
        validators=list(VALIDATORS))
    fields.update(changes)
    return RoundOpen(**fields)


def hijacking_opens(round_id: int, base: str) -> list[tuple[str, RoundOpen]]:
    """ByzOpenRound: what the adversary may gossip for this round (sender, RoundOpen):
    any minimum and maximum from either key, or the mesh's minimum from a non-opener."""
    opens = [(f, round_open(round_id, base, min_contributors=n, max_contributors=n))
             for f in BYZANTINE for n in range(1, len(TRAINERS) + 1) if (f, n) != (OPENER, MIN_CONTRIBUTORS)]
    return opens + [("vb", round_open(round_id, base))]


# --- the world: machine states as bytes, messages in flight, the clock -------------------

NODES = VALIDATORS + COMMITTEE + TRAINERS
_CLASS = {**{v: agg.ValidatorRound for v in VALIDATORS}, **{c: agg.CommitteeRound for c in COMMITTEE},
          **{t: agg.TrainerRound for t in TRAINERS}}
_parsed: dict[bytes, Any] = {}


def pack(machine: Any) -> bytes:
    return msgpack.packb(machine.to_state(), use_bin_type=True)


def load(raw: bytes) -> Any:
    """A fresh machine from its bytes (callers may change it)."""
    state = msgpack.unpackb(raw, raw=False)
    return _CLASS_BY_KIND[state["kind"]].from_state(state)


_CLASS_BY_KIND = {"validator": agg.ValidatorRound, "committee": agg.CommitteeRound, "trainer": agg.TrainerRound}


def view(raw: bytes) -> Any:
    """A shared, read-only machine for invariant checks."""
    machine = _parsed.get(raw)
    if machine is None:
        machine = _parsed[raw] = load(raw)
    return machine


class World:
    __slots__ = ("round_id", "base", "clock", "nodes", "inflight")

    def __init__(self, round_id: int, base: str, clock: int, nodes: dict[str, bytes],
                 inflight: frozenset) -> None:
        self.round_id, self.base, self.clock, self.nodes, self.inflight = round_id, base, clock, nodes, inflight

    @classmethod
    def start(cls, round_id: int, base: str) -> "World":
        ro = round_open(round_id, base)
        nodes = {v: pack(agg.ValidatorRound(ro, v)) for v in VALIDATORS}
        nodes.update({c: pack(agg.CommitteeRound(c)) for c in COMMITTEE})
        nodes.update({t: pack(agg.TrainerRound(t)) for t in TRAINERS})
        return cls(round_id, base, 0, nodes, frozenset())

    def key(self) -> tuple:
        inflight = frozenset(e for e in self.inflight if useful(e, self.clock, self.nodes))
        return (self.round_id, self.base, self.clock, tuple(self.nodes[n] for n in NODES), inflight)

    @property
    def now_ms(self) -> int:
        return CLOCK_MS[self.clock]


COMMITTEE_AS_ONE = "committee"  # recipient of an AcceptedSet that reaches every member in one step


def recipients(sender: str, message: Any, bounds: "Bounds") -> list[str]:
    if isinstance(message, (Contribution, PartialDecryption)):
        return list(VALIDATORS)
    if isinstance(message, AcceptedSet):
        members = [COMMITTEE_AS_ONE] if bounds.committee_hears_as_one else list(COMMITTEE)
        return [v for v in VALIDATORS if v != sender] + members
    # RoundOpen: heard by all in the step that sends it; RoundFinal and RoundAborted: by
    # the trainers once the round is over (settle_trainers); verdicts: settlement only.
    return []


_KIND = {Contribution: "contribution", AcceptedSet: "set", PartialDecryption: "partial"}


def shell_result(node: str, machine: Any, effect: Any, world: World) -> tuple[str, tuple, dict] | None:
    """The honest shell's answer to a work effect: (method, args, kwargs)."""
    if isinstance(effect, agg.VerifyContributionBlob):
        if effect.trainer in CHEATERS:
            return "verify_contribution", (effect.trainer,), {
                "valid": False, "reason": "range_proof", "evidence_id": h(f"evidence:{effect.blob_id}")}
        return "verify_contribution", (effect.trainer,), {"valid": True}
    if isinstance(effect, agg.ComputeAggregate):
        return "compute_aggregate", (h("aggregate:" + ",".join(effect.blob_ids)),), {}
    if isinstance(effect, agg.DecryptPartial):
        return "release_partial", (effect.aggregate_id, h(f"partial:{node}:{effect.aggregate_id}")), {}
    if isinstance(effect, agg.VerifyPartialBlob):
        good = effect.member not in BAD_MEMBERS and effect.member_index == COMMITTEE.index(effect.member) + 1
        # An honest member's batch carries its own blocks and, by the substitute rule
        # (agg.blocks_to_decrypt), the bad member's: the cover those blocks need, folded into
        # the first partial (the cover step itself is driven in test_aggregation.py); a bad
        # member's batch has a bad proof. The combine needs t valid batches per block.
        ro = machine.round_open
        good_members = [COMMITTEE.index(c) + 1 for c in COMMITTEE if c not in BAD_MEMBERS]
        ok = {"valid": True, "blocks": agg.blocks_to_decrypt(agg.round_blocks(ro), effect.member_index,
                                                              good_members, ro.threshold)}
        return "verify_partial", (effect.member,), (ok if good else {"valid": False, "reason": "proof"})
    if isinstance(effect, agg.CombinePartials):
        return "finalize", (h(f"adapter:{effect.base_adapter_id}:{effect.aggregate_id}"), {"l2": 0.5}), {}
    if isinstance(effect, agg.Train):
        return "contribute", (blob_of(node, world.round_id),), {
            "ciphertext_count": 4, "size_bytes": 4096, "now_ms": world.now_ms}
    return None


_decoded: dict[bytes, Any] = {}


def decoded(raw: bytes) -> Any:
    """The strict decoder's result (messages are frozen: one copy serves every state)."""
    message = _decoded.get(raw)
    if message is None:
        message = _decoded[raw] = decode(raw, channel=Channel.TRAIN)
    return message


IMMEDIATE = (agg.ComputeAggregate, agg.CombinePartials, agg.VerifyContributionBlob, agg.VerifyPartialBlob)


def useful(entry: tuple, clock: int, nodes: dict[str, bytes]) -> bool:
    """False for a message whose delivery can no longer change its recipient (a
    contribution after the deadline, anything to a machine that is done): dropping it
    merges states that differ only in dead messages."""
    kind, recipient, _, _ = entry
    if recipient == COMMITTEE_AS_ONE:
        return any(useful((kind, c, None, None), clock, nodes) for c in COMMITTEE)
    m = view(nodes[recipient])
    if kind == "contribution":
        return clock == 0 and m.phase in (agg.Phase.OPEN, agg.Phase.COLLECT)
    if recipient in COMMITTEE:
        return m.phase in (agg.CommitteePhase.WAITING, agg.CommitteePhase.WATCH)
    return m.phase not in (agg.Phase.FINAL, agg.Phase.ABORTED)


@dataclass(frozen=True)
class Bounds:
    rounds: int = ROUNDS
    # True: an AcceptedSet reaches all three members in one step (or none); members still
    # drop out independently, since each release is its own step that may never come.
    committee_hears_as_one: bool = True


class Explorer:
    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.transitions = 0
        self.rejected_messages = 0
        self.hijacked: set = set()

    def apply(self, world: World, node: str, method: str, args: tuple, kwargs: dict,
              consumed: Any = None) -> World | None:
        """World after node's machine takes one event; None if the machine rejected it."""
        before = world.nodes[node]
        machine = load(before)
        try:
            effects = getattr(machine, method)(*args, **kwargs)
        except RemoteProtocolError as exc:
            assert exc.reason and pack(machine) == before, f"{method} changed state before rejecting"
            self.rejected_messages += 1
            return World(world.round_id, world.base, world.clock, world.nodes,
                         world.inflight - {consumed}) if consumed else None
        self.transitions += 1
        inflight = set(world.inflight)
        if consumed is not None:
            inflight.discard(consumed)
        nodes = dict(world.nodes)
        first_open = False
        for effect in effects:
            if isinstance(effect, agg.Send):
                raw = encode(effect.message)
                for r in recipients(node, effect.message, self.bounds):
                    inflight.add((_KIND[type(effect.message)], r, node, raw))
                first_open |= isinstance(effect.message, RoundOpen) and not any(
                    view(world.nodes[p]).round_open for p in COMMITTEE)
        outstanding = machine.resume_effects()
        work = [e for e in effects if not isinstance(e, (agg.Send, agg.SetTimer, agg.EnterPhase))]
        assert all(e in outstanding for e in work), f"{method}: asked for work that resume_effects forgets"
        nodes[node] = pack(machine)
        new = World(world.round_id, world.base, world.clock, nodes, frozenset(inflight))
        self.observe(world, new, f"{node}.{method}")
        if first_open:  # every member and trainer hears the first RoundOpen at once
            message = decode(encode(machine.round_open), channel=Channel.TRAIN)
            for p in COMMITTEE:
                new = self.apply(new, p, "join_round", (node, message), self.join_kwargs(world))
            for t in TRAINERS:
                new = self.apply(new, t, "join_round", (node, message), self.join_kwargs(world))
        for effect in work:  # local work nobody else can see: done in the same step
            if isinstance(effect, IMMEDIATE):
                result = shell_result(node, machine, effect, new)
                assert result is not None
                new = self.apply(new, node, *result) or new
        return new

    def observe(self, before: World, after: World, label: str) -> None:
        """One machine event (or the clock) took `before` to `after`: the hook of the
        conformance check (tests/test_aggregation_conformance.py), which maps both to
        the spec's variables. Nested work (joins, immediate shell work) is observed as
        its own events."""

    @staticmethod
    def join_kwargs(world: World) -> dict:
        return {"mesh": MESH, "now_ms": world.now_ms, "last_round_id": world.round_id - 1}

    def hijack(self, world: World) -> None:
        """ByzOpenRound: every member and trainer, joined or not, refuses every hijacking
        RoundOpen (apply() asserts a refusal changes nothing), so no state comes of it.
        Each distinct machine state is tried once: the refusal depends on nothing else."""
        for p in COMMITTEE + TRAINERS:
            if (world.round_id, world.nodes[p]) in self.hijacked:
                continue
            self.hijacked.add((world.round_id, world.nodes[p]))
            for sender, message in hijacking_opens(world.round_id, world.base):
                after = self.apply(world, p, "join_round", (sender, message), self.join_kwargs(world))
                # refused, or (a copy of the round it joined, re-sent by another validator) a no-op
                assert after is None or after.nodes[p] == world.nodes[p], (p, sender, message)

    def successors(self, world: World):
        now = world.now_ms
        if world.clock == 0:
            self.hijack(world)
        for v in VALIDATORS:
            # the shell builds a non-opener's round from the opener's RoundOpen (OpenRound)
            opener_open = v == OPENER or view(world.nodes[OPENER]).phase is not agg.Phase.OPEN
            if view(world.nodes[v]).phase is agg.Phase.OPEN and world.clock == 0 and opener_open:
                yield self.apply(world, v, "open_round", (), {"now_ms": now})
        for node in NODES:
            m = view(world.nodes[node])
            for effect in m.resume_effects():
                if isinstance(effect, IMMEDIATE) or (isinstance(effect, agg.Train) and world.clock > 0):
                    continue  # training that ends after the deadline is a dropout: see tick()
                result = shell_result(node, m, effect, world)
                if result is not None:
                    yield self.apply(world, node, *result)
        for entry in world.inflight:
            kind, recipient, sender, raw = entry
            if not useful(entry, world.clock, world.nodes):
                continue
            if recipient == COMMITTEE_AS_ONE:
                heard = World(world.round_id, world.base, world.clock, world.nodes, world.inflight - {entry})
                for c in COMMITTEE:
                    heard = self.apply(heard, c, "receive_accepted_set", (sender, decoded(raw)), {}) or heard
                yield heard
                continue
            method, kwargs = {
                "contribution": ("receive_contribution", {"now_ms": now}),
                "set": ("receive_accepted_set", {}),
                "partial": ("receive_partial", {}),
            }[kind]
            yield self.apply(world, recipient, method, (sender, decoded(raw)), kwargs, consumed=entry)
        if world.clock < 2:
            yield self.tick(world)

    def next_round(self, world: World) -> World | None:
        if world.round_id >= self.bounds.rounds:
            return None
        finals = {view(world.nodes[v]).adapter_id for v in VALIDATORS
                  if view(world.nodes[v]).phase is agg.Phase.FINAL}
        return World.start(world.round_id + 1, finals.pop() if finals else world.base)

    def tick(self, world: World) -> World:
        """The clock passes the next deadline. Every node's timer for it fires at once
        (the same absolute time): at the deadline the validators close collection; at
        the final deadline every machine stops, so nothing is left to interleave."""
        before, world = world, World(world.round_id, world.base, world.clock + 1, world.nodes, world.inflight)
        self.observe(before, world, "Tick")
        if world.clock == 1:
            for v in VALIDATORS:
                if view(world.nodes[v]).phase is agg.Phase.COLLECT:
                    world = self.apply(world, v, "close_collection", (), {"now_ms": world.now_ms})
            return world
        for node in NODES:
            if getattr(view(world.nodes[node]), "round_open", None) is not None:
                world = self.apply(world, node, "final_deadline", (), {"now_ms": world.now_ms})
        return world

    def settle_trainers(self, world: World) -> None:
        """Deliver every validator's outcome to every trainer (in both orders): the
        trainers must accept them and learn the adapter the validators agreed on."""
        outcomes = []
        for v in VALIDATORS:
            m = view(world.nodes[v])
            if m.phase is agg.Phase.FINAL:
                assert m.agreed is not None
                outcomes.append((v, "receive_round_final", RoundFinal(
                    m.round_id, m.round_open.base_adapter_id, m.adapter_id, m.agreed.aggregate_id,
                    list(m.agreed.contributors), m.mean_stats)))
            else:
                outcomes.append((v, "receive_round_aborted", RoundAborted(m.round_id, m.abort_reason)))
        for order in (outcomes, outcomes[::-1]):
            for t in TRAINERS:
                trainer = load(world.nodes[t])
                if trainer.round_open is None:
                    continue
                for v, method, message in order:
                    getattr(trainer, method)(v, decode(encode(message), channel=Channel.TRAIN))
                if trainer.phase is agg.TrainerPhase.FINAL:
                    assert trainer.adapter_id == order[0][2].adapter_id
                    assert trainer.included == (t in order[0][2].contributors)

    @staticmethod
    def round_over(world: World) -> bool:
        return all(view(world.nodes[v]).phase in (agg.Phase.FINAL, agg.Phase.ABORTED) for v in VALIDATORS)


def check_invariants(world: World) -> None:
    validators = [view(world.nodes[v]) for v in VALIDATORS]
    committee = [view(world.nodes[c]) for c in COMMITTEE]
    trainers = [view(world.nodes[t]) for t in TRAINERS]
    valid_blobs = {t: blob_of(t, world.round_id) for t in TRAINERS if t not in CHEATERS}
    assert agg.TypeOK(validators, committee, trainers)
    assert agg.NoDecryptionBelowMin(committee, MIN_CONTRIBUTORS)
    assert agg.JoinedOnlyMeshRounds(committee + trainers, MIN_CONTRIBUTORS)
    assert agg.OnlyAgreedAggregateDecrypted(validators, committee)
    assert agg.HonestValidatorsAgreeOnAdapter(validators)
    assert agg.FinalContainsOnlyValidContributions(validators, valid_blobs)
    assert agg.HonestNeverNamed(validators, [t for t in TRAINERS if t not in CHEATERS])
    assert agg.OverflowNamesAByzantine(validators, CHEATERS)  # no overflow here: the unit tests and TLC
    adapters = {v.adapter_id for v in validators if v.phase is agg.Phase.FINAL}
    assert all(t.adapter_id in adapters for t in trainers if t.phase is agg.TrainerPhase.FINAL)
    for raw in world.nodes.values():  # persistence is exact in every reachable state
        if raw not in _persistence_checked:
            assert pack(view(raw)) == raw
            _persistence_checked.add(raw)


_persistence_checked: set[bytes] = set()


def explore(bounds: Bounds) -> dict[str, Any]:
    """Breadth-first over every reachable world; returns counts and how rounds ended."""
    explorer = Explorer(bounds)
    start = World.start(1, h("genesis adapter"))
    seen, finished = {start.key()}, set()
    queue = deque([start])
    outcomes: Counter = Counter()
    while queue:
        world = queue.popleft()
        check_invariants(world)
        for nxt in explorer.successors(world):
            if nxt is None:
                continue
            if nxt.clock < 2:
                key = nxt.key()
                if key not in seen:
                    seen.add(key)
                    queue.append(nxt)
                continue
            # Past the final deadline every machine is done: a leaf, or the next round.
            key = (nxt.round_id, nxt.base, tuple(nxt.nodes[n] for n in NODES))
            if key in finished:
                continue
            finished.add(key)
            check_invariants(nxt)
            explorer.settle_trainers(nxt)
            phases = tuple(view(nxt.nodes[v]).phase.value for v in VALIDATORS)
            reasons = tuple(sorted({view(nxt.nodes[v]).abort_reason for v in VALIDATORS} - {""}))
            outcomes[(nxt.round_id, phases, reasons)] += 1
            following = explorer.next_round(nxt)
            if following is not None and following.key() not in seen:
                seen.add(following.key())
                queue.append(following)
    return {"states": len(seen) + len(finished), "transitions": explorer.transitions,
            "rejected": explorer.rejected_messages, "outcomes": outcomes}


def report(bounds: Bounds, capsys) -> dict[str, Any]:
    started = time.perf_counter()
    result = explore(bounds)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\naggregation explore {bounds}: {result['states']} states, {result['transitions']} "
              f"transitions, {result['rejected']} rejected messages, {elapsed:.1f} s")
        for (round_id, phases, reasons), count in sorted(result["outcomes"].items()):
            print(f"  round {round_id}: validators {phases} {reasons} x{count}")
    return result


def assert_interesting_ends(outcomes: Counter, rounds: int) -> None:
    """The search reaches the ends that matter, not just any: every round finishes with
    an adapter somewhere, and rounds abort for each reason the model can produce."""
    for round_id in range(1, rounds + 1):
        assert (round_id, ("final", "final"), ()) in outcomes
    reasons = {r for (_, _, rs) in outcomes for r in rs}
    assert {"below_min_contributors", "no_agreement", "not_enough_partials", "never_opened"} <= reasons
    assert any("final" in phases and "aborted" in phases for (_, phases, _) in outcomes)


def test_every_reachable_state_keeps_the_invariants(capsys):
    bounds = Bounds()
    result = report(bounds, capsys)
    assert_interesting_ends(result["outcomes"], bounds.rounds)


@pytest.mark.slow
def test_every_reachable_state_keeps_the_invariants_with_members_hearing_apart(capsys):
    """The full bound: each AcceptedSet reaches each member on its own (minutes)."""
    bounds = Bounds(committee_hears_as_one=False)
    result = report(bounds, capsys)
    assert_interesting_ends(result["outcomes"], bounds.rounds)
