"""Mesh messages of the FHE challenge (protocol/challenge.py); registered with protocol.messages on import.

Gossip on Channel.FHE:
- ModelOffer (miners): "I serve this model, pinned by its server.zip sha256, on this
  peer, over FHE_PROTOCOL".
- ScoreReport (validators): one miner's score over its window, after an epoch.

Direct, on the FHE_PROTOCOL stream (CHANNEL None, never broadcast, always signed for
the peer at the other end). Keys and ciphertexts are far too big for a message, so a
stream frame is the signed envelope followed by a raw payload:

    frame = u32 big-endian len(envelope) || envelope (Envelope.to_gossip_bytes) || payload

The signed message names the payload's length and sha256, so the payload is as
authenticated as the message. Requests (validator -> miner): AddKey + evaluation keys,
ChallengeRequest + encrypted input. Responses (miner -> validator): KeyAdded,
ChallengeResponse + encrypted result, or Refused with the refusal's reason label.

Every field is bounded (checked when a message is built, so also when one is decoded:
a peer's message that breaks a bound is an InvalidChallengeMessage), which is what
keeps each MAX_BYTES honest; tests/test_challenge.py builds the largest of each. Those
are wire bounds, judged before the signature; what the miner allows (how many
iterations) is its policy, judged after it, so it can answer with a signed Refused.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import ClassVar

from crypto.identity import is_valid_address
from protocol.challenge import MAX_ITERATIONS
from protocol.epistula import Envelope, EnvelopeVerifier, Signer
from protocol.inbound import Verified, seal_message
from protocol.membership import Role, SenderPolicy
from protocol.messages import Channel, Message, MessageError, decode, message_type
from protocol.scoring import WINDOW, MinerScore

FHE_PROTOCOL = "/sealmesh/fhe/1"

MAX_MODEL_CHARS = 64
MAX_REASON_CHARS = 48
MAX_HINT_BYTES = 256
MAX_PEER_ID_CHARS = 64
MAX_EVAL_KEY_BYTES = 512 * 1024 * 1024  # digits-cnn: 39 MB; cnv-cifar10: about 314 MB
MAX_CIPHERTEXT_BYTES = 1024 * 1024  # digits-cnn: 1.8 KB; cnv-cifar10: at most 78 KB
MAX_RESULT_BYTES = 4 * 1024 * 1024  # digits-cnn: 164 KB
# What a ChallengeRequest's iterations may say on the wire. The miner's own bound
# (MinerKeyring.max_iterations, at most MAX_ITERATIONS) is policy, judged once the request's
# signature holds, so a validator asking for more hears a signed too_many_iterations
# instead of an unsigned nothing (issue 13). A uint16, so MAX_BYTES stays honest.
MAX_WIRE_ITERATIONS = 0xFFFF
# Epistula's envelope around a body: version, timestamp, uuid, two SS58 addresses and a
# signature, as a msgpack map; 344 bytes measured at the largest timestamp.
ENVELOPE_OVERHEAD = 352

MINERS_ONLY = SenderPolicy(roles=frozenset({Role.MINER}))
VALIDATORS_ONLY = SenderPolicy(roles=frozenset({Role.VALIDATOR}))

_MODEL = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHALLENGE_ID = re.compile(r"^[0-9a-f]{32}$")
_REASON = re.compile(r"^[a-z][a-z0-9_]*$")
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")


class InvalidChallengeMessage(MessageError):
    reason = "invalid_field"


class BadFrame(MessageError):
    reason = "bad_frame"


class PayloadMismatch(MessageError):
    reason = "payload_mismatch"


class UnexpectedMessage(MessageError):
    reason = "unexpected_message"


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidChallengeMessage(what)


def _model(name: str) -> None:
    _require(len(name) <= MAX_MODEL_CHARS and bool(_MODEL.match(name)),
             f"model must be 1..{MAX_MODEL_CHARS} of a-z 0-9 . _ -, got {name[:80]!r}")


def _sha256(name: str, value: str) -> None:
    _require(_SHA256.fullmatch(value) is not None, f"{name} must be 64 lowercase hex digits")


def _size(name: str, value: int, limit: int) -> None:
    _require(0 <= value <= limit, f"{name} must lie in 0..{limit}, got {value}")


def _non_negative(name: str, value: float) -> None:
    _require(math.isfinite(value) and value >= 0.0, f"{name} must be finite and >= 0, got {value}")


# --- gossip ------------------------------------------------------------------------------


@message_type
@dataclass(frozen=True)
class ModelOffer(Message):
    """A miner serves `model` (its server.zip pinned by sha256) on `peer_id` over `protocol`,
    and, when `brainlock_port` is not 0, over the Brainlock subnet's HTTP protocol on that
    TCP port of the host it announced (issue 13).

    A port, not a URL: a validator dials the host already bound to the miner's hotkey by
    its signed Announce (the addresses libp2p dials anyway), plus this port, over plain
    HTTP with fixed paths. An arbitrary URL in a gossiped offer would let any miner point
    every validator's signed, tens-of-MB POSTs at any host, scheme or path (an internal
    service, a cloud metadata address, the validator's own loopback ports); a port only
    ever reaches the miner's own announced host. 0 means no Brainlock server. The field
    is always present on the wire (the decoder refuses missing and unknown fields alike),
    so every node of a mesh must run a release that knows it.
    """

    TYPE: ClassVar[str] = "fhe_model_offer"
    CHANNEL: ClassVar[Channel] = Channel.FHE
    MAX_BYTES: ClassVar[int] = 372  # 352 before brainlock_port (its key and a uint16: 18 bytes)
    POLICY: ClassVar[SenderPolicy] = MINERS_ONLY

    model: str
    server_sha256: str
    peer_id: str
    protocol: str
    max_iterations: int
    offered_ms: int
    brainlock_port: int = 0

    def __post_init__(self) -> None:
        _model(self.model)
        _sha256("server_sha256", self.server_sha256)
        _require(len(self.peer_id) <= MAX_PEER_ID_CHARS and bool(_BASE58.match(self.peer_id)),
                 "peer_id must be a base58 libp2p peer id")
        _require(self.protocol == FHE_PROTOCOL, f"protocol must be {FHE_PROTOCOL}")
        _require(1 <= self.max_iterations <= MAX_ITERATIONS, f"max_iterations must lie in 1..{MAX_ITERATIONS}")
        _require(self.offered_ms >= 0, "offered_ms must be >= 0")
        _require(isinstance(self.brainlock_port, int) and not isinstance(self.brainlock_port, bool)
                 and 0 <= self.brainlock_port <= 65535,
                 f"brainlock_port must be a TCP port 1..65535, or 0 for none; got {self.brainlock_port!r}")


@message_type
@dataclass(frozen=True)
class ScoreReport(Message):
    """One validator's score of one miner after an epoch (protocol/scoring.py's MinerScore).

    median_latency_s is 0.0 when the window has no ok challenge.
    """

    TYPE: ClassVar[str] = "fhe_score_report"
    CHANNEL: ClassVar[Channel] = Channel.FHE
    MAX_BYTES: ClassVar[int] = 192
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY

    epoch: int
    miner: str
    score: float
    challenges: int
    ok: int
    failure_rate: float
    median_latency_s: float

    def __post_init__(self) -> None:
        _require(self.epoch >= 0, "epoch must be >= 0")
        _require(is_valid_address(self.miner), "miner must be an SS58 address")
        _require(0 <= self.ok <= self.challenges <= WINDOW, f"need 0 <= ok <= challenges <= {WINDOW}")
        for name in ("score", "failure_rate", "median_latency_s"):
            _non_negative(name, getattr(self, name))
        expected_rate = (self.challenges - self.ok) / self.challenges if self.challenges else 0.0
        _require(abs(self.failure_rate - expected_rate) < 1e-9, "failure_rate must be (challenges - ok) / challenges")

    @classmethod
    def of(cls, epoch: int, score: MinerScore) -> "ScoreReport":
        return cls(epoch, score.miner, float(score.score), score.challenges, score.ok, float(score.failure_rate),
                   float(score.median_latency_s or 0.0))


# --- direct, on FHE_PROTOCOL ------------------------------------------------------------


@dataclass(frozen=True)
class StreamMessage(Message):
    CHANNEL: ClassVar[Channel | None] = None
    BROADCAST: ClassVar[bool] = False
    MAX_BYTES: ClassVar[int] = 512
    PAYLOAD_LIMIT: ClassVar[int] = 0  # bytes allowed after the envelope

    def payload_digest(self) -> tuple[int, str] | None:
        """(length, sha256) the payload must have; None: no payload allowed."""
        return None


@message_type
@dataclass(frozen=True)
class AddKey(StreamMessage):
    """Store my evaluation keys for `model`; the payload is their serialized bytes."""

    TYPE: ClassVar[str] = "fhe_add_key"
    MAX_BYTES: ClassVar[int] = 192
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY
    PAYLOAD_LIMIT: ClassVar[int] = MAX_EVAL_KEY_BYTES

    model: str
    key_id: str  # sha256 of the payload: the name the miner stores it under
    key_bytes: int

    def __post_init__(self) -> None:
        _model(self.model)
        _sha256("key_id", self.key_id)
        _size("key_bytes", self.key_bytes, MAX_EVAL_KEY_BYTES)

    @classmethod
    def for_keys(cls, model: str, evaluation_keys: bytes) -> "AddKey":
        return cls(model, hashlib.sha256(evaluation_keys).hexdigest(), len(evaluation_keys))

    def payload_digest(self) -> tuple[int, str]:
        return self.key_bytes, self.key_id


@message_type
@dataclass(frozen=True)
class KeyAdded(StreamMessage):
    TYPE: ClassVar[str] = "fhe_key_added"
    MAX_BYTES: ClassVar[int] = 112
    POLICY: ClassVar[SenderPolicy] = MINERS_ONLY

    key_id: str

    def __post_init__(self) -> None:
        _sha256("key_id", self.key_id)


@message_type
@dataclass(frozen=True)
class ChallengeRequest(StreamMessage):
    """Run `model` `iterations` times on the encrypted input (the payload) under `key_id`."""

    TYPE: ClassVar[str] = "fhe_challenge"
    MAX_BYTES: ClassVar[int] = 352
    POLICY: ClassVar[SenderPolicy] = VALIDATORS_ONLY
    PAYLOAD_LIMIT: ClassVar[int] = MAX_CIPHERTEXT_BYTES

    challenge_id: str
    epoch: int
    model: str
    key_id: str
    iterations: int
    input_sha256: str
    input_bytes: int

    def __post_init__(self) -> None:
        _require(bool(_CHALLENGE_ID.match(self.challenge_id)), "challenge_id must be 32 lowercase hex digits")
        _require(self.epoch >= 0, "epoch must be >= 0")
        _model(self.model)
        _sha256("key_id", self.key_id)
        # Only the wire range here: 0 and values over the miner's bound decode, so that the
        # keyring refuses them with a signed, reasoned answer (bad_iterations, too_many_iterations).
        _require(0 <= self.iterations <= MAX_WIRE_ITERATIONS, f"iterations must lie in 0..{MAX_WIRE_ITERATIONS}")
        _sha256("input_sha256", self.input_sha256)
        _size("input_bytes", self.input_bytes, MAX_CIPHERTEXT_BYTES)

    @classmethod
    def for_input(cls, challenge_id: str, epoch: int, model: str, key_id: str, iterations: int,
                  ciphertext: bytes) -> "ChallengeRequest":
        return cls(challenge_id, epoch, model, key_id, iterations, hashlib.sha256(ciphertext).hexdigest(),
                   len(ciphertext))

    def payload_digest(self) -> tuple[int, str]:
        return self.input_bytes, self.input_sha256


@message_type
@dataclass(frozen=True)
class ChallengeResponse(StreamMessage):
    """The encrypted result (the payload). compute_ms is the miner's own figure, for logs only:
    the validator measures latency itself."""

    TYPE: ClassVar[str] = "fhe_challenge_response"
    MAX_BYTES: ClassVar[int] = 224
    POLICY: ClassVar[SenderPolicy] = MINERS_ONLY
    PAYLOAD_LIMIT: ClassVar[int] = MAX_RESULT_BYTES

    challenge_id: str
    output_sha256: str
    output_bytes: int
    compute_ms: int

    def __post_init__(self) -> None:
        _require(bool(_CHALLENGE_ID.match(self.challenge_id)), "challenge_id must be 32 lowercase hex digits")
        _sha256("output_sha256", self.output_sha256)
        _size("output_bytes", self.output_bytes, MAX_RESULT_BYTES)
        _require(self.compute_ms >= 0, "compute_ms must be >= 0")

    @classmethod
    def for_result(cls, challenge_id: str, result: bytes, compute_ms: int) -> "ChallengeResponse":
        return cls(challenge_id, hashlib.sha256(result).hexdigest(), len(result), compute_ms)

    def payload_digest(self) -> tuple[int, str]:
        return self.output_bytes, self.output_sha256


@message_type
@dataclass(frozen=True)
class Refused(StreamMessage):
    """The miner will not serve a request: `reason` is the label of the refusal
    (unknown_key, foreign_key, too_many_challenges, malformed_key, ...), `ref` the key id
    or challenge id it concerns. The validator records it as an error outcome."""

    TYPE: ClassVar[str] = "fhe_refused"
    MAX_BYTES: ClassVar[int] = 448
    POLICY: ClassVar[SenderPolicy] = MINERS_ONLY

    request: str  # the TYPE of the refused request
    ref: str
    reason: str
    hint: str

    def __post_init__(self) -> None:
        _require(self.request in (AddKey.TYPE, ChallengeRequest.TYPE), "request must be a request type")
        _require(bool(_SHA256.match(self.ref) or _CHALLENGE_ID.match(self.ref)), "ref must be a key or challenge id")
        _require(len(self.reason) <= MAX_REASON_CHARS and bool(_REASON.match(self.reason)),
                 f"reason must be a label of a-z 0-9 _, at most {MAX_REASON_CHARS} characters")
        _require(len(self.hint.encode()) <= MAX_HINT_BYTES, f"hint must be at most {MAX_HINT_BYTES} bytes of UTF-8")


REQUESTS = (AddKey, ChallengeRequest)
RESPONSES = {AddKey: (KeyAdded, Refused), ChallengeRequest: (ChallengeResponse, Refused)}
STREAM_MESSAGES = (AddKey, KeyAdded, ChallengeRequest, ChallengeResponse, Refused)

MAX_ENVELOPE_BYTES = ENVELOPE_OVERHEAD + max(cls.MAX_BYTES for cls in STREAM_MESSAGES)
# What node/mesh.py's stream handler and requester should allow for FHE_PROTOCOL.
MAX_REQUEST_BYTES = 4 + MAX_ENVELOPE_BYTES + max(cls.PAYLOAD_LIMIT for cls in REQUESTS)
MAX_RESPONSE_BYTES = 4 + MAX_ENVELOPE_BYTES + max(cls.PAYLOAD_LIMIT for r in RESPONSES.values() for cls in r)


# --- frames: envelope then payload -------------------------------------------------------------


def pack_frame(envelope: bytes, payload: bytes = b"") -> bytes:
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"envelope of {len(envelope)} bytes is over {MAX_ENVELOPE_BYTES}")
    return len(envelope).to_bytes(4, "big") + envelope + payload


def unpack_frame(raw: bytes) -> tuple[bytes, bytes]:
    """(envelope bytes, payload); BadFrame if the prefix does not fit."""
    if len(raw) < 4:
        raise BadFrame(f"a frame starts with a 4-byte length, got {len(raw)} bytes")
    length = int.from_bytes(raw[:4], "big")
    if length > MAX_ENVELOPE_BYTES:
        raise BadFrame(f"envelope length {length} is over {MAX_ENVELOPE_BYTES}")
    if 4 + length > len(raw):
        raise BadFrame(f"envelope length {length} runs past the {len(raw)}-byte frame")
    return raw[4:4 + length], raw[4 + length:]


def seal_frame(signer: Signer, message: StreamMessage, payload: bytes = b"", *, now_ms: int,
               signed_for: str) -> bytes:
    """Sign `message` for the peer `signed_for` and append its payload."""
    check_payload(message, payload)  # our own mismatch would be refused by the peer anyway
    envelope = seal_message(signer, message, now_ms=now_ms, signed_for=signed_for)
    return pack_frame(envelope.to_gossip_bytes(), payload)


def check_payload(message: Message, payload: bytes) -> None:
    """The payload is exactly what the signed message says it is."""
    digest = message.payload_digest() if isinstance(message, StreamMessage) else None
    if digest is None:
        if payload:
            raise PayloadMismatch(f"{message.TYPE} carries no payload, got {len(payload)} bytes")
        return
    length, sha256 = digest
    if len(payload) != length:
        raise PayloadMismatch(f"{message.TYPE} announces {length} payload bytes, got {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise PayloadMismatch(f"{message.TYPE} payload does not hash to the signed sha256")


def open_frame(raw: bytes, *, verifier: EnvelopeVerifier, now_ms: int,
               expect: tuple[type[StreamMessage], ...]) -> tuple[Verified, bytes]:
    """Verify a frame from the FHE stream: envelope (Epistula, signed for us), message type
    among `expect`, payload matching the message. Raises a RemoteProtocolError subclass."""
    limit = max(cls.PAYLOAD_LIMIT for cls in expect)
    if len(raw) > 4 + MAX_ENVELOPE_BYTES + limit:
        raise BadFrame(f"frame of {len(raw)} bytes is over what {[c.TYPE for c in expect]} allow")
    envelope_bytes, payload = unpack_frame(raw)
    # Cheap checks first, as Epistula orders them: the type before the signature, the
    # signature before hashing a payload of up to hundreds of MB.
    envelope = Envelope.from_gossip_bytes(envelope_bytes)
    message = decode(envelope.body)
    if not isinstance(message, expect):
        raise UnexpectedMessage(f"expected {[c.TYPE for c in expect]}, got {message.TYPE}")
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    check_payload(message, payload)
    return Verified(member, envelope, message), payload


__all__ = [
    "AddKey", "BadFrame", "ChallengeRequest", "ChallengeResponse", "FHE_PROTOCOL", "InvalidChallengeMessage",
    "KeyAdded", "MAX_CIPHERTEXT_BYTES", "MAX_WIRE_ITERATIONS", "MAX_ENVELOPE_BYTES", "MAX_EVAL_KEY_BYTES", "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES", "MAX_RESULT_BYTES", "ModelOffer", "PayloadMismatch", "REQUESTS", "RESPONSES",
    "Refused", "STREAM_MESSAGES", "ScoreReport", "StreamMessage", "UnexpectedMessage", "check_payload", "open_frame",
    "pack_frame", "seal_frame", "unpack_frame",
]
