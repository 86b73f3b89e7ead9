"""The invariants of specs/SecureAggregation.tla over the machines (same names), and the
table of the spec's actions to the methods that implement them."""

from __future__ import annotations

from typing import Iterable, Mapping

from protocol.aggregation._committee import CommitteeRound
from protocol.aggregation._phases import CommitteePhase, Phase, TrainerPhase
from protocol.aggregation._round_open import is_blob_id, quorum
from protocol.aggregation._trainer import TrainerRound
from protocol.aggregation._validator import ValidatorRound


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
