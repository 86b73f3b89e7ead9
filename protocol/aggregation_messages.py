"""Mesh messages of the secure-aggregation round (protocol/aggregation/); registered with protocol.messages on import.

All of them travel on Channel.TRAIN. Big data never does: a contribution, an aggregate,
a partial-decryption batch and an adapter are blobs named by the sha256 of their bytes
and fetched over the blob protocol; messages carry only those ids. Each MAX_BYTES is
the encoded size of the largest message the round machine accepts (the limits below),
rounded up; tests/test_aggregation.py builds those largest messages and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol.membership import Role, SenderPolicy
from protocol.messages import Channel, Message, message_type

# Bounds the round machine enforces; they are what makes each MAX_BYTES honest.
MAX_VALIDATORS = 64
MAX_COMMITTEE = 64
MAX_ROUND_CONTRIBUTORS = 256
MAX_HYPERPARAMETERS = 32
MAX_NAME_CHARS = 64  # hyper-parameter names, verdict reasons, abort reasons, stat names
MAX_STATS = 16

VALIDATORS_ONLY = SenderPolicy(roles=frozenset({Role.VALIDATOR}))
TRAINERS_ONLY = SenderPolicy(roles=frozenset({Role.TRAINER}))


@message_type
@dataclass(frozen=True)
class RoundOpen(Message):
    """Everything a trainer needs to train and a committee member needs to decide.

    The packing layout is given by its inputs (crypto/packing.derive_layout): clip
    bound, quantization bits, max contributors, key bits; every party derives the same
    layout, and ciphertexts_per_contribution is what that layout needs for the adapter.
    """

    TYPE: ClassVar[str] = "agg_round_open"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 12 * 1024
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    base_adapter_id: str
    public_key_id: str  # sha256 of the committee's encoded Paillier public key
    hyperparameters: dict[str, float]
    clip_bound: float
    quant_bits: int
    max_contributors: int
    key_bits: int
    ciphertexts_per_contribution: int
    max_contribution_bytes: int
    deadline_ms: int  # contributions must arrive before this
    final_deadline_ms: int  # no RoundFinal by then: the round is aborted
    min_contributors: int
    committee: list[str]  # hotkeys; member i (1-based) holds key share i
    threshold: int
    validators: list[str]  # hotkeys whose AcceptedSets count towards the quorum


@message_type
@dataclass(frozen=True)
class Contribution(Message):
    TYPE: ClassVar[str] = "agg_contribution"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 256
    POLICY: ClassVar[SenderPolicy] = TRAINERS_ONLY

    round_id: int
    blob_id: str  # sha256 of the sealed contribution blob (ciphertexts and their proofs)
    ciphertext_count: int
    size_bytes: int


@message_type
@dataclass(frozen=True)
class ContributionVerdict(Message):
    """One validator's verdict on one contribution; evidence_id names the blob that lets
    anyone re-check a rejection (empty when accepted)."""

    TYPE: ClassVar[str] = "agg_verdict"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 512
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    trainer: str
    blob_id: str
    accepted: bool
    reason: str
    evidence_id: str


@message_type
@dataclass(frozen=True)
class AcceptedSet(Message):
    """A validator's accepted contributions in the agreed order (sorted by trainer
    hotkey) and the sha256 of their aggregate ciphertext bytes ("" below the minimum:
    nothing is aggregated then)."""

    TYPE: ClassVar[str] = "agg_accepted_set"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 32 * 1024
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    contributors: list[str]
    blob_ids: list[str]  # blob_ids[i] is contributors[i]'s contribution
    aggregate_id: str


@message_type
@dataclass(frozen=True)
class PartialDecryption(Message):
    """A committee member's partial decryption of the agreed aggregate: the blob holds
    the batch of shares and its one proof of correct decryption."""

    TYPE: ClassVar[str] = "agg_partial"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 256
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY  # committee members are validators

    round_id: int
    aggregate_id: str
    partial_blob_id: str
    # False: the member's partial of its own blocks; True: its one cover partial, of
    # blocks still missing after a timeout (issue 11 finding 7)
    cover: bool = False


@message_type
@dataclass(frozen=True)
class RoundFinal(Message):
    TYPE: ClassVar[str] = "agg_round_final"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 16 * 1024
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    base_adapter_id: str
    adapter_id: str
    aggregate_id: str
    contributors: list[str]
    mean_stats: dict[str, float]  # e.g. l2 norm and max |x| of the mean update


@message_type
@dataclass(frozen=True)
class RoundAborted(Message):
    """Not in the issue's list: settlement and trainers need to hear that a round ended
    without an adapter, and why."""

    TYPE: ClassVar[str] = "agg_round_aborted"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 160
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    reason: str


@message_type
@dataclass(frozen=True)
class BlameRequest(Message):
    """Issue 11 finding 5: the agreed aggregate decrypted to a slot sum out of reach
    (SlotOverflow). Every contributor of the agreed set must prove, with the exact slot
    proof (crypto.contribution.prove_slots), that slots 0..slot of its plaintext
    plaintext_index were in range (top: the whole plaintext, nothing above its last
    slot); who cannot, or does not answer, is named."""

    TYPE: ClassVar[str] = "agg_blame_request"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 224
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    round_id: int
    aggregate_id: str
    plaintext_index: int
    slot: int
    top: bool


@message_type
@dataclass(frozen=True)
class SlotProof(Message):
    """A contributor's answer to a BlameRequest: proof_blob_id names the encoded slot
    proof (crypto.contribution.encode_slot_proof, 1-2 MB at 2048 bits), fetched over the
    blob protocol like a contribution; the message never carries it."""

    TYPE: ClassVar[str] = "agg_slot_proof"
    CHANNEL: ClassVar[Channel] = Channel.TRAIN
    MAX_BYTES: ClassVar[int] = 320
    POLICY: ClassVar[SenderPolicy] = TRAINERS_ONLY

    round_id: int
    aggregate_id: str
    plaintext_index: int
    slot: int
    top: bool
    proof_blob_id: str


__all__ = [
    "AcceptedSet", "BlameRequest", "SlotProof", "Contribution", "ContributionVerdict", "MAX_COMMITTEE", "MAX_HYPERPARAMETERS",
    "MAX_NAME_CHARS", "MAX_ROUND_CONTRIBUTORS", "MAX_STATS", "MAX_VALIDATORS", "PartialDecryption",
    "RoundAborted", "RoundFinal", "RoundOpen",
]
