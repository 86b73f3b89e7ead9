"""The validator's round machine: collect, aggregate, agree, decrypt, finalize or blame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from protocol.aggregation._agreement import Agreement, SetView
from protocol.aggregation._blocks import cover
from protocol.aggregation._effects import (BlamePosition, CombinePartials, ComputeAggregate, Effect, EnterPhase, Send,
                                           SetTimer, VerifyContributionBlob, VerifyPartialBlob, VerifySlotProofBlob)
from protocol.aggregation._phases import Phase
from protocol.aggregation._round_open import MeshRounds, check_round_open, is_blob_id, round_open_problem
from protocol.aggregation._rules import (BLAME_MS, COOLDOWN_ROUNDS, MAX_BLAME_MS, NAMED_OUT_OF_RANGE, NAMED_SILENT,
                                         blame_position_problem, candidate_limit, draw_contributors,
                                         partial_coverage_problem, round_blocks)
from protocol.aggregation._state import STATE_VERSION, check_state, round_open_from_state, round_open_state, same_round
from protocol.aggregation_messages import (MAX_NAME_CHARS, MAX_STATS, AcceptedSet, BlameRequest, Contribution,
                                           ContributionVerdict, PartialDecryption, RoundAborted, RoundFinal, RoundOpen,
                                           SlotProof)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import Message


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
        self.agreement = Agreement(round_open)
        self.agreed: SetView | None = None
        self.aggregate_confirmed = False  # we hold (recomputed) the agreed aggregate
        self.partials: dict[str, tuple[str, str]] = {}  # member -> (aggregate id, blob id)
        self.partials_valid: set[str] = set()
        self.bad_partials: dict[str, str] = {}  # member -> why it was excluded
        # A member's second, cover partial: blocks still missing after a timeout (finding 7).
        self.covers: dict[str, tuple[str, str]] = {}
        self.covers_valid: set[str] = set()
        self.bad_covers: dict[str, str] = {}
        # member -> block numbers its valid first partial / valid cover partial carries
        self.partial_blocks: dict[str, tuple[int, ...]] = {}
        self.cover_blocks: dict[str, tuple[int, ...]] = {}
        # The spec's `combining`: t partials are valid (the first t in committee order).
        self.combining: tuple[tuple[int, str], ...] = ()
        # What the combine takes, once every block has t valid batches (_blocks.cover):
        # block -> its t (member index, blob id). Until then CombinePartials is not asked for.
        self.combine_batches: tuple[tuple[int, tuple[tuple[int, str], ...]], ...] = ()
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
        same_round(self.round_open, msg.round_id, "Contribution")
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
        same_round(self.round_open, msg.round_id, "AcceptedSet")
        view = SetView.from_message(msg, self.round_open)
        if self._terminal():
            return []
        if not self.agreement.record(validator, view):
            return []
        return self._try_agree()

    def receive_partial(self, member: str, msg: PartialDecryption) -> list[Effect]:
        """ReceivePartial: kept until we hold the agreed aggregate, then verified."""
        same_round(self.round_open, msg.round_id, "PartialDecryption")
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
        assigned to its member (own_blocks), else the member is named: incomplete_partial.
        The combine is asked for once every block has t valid batches (_maybe_combine)."""
        if cover:
            return self._verify_cover(member, valid=valid, reason=reason, blocks=blocks)
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
        self.partial_blocks[member] = self._block_numbers(blocks)
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

    def _verify_cover(self, member: str, *, valid: bool, reason: str, blocks: Iterable[int]) -> list[Effect]:
        """A cover partial's batches join its member's for combining (once its first
        partial is valid too); an invalid one names its member in bad_covers."""
        if (member not in self.covers or member in self.covers_valid or member in self.bad_covers
                or not self.aggregate_confirmed):
            raise LocalProtocolError(f"no verification of {member}'s cover partial is pending")
        if not valid and not 0 < len(reason) <= MAX_NAME_CHARS:
            raise LocalProtocolError("an invalid partial needs a reason (1..64 chars)")
        if self._terminal():
            return []
        if not valid:
            self.bad_covers[member] = reason
            return []
        self.covers_valid.add(member)
        self.cover_blocks[member] = self._block_numbers(blocks)
        return self._maybe_combine()

    def finalize(self, adapter_id: str, mean_stats: Mapping[str, float]) -> list[Effect]:
        """Finalize: the shell combined, averaged and applied the sum; the round is done."""
        if self.phase is Phase.ABORTED:  # the final deadline came first: no adapter
            return []
        if self.phase is not Phase.DECRYPT or not self.combine_batches:
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
        if self.phase is not Phase.DECRYPT or not self.combine_batches:
            raise LocalProtocolError(f"CombineFails in phase {self.phase.value} without a combine")
        return self._abort(f"combine_failed:{reason}"[:MAX_NAME_CHARS])

    def slot_overflow(self, plaintext_index: int, slot: int, top: bool, *, now_ms: int,
                      blame_ms: int = BLAME_MS) -> list[Effect]:
        """SlotOverflow: the combined sum did not unpack at this position (the shell's
        crypto.contribution.blame_for): every contributor of the agreed set is asked to
        prove it in range before now_ms + blame_ms."""
        if self.phase is Phase.ABORTED:
            return []
        if self.phase is not Phase.DECRYPT or not self.combine_batches:
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
        same_round(self.round_open, msg.round_id, "SlotProof")
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
            if self.combine_batches:
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

    def _block_numbers(self, blocks: Iterable[int]) -> tuple[int, ...]:
        count = len(round_blocks(self.round_open))
        return tuple(sorted({b for b in blocks if 0 <= b < count}))

    def verified_blocks(self) -> dict[int, tuple[int, ...]]:
        """member index -> block numbers of its valid batches (first partial and cover), for
        members whose first partial is valid: what _blocks.cover and cover_for_missing read.
        A cover of a member whose own partial is not (yet) valid does not count."""
        committee = self.round_open.committee
        return {committee.index(m) + 1: tuple(sorted(set(self.partial_blocks.get(m, ()))
                                                     | set(self.cover_blocks.get(m, ()))))
                for m in sorted(self.partials_valid, key=committee.index)}

    def cover_view(self) -> dict[int, tuple[int, ...]] | None:
        """What our committee member's cover choice reads (CommitteeRound.choose_cover):
        verified_blocks while this round is decrypting, None once no cover can help it."""
        return self.verified_blocks() if self.phase is Phase.DECRYPT else None

    def _maybe_combine(self) -> list[Effect]:
        if self.phase is not Phase.DECRYPT or self.combine_batches:
            return []
        t = self.round_open.threshold
        if not self.combining:
            if len(self.partials_valid) < t:
                return []
            # The spec's combining: the first t valid partials in committee order.
            chosen = [m for m in self.round_open.committee if m in self.partials_valid][:t]
            self.combining = tuple((self.round_open.committee.index(m) + 1, self.partials[m][1]) for m in chosen)
        # Every block needs t valid batches from distinct members, first partial or cover
        # (issue 11 finding 7); lowest index first, so every validator with the same
        # verified batches combines the same ones (the sum does not depend on the choice).
        plan = cover(round_blocks(self.round_open), self.verified_blocks(), t)
        if plan is None:
            return []
        self.combine_batches = tuple((b, tuple((i, self._blob_holding(i, b)) for i in members))
                                     for b, members in sorted(plan.items()))
        return [self._combine_effect()]

    def _blob_holding(self, member_index: int, block: int) -> str:
        """The blob with this member's valid batch of `block`: its first partial, else its cover."""
        member = self.round_open.committee[member_index - 1]
        if block in self.partial_blocks.get(member, ()):
            return self.partials[member][1]
        return self.covers[member][1]

    def _combine_effect(self) -> CombinePartials:
        assert self.agreed is not None
        used = sorted({i for _, chosen in self.combine_batches for i, _ in chosen})
        partials = tuple((i, self.partials[self.round_open.committee[i - 1]][1]) for i in used)
        return CombinePartials(self.round_id, self.agreed.aggregate_id, self.round_open.base_adapter_id,
                               partials, len(self.agreed.contributors), self.combine_batches)

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
            "round_open": round_open_state(self),
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
            "partial_blocks": {m: list(b) for m, b in sorted(self.partial_blocks.items())},
            "cover_blocks": {m: list(b) for m, b in sorted(self.cover_blocks.items())},
            "combine_batches": [[b, [list(p) for p in chosen]] for b, chosen in self.combine_batches],
            "adapter_id": self.adapter_id, "mean_stats": dict(sorted(self.mean_stats.items())),
            "barred": sorted(self.barred),
            "blame": self.blame.to_state() if self.blame else None, "blame_deadline_ms": self.blame_deadline_ms,
            "blame_closed": self.blame_closed, "slot_proofs": dict(sorted(self.slot_proofs.items())),
            "slot_verdicts": dict(sorted(self.slot_verdicts.items())),
            "bad_contributors": dict(sorted(self.bad_contributors.items())),
        }

    @classmethod
    def from_state(cls, raw: Any) -> "ValidatorRound":
        s = check_state(raw, "validator")
        machine = cls.__new__(cls)
        machine._start(round_open_from_state(s["round_open"]), s["me"])
        machine._round_open_wire = s["round_open"]
        machine.phase = Phase(s["phase"])
        machine.abort_reason = s["abort_reason"]
        machine.contributions = dict(s["contributions"])
        machine.pending, machine.accepted = set(s["pending"]), set(s["accepted"])
        machine.rejected = {t: (v[0], v[1]) for t, v in s["rejected"].items()}
        machine.computing_own = s["computing_own"]
        machine.published = SetView.from_state(s["published"]) if s["published"] else None
        machine.agreement = Agreement(machine.round_open, {v: SetView.from_state(x) for v, x in s["sets"].items()})
        machine.agreed = SetView.from_state(s["agreed"]) if s["agreed"] else None
        machine.aggregate_confirmed = s["aggregate_confirmed"]
        machine.partials = {m: (v[0], v[1]) for m, v in s["partials"].items()}
        machine.partials_valid = set(s["partials_valid"])
        machine.bad_partials = dict(s["bad_partials"])
        machine.covers = {m: (v[0], v[1]) for m, v in s.get("covers", {}).items()}
        machine.covers_valid, machine.bad_covers = set(s.get("covers_valid", ())), dict(s.get("bad_covers", {}))
        machine.combining = tuple((p[0], p[1]) for p in s["combining"])
        machine.partial_blocks = {m: tuple(b) for m, b in s.get("partial_blocks", {}).items()}
        machine.cover_blocks = {m: tuple(b) for m, b in s.get("cover_blocks", {}).items()}
        machine.combine_batches = tuple((b, tuple((p[0], p[1]) for p in chosen))
                                        for b, chosen in s.get("combine_batches", ()))
        machine.adapter_id, machine.mean_stats = s["adapter_id"], dict(s["mean_stats"])
        machine.barred = frozenset(s.get("barred", ()))
        machine.blame = BlamePosition.from_state(s["blame"]) if s.get("blame") else None
        machine.blame_deadline_ms, machine.blame_closed = s.get("blame_deadline_ms", 0), s.get("blame_closed", False)
        machine.slot_proofs, machine.slot_verdicts = dict(s.get("slot_proofs", {})), dict(s.get("slot_verdicts", {}))
        machine.bad_contributors = dict(s.get("bad_contributors", {}))
        return machine
