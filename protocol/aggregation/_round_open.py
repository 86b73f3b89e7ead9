"""A RoundOpen checked: its own consistency (round_open_problem), and the mesh's rules it
must match before any node joins it (MeshRounds, RoundPolicy, round_open_refusal)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from protocol.aggregation_messages import (MAX_COMMITTEE, MAX_HYPERPARAMETERS, MAX_NAME_CHARS, MAX_ROUND_CONTRIBUTORS,
                                           MAX_VALIDATORS, RoundOpen)
from protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_HOTKEY_CHARS = 48  # an SS58 address of a 32-byte key with a one-byte prefix
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_blob_id(text: object) -> bool:
    return isinstance(text, str) and _SHA256_HEX.fullmatch(text) is not None  # not "$": no trailing "\n"


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


def is_copy_of_held(held: RoundOpen | None, msg: RoundOpen) -> bool:
    """Whether `msg` repeats the RoundOpen a machine already joined (a copy changes
    nothing); a different one for that round is refused, whoever sent it."""
    if held is None:
        return False
    if held != msg:
        raise RemoteProtocolError(f"a different RoundOpen for round {msg.round_id}", reason="conflicting_round_open")
    return True


def check_round_open(mesh: MeshRounds, sender: str, ro: RoundOpen, *, now_ms: int,
                     last_round_id: int | None, expected_base: str | None = None) -> RoundOpen:
    """round_open_refusal as a RemoteProtocolError with its reason."""
    refusal = round_open_refusal(mesh, sender, ro, now_ms=now_ms, last_round_id=last_round_id,
                                 expected_base=expected_base)
    if refusal is not None:
        raise RemoteProtocolError(f"RoundOpen {ro.round_id} from {sender}: {refusal.hint}", reason=refusal.reason)
    return ro
