"""A trainer's round machine: join, train, contribute once, learn the outcome, prove slots."""

from __future__ import annotations

from typing import Any

from protocol.aggregation._effects import BlamePosition, Effect, EnterPhase, ProveSlots, Send, SetTimer, Train
from protocol.aggregation._phases import TrainerPhase
from protocol.aggregation._round_open import MeshRounds, check_round_open, is_blob_id, is_copy_of_held
from protocol.aggregation._rules import blame_position_problem
from protocol.aggregation._state import STATE_VERSION, check_state, round_open_from_state, round_open_state, same_round
from protocol.aggregation_messages import (MAX_NAME_CHARS, BlameRequest, Contribution, RoundAborted, RoundFinal,
                                           RoundOpen, SlotProof)
from protocol.errors import LocalProtocolError, RemoteProtocolError


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
        if is_copy_of_held(self.round_open, msg):
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
        same_round(ro, round_id, what)
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
            "round_open": round_open_state(self),
            "phase": self.phase.value, "blob_id": self.blob_id, "adapter_id": self.adapter_id,
            "included": self.included, "abort_reason": self.abort_reason,
            "blames_asked": {v: p.to_state() for v, p in sorted(self.blames_asked.items())},
            "slot_proofs": sorted([*p.to_state(), b] for p, b in self.slot_proofs.items()),
            "proving": sorted([*p.to_state(), a] for p, a in self.proving.items()),
        }

    @classmethod
    def from_state(cls, raw: Any) -> "TrainerRound":
        s = check_state(raw, "trainer")
        machine = cls(s["me"])
        if s["round_open"] is not None:
            machine.round_open = round_open_from_state(s["round_open"])
            machine._round_open_wire = s["round_open"]
        machine.phase = TrainerPhase(s["phase"])
        machine.blob_id, machine.adapter_id = s["blob_id"], s["adapter_id"]
        machine.included, machine.abort_reason = s["included"], s["abort_reason"]
        machine.blames_asked = {v: BlamePosition.from_state(p) for v, p in s.get("blames_asked", {}).items()}
        machine.slot_proofs = {BlamePosition.from_state(x[:3]): x[3] for x in s.get("slot_proofs", [])}
        machine.proving = {BlamePosition.from_state(x[:3]): x[3] for x in s.get("proving", [])}
        return machine
