"""Effects: what a round machine asks its shell to do (send, set a timer, verify, compute,
decrypt, cover, combine, prove)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from protocol.aggregation_messages import RoundOpen
from protocol.messages import Message


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
class CoverBlocks:
    """Committee member: partially decrypt these blocks of the agreed aggregate (blocks
    that lack t valid batches, which this member was chosen to cover: cover_for_missing),
    store the batch with its proofs, then release_cover(aggregate_id, that blob's id)."""

    round_id: int
    aggregate_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class CombinePartials:
    """Combine, block by block, the batches named in `batches` (t per block, each from the
    member's partial or cover blob named there; all of them verified before), unpack and
    average the sum over `contributors`, apply it to the base adapter, store the adapter,
    then finalize(adapter_id, mean_stats); or combine_fails(reason) / slot_overflow(...)."""

    round_id: int
    aggregate_id: str
    base_adapter_id: str
    partials: tuple[tuple[int, str], ...]  # (member_index, partial_blob_id) of every member combined
    contributors: int
    # block number -> its t (member_index, blob id holding that block's batch), lowest index first
    batches: tuple[tuple[int, tuple[tuple[int, str], ...]], ...] = ()


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
               DecryptPartial, CoverBlocks, VerifyPartialBlob, CombinePartials, VerifySlotProofBlob, ProveSlots]
