"""Secure-aggregation rounds, sans-IO: the validator's, committee member's and trainer's machines.

Read beside specs/SecureAggregation.tla: each public method is one of its actions under
the same name in snake_case (OpenRound = open_round, ...), and the check functions at
the bottom are its invariants, under the same names.

Validator phases:  OPEN -> COLLECT -> AGGREGATE -> DECRYPT -> FINAL, or ABORTED
                   (DECRYPT -> BLAME -> ABORTED when the sum overflows a slot).
  COLLECT    contributions that arrive before the deadline are verified by the shell;
  AGGREGATE  at the deadline, once every received contribution has a verdict, the
             accepted ones (sorted by trainer hotkey) are aggregated and published as
             an AcceptedSet; the round goes on with the set that a quorum (a strict
             majority of the round's validators) published identically;
  DECRYPT    t valid partial decryptions of that aggregate are combined;
  FINAL      the shell reports the new adapter id; RoundFinal is sent.
  BLAME      the sum did not unpack at one position (SlotOverflow, issue 11 finding 5):
             every contributor of the agreed set is asked to prove that position in
             range (BlameRequest, SlotProof); at the blame deadline whoever failed or
             stayed silent is named in bad_contributors and the round is aborted; the
             named are refused as contributors for COOLDOWN_ROUNDS rounds after it.
A committee member releases its partial decryption only for an aggregate that a quorum
agreed on, that it recomputed itself, and that has at least the mesh's min_contributors.

Who may open a round, and with which parameters, is not the RoundOpen's to say: every
node holds the mesh's rules (MeshRounds: validators, committee, RoundPolicy) and joins
only what round_open_refusal() allows: the scheduled opener's RoundOpen for a round id
this node expects next, with the mesh's minimum and layout and bounded hyper-parameters.

The machines never do crypto, read a clock or touch the network: verification
outcomes, aggregate ids and partial validity come in as events from the shell, time is
an argument, and what to do comes back as effects.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from crypto.contribution import decryption_blocks, derive_layout
from protocol.aggregation_messages import (
    MAX_COMMITTEE, MAX_HYPERPARAMETERS, MAX_NAME_CHARS, MAX_ROUND_CONTRIBUTORS, MAX_STATS,
    MAX_VALIDATORS, AcceptedSet, BlameRequest, Contribution, ContributionVerdict, PartialDecryption,
    RoundAborted, RoundFinal, RoundOpen, SlotProof,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import Message, decode, encode

STATE_VERSION = 1
MAX_HOTKEY_CHARS = 48  # an SS58 address of a 32-byte key with a one-byte prefix
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_blob_id(text: object) -> bool:
    return isinstance(text, str) and _SHA256_HEX.fullmatch(text) is not None  # not "$": no trailing "\n"


# --- phases -------------------------------------------------------------------------


class Phase(str, enum.Enum):
    OPEN = "open"
    COLLECT = "collect"
    AGGREGATE = "aggregate"
    DECRYPT = "decrypt"
    BLAME = "blame"  # the sum overflowed a slot: waiting for every contributor's slot proof
    FINAL = "final"
    ABORTED = "aborted"


class CommitteePhase(str, enum.Enum):
    WAITING = "waiting"  # no RoundOpen yet
    WATCH = "watch"  # waiting for a quorum of AcceptedSets
    DECRYPT = "decrypt"  # agreed: recompute the aggregate, then partially decrypt it
    RELEASED = "released"
    ABORTED = "aborted"


class TrainerPhase(str, enum.Enum):
    WAITING = "waiting"
    TRAINING = "training"
    CONTRIBUTED = "contributed"
    MISSED = "missed"  # training ended after the deadline: nothing sent
    FINAL = "final"
    ABORTED = "aborted"


# --- effects: what the shell must do -------------------------------------------------


@dataclass(frozen=True)
class Send:
    message: Message


@dataclass(frozen=True)
class SetTimer:
    """Call the named event (final_deadline, close_collection) at `at_ms`."""

    name: str
    at_ms: int


@dataclass(frozen=True)
class EnterPhase:
    """For logs and metrics: the machine moved to `phase` (reason says why, if aborted)."""

    phase: str
    reason: str = ""


@dataclass(frozen=True)
class Train:
    round_open: RoundOpen


@dataclass(frozen=True)
class VerifyContributionBlob:
    """Fetch the blob, verify every proof, then verify_contribution(...)."""

    trainer: str
    blob_id: str


@dataclass(frozen=True)
class ComputeAggregate:
    """Multiply these contributions' ciphertexts slot-wise, store the aggregate blob,
    then compute_aggregate(sha256 of its bytes)."""

    round_id: int
    blob_ids: tuple[str, ...]


@dataclass(frozen=True)
class DecryptPartial:
    """Partially decrypt the aggregate (our key share), store the batch with its proof,
    then release_partial(aggregate_id, that blob's id)."""

    round_id: int
    aggregate_id: str


@dataclass(frozen=True)
class VerifyPartialBlob:
    """Fetch the batch, check member_index and its proof against the aggregate, then
    verify_partial(..., blocks=the block numbers it carries, cover=cover)."""

    member: str
    member_index: int  # 1-based key-share index: position in the committee
    partial_blob_id: str
    aggregate_id: str
    cover: bool = False  # the member's cover partial (blocks still missing), not its first


@dataclass(frozen=True)
class CombinePartials:
    """Combine these t partials, unpack and average the sum over `contributors`, apply it
    to the base adapter, store the adapter, then finalize(adapter_id, mean_stats); or
    combine_fails(reason)."""

    round_id: int
    aggregate_id: str
    base_adapter_id: str
    partials: tuple[tuple[int, str], ...]  # (member_index, partial_blob_id)
    contributors: int


@dataclass(frozen=True)
class BlamePosition:
    """Where a SlotOverflow asks every contributor to prove its plaintext in range
    (crypto.contribution.Blame, in the machine's terms)."""

    plaintext_index: int
    slot: int
    top: bool  # the whole plaintext: every slot in range, nothing above the last

    def to_state(self) -> list:
        return [self.plaintext_index, self.slot, self.top]

    @classmethod
    def from_state(cls, raw: list) -> "BlamePosition":
        return cls(int(raw[0]), int(raw[1]), bool(raw[2]))


@dataclass(frozen=True)
class VerifySlotProofBlob:
    """Fetch the proof blob and the trainer's contribution blob, check the slot proof
    (crypto.contribution.verify_slots, under the trainer's slot_context_for), then
    verify_slot_proof(trainer, valid=..., reason=...)."""

    trainer: str
    proof_blob_id: str
    contribution_blob_id: str
    position: BlamePosition


@dataclass(frozen=True)
class ProveSlots:
    """Trainer: prove `position` in range for the update this trainer sealed in the round
    (crypto.contribution.prove_slots with the kept update and Precomputation), store the
    encoded proof, then slot_proved(position, that blob's id)."""

    round_id: int
    aggregate_id: str
    position: BlamePosition


Effect = Union[Send, SetTimer, EnterPhase, Train, VerifyContributionBlob, ComputeAggregate,
               DecryptPartial, VerifyPartialBlob, CombinePartials, VerifySlotProofBlob, ProveSlots]


# --- round configuration: a RoundOpen message, checked --------------------------------


def quorum(round_open: RoundOpen) -> int:
    """AcceptedSets needed to agree: a strict majority, so two quorums share a validator
    and, as an honest validator publishes one set per round, at most one set is agreed."""
    return len(round_open.validators) // 2 + 1


def _check_hotkeys(name: str, hotkeys: list[str], limit: int) -> str | None:
    if not 1 <= len(hotkeys) <= limit:
        return f"{name}: between 1 and {limit} hotkeys, got {len(hotkeys)}"
    if len(set(hotkeys)) != len(hotkeys):
        return f"{name}: a hotkey appears twice"
    if not all(0 < len(h) <= MAX_HOTKEY_CHARS for h in hotkeys):
        return f"{name}: each hotkey is 1..{MAX_HOTKEY_CHARS} characters"
    return None


def round_open_problem(ro: RoundOpen) -> str | None:
    """Why this RoundOpen cannot be a round's configuration, or None if it can."""
    checks = [
        (ro.round_id >= 0, "round_id must be >= 0"),
        (is_blob_id(ro.base_adapter_id), "base_adapter_id must be a sha256 hex id"),
        (is_blob_id(ro.public_key_id), "public_key_id must be a sha256 hex id"),
        (len(ro.hyperparameters) <= MAX_HYPERPARAMETERS, f"at most {MAX_HYPERPARAMETERS} hyper-parameters"),
        (all(0 < len(k) <= MAX_NAME_CHARS and math.isfinite(v) for k, v in ro.hyperparameters.items()),
         f"hyper-parameter names are 1..{MAX_NAME_CHARS} characters and values finite"),
        (math.isfinite(ro.clip_bound) and ro.clip_bound > 0, "clip_bound must be finite and > 0"),
        (2 <= ro.quant_bits <= 32, "quant_bits must be in 2..32"),
        (1 <= ro.max_contributors <= MAX_ROUND_CONTRIBUTORS,
         f"max_contributors must be in 1..{MAX_ROUND_CONTRIBUTORS}"),
        (ro.key_bits >= 256, "key_bits must be >= 256"),
        (ro.ciphertexts_per_contribution >= 1, "ciphertexts_per_contribution must be >= 1"),
        (ro.max_contribution_bytes >= 1, "max_contribution_bytes must be >= 1"),
        (0 <= ro.deadline_ms < ro.final_deadline_ms, "need 0 <= deadline_ms < final_deadline_ms"),
        (1 <= ro.min_contributors <= ro.max_contributors, "need 1 <= min_contributors <= max_contributors"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    problem = (_check_hotkeys("committee", ro.committee, MAX_COMMITTEE)
               or _check_hotkeys("validators", ro.validators, MAX_VALIDATORS))
    if problem:
        return problem
    if not 1 <= ro.threshold <= len(ro.committee):
        return f"threshold must be in 1..{len(ro.committee)} (the committee's size)"
    return None




# --- the mesh's round rules: what a RoundOpen must match (issue 11 finding 1) -------------
#
# A RoundOpen names its own minimum, layout and hyper-parameters, so taking them from the
# message lets any validator that gossips first choose them (min_contributors=1 has the
# committee decrypt one trainer's update). Every node therefore holds the mesh's rules
# (the committee files on disk, the same on every node) and accepts a RoundOpen only if
# it is the scheduled opener's, for a round id this node expects next, with exactly the
# mesh's privacy parameters and hyper-parameters in the mesh's ranges.

MAX_ROUND_ID = 2**31 - 1


@dataclass(frozen=True)
class HyperparameterBound:
    """A hyper-parameter a RoundOpen must carry, in [low, high] (an integer if integral)."""

    name: str
    low: float
    high: float
    integral: bool = False

    def problem(self, value: float) -> str | None:
        if not self.low <= value <= self.high:
            return f"{self.name}={value!r} is outside [{self.low:g}, {self.high:g}]"
        if self.integral and value != int(value):
            return f"{self.name}={value!r} must be a whole number"
        return None


# What the trainer's shell reads (node/roles/trainer.py): steps holds its train lock, so
# it is bounded; lr 0 would contribute nothing and a huge one noise.
DEFAULT_HYPERPARAMETERS = (
    HyperparameterBound("steps", 1, 1000, integral=True),
    HyperparameterBound("lr", 1e-6, 1.0),
    HyperparameterBound("batch_size", 1, 256, integral=True),
    HyperparameterBound("block_len", 8, 4096, integral=True),
    HyperparameterBound("adapter_values", 1, 1 << 28, integral=True),
)


@dataclass(frozen=True)
class RoundPolicy:
    """The mesh's privacy parameters and bounds: configuration, never a message's choice.

    min_contributors is what keeps the mean private (the "mean" of one update is that
    update); max_contributors, clip_bound and quant_bits fix the packing layout, which
    every party must derive identically. The time bounds keep a round (a trainer's train
    lock, a slot, a state file) from being held open for long.
    """

    min_contributors: int = 2
    max_contributors: int = 16
    clip_bound: float = 1.0
    quant_bits: int = 16
    max_collect_ms: int = 15 * 60_000  # deadline at most this far after the RoundOpen is heard
    max_decrypt_ms: int = 30 * 60_000  # final deadline at most this far after the deadline
    max_round_gap: int = 4  # a RoundOpen may skip at most gap - 1 round ids past the last known
    hyperparameters: tuple[HyperparameterBound, ...] = DEFAULT_HYPERPARAMETERS

    def problem(self) -> str | None:
        checks = [
            (1 <= self.min_contributors <= self.max_contributors <= MAX_ROUND_CONTRIBUTORS,
             f"need 1 <= min_contributors <= max_contributors <= {MAX_ROUND_CONTRIBUTORS}"),
            (math.isfinite(self.clip_bound) and self.clip_bound > 0, "clip_bound must be finite and > 0"),
            (2 <= self.quant_bits <= 32, "quant_bits must be in 2..32"),
            (self.max_collect_ms > 0 and self.max_decrypt_ms > 0, "time bounds must be > 0"),
            (1 <= self.max_round_gap <= 1000, "max_round_gap must be in 1..1000"),
            (len({b.name for b in self.hyperparameters}) == len(self.hyperparameters) <= MAX_HYPERPARAMETERS,
             "hyper-parameter bounds: distinct names"),
        ]
        return next((why for ok, why in checks if not ok), None)

    def to_doc(self) -> dict:
        doc = {k: getattr(self, k) for k in ("min_contributors", "max_contributors", "clip_bound", "quant_bits",
                                            "max_collect_ms", "max_decrypt_ms", "max_round_gap")}
        doc["hyperparameters"] = [[b.name, b.low, b.high, b.integral] for b in self.hyperparameters]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "RoundPolicy":
        """From a config file's dict; LocalProtocolError (with the key) if it is not one."""
        known = {"min_contributors", "max_contributors", "clip_bound", "quant_bits", "max_collect_ms",
                 "max_decrypt_ms", "max_round_gap", "hyperparameters"}
        if not isinstance(doc, Mapping):
            raise LocalProtocolError(f"round policy: an object with keys {sorted(known)}, got {doc!r}")
        if set(doc) - known:
            raise LocalProtocolError(f"round policy: unknown keys {sorted(set(doc) - known)}; known: {sorted(known)}")
        fields = dict(doc)
        try:
            if "hyperparameters" in fields:
                fields["hyperparameters"] = tuple(HyperparameterBound(str(n), float(lo), float(hi), bool(i))
                                                  for n, lo, hi, i in fields["hyperparameters"])
            policy = cls(**fields)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"round policy: {exc}") from exc
        problem = policy.problem()
        if problem:
            raise LocalProtocolError(f"round policy: {problem}")
        return policy


@dataclass(frozen=True)
class MeshRounds:
    """Who runs this mesh's rounds and under which policy, as this node's configuration
    says (validators from the genesis file, committee and policy from the committee files)."""

    validators: tuple[str, ...]  # sorted hotkeys
    committee: tuple[str, ...]  # member i (1-based) holds key share i
    threshold: int
    public_key_id: str
    key_bits: int
    policy: RoundPolicy = RoundPolicy()


def scheduled_opener(mesh: MeshRounds, round_id: int) -> str:
    """The one validator whose RoundOpen for round_id counts: rank 0 of the sorted
    validators (the node shell opens every round from there)."""
    return sorted(mesh.validators)[0]


def round_id_problem(round_id: int, last_round_id: int | None, max_gap: int) -> str | None:
    """A RoundOpen names the round after the last one this node knows (at most max_gap
    ahead, so a node that missed a round or two catches up); a node that knows none
    expects one of the first max_gap rounds."""
    if not 0 <= round_id <= MAX_ROUND_ID:
        return f"round id {round_id} is outside 0..{MAX_ROUND_ID}"
    low = 0 if last_round_id is None else last_round_id + 1
    if not low <= round_id < low + max_gap:
        return f"round id {round_id}: this node expects {low}..{low + max_gap - 1} next"
    return None


def open_wait_reason(live_trainers: int, policy: RoundPolicy) -> str | None:
    """Why the opener should not open the next round now (None: open it). Fewer live
    trainers than the minimum can only end in below_min_contributors: waiting costs
    nothing, a round that must abort costs every validator a deadline."""
    if live_trainers < policy.min_contributors:
        return (f"{live_trainers} trainer(s) live, a round needs {policy.min_contributors}: "
                "waiting for more to be heard")
    return None


def expected_base_adapter(finals: Mapping[int, str], round_id: int, initial_adapter_id: str) -> str:
    """The base a round starts from: the adapter of the last round before it that ended
    with one here, else the mesh's initial adapter (the honest opener's rule)."""
    before = [r for r in finals if r < round_id]
    return finals[max(before)] if before else initial_adapter_id


@dataclass(frozen=True)
class OpenRefusal:
    reason: str
    hint: str


def round_open_refusal(mesh: MeshRounds, sender: str, ro: RoundOpen, *, now_ms: int,
                       last_round_id: int | None, expected_base: str | None = None) -> OpenRefusal | None:
    """Why this node must not join the round `sender` announced, or None if it may.

    The same rule for validators, committee members and trainers. expected_base: the base
    adapter this node would open the round from (None: this node cannot tell, a trainer).
    """
    problem = round_open_problem(ro)
    if problem:
        return OpenRefusal("bad_round_open", problem)
    p = mesh.policy
    opener = scheduled_opener(mesh, ro.round_id)
    if sender != opener:
        return OpenRefusal("not_the_scheduled_opener",
                           f"{sender} announced round {ro.round_id}; only {opener} opens it")
    problem = round_id_problem(ro.round_id, last_round_id, p.max_round_gap)
    if problem:
        return OpenRefusal("unexpected_round_id", problem)
    if list(ro.validators) != sorted(mesh.validators):
        return OpenRefusal("not_a_round_validator", "the round's validators are not the mesh's")
    if (ro.public_key_id != mesh.public_key_id or list(ro.committee) != list(mesh.committee)
            or ro.threshold != mesh.threshold or ro.key_bits != mesh.key_bits):
        return OpenRefusal("wrong_committee_key", "the round is for another committee key")
    theirs = (ro.min_contributors, ro.max_contributors, ro.clip_bound, ro.quant_bits)
    ours = (p.min_contributors, p.max_contributors, p.clip_bound, p.quant_bits)
    if theirs != ours:
        return OpenRefusal("round_policy_mismatch",
                           f"(min, max contributors, clip bound, quant bits) {theirs} are not the mesh's {ours}")
    problem = hyperparameters_problem(p, ro.hyperparameters)
    if problem:
        return OpenRefusal("bad_hyperparameters", problem)
    if not ro.deadline_ms <= now_ms + p.max_collect_ms or ro.final_deadline_ms - ro.deadline_ms > p.max_decrypt_ms:
        return OpenRefusal("deadline_out_of_range",
                           f"deadline at most {p.max_collect_ms} ms ahead and final deadline at most "
                           f"{p.max_decrypt_ms} ms after it")
    if expected_base is not None and ro.base_adapter_id != expected_base:
        return OpenRefusal("wrong_base_adapter",
                           f"base {ro.base_adapter_id[:12]}, this node expects {expected_base[:12]}")
    return None


def hyperparameters_problem(policy: RoundPolicy, hyperparameters: Mapping[str, float]) -> str | None:
    bounds = {b.name: b for b in policy.hyperparameters}
    if set(hyperparameters) != set(bounds):
        return f"hyper-parameters must be exactly {sorted(bounds)}, got {sorted(hyperparameters)}"
    return next((why for name, value in sorted(hyperparameters.items())
                 if (why := bounds[name].problem(value))), None)


def check_round_open(mesh: MeshRounds, sender: str, ro: RoundOpen, *, now_ms: int,
                     last_round_id: int | None, expected_base: str | None = None) -> RoundOpen:
    """round_open_refusal as a RemoteProtocolError with its reason."""
    refusal = round_open_refusal(mesh, sender, ro, now_ms=now_ms, last_round_id=last_round_id,
                                 expected_base=expected_base)
    if refusal is not None:
        raise RemoteProtocolError(f"RoundOpen {ro.round_id} from {sender}: {refusal.hint}", reason=refusal.reason)
    return ro


# --- which contributions are aggregated (issue 11 finding 8) ---------------------------
#
# First come, first served let k-1 colluders contribute first so that one honest trainer
# filled the last place: its update is then count x mean minus theirs. Validators now take
# every valid contribution up to candidate_limit and, after the deadline, draw
# max_contributors of them; the draw is seeded by the hash of the accepted (trainer, blob
# id) pairs themselves, so no single party picks it and every validator with the same
# accepted contributions draws the same set (docs/aggregation.md says what this does not
# protect against).

CANDIDATES_PER_PLACE = 4  # how many candidates a validator verifies per place in the set


def candidate_limit(ro: RoundOpen) -> int:
    """Contributions a validator receives (and verifies) at most: each costs a proof check."""
    return min(MAX_ROUND_CONTRIBUTORS, CANDIDATES_PER_PLACE * ro.max_contributors)


def draw_seed(ro: RoundOpen, accepted: Mapping[str, str]) -> bytes:
    """sha256 over the round (id, key, base) and every accepted (trainer, blob id) pair."""
    lines = [f"sealmesh/draw/v1/{ro.round_id}/{ro.public_key_id}/{ro.base_adapter_id}"]
    lines += [f"{t}:{accepted[t]}" for t in sorted(accepted)]
    return hashlib.sha256("\n".join(lines).encode()).digest()


def draw_contributors(ro: RoundOpen, accepted: Mapping[str, str]) -> list[str]:
    """The trainers whose contributions are aggregated, sorted: all of them up to
    max_contributors, else the max_contributors with the lowest sha256(seed || trainer)."""
    if len(accepted) <= ro.max_contributors:
        return sorted(accepted)
    seed = draw_seed(ro, accepted)
    ranked = sorted(accepted, key=lambda t: hashlib.sha256(seed + t.encode()).digest())
    return sorted(ranked[:ro.max_contributors])


# --- which blocks a partial must carry (issue 11 finding 7) ---------------------------


def own_blocks(ro: RoundOpen, member: str) -> tuple[int, ...]:
    """The decryption blocks (crypto.contribution.decryption_blocks over the aggregate's
    ciphertexts) that `member` is asked to decrypt first."""
    index = ro.committee.index(member) + 1
    blocks = decryption_blocks(ro.ciphertexts_per_contribution, range(1, len(ro.committee) + 1), ro.threshold)
    return tuple(b for b, block in enumerate(blocks) if index in block.members)


def partial_coverage_problem(ro: RoundOpen, member: str, blocks: Iterable[int]) -> str | None:
    """A member's (first) partial must carry each of its own blocks; one that carries only
    some would stall the combine while its member looks alive, so it is a bad partial and
    its blocks are covered by others. More blocks (cover for a gone member) are fine."""
    missing = sorted(set(own_blocks(ro, member)) - set(blocks))
    return f"blocks {missing} of {member}'s are missing" if missing else None


# --- the blame step after a slot overflow (issue 11 finding 5) -----------------------
#
# The contribution proof bounds plaintexts, not slots, so an accepted contribution can make
# the decrypted sum unpackable (SlotOverflow, with its position). Every contributor of the
# agreed set then proves that position in range with the exact slot proof; an honest one
# always can, and if all could, no slot sum could overflow there. So whoever fails or stays
# silent until the blame deadline is named, and only they: the round is aborted (no
# re-aggregation without them in the same round: docs/aggregation.md) and validators refuse
# their contributions for COOLDOWN_ROUNDS rounds.

BLAME_MS = 60_000  # proofs take 2-4 s each at 2048 bits, every contributor in parallel
MAX_BLAME_MS = 10 * 60_000
COOLDOWN_ROUNDS = 3
NAMED_OUT_OF_RANGE = "slot_out_of_range"  # its proof does not verify
NAMED_SILENT = "no_slot_proof"  # no proof (or none fetchable) by the blame deadline


@functools.lru_cache(maxsize=64)
def _slots_per_plaintext(clip_bound: float, quant_bits: int, max_contributors: int, key_bits: int) -> int | None:
    try:
        return derive_layout(clip_bound, quant_bits, max_contributors, key_bits).slots_per_plaintext
    except ValueError:
        return None


def blame_position_problem(ro: RoundOpen, position: BlamePosition) -> str | None:
    """Why `position` cannot be a blamed position of this round's layout, or None."""
    k = _slots_per_plaintext(ro.clip_bound, ro.quant_bits, ro.max_contributors, ro.key_bits)
    if k is None:
        return "the round's layout cannot be derived"
    if not 0 <= position.plaintext_index < ro.ciphertexts_per_contribution:
        return f"plaintext {position.plaintext_index} is outside 0..{ro.ciphertexts_per_contribution - 1}"
    if not 0 <= position.slot < k or (position.top and position.slot != k - 1):
        return f"slot {position.slot} (top={position.top}) does not fit {k} slots per plaintext"
    return None


def cooling_down(named_by_round: Mapping[int, Iterable[str]], round_id: int,
                 rounds: int = COOLDOWN_ROUNDS) -> frozenset[str]:
    """Trainers named by this validator's blame step in one of the `rounds` rounds before
    round_id: their contributions to round_id are refused (blamed_cooling_down)."""
    return frozenset(t for r, named in named_by_round.items() if round_id - rounds <= r < round_id for t in named)


# --- accepted sets --------------------------------------------------------------------


@dataclass(frozen=True)
class SetView:
    """One AcceptedSet's content: what validators must publish identically to agree."""

    contributors: tuple[str, ...]
    blob_ids: tuple[str, ...]
    aggregate_id: str  # "" when below the minimum

    @classmethod
    def from_message(cls, msg: AcceptedSet, ro: RoundOpen) -> "SetView":
        def bad(why: str) -> RemoteProtocolError:
            return RemoteProtocolError(f"AcceptedSet of round {msg.round_id}: {why}", reason="bad_accepted_set")

        if len(msg.contributors) != len(msg.blob_ids):
            raise bad("one blob id per contributor")
        if len(msg.contributors) > ro.max_contributors:
            raise bad(f"more than max_contributors ({ro.max_contributors})")
        if any(a >= b for a, b in zip(msg.contributors, msg.contributors[1:])):
            raise bad("contributors must be sorted by hotkey, each once")
        if not all(is_blob_id(b) for b in msg.blob_ids) or len(set(msg.blob_ids)) != len(msg.blob_ids):
            raise bad("blob ids must be distinct sha256 hex ids")
        below = len(msg.contributors) < ro.min_contributors
        if below and msg.aggregate_id != "":
            raise bad("a set below min_contributors has no aggregate (aggregate_id must be empty)")
        if not below and not is_blob_id(msg.aggregate_id):
            raise bad("aggregate_id must be a sha256 hex id")
        return cls(tuple(msg.contributors), tuple(msg.blob_ids), msg.aggregate_id)

    def to_message(self, round_id: int) -> AcceptedSet:
        return AcceptedSet(round_id, list(self.contributors), list(self.blob_ids), self.aggregate_id)

    def to_state(self) -> list:
        return [list(self.contributors), list(self.blob_ids), self.aggregate_id]

    @classmethod
    def from_state(cls, raw: list) -> "SetView":
        return cls(tuple(raw[0]), tuple(raw[1]), raw[2])


class _Agreement:
    """The AcceptedSets heard from the round's validators, one each."""

    def __init__(self, ro: RoundOpen, sets: Mapping[str, SetView] | None = None) -> None:
        self.ro = ro
        self.sets: dict[str, SetView] = dict(sets or {})

    def record(self, validator: str, view: SetView) -> bool:
        """True if new; a second, different set from one validator is equivocation."""
        if validator not in self.ro.validators:
            raise RemoteProtocolError(f"{validator} is not a validator of round {self.ro.round_id}",
                                      reason="not_a_round_validator")
        known = self.sets.get(validator)
        if known is not None:
            if known != view:
                raise RemoteProtocolError(f"{validator} published two different AcceptedSets",
                                          reason="equivocation")
            return False
        self.sets[validator] = view
        return True

    def agreed(self) -> SetView | None:
        counts = Counter(self.sets.values())
        for view, count in counts.items():
            if count >= quorum(self.ro):
                return view
        return None

    def impossible(self) -> bool:
        """No set can reach the quorum any more, even if every silent validator joins it."""
        silent = len(self.ro.validators) - len(self.sets)
        best = max(Counter(self.sets.values()).values(), default=0)
        return best + silent < quorum(self.ro)

    def to_state(self) -> dict:
        return {v: s.to_state() for v, s in sorted(self.sets.items())}


def _round_open_state(machine: Any) -> bytes | None:
    """Persist the announced RoundOpen in its wire form: compact, and decoded strictly.
    Encoded once per machine: a node snapshots after every event."""
    if machine.round_open is None:
        return None
    wire = machine.__dict__.get("_round_open_wire")
    if wire is None:
        wire = machine._round_open_wire = encode(machine.round_open)
    return wire


@functools.lru_cache(maxsize=256)
def _round_open_from_state(raw: bytes) -> RoundOpen:
    # Cached: a node reloads the same round's state after every event (and the explorer
    # millions of times); RoundOpen is frozen and machines never change its lists.
    try:
        ro = decode(raw)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"saved RoundOpen does not decode: {exc}") from exc
    if not isinstance(ro, RoundOpen) or round_open_problem(ro):
        raise LocalProtocolError("saved state holds no valid RoundOpen")
    return ro


def _check_state(raw: Any, kind: str) -> dict:
    if not isinstance(raw, dict) or raw.get("v") != STATE_VERSION or raw.get("kind") != kind:
        raise LocalProtocolError(f"not a version-{STATE_VERSION} {kind} state: "
                                 f"v={raw.get('v') if isinstance(raw, dict) else None!r}")
    return raw


def _same_round(ro: RoundOpen, round_id: int, what: str) -> None:
    if round_id != ro.round_id:
        raise RemoteProtocolError(f"{what} for round {round_id}, this is round {ro.round_id}",
                                  reason="wrong_round")


# --- the validator's round ---------------------------------------------------------------


@dataclass(frozen=True)
class Exclusion:
    """A contribution left out, with what settlement needs to justify it."""

    trainer: str
    blob_id: str
    reason: str
    evidence_id: str


class ValidatorRound:
    """One validator's view of one round."""

    def __init__(self, round_open: RoundOpen, me: str, *, barred: Iterable[str] = ()) -> None:
        """barred: trainers cooling down after being named (cooling_down)."""
        problem = round_open_problem(round_open)
        if problem:
            raise LocalProtocolError(f"cannot run round {round_open.round_id}: {problem}")
        self._start(round_open, me)
        self.barred = frozenset(barred)

    def _start(self, round_open: RoundOpen, me: str) -> None:
        if me not in round_open.validators:
            raise LocalProtocolError(f"{me} is not among round {round_open.round_id}'s validators")
        self.round_open = round_open
        self.me = me
        self.phase = Phase.OPEN
        self.abort_reason = ""
        self.contributions: dict[str, str] = {}  # trainer -> blob id, received in time
        self.pending: set[str] = set()  # trainers whose verification the shell still owes
        self.accepted: set[str] = set()
        self.rejected: dict[str, tuple[str, str]] = {}  # trainer -> (reason, evidence id)
        self.computing_own = False  # ComputeAggregate for our own set is out
        self.published: SetView | None = None
        self.agreement = _Agreement(round_open)
        self.agreed: SetView | None = None
        self.aggregate_confirmed = False  # we hold (recomputed) the agreed aggregate
        self.partials: dict[str, tuple[str, str]] = {}  # member -> (aggregate id, blob id)
        self.partials_valid: set[str] = set()
        self.bad_partials: dict[str, str] = {}  # member -> why it was excluded
        # A member's second, cover partial: blocks still missing after a timeout (finding 7).
        self.covers: dict[str, tuple[str, str]] = {}
        self.covers_valid: set[str] = set()
        self.bad_covers: dict[str, str] = {}
        self.combining: tuple[tuple[int, str], ...] = ()
        self.adapter_id = ""
        self.mean_stats: dict[str, float] = {}
        self.barred: frozenset[str] = frozenset()
        # the blame step (issue 11 finding 5)
        self.blame: BlamePosition | None = None
        self.blame_deadline_ms = 0
        self.blame_closed = False  # the blame deadline passed: no more proofs taken
        self.slot_proofs: dict[str, str] = {}  # contributor -> proof blob id
        self.slot_verdicts: dict[str, str] = {}  # contributor -> "" (proven) or why not
        self.bad_contributors: dict[str, str] = {}  # contributor -> NAMED_OUT_OF_RANGE | NAMED_SILENT

    @classmethod
    def join_round(cls, sender: str, ro: RoundOpen, *, me: str, mesh: MeshRounds, now_ms: int,
                   last_round_id: int | None, expected_base: str | None,
                   barred: Iterable[str] = ()) -> "ValidatorRound":
        """JoinRound for a validator: the round `sender` announced becomes ours if it keeps
        the mesh's rules (round_open_refusal, the rule every node joins by); a refusal is a
        RemoteProtocolError with its reason."""
        check_round_open(mesh, sender, ro, now_ms=now_ms, last_round_id=last_round_id, expected_base=expected_base)
        return cls(ro, me, barred=barred)

    def receive_round_open(self, sender: str, ro: RoundOpen) -> list[Effect]:
        """A RoundOpen for the round we already run: a copy changes nothing, another is refused."""
        if ro != self.round_open:
            raise RemoteProtocolError(f"a different RoundOpen for round {ro.round_id} from {sender}",
                                      reason="conflicting_round_open")
        return []

    @property
    def round_id(self) -> int:
        return self.round_open.round_id

    def exclusions(self) -> list[Exclusion]:
        return [Exclusion(t, self.contributions[t], why, evidence)
                for t, (why, evidence) in sorted(self.rejected.items())]

    # -- actions --

    def open_round(self, *, now_ms: int) -> list[Effect]:
        """OpenRound: announce the round and start collecting."""
        self._require(Phase.OPEN, "OpenRound")
        if now_ms >= self.round_open.deadline_ms:
            raise LocalProtocolError(f"round {self.round_id} opened at {now_ms}, after its deadline")
        self.phase = Phase.COLLECT
        # only the scheduled opener announces: every other node refuses a RoundOpen from
        # anyone else (round_open_refusal, not_the_scheduled_opener)
        announce = [Send(self.round_open)] if self.is_opener else []
        return [*announce, EnterPhase(Phase.COLLECT.value),
                SetTimer("close_collection", self.round_open.deadline_ms),
                SetTimer("final_deadline", self.round_open.final_deadline_ms)]

    @property
    def is_opener(self) -> bool:
        """This validator is the round's scheduled opener (rank 0 of its sorted validators)."""
        return self.me == sorted(self.round_open.validators)[0]

    def receive_contribution(self, trainer: str, msg: Contribution, *, now_ms: int) -> list[Effect]:
        """ReceiveContribution: one per trainer, before the deadline, of the announced shape."""
        _same_round(self.round_open, msg.round_id, "Contribution")
        if self.phase is Phase.OPEN:
            raise RemoteProtocolError(f"contribution from {trainer} before round {self.round_id} opened here",
                                      reason="round_not_open")
        if self.phase is not Phase.COLLECT or now_ms >= self.round_open.deadline_ms:
            raise RemoteProtocolError(f"contribution from {trainer} after round {self.round_id}'s deadline",
                                      reason="late_contribution")
        if not is_blob_id(msg.blob_id):
            raise RemoteProtocolError("blob_id must be a sha256 hex id", reason="bad_blob_id")
        if trainer in self.barred:
            raise RemoteProtocolError(f"{trainer} was named by a blame step less than {COOLDOWN_ROUNDS} rounds ago",
                                      reason="blamed_cooling_down")
        known = self.contributions.get(trainer)
        if known == msg.blob_id:
            return []
        if known is not None:
            raise RemoteProtocolError(f"{trainer} sent a second, different contribution",
                                      reason="second_contribution")
        if msg.ciphertext_count != self.round_open.ciphertexts_per_contribution:
            raise RemoteProtocolError(
                f"{msg.ciphertext_count} ciphertexts, the round needs "
                f"{self.round_open.ciphertexts_per_contribution}", reason="wrong_ciphertext_count")
        if not 0 < msg.size_bytes <= self.round_open.max_contribution_bytes:
            raise RemoteProtocolError(f"{msg.size_bytes} bytes, the limit is "
                                      f"{self.round_open.max_contribution_bytes}", reason="oversized_contribution")
        if len(self.contributions) >= candidate_limit(self.round_open):
            raise RemoteProtocolError(f"round {self.round_id} already has {candidate_limit(self.round_open)} "
                                      "candidate contributions", reason="round_full")
        self.contributions[trainer] = msg.blob_id
        self.pending.add(trainer)
        return [VerifyContributionBlob(trainer, msg.blob_id)]

    def verify_contribution(self, trainer: str, *, valid: bool, reason: str = "",
                            evidence_id: str = "") -> list[Effect]:
        """VerifyContribution: the shell's verdict on a received contribution."""
        if trainer not in self.pending:
            raise LocalProtocolError(f"no verification of {trainer}'s contribution is pending")
        if not valid and not (reason and len(reason) <= MAX_NAME_CHARS and is_blob_id(evidence_id)):
            raise LocalProtocolError("a rejection needs a reason (1..64 chars) and an evidence blob id")
        self.pending.discard(trainer)
        blob_id = self.contributions[trainer]
        if valid:
            self.accepted.add(trainer)
            reason, evidence_id = "", ""
        else:
            self.rejected[trainer] = (reason, evidence_id)
        effects: list[Effect] = [Send(ContributionVerdict(self.round_id, trainer, blob_id, valid,
                                                          reason, evidence_id))]
        if self.phase is Phase.AGGREGATE and not self.pending:
            effects += self._seal_own_set()
        return effects

    def close_collection(self, *, now_ms: int) -> list[Effect]:
        """CloseCollection: the deadline passed; the set is fixed once pending verdicts are in.
        A timer that fires after collection closed (a restart re-arms it, or the round
        already ended) changes nothing: the spec's CloseCollection is not enabled then."""
        if self.phase not in (Phase.OPEN, Phase.COLLECT):
            return []
        self._require(Phase.COLLECT, "CloseCollection")
        if now_ms < self.round_open.deadline_ms:
            raise LocalProtocolError(f"CloseCollection at {now_ms}, before the deadline")
        self.phase = Phase.AGGREGATE
        effects: list[Effect] = [EnterPhase(Phase.AGGREGATE.value)]
        if not self.pending:
            effects += self._seal_own_set()
        return effects

    def compute_aggregate(self, aggregate_id: str) -> list[Effect]:
        """ComputeAggregate: the shell multiplied the ciphertexts we asked for."""
        if not is_blob_id(aggregate_id):
            raise LocalProtocolError(f"aggregate id {aggregate_id!r} is not a sha256 hex id")
        if self._terminal():  # the round ended while the shell was computing
            return []
        if self.phase is Phase.AGGREGATE and self.computing_own:
            self.computing_own = False
            ordered = self._own_selection()
            own = SetView(tuple(ordered), tuple(self.contributions[t] for t in ordered), aggregate_id)
            return self._publish(own)
        if self.phase is Phase.DECRYPT and not self.aggregate_confirmed and self.agreed is not None:
            if aggregate_id != self.agreed.aggregate_id:
                return self._abort("aggregate_mismatch")
            self.aggregate_confirmed = True
            return self._check_buffered_partials()
        raise LocalProtocolError(f"no aggregate was asked for in phase {self.phase.value}")

    def receive_accepted_set(self, validator: str, msg: AcceptedSet) -> list[Effect]:
        """ReceiveAcceptedSet: another validator's set; agree once a quorum published one."""
        _same_round(self.round_open, msg.round_id, "AcceptedSet")
        view = SetView.from_message(msg, self.round_open)
        if self._terminal():
            return []
        if not self.agreement.record(validator, view):
            return []
        return self._try_agree()

    def receive_partial(self, member: str, msg: PartialDecryption) -> list[Effect]:
        """ReceivePartial: kept until we hold the agreed aggregate, then verified."""
        _same_round(self.round_open, msg.round_id, "PartialDecryption")
        if member not in self.round_open.committee:
            raise RemoteProtocolError(f"{member} is not in round {self.round_id}'s committee",
                                      reason="not_a_committee_member")
        if not (is_blob_id(msg.partial_blob_id) and is_blob_id(msg.aggregate_id)):
            raise RemoteProtocolError("partial and aggregate ids must be sha256 hex ids", reason="bad_blob_id")
        if msg.cover:
            return self._receive_cover(member, msg)
        known = self.partials.get(member)
        if known == (msg.aggregate_id, msg.partial_blob_id) or self._terminal():
            return []
        if known is not None:
            raise RemoteProtocolError(f"{member} sent a second, different partial decryption",
                                      reason="second_partial")
        self.partials[member] = (msg.aggregate_id, msg.partial_blob_id)
        if self.phase is Phase.DECRYPT and self.aggregate_confirmed:
            return self._check_partial(member)
        return []

    def verify_partial(self, member: str, *, valid: bool, reason: str = "", blocks: Iterable[int] = (),
                       cover: bool = False) -> list[Effect]:
        """VerifyPartial: the shell checked the batch and its proof against our aggregate;
        `blocks` are the block numbers it carries. A first partial must carry every block
        assigned to its member (own_blocks), else the member is named: incomplete_partial."""
        if cover:
            return self._verify_cover(member, valid=valid, reason=reason)
        if (member not in self.partials or member in self.partials_valid or member in self.bad_partials
                or not self.aggregate_confirmed):
            raise LocalProtocolError(f"no verification of {member}'s partial decryption is pending")
        if not valid and not 0 < len(reason) <= MAX_NAME_CHARS:
            raise LocalProtocolError("an invalid partial needs a reason (1..64 chars)")
        if self._terminal():
            return []
        if valid:
            missing = partial_coverage_problem(self.round_open, member, blocks)
            valid, reason = missing is None, "incomplete_partial"
        if not valid:
            self.bad_partials[member] = reason
            return []
        self.partials_valid.add(member)
        return self._maybe_combine()

    def _receive_cover(self, member: str, msg: PartialDecryption) -> list[Effect]:
        known = self.covers.get(member)
        if known == (msg.aggregate_id, msg.partial_blob_id) or self._terminal():
            return []
        if known is not None:
            raise RemoteProtocolError(f"{member} sent a second, different cover partial", reason="second_partial")
        self.covers[member] = (msg.aggregate_id, msg.partial_blob_id)
        if self.phase is Phase.DECRYPT and self.aggregate_confirmed:
            return self._check_cover(member)
        return []

    def _check_cover(self, member: str) -> list[Effect]:
        assert self.agreed is not None
        if self.covers[member][0] != self.agreed.aggregate_id:
            self.bad_covers[member] = "wrong_aggregate"
            return []
        return [self._verify_partial_effect(member, cover=True)]

    def _verify_cover(self, member: str, *, valid: bool, reason: str) -> list[Effect]:
        """A cover partial's batches join its member's for combining (the shell keeps them);
        an invalid one names its member in bad_covers."""
        if (member not in self.covers or member in self.covers_valid or member in self.bad_covers
                or not self.aggregate_confirmed):
            raise LocalProtocolError(f"no verification of {member}'s cover partial is pending")
        if not valid and not 0 < len(reason) <= MAX_NAME_CHARS:
            raise LocalProtocolError("an invalid partial needs a reason (1..64 chars)")
        if self._terminal():
            return []
        if valid:
            self.covers_valid.add(member)
        else:
            self.bad_covers[member] = reason
        return []

    def finalize(self, adapter_id: str, mean_stats: Mapping[str, float]) -> list[Effect]:
        """Finalize: the shell combined, averaged and applied the sum; the round is done."""
        if self.phase is Phase.ABORTED:  # the final deadline came first: no adapter
            return []
        if self.phase is not Phase.DECRYPT or not self.combining:
            raise LocalProtocolError(f"Finalize in phase {self.phase.value} without a combine")
        if not is_blob_id(adapter_id):
            raise LocalProtocolError(f"adapter id {adapter_id!r} is not a sha256 hex id")
        stats = {str(k): float(v) for k, v in mean_stats.items()}
        if len(stats) > MAX_STATS or not all(0 < len(k) <= MAX_NAME_CHARS for k in stats):
            raise LocalProtocolError(f"at most {MAX_STATS} mean stats with 1..{MAX_NAME_CHARS}-char names")
        assert self.agreed is not None
        self.phase, self.adapter_id, self.mean_stats = Phase.FINAL, adapter_id, stats
        final = RoundFinal(self.round_id, self.round_open.base_adapter_id, adapter_id,
                           self.agreed.aggregate_id, list(self.agreed.contributors), stats)
        return [Send(final), EnterPhase(Phase.FINAL.value)]

    def combine_fails(self, reason: str) -> list[Effect]:
        """CombineFails: the decrypted sum did not unpack (a slot overflowed): no adapter."""
        if self.phase is Phase.ABORTED:
            return []
        if self.phase is not Phase.DECRYPT or not self.combining:
            raise LocalProtocolError(f"CombineFails in phase {self.phase.value} without a combine")
        return self._abort(f"combine_failed:{reason}"[:MAX_NAME_CHARS])

    def slot_overflow(self, plaintext_index: int, slot: int, top: bool, *, now_ms: int,
                      blame_ms: int = BLAME_MS) -> list[Effect]:
        """SlotOverflow: the combined sum did not unpack at this position (the shell's
        crypto.contribution.blame_for): every contributor of the agreed set is asked to
        prove it in range before now_ms + blame_ms."""
        if self.phase is Phase.ABORTED:
            return []
        if self.phase is not Phase.DECRYPT or not self.combining:
            raise LocalProtocolError(f"SlotOverflow in phase {self.phase.value} without a combine")
        position = BlamePosition(plaintext_index, slot, top)
        problem = blame_position_problem(self.round_open, position)
        if problem or not 0 < blame_ms <= MAX_BLAME_MS:
            raise LocalProtocolError(f"SlotOverflow at a position of no blame: {problem or f'blame_ms={blame_ms}'}")
        self.phase, self.blame, self.blame_deadline_ms = Phase.BLAME, position, now_ms + blame_ms
        return [EnterPhase(Phase.BLAME.value), Send(self.blame_request()),
                SetTimer("blame_deadline", self.blame_deadline_ms)]

    def blame_request(self) -> BlameRequest:
        assert self.blame is not None and self.agreed is not None
        b = self.blame
        return BlameRequest(self.round_id, self.agreed.aggregate_id, b.plaintext_index, b.slot, b.top)

    def receive_slot_proof(self, trainer: str, msg: SlotProof) -> list[Effect]:
        """ReceiveSlotProof: a contributor's answer to our BlameRequest; one per contributor.
        An answer to another position or aggregate (another validator's request) is not ours."""
        _same_round(self.round_open, msg.round_id, "SlotProof")
        if not (is_blob_id(msg.proof_blob_id) and is_blob_id(msg.aggregate_id)):
            raise RemoteProtocolError("proof and aggregate ids must be sha256 hex ids", reason="bad_blob_id")
        if self.phase is not Phase.BLAME or self.blame_closed:
            return []
        assert self.agreed is not None
        position = BlamePosition(msg.plaintext_index, msg.slot, msg.top)
        if msg.aggregate_id != self.agreed.aggregate_id or position != self.blame:
            return []
        if trainer not in self.agreed.contributors:
            raise RemoteProtocolError(f"{trainer} is not a contributor of round {self.round_id}'s agreed set",
                                      reason="not_a_contributor")
        known = self.slot_proofs.get(trainer)
        if known == msg.proof_blob_id:
            return []
        if known is not None:
            raise RemoteProtocolError(f"{trainer} sent a second, different slot proof", reason="second_slot_proof")
        self.slot_proofs[trainer] = msg.proof_blob_id
        return [self._verify_slot_effect(trainer)]

    def verify_slot_proof(self, trainer: str, *, valid: bool, reason: str = "") -> list[Effect]:
        """VerifySlotProof: the shell checked the proof against the trainer's contribution;
        reason "unavailable" (the blob could not be fetched) counts as no proof."""
        if trainer not in self.slot_proofs or trainer in self.slot_verdicts:
            raise LocalProtocolError(f"no verification of {trainer}'s slot proof is pending")
        if not valid and not 0 < len(reason) <= MAX_NAME_CHARS:
            raise LocalProtocolError("an invalid slot proof needs a reason (1..64 chars)")
        if self.phase is not Phase.BLAME:
            return []
        self.slot_verdicts[trainer] = "" if valid else reason
        return self._maybe_close_blame()

    def blame_deadline(self, *, now_ms: int) -> list[Effect]:
        """BlameDeadline: no more proofs; the round ends once pending verifications are in."""
        if self.phase is not Phase.BLAME:
            return []
        if now_ms < self.blame_deadline_ms:
            raise LocalProtocolError(f"BlameDeadline at {now_ms}, before {self.blame_deadline_ms}")
        self.blame_closed = True
        return self._maybe_close_blame()

    def _verify_slot_effect(self, trainer: str) -> VerifySlotProofBlob:
        assert self.agreed is not None and self.blame is not None
        blob_id = self.agreed.blob_ids[self.agreed.contributors.index(trainer)]
        return VerifySlotProofBlob(trainer, self.slot_proofs[trainer], blob_id, self.blame)

    def _maybe_close_blame(self) -> list[Effect]:
        assert self.agreed is not None
        contributors = self.agreed.contributors
        answered = all(t in self.slot_verdicts for t in contributors)
        pending = any(t in self.slot_proofs and t not in self.slot_verdicts for t in contributors)
        if not answered and not (self.blame_closed and not pending):
            return []
        named = {}
        for t in contributors:
            verdict = self.slot_verdicts.get(t)
            if verdict is None or verdict == "unavailable":
                named[t] = NAMED_SILENT
            elif verdict:
                named[t] = NAMED_OUT_OF_RANGE
        self.bad_contributors = named
        # every contributor proven: the overflow is not any contribution's (our decode?)
        return self._abort("slot_overflow_named" if named else "slot_overflow_unexplained")

    def final_deadline(self, *, now_ms: int) -> list[Effect]:
        """FinalDeadline: no adapter by the final deadline, the round is aborted. A blame
        step under way is not cut short: its own deadline ends it, naming who failed."""
        if now_ms < self.round_open.final_deadline_ms:
            raise LocalProtocolError(f"FinalDeadline at {now_ms}, before {self.round_open.final_deadline_ms}")
        if self._terminal() or self.phase is Phase.BLAME:
            return []
        if self.phase is Phase.DECRYPT:
            why = "combine_timeout" if self.combining else "not_enough_partials"
        else:
            why = "never_opened" if self.phase is Phase.OPEN else "no_agreement"
        return self._abort(why)

    def still_needed(self) -> list[Message]:
        """What others may still need from us: gossip loses messages, so the shell re-sends
        these every few seconds until the final deadline. Only the scheduled opener's
        RoundOpen counts (round_open_refusal), so nobody else re-sends one."""
        out: list[Message] = []
        if self.phase is Phase.COLLECT and self.is_opener:
            out.append(self.round_open)
        if self.published is not None:
            out.append(self.published.to_message(self.round_id))
        if self.phase is Phase.BLAME:
            out.append(self.blame_request())
        if self.phase is Phase.FINAL:
            assert self.agreed is not None
            out.append(RoundFinal(self.round_id, self.round_open.base_adapter_id, self.adapter_id,
                                  self.agreed.aggregate_id, list(self.agreed.contributors), dict(self.mean_stats)))
        elif self.phase is Phase.ABORTED:
            out.append(RoundAborted(self.round_id, self.abort_reason))
        return out

    # -- after a restart --

    def resume_effects(self) -> list[Effect]:
        """The shell work that was outstanding when the state was saved: redo it."""
        effects: list[Effect] = [VerifyContributionBlob(t, self.contributions[t]) for t in sorted(self.pending)]
        if self.computing_own:
            effects.append(ComputeAggregate(self.round_id, tuple(self.contributions[t] for t in self._own_selection())))
        if self.phase is Phase.DECRYPT and not self.aggregate_confirmed and self.agreed is not None:
            effects.append(ComputeAggregate(self.round_id, self.agreed.blob_ids))
        if self.phase is Phase.DECRYPT and self.aggregate_confirmed:
            effects += [self._verify_partial_effect(m) for m in sorted(self.partials)
                        if m not in self.partials_valid and m not in self.bad_partials]
            effects += [self._verify_partial_effect(m, cover=True) for m in sorted(self.covers)
                        if m not in self.covers_valid and m not in self.bad_covers]
            if self.combining:
                effects.append(self._combine_effect())
        if self.phase is Phase.BLAME:
            effects += [self._verify_slot_effect(t) for t in sorted(self.slot_proofs) if t not in self.slot_verdicts]
        return effects

    # -- internals --

    def _terminal(self) -> bool:
        return self.phase in (Phase.FINAL, Phase.ABORTED)

    def _require(self, phase: Phase, action: str) -> None:
        if self.phase is not phase:
            raise LocalProtocolError(f"{action} in phase {self.phase.value}, needs {phase.value}")

    def _own_selection(self) -> list[str]:
        return draw_contributors(self.round_open, {t: self.contributions[t] for t in self.accepted})

    def _seal_own_set(self) -> list[Effect]:
        ordered = self._own_selection()
        if len(ordered) < self.round_open.min_contributors:
            own = SetView(tuple(ordered), tuple(self.contributions[t] for t in ordered), "")
            return self._publish(own)
        self.computing_own = True
        return [ComputeAggregate(self.round_id, tuple(self.contributions[t] for t in ordered))]

    def _publish(self, own: SetView) -> list[Effect]:
        self.published = own
        effects: list[Effect] = [Send(own.to_message(self.round_id))]
        known = self.agreement.sets.get(self.me)
        if known is not None and known != own:
            raise LocalProtocolError("our own AcceptedSet changed")
        self.agreement.sets[self.me] = own
        return effects + self._try_agree()

    def _try_agree(self) -> list[Effect]:
        if self.phase is not Phase.AGGREGATE or self.published is None:
            return []
        agreed = self.agreement.agreed()
        if agreed is None:
            return self._abort("no_agreement") if self.agreement.impossible() else []
        self.agreed = agreed
        if len(agreed.contributors) < self.round_open.min_contributors:
            return self._abort("below_min_contributors")
        if any(t in self.rejected for t in agreed.contributors):
            return self._abort("agreed_set_includes_rejected")
        self.phase = Phase.DECRYPT
        effects: list[Effect] = [EnterPhase(Phase.DECRYPT.value)]
        if agreed == self.published:
            self.aggregate_confirmed = True
            return effects + self._check_buffered_partials()
        return effects + [ComputeAggregate(self.round_id, agreed.blob_ids)]

    def _check_buffered_partials(self) -> list[Effect]:
        effects: list[Effect] = []
        for member in sorted(self.partials):
            effects += self._check_partial(member)
        for member in sorted(self.covers):
            effects += self._check_cover(member)
        return effects

    def _check_partial(self, member: str) -> list[Effect]:
        assert self.agreed is not None
        if self.partials[member][0] != self.agreed.aggregate_id:
            self.bad_partials[member] = "wrong_aggregate"
            return []
        return [self._verify_partial_effect(member)]

    def _verify_partial_effect(self, member: str, *, cover: bool = False) -> VerifyPartialBlob:
        aggregate_id, blob_id = (self.covers if cover else self.partials)[member]
        return VerifyPartialBlob(member, self.round_open.committee.index(member) + 1, blob_id, aggregate_id, cover)

    def _maybe_combine(self) -> list[Effect]:
        if self.combining or len(self.partials_valid) < self.round_open.threshold:
            return []
        # The first t valid partials in committee order: every validator with the same
        # valid partials picks the same ones (the sum does not depend on the choice).
        chosen = [m for m in self.round_open.committee if m in self.partials_valid][: self.round_open.threshold]
        self.combining = tuple((self.round_open.committee.index(m) + 1, self.partials[m][1]) for m in chosen)
        return [self._combine_effect()]

    def _combine_effect(self) -> CombinePartials:
        assert self.agreed is not None
        return CombinePartials(self.round_id, self.agreed.aggregate_id, self.round_open.base_adapter_id,
                               self.combining, len(self.agreed.contributors))

    def _abort(self, reason: str) -> list[Effect]:
        self.phase, self.abort_reason = Phase.ABORTED, reason
        self.computing_own = False
        return [Send(RoundAborted(self.round_id, reason)), EnterPhase(Phase.ABORTED.value, reason)]

    # -- persistence --

    def blob_ids(self) -> frozenset[str]:
        """Every blob this round produced or fetched (not its base adapter, an earlier
        round's): what retention may delete once the round is old (protocol/retention.py)."""
        ids = set(self.contributions.values()) | {evidence for _, evidence in self.rejected.values()}
        for view in (self.published, self.agreed):
            if view is not None:
                ids |= set(view.blob_ids) | {view.aggregate_id}
        ids |= {b for _, b in self.partials.values()} | {b for _, b in self.covers.values()}
        ids |= set(self.slot_proofs.values()) | {self.adapter_id}
        return frozenset(i for i in ids if i)

    def to_state(self) -> dict:
        """A msgpack-able snapshot; from_state(to_state()) continues where this left off."""
        return {
            "v": STATE_VERSION, "kind": "validator", "me": self.me,
            "round_open": _round_open_state(self),
            "phase": self.phase.value, "abort_reason": self.abort_reason,
            "contributions": dict(sorted(self.contributions.items())),
            "pending": sorted(self.pending), "accepted": sorted(self.accepted),
            "rejected": {t: list(v) for t, v in sorted(self.rejected.items())},
            "computing_own": self.computing_own,
            "published": self.published.to_state() if self.published else None,
            "sets": self.agreement.to_state(),
            "agreed": self.agreed.to_state() if self.agreed else None,
            "aggregate_confirmed": self.aggregate_confirmed,
            "partials": {m: list(v) for m, v in sorted(self.partials.items())},
            "partials_valid": sorted(self.partials_valid),
            "bad_partials": dict(sorted(self.bad_partials.items())),
            "covers": {m: list(v) for m, v in sorted(self.covers.items())},
            "covers_valid": sorted(self.covers_valid), "bad_covers": dict(sorted(self.bad_covers.items())),
            "combining": [list(p) for p in self.combining],
            "adapter_id": self.adapter_id, "mean_stats": dict(sorted(self.mean_stats.items())),
            "barred": sorted(self.barred),
            "blame": self.blame.to_state() if self.blame else None, "blame_deadline_ms": self.blame_deadline_ms,
            "blame_closed": self.blame_closed, "slot_proofs": dict(sorted(self.slot_proofs.items())),
            "slot_verdicts": dict(sorted(self.slot_verdicts.items())),
            "bad_contributors": dict(sorted(self.bad_contributors.items())),
        }

    @classmethod
    def from_state(cls, raw: Any) -> "ValidatorRound":
        s = _check_state(raw, "validator")
        machine = cls.__new__(cls)
        machine._start(_round_open_from_state(s["round_open"]), s["me"])
        machine._round_open_wire = s["round_open"]
        machine.phase = Phase(s["phase"])
        machine.abort_reason = s["abort_reason"]
        machine.contributions = dict(s["contributions"])
        machine.pending, machine.accepted = set(s["pending"]), set(s["accepted"])
        machine.rejected = {t: (v[0], v[1]) for t, v in s["rejected"].items()}
        machine.computing_own = s["computing_own"]
        machine.published = SetView.from_state(s["published"]) if s["published"] else None
        machine.agreement = _Agreement(machine.round_open, {v: SetView.from_state(x) for v, x in s["sets"].items()})
        machine.agreed = SetView.from_state(s["agreed"]) if s["agreed"] else None
        machine.aggregate_confirmed = s["aggregate_confirmed"]
        machine.partials = {m: (v[0], v[1]) for m, v in s["partials"].items()}
        machine.partials_valid = set(s["partials_valid"])
        machine.bad_partials = dict(s["bad_partials"])
        machine.covers = {m: (v[0], v[1]) for m, v in s.get("covers", {}).items()}
        machine.covers_valid, machine.bad_covers = set(s.get("covers_valid", ())), dict(s.get("bad_covers", {}))
        machine.combining = tuple((p[0], p[1]) for p in s["combining"])
        machine.adapter_id, machine.mean_stats = s["adapter_id"], dict(s["mean_stats"])
        machine.barred = frozenset(s.get("barred", ()))
        machine.blame = BlamePosition.from_state(s["blame"]) if s.get("blame") else None
        machine.blame_deadline_ms, machine.blame_closed = s.get("blame_deadline_ms", 0), s.get("blame_closed", False)
        machine.slot_proofs, machine.slot_verdicts = dict(s.get("slot_proofs", {})), dict(s.get("slot_verdicts", {}))
        machine.bad_contributors = dict(s.get("bad_contributors", {}))
        return machine


# --- a committee member's round --------------------------------------------------------


class CommitteeRound:
    """A key-share holder: releases one partial decryption per round, of the agreed
    aggregate only, and only if it has at least min_contributors."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.round_open: RoundOpen | None = None
        self.phase = CommitteePhase.WAITING
        self.abort_reason = ""
        self.agreement: _Agreement | None = None
        self.agreed: SetView | None = None
        self.aggregate_confirmed = False
        self.released_blob_id = ""
        self.mesh_min = 1  # the mesh's min_contributors, set on joining
        self.cover_blob_id = ""  # our cover partial, if we released one

    def join_round(self, validator: str, msg: RoundOpen, *, mesh: MeshRounds, now_ms: int,
                   last_round_id: int | None = None, expected_base: str | None = None) -> list[Effect]:
        """JoinRound: the scheduled opener announced a round that keeps the mesh's rules
        (round_open_refusal); a copy of it from another validator changes nothing."""
        if self.round_open is not None:
            if self.round_open != msg:
                raise RemoteProtocolError(f"a different RoundOpen for round {msg.round_id}",
                                          reason="conflicting_round_open")
            return []
        ro = check_round_open(mesh, validator, msg, now_ms=now_ms, last_round_id=last_round_id,
                              expected_base=expected_base)
        if self.me not in ro.committee:
            raise LocalProtocolError(f"{self.me} is not in round {ro.round_id}'s committee")
        self.round_open, self.agreement = ro, _Agreement(ro)
        self.mesh_min = mesh.policy.min_contributors
        self.phase = CommitteePhase.WATCH
        return [EnterPhase(CommitteePhase.WATCH.value), SetTimer("final_deadline", ro.final_deadline_ms)]

    def receive_accepted_set(self, validator: str, msg: AcceptedSet) -> list[Effect]:
        """ReceiveAcceptedSet: decide once a quorum of validators published one set."""
        ro, agreement = self._joined()
        _same_round(ro, msg.round_id, "AcceptedSet")
        view = SetView.from_message(msg, ro)
        if self.phase is not CommitteePhase.WATCH or not agreement.record(validator, view):
            return []
        agreed = agreement.agreed()
        if agreed is None:
            return self._abort("no_agreement") if agreement.impossible() else []
        self.agreed = agreed
        if len(agreed.contributors) < max(ro.min_contributors, self.mesh_min):
            return self._abort("below_min_contributors")
        self.phase = CommitteePhase.DECRYPT
        return [EnterPhase(CommitteePhase.DECRYPT.value), ComputeAggregate(ro.round_id, agreed.blob_ids)]

    def compute_aggregate(self, aggregate_id: str) -> list[Effect]:
        """ComputeAggregate: our own product of the agreed blobs must be the agreed id."""
        ro, _ = self._joined()
        if self.phase is CommitteePhase.ABORTED:  # the final deadline came first
            return []
        if self.phase is not CommitteePhase.DECRYPT or self.aggregate_confirmed or self.agreed is None:
            raise LocalProtocolError(f"no aggregate was asked for in phase {self.phase.value}")
        if aggregate_id != self.agreed.aggregate_id:
            return self._abort("aggregate_mismatch")
        self.aggregate_confirmed = True
        return [DecryptPartial(ro.round_id, aggregate_id)]

    def release_partial(self, aggregate_id: str, partial_blob_id: str) -> list[Effect]:
        """ReleasePartial: publish our partial decryption of the agreed aggregate."""
        ro, _ = self._joined()
        if self.phase is CommitteePhase.ABORTED:  # too late: the share stays unreleased
            return []
        if self.phase is not CommitteePhase.DECRYPT or not self.aggregate_confirmed or self.agreed is None:
            raise LocalProtocolError(f"ReleasePartial in phase {self.phase.value} before the aggregate is confirmed")
        if aggregate_id != self.agreed.aggregate_id:
            raise LocalProtocolError(f"refusing to release a partial of {aggregate_id}: "
                                     f"the agreed aggregate is {self.agreed.aggregate_id}")
        if not is_blob_id(partial_blob_id):
            raise LocalProtocolError(f"partial blob id {partial_blob_id!r} is not a sha256 hex id")
        self.phase, self.released_blob_id = CommitteePhase.RELEASED, partial_blob_id
        return [Send(PartialDecryption(ro.round_id, aggregate_id, partial_blob_id)),
                EnterPhase(CommitteePhase.RELEASED.value)]

    def release_cover(self, aggregate_id: str, partial_blob_id: str) -> list[Effect]:
        """After our partial, once: the blocks still missing after a timeout (a member that
        released an incomplete or bad partial, or none), decrypted from the same agreed
        aggregate. Part of ReleasePartial in the spec, which does not model blocks."""
        ro, _ = self._joined()
        if self.phase is CommitteePhase.ABORTED:
            return []
        if self.phase is not CommitteePhase.RELEASED or self.agreed is None:
            raise LocalProtocolError(f"ReleaseCover in phase {self.phase.value}: only after our own partial")
        if aggregate_id != self.agreed.aggregate_id:
            raise LocalProtocolError(f"refusing to release a cover of {aggregate_id}: "
                                     f"the agreed aggregate is {self.agreed.aggregate_id}")
        if not is_blob_id(partial_blob_id):
            raise LocalProtocolError(f"cover blob id {partial_blob_id!r} is not a sha256 hex id")
        if self.cover_blob_id:
            raise LocalProtocolError("one cover partial per round")
        self.cover_blob_id = partial_blob_id
        return [Send(PartialDecryption(ro.round_id, aggregate_id, partial_blob_id, cover=True))]

    def final_deadline(self, *, now_ms: int) -> list[Effect]:
        """FinalDeadline: stop waiting; an unreleased share stays unreleased."""
        ro, _ = self._joined()
        if now_ms < ro.final_deadline_ms:
            raise LocalProtocolError(f"FinalDeadline at {now_ms}, before {ro.final_deadline_ms}")
        if self.phase in (CommitteePhase.RELEASED, CommitteePhase.ABORTED):
            return []
        return self._abort("no_agreement" if self.agreed is None else "deadline")

    def still_needed(self) -> list[Message]:
        """Our released partial (and cover partial): re-sent by the shell until the final
        deadline, as ValidatorRound.still_needed."""
        if self.phase is not CommitteePhase.RELEASED or self.agreed is None or self.round_open is None:
            return []
        out: list[Message] = [PartialDecryption(self.round_open.round_id, self.agreed.aggregate_id,
                                                self.released_blob_id)]
        if self.cover_blob_id:
            out.append(PartialDecryption(self.round_open.round_id, self.agreed.aggregate_id, self.cover_blob_id,
                                         cover=True))
        return out

    def resume_effects(self) -> list[Effect]:
        if self.phase is not CommitteePhase.DECRYPT or self.agreed is None or self.round_open is None:
            return []
        if not self.aggregate_confirmed:
            return [ComputeAggregate(self.round_open.round_id, self.agreed.blob_ids)]
        return [DecryptPartial(self.round_open.round_id, self.agreed.aggregate_id)]

    def _joined(self) -> tuple[RoundOpen, _Agreement]:
        if self.round_open is None or self.agreement is None:
            raise RemoteProtocolError("a round message before its RoundOpen", reason="unknown_round")
        return self.round_open, self.agreement

    def _abort(self, reason: str) -> list[Effect]:
        self.phase, self.abort_reason = CommitteePhase.ABORTED, reason
        return [EnterPhase(CommitteePhase.ABORTED.value, reason)]

    def blob_ids(self) -> frozenset[str]:
        """Our partial and cover blobs (see ValidatorRound.blob_ids)."""
        return frozenset(i for i in (self.released_blob_id, self.cover_blob_id) if i)

    def to_state(self) -> dict:
        return {
            "v": STATE_VERSION, "kind": "committee", "me": self.me,
            "round_open": _round_open_state(self),
            "phase": self.phase.value, "abort_reason": self.abort_reason,
            "sets": self.agreement.to_state() if self.agreement else {},
            "agreed": self.agreed.to_state() if self.agreed else None,
            "aggregate_confirmed": self.aggregate_confirmed, "released_blob_id": self.released_blob_id,
            "mesh_min": self.mesh_min, "cover_blob_id": self.cover_blob_id,
        }

    @classmethod
    def from_state(cls, raw: Any) -> "CommitteeRound":
        s = _check_state(raw, "committee")
        machine = cls(s["me"])
        if s["round_open"] is not None:
            machine.round_open = _round_open_from_state(s["round_open"])
            machine._round_open_wire = s["round_open"]
            machine.agreement = _Agreement(machine.round_open,
                                           {v: SetView.from_state(x) for v, x in s["sets"].items()})
        machine.phase, machine.abort_reason = CommitteePhase(s["phase"]), s["abort_reason"]
        machine.agreed = SetView.from_state(s["agreed"]) if s["agreed"] else None
        machine.aggregate_confirmed, machine.released_blob_id = s["aggregate_confirmed"], s["released_blob_id"]
        machine.mesh_min = int(s.get("mesh_min", machine.round_open.min_contributors if machine.round_open else 1))
        machine.cover_blob_id = s.get("cover_blob_id", "")
        return machine


# --- a trainer's round -------------------------------------------------------------------


class TrainerRound:
    """Join an open round, train, contribute once before the deadline, learn the outcome."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.round_open: RoundOpen | None = None
        self.phase = TrainerPhase.WAITING
        self.blob_id = ""
        self.adapter_id = ""
        self.included = False  # our contribution is in the final aggregate
        self.abort_reason = ""
        # the blame step (issue 11 finding 5): one position per round validator, each
        # position proven once and its proof re-sent to whoever asks for it again
        self.blames_asked: dict[str, BlamePosition] = {}  # validator -> the position it asked
        self.slot_proofs: dict[BlamePosition, str] = {}  # position -> our proof blob id
        self.proving: dict[BlamePosition, str] = {}  # position -> aggregate id of the first request

    def join_round(self, validator: str, msg: RoundOpen, *, mesh: MeshRounds, now_ms: int,
                   last_round_id: int | None = None, expected_base: str | None = None) -> list[Effect]:
        """JoinRound: train for this round if there is time left, and only for the scheduled
        opener's round under the mesh's rules (round_open_refusal): the hyper-parameters
        are bounded, the minimum and layout are the mesh's."""
        if self.round_open is not None:
            if self.round_open != msg:
                raise RemoteProtocolError(f"a different RoundOpen for round {msg.round_id}",
                                          reason="conflicting_round_open")
            return []
        ro = check_round_open(mesh, validator, msg, now_ms=now_ms, last_round_id=last_round_id,
                              expected_base=expected_base)
        self.round_open = ro
        if now_ms >= ro.deadline_ms:
            self.phase = TrainerPhase.MISSED
            return [EnterPhase(TrainerPhase.MISSED.value, "joined after the deadline")]
        self.phase = TrainerPhase.TRAINING
        return [EnterPhase(TrainerPhase.TRAINING.value), Train(ro),
                SetTimer("final_deadline", ro.final_deadline_ms)]

    def worth_training(self, now_ms: int) -> bool:
        """Whether training now can still end in a contribution: the round is still ours to
        train for and its deadline has not passed. A trainer whose model was not ready when
        the round opened (a node that just started or just joined, issue 15) asks before it
        spends the CPU: rounds that ended meanwhile are skipped, so the open one is reached
        in time. A query, no state change (Contribute still decides)."""
        return (self.phase is TrainerPhase.TRAINING and self.round_open is not None
                and now_ms < self.round_open.deadline_ms)

    def contribute(self, blob_id: str, *, ciphertext_count: int, size_bytes: int, now_ms: int) -> list[Effect]:
        """Contribute: send the sealed update's id, once, if the deadline has not passed."""
        ro = self._joined()
        if self.phase in (TrainerPhase.FINAL, TrainerPhase.ABORTED):  # training outlived the round
            return []
        if self.phase is not TrainerPhase.TRAINING:
            raise LocalProtocolError(f"Contribute in phase {self.phase.value}: one contribution per round")
        if not is_blob_id(blob_id):
            raise LocalProtocolError(f"blob id {blob_id!r} is not a sha256 hex id")
        if ciphertext_count != ro.ciphertexts_per_contribution or not 0 < size_bytes <= ro.max_contribution_bytes:
            raise LocalProtocolError(f"contribution of {ciphertext_count} ciphertexts and {size_bytes} bytes "
                                     f"does not fit round {ro.round_id}'s layout")
        if now_ms >= ro.deadline_ms:  # training outran the deadline: a dropout, not an error
            self.phase = TrainerPhase.MISSED
            return [EnterPhase(TrainerPhase.MISSED.value, "training ended after the deadline")]
        self.phase, self.blob_id = TrainerPhase.CONTRIBUTED, blob_id
        return [Send(Contribution(ro.round_id, blob_id, ciphertext_count, size_bytes)),
                EnterPhase(TrainerPhase.CONTRIBUTED.value)]

    def receive_round_final(self, validator: str, msg: RoundFinal) -> list[Effect]:
        """ReceiveRoundFinal: the new adapter (the next round starts from it)."""
        ro = self._joined()
        self._from_validator(ro, validator, msg.round_id, "RoundFinal")
        if self.phase is TrainerPhase.FINAL:
            if msg.adapter_id != self.adapter_id:
                raise RemoteProtocolError(f"{validator} reports adapter {msg.adapter_id}, another "
                                          f"validator {self.adapter_id}", reason="conflicting_final")
            return []
        if self.phase is TrainerPhase.ABORTED:
            return []
        if not is_blob_id(msg.adapter_id) or msg.base_adapter_id != ro.base_adapter_id:
            raise RemoteProtocolError("RoundFinal names a bad adapter or another base", reason="bad_round_final")
        self.phase, self.adapter_id = TrainerPhase.FINAL, msg.adapter_id
        self.included = self.me in msg.contributors
        return [EnterPhase(TrainerPhase.FINAL.value)]

    def receive_round_aborted(self, validator: str, msg: RoundAborted) -> list[Effect]:
        """ReceiveRoundAborted: no adapter this round."""
        ro = self._joined()
        self._from_validator(ro, validator, msg.round_id, "RoundAborted")
        if self.phase in (TrainerPhase.FINAL, TrainerPhase.ABORTED):
            return []
        return self._abort(msg.reason[:MAX_NAME_CHARS])

    def final_deadline(self, *, now_ms: int) -> list[Effect]:
        ro = self._joined()
        if now_ms < ro.final_deadline_ms:
            raise LocalProtocolError(f"FinalDeadline at {now_ms}, before {ro.final_deadline_ms}")
        if self.phase in (TrainerPhase.FINAL, TrainerPhase.ABORTED):
            return []
        return self._abort("no_final_by_deadline")

    def receive_blame_request(self, validator: str, msg: BlameRequest) -> list[Effect]:
        """Part of ReceiveSlotProof in the spec: a round validator's aggregate overflowed at
        msg's position; prove it in range for our contribution (ProveSlots), once per
        position. Refused: a sender that is not a round validator, a round we did not
        contribute to or that ended with an adapter (no overflow then), a position the
        layout does not have, a second position from the same validator (each proof
        costs seconds: a validator gets one)."""
        ro = self._joined()
        self._from_validator(ro, validator, msg.round_id, "BlameRequest")
        if not self.blob_id:
            raise RemoteProtocolError(f"BlameRequest for round {ro.round_id}, to which {self.me} did not contribute",
                                      reason="not_a_contributor")
        if self.phase is TrainerPhase.FINAL:
            raise RemoteProtocolError(f"round {ro.round_id} ended with an adapter: nothing overflowed",
                                      reason="round_final")
        if not is_blob_id(msg.aggregate_id):
            raise RemoteProtocolError("aggregate_id must be a sha256 hex id", reason="bad_blob_id")
        position = BlamePosition(msg.plaintext_index, msg.slot, msg.top)
        problem = blame_position_problem(ro, position)
        if problem:
            raise RemoteProtocolError(f"BlameRequest from {validator}: {problem}", reason="bad_blame_position")
        asked = self.blames_asked.get(validator)
        if asked is not None and asked != position:
            raise RemoteProtocolError(f"{validator} already asked for {asked}; one position per validator and round",
                                      reason="second_blame_position")
        self.blames_asked[validator] = position
        proof = self.slot_proofs.get(position)
        if proof:
            return [Send(self._slot_proof(msg.aggregate_id, position, proof))]
        if position in self.proving:
            return []  # being proven; the validator re-sends its request and gets it then
        self.proving[position] = msg.aggregate_id
        return [ProveSlots(ro.round_id, msg.aggregate_id, position)]

    def slot_proved(self, position: BlamePosition, proof_blob_id: str) -> list[Effect]:
        """The shell proved `position` and stored the proof: send it to the first asker's
        aggregate (later askers get it from slot_proofs)."""
        ro = self._joined()
        if position not in self.proving:
            raise LocalProtocolError(f"no slot proof of {position} was asked for")
        if not is_blob_id(proof_blob_id):
            raise LocalProtocolError(f"proof blob id {proof_blob_id!r} is not a sha256 hex id")
        aggregate_id = self.proving.pop(position)
        self.slot_proofs[position] = proof_blob_id
        return [Send(self._slot_proof(aggregate_id, position, proof_blob_id))]

    def _slot_proof(self, aggregate_id: str, position: BlamePosition, proof_blob_id: str) -> SlotProof:
        return SlotProof(self._joined().round_id, aggregate_id, position.plaintext_index, position.slot,
                         position.top, proof_blob_id)

    def resume_effects(self) -> list[Effect]:
        if self.phase is TrainerPhase.TRAINING and self.round_open is not None:
            return [Train(self.round_open)]
        if self.round_open is not None:
            return [ProveSlots(self.round_open.round_id, a, p) for p, a in sorted(
                self.proving.items(), key=lambda item: item[0].to_state())]
        return []

    def _joined(self) -> RoundOpen:
        if self.round_open is None:
            raise RemoteProtocolError("a round message before its RoundOpen", reason="unknown_round")
        return self.round_open

    @staticmethod
    def _from_validator(ro: RoundOpen, validator: str, round_id: int, what: str) -> None:
        _same_round(ro, round_id, what)
        if validator not in ro.validators:
            raise RemoteProtocolError(f"{what} from {validator}, not a validator of round {ro.round_id}",
                                      reason="not_a_round_validator")

    def _abort(self, reason: str) -> list[Effect]:
        self.phase, self.abort_reason = TrainerPhase.ABORTED, reason
        return [EnterPhase(TrainerPhase.ABORTED.value, reason)]

    def blob_ids(self) -> frozenset[str]:
        """Our contribution and slot proofs (see ValidatorRound.blob_ids)."""
        return frozenset(i for i in (self.blob_id, *self.slot_proofs.values()) if i)

    def to_state(self) -> dict:
        return {
            "v": STATE_VERSION, "kind": "trainer", "me": self.me,
            "round_open": _round_open_state(self),
            "phase": self.phase.value, "blob_id": self.blob_id, "adapter_id": self.adapter_id,
            "included": self.included, "abort_reason": self.abort_reason,
            "blames_asked": {v: p.to_state() for v, p in sorted(self.blames_asked.items())},
            "slot_proofs": sorted([*p.to_state(), b] for p, b in self.slot_proofs.items()),
            "proving": sorted([*p.to_state(), a] for p, a in self.proving.items()),
        }

    @classmethod
    def from_state(cls, raw: Any) -> "TrainerRound":
        s = _check_state(raw, "trainer")
        machine = cls(s["me"])
        if s["round_open"] is not None:
            machine.round_open = _round_open_from_state(s["round_open"])
            machine._round_open_wire = s["round_open"]
        machine.phase = TrainerPhase(s["phase"])
        machine.blob_id, machine.adapter_id = s["blob_id"], s["adapter_id"]
        machine.included, machine.abort_reason = s["included"], s["abort_reason"]
        machine.blames_asked = {v: BlamePosition.from_state(p) for v, p in s.get("blames_asked", {}).items()}
        machine.slot_proofs = {BlamePosition.from_state(x[:3]): x[3] for x in s.get("slot_proofs", [])}
        machine.proving = {BlamePosition.from_state(x[:3]): x[3] for x in s.get("proving", [])}
        return machine


# --- invariants (specs/SecureAggregation.tla, same names) -------------------------------


def TypeOK(validators: Iterable[ValidatorRound], committee: Iterable[CommitteeRound],  # noqa: N802
           trainers: Iterable[TrainerRound] = ()) -> bool:
    for v in validators:
        decided = v.accepted | set(v.rejected)
        if not (isinstance(v.phase, Phase) and v.accepted.isdisjoint(v.rejected)
                and v.pending.isdisjoint(decided) and v.pending | decided == set(v.contributions)):
            return False
        if v.phase in (Phase.DECRYPT, Phase.FINAL) and (v.agreed is None or v.published is None):
            return False
        if v.phase is Phase.FINAL and not (is_blob_id(v.adapter_id) and v.combining):
            return False
        if not v.partials_valid.isdisjoint(v.bad_partials) or not set(v.partials) >= v.partials_valid:
            return False
        if not v.covers_valid.isdisjoint(v.bad_covers) or not set(v.covers) >= v.covers_valid:
            return False
        if (v.phase is Phase.BLAME and (v.blame is None or not v.combining)) or not set(v.slot_proofs) >= set(
                v.slot_verdicts):
            return False
        if v.bad_contributors and (v.agreed is None or not set(v.bad_contributors) <= set(v.agreed.contributors)):
            return False
    for c in committee:
        if not isinstance(c.phase, CommitteePhase):
            return False
        if c.phase in (CommitteePhase.DECRYPT, CommitteePhase.RELEASED) and c.agreed is None:
            return False
        if (c.phase is CommitteePhase.RELEASED) != bool(c.released_blob_id):
            return False
    for t in trainers:
        if not isinstance(t.phase, TrainerPhase) or (t.phase is TrainerPhase.FINAL and not t.adapter_id):
            return False
    return True


def NoDecryptionBelowMin(committee: Iterable[CommitteeRound], mesh_min_contributors: int) -> bool:  # noqa: N802
    """A committee member decrypts (asks for or releases a partial) only an aggregate of
    at least the MESH's min_contributors (configuration), whatever a RoundOpen said."""
    return all(c.agreed is not None and c.round_open is not None
               and len(c.agreed.contributors) >= mesh_min_contributors
               for c in committee if c.aggregate_confirmed or c.phase is CommitteePhase.RELEASED)


def JoinedOnlyMeshRounds(machines: Iterable[CommitteeRound | TrainerRound],  # noqa: N802
                         mesh_min_contributors: int) -> bool:
    """A member (or trainer) that joined a round joined one with the mesh's minimum."""
    return all(m.round_open is None or m.round_open.min_contributors == mesh_min_contributors for m in machines)


def OnlyAgreedAggregateDecrypted(validators: Iterable[ValidatorRound],  # noqa: N802
                                 committee: Iterable[CommitteeRound]) -> bool:
    """Every released partial is of a set that a quorum of validators really published."""
    validators = list(validators)
    for c in committee:
        if c.phase is not CommitteePhase.RELEASED or c.round_open is None or c.agreed is None:
            continue
        same_round = [v for v in validators if v.round_id == c.round_open.round_id]
        if sum(v.published == c.agreed for v in same_round) < quorum(c.round_open):
            return False
    return True


def HonestValidatorsAgreeOnAdapter(validators: Iterable[ValidatorRound]) -> bool:  # noqa: N802
    """All validators that finish a round finish it with the same adapter and set."""
    outcomes: dict[int, set] = {}
    for v in validators:
        if v.phase is Phase.FINAL:
            outcomes.setdefault(v.round_id, set()).add((v.adapter_id, v.agreed))
    return all(len(o) == 1 for o in outcomes.values())


def FinalContainsOnlyValidContributions(validators: Iterable[ValidatorRound],  # noqa: N802
                                        valid_blobs: Mapping[str, str]) -> bool:
    """A final set holds only contributions that are valid (trainer -> its valid blob id,
    the ground truth a test knows)."""
    return all(valid_blobs.get(t) == b
               for v in validators if v.phase is Phase.FINAL and v.agreed is not None
               for t, b in zip(v.agreed.contributors, v.agreed.blob_ids))


def HonestNeverNamed(validators: Iterable[ValidatorRound], honest: Iterable[str]) -> bool:  # noqa: N802
    """No blame step names an honest contributor (it always proves in time)."""
    honest = set(honest)
    return all(honest.isdisjoint(v.bad_contributors) for v in validators)


def OverflowNamesAByzantine(validators: Iterable[ValidatorRound], byzantine: Iterable[str]) -> bool:  # noqa: N802
    """A round that ended after a blame step names at least one byzantine contributor."""
    byzantine = set(byzantine)
    return all(not byzantine.isdisjoint(v.bad_contributors)
               for v in validators if v.blame is not None and v.phase is Phase.ABORTED)


INVARIANTS = ("TypeOK", "NoDecryptionBelowMin", "JoinedOnlyMeshRounds", "OnlyAgreedAggregateDecrypted",
              "HonestValidatorsAgreeOnAdapter", "FinalContainsOnlyValidContributions", "HonestNeverNamed",
              "OverflowNamesAByzantine")

# Each action of specs/SecureAggregation.tla and the methods that implement it; an
# action shared by roles (JoinRound, ComputeAggregate, ...) is one method per role.
ACTIONS: dict[str, tuple[tuple[type, str], ...]] = {
    "OpenRound": ((ValidatorRound, "open_round"),),
    "JoinRound": ((TrainerRound, "join_round"), (CommitteeRound, "join_round")),
    "Contribute": ((TrainerRound, "contribute"),),
    "ReceiveContribution": ((ValidatorRound, "receive_contribution"),),
    "VerifyContribution": ((ValidatorRound, "verify_contribution"),),
    "CloseCollection": ((ValidatorRound, "close_collection"),),
    "ComputeAggregate": ((ValidatorRound, "compute_aggregate"), (CommitteeRound, "compute_aggregate")),
    "ReceiveAcceptedSet": ((ValidatorRound, "receive_accepted_set"), (CommitteeRound, "receive_accepted_set")),
    "ReleasePartial": ((CommitteeRound, "release_partial"),),
    "ReceivePartial": ((ValidatorRound, "receive_partial"),),
    "VerifyPartial": ((ValidatorRound, "verify_partial"),),
    "Finalize": ((ValidatorRound, "finalize"),),
    "CombineFails": ((ValidatorRound, "combine_fails"),),
    "SlotOverflow": ((ValidatorRound, "slot_overflow"),),
    "ReceiveSlotProof": ((ValidatorRound, "receive_slot_proof"),),
    "VerifySlotProof": ((ValidatorRound, "verify_slot_proof"),),
    "BlameDeadline": ((ValidatorRound, "blame_deadline"),),
    "FinalDeadline": ((ValidatorRound, "final_deadline"), (CommitteeRound, "final_deadline"),
                      (TrainerRound, "final_deadline")),
    "ReceiveRoundFinal": ((TrainerRound, "receive_round_final"),),
    "ReceiveRoundAborted": ((TrainerRound, "receive_round_aborted"),),
}
# Steps of the environment, not of a machine: the clock, and the next round's schedule.
ENVIRONMENT_ACTIONS = ("Tick", "NextRound", "Done")
# Steps of an adversary the model allows: a validator (the scheduled opener or not)
# gossips a RoundOpen with any min_contributors; honest nodes must refuse it.
ADVERSARY_ACTIONS = ("ByzOpenRound",)

__all__ = [
    "ACTIONS", "ADVERSARY_ACTIONS", "BLAME_MS", "BlamePosition", "COOLDOWN_ROUNDS", "HonestNeverNamed",
    "NAMED_OUT_OF_RANGE", "NAMED_SILENT", "OverflowNamesAByzantine", "ProveSlots", "VerifySlotProofBlob",
    "blame_position_problem", "cooling_down", "CombinePartials", "CommitteePhase", "CommitteeRound", "ComputeAggregate",
    "DEFAULT_HYPERPARAMETERS", "DecryptPartial", "ENVIRONMENT_ACTIONS", "Effect", "EnterPhase", "Exclusion",
    "FinalContainsOnlyValidContributions", "HonestValidatorsAgreeOnAdapter", "HyperparameterBound", "INVARIANTS",
    "JoinedOnlyMeshRounds", "MeshRounds", "NoDecryptionBelowMin", "OnlyAgreedAggregateDecrypted", "OpenRefusal",
    "Phase", "RoundPolicy", "STATE_VERSION", "Send", "SetTimer", "SetView", "Train", "TrainerPhase", "TrainerRound",
    "TypeOK", "ValidatorRound", "VerifyContributionBlob", "VerifyPartialBlob", "check_round_open",
    "expected_base_adapter", "hyperparameters_problem", "is_blob_id", "quorum", "round_id_problem",
    "CANDIDATES_PER_PLACE", "candidate_limit", "draw_contributors", "draw_seed",
    "own_blocks", "partial_coverage_problem", "round_open_problem", "round_open_refusal", "scheduled_opener",
]
