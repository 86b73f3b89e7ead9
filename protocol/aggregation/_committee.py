"""A committee member's round machine: one partial decryption, of the agreed aggregate only."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from protocol.aggregation._agreement import Agreement, SetView
from protocol.aggregation._blocks import cover, cover_for_missing
from protocol.aggregation._effects import (ComputeAggregate, CoverBlocks, DecryptPartial, Effect, EnterPhase, Send,
                                           SetTimer)
from protocol.aggregation._phases import CommitteePhase
from protocol.aggregation._round_open import MeshRounds, check_round_open, is_blob_id, is_copy_of_held
from protocol.aggregation._rules import round_blocks
from protocol.aggregation._state import STATE_VERSION, check_state, round_open_from_state, round_open_state, same_round
from protocol.aggregation_messages import AcceptedSet, PartialDecryption, RoundOpen
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import Message


class CommitteeRound:
    """A key-share holder: releases one partial decryption per round, of the agreed
    aggregate only, and only if it has at least min_contributors."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.round_open: RoundOpen | None = None
        self.phase = CommitteePhase.WAITING
        self.abort_reason = ""
        self.agreement: Agreement | None = None
        self.agreed: SetView | None = None
        self.aggregate_confirmed = False
        self.released_blob_id = ""
        self.mesh_min = 1  # the mesh's min_contributors, set on joining
        self.cover_blob_id = ""  # our cover partial, if we released one
        self.cover_blocks: tuple[int, ...] = ()  # the blocks we chose to cover (CoverBlocks is out)
        self.cover_settled = False  # no cover of ours is needed this round (or it is chosen)

    def join_round(self, validator: str, msg: RoundOpen, *, mesh: MeshRounds, now_ms: int,
                   last_round_id: int | None = None, expected_base: str | None = None) -> list[Effect]:
        """JoinRound: the scheduled opener announced a round that keeps the mesh's rules
        (round_open_refusal); a copy of it from another validator changes nothing."""
        if is_copy_of_held(self.round_open, msg):
            return []
        ro = check_round_open(mesh, validator, msg, now_ms=now_ms, last_round_id=last_round_id,
                              expected_base=expected_base)
        if self.me not in ro.committee:
            raise LocalProtocolError(f"{self.me} is not in round {ro.round_id}'s committee")
        self.round_open, self.agreement = ro, Agreement(ro)
        self.mesh_min = mesh.policy.min_contributors
        self.phase = CommitteePhase.WATCH
        return [EnterPhase(CommitteePhase.WATCH.value), SetTimer("final_deadline", ro.final_deadline_ms)]

    def receive_accepted_set(self, validator: str, msg: AcceptedSet) -> list[Effect]:
        """ReceiveAcceptedSet: decide once a quorum of validators published one set."""
        ro, agreement = self._joined()
        same_round(ro, msg.round_id, "AcceptedSet")
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

    def cover_pending(self) -> bool:
        """Our partial is out and our cover is not decided yet: the shell asks choose_cover,
        after its cover wait and again whenever the round changes."""
        return self.phase is CommitteePhase.RELEASED and not self.cover_settled

    def choose_cover(self, verified: Mapping[int, Iterable[int]] | None) -> list[Effect]:
        """Issue 11 finding 7: which blocks we cover for members that released incomplete or
        bad partials, or none, or died after being heard. `verified`: our validator's view
        (ValidatorRound.cover_view): member index -> block numbers of its valid batches;
        None once that round no longer decrypts. Nothing to do while every block has t
        valid batches (settled); CoverBlocks(the blocks cover_for_missing gives us) when
        some lack them and we are a chosen substitute; otherwise wait for a later view.
        Part of ReleasePartial in the spec, which does not model blocks (SecureAggregation.md)."""
        ro, _ = self._joined()
        if not self.cover_pending():
            return []
        assert self.agreed is not None
        if verified is None:
            self.cover_settled = True
            return []
        holders = {int(m): tuple(b) for m, b in verified.items()}
        blocks = round_blocks(ro)
        if cover(blocks, holders, ro.threshold) is not None:
            self.cover_settled = True  # every block can be combined
            return []
        mine = cover_for_missing(blocks, holders, ro.committee.index(self.me) + 1, ro.threshold)
        if not mine:
            return []
        self.cover_settled, self.cover_blocks = True, tuple(mine)
        return [CoverBlocks(ro.round_id, self.agreed.aggregate_id, self.cover_blocks)]

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
        self.cover_blob_id, self.cover_settled = partial_blob_id, True
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
        if (self.phase is CommitteePhase.RELEASED and self.cover_blocks and not self.cover_blob_id
                and self.agreed is not None and self.round_open is not None):
            return [CoverBlocks(self.round_open.round_id, self.agreed.aggregate_id, self.cover_blocks)]
        if self.phase is not CommitteePhase.DECRYPT or self.agreed is None or self.round_open is None:
            return []
        if not self.aggregate_confirmed:
            return [ComputeAggregate(self.round_open.round_id, self.agreed.blob_ids)]
        return [DecryptPartial(self.round_open.round_id, self.agreed.aggregate_id)]

    def _joined(self) -> tuple[RoundOpen, Agreement]:
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
            "round_open": round_open_state(self),
            "phase": self.phase.value, "abort_reason": self.abort_reason,
            "sets": self.agreement.to_state() if self.agreement else {},
            "agreed": self.agreed.to_state() if self.agreed else None,
            "aggregate_confirmed": self.aggregate_confirmed, "released_blob_id": self.released_blob_id,
            "mesh_min": self.mesh_min, "cover_blob_id": self.cover_blob_id,
            "cover_blocks": list(self.cover_blocks), "cover_settled": self.cover_settled,
        }

    @classmethod
    def from_state(cls, raw: Any) -> "CommitteeRound":
        s = check_state(raw, "committee")
        machine = cls(s["me"])
        if s["round_open"] is not None:
            machine.round_open = round_open_from_state(s["round_open"])
            machine._round_open_wire = s["round_open"]
            machine.agreement = Agreement(machine.round_open,
                                           {v: SetView.from_state(x) for v, x in s["sets"].items()})
        machine.phase, machine.abort_reason = CommitteePhase(s["phase"]), s["abort_reason"]
        machine.agreed = SetView.from_state(s["agreed"]) if s["agreed"] else None
        machine.aggregate_confirmed, machine.released_blob_id = s["aggregate_confirmed"], s["released_blob_id"]
        machine.mesh_min = int(s.get("mesh_min", machine.round_open.min_contributors if machine.round_open else 1))
        machine.cover_blob_id = s.get("cover_blob_id", "")
        machine.cover_blocks = tuple(s.get("cover_blocks", ()))
        machine.cover_settled = bool(s.get("cover_settled", machine.cover_blob_id))
        return machine
