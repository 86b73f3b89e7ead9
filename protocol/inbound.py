"""From raw bytes to a verified, typed message, and back: the one pipeline every
gossip payload and every authenticated HTTP request goes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from protocol.epistula import Envelope, EnvelopeVerifier, Signer, seal
from protocol.admission import JoinRateLimit, JoinRequest
from protocol.errors import RemoteProtocolError
from protocol.membership import Member
from protocol.messages import Announce, Channel, Message, MessageError, OversizedMessage, WrongChannel, decode, encode


@dataclass(frozen=True)
class Verified:
    member: Member
    envelope: Envelope
    message: Message


def seal_message(signer: Signer, message: Message, *, now_ms: int, signed_for: str = "") -> Envelope:
    return seal(signer, encode(message), now_ms=now_ms, signed_for=signed_for)


# Gossip verdicts that depend on the receiver (its clock, what it has already seen, how
# full its replay quota for the signer is): an honest relay can forward such a message
# in good faith and a neighbour can still refuse it, so it is dropped without blaming the
# forwarder (GossipSub's IGNORE). Every other refusal is the same at every node that
# shares the mesh's directory (genesis or metagraph snapshot): the relay should have
# refused it too, so it counts against the forwarder (REJECT). Gossip carries an empty
# signed-for for exactly this reason; see protocol/epistula.py.
#
# unknown_signer too (issue 15): membership changes while the mesh runs, and a relay that
# has already applied the snapshot admitting a member (or a node that has not yet
# applied the one it left by) judges its messages differently from its neighbour. A
# stranger's message costs the receiver a directory lookup only, before any signature.
# A join request over its publisher's rate is dropped the same way (join_rate_limited).
RECEIVER_DEPENDENT_REASONS = frozenset({"stale_timestamp", "future_timestamp", "replay", "replay_quota",
                                        "unknown_signer", JoinRateLimit.reason})


def forwarder_is_at_fault(reason: str) -> bool:
    """Whether a gossip refusal with this reason should count against the peer that forwarded it."""
    return reason not in RECEIVER_DEPENDENT_REASONS


class PeerBindingError(RemoteProtocolError):
    reason = "peer_binding"


class GossipOnly(MessageError):
    reason = "gossip_only"


class JoinRateLimited(RemoteProtocolError):
    reason = JoinRateLimit.reason


def check_peer_binding(message: Message, from_peer: str, mesh_id: str) -> None:
    """An announcement (or a join request) must come from the peer id it claims, for this mesh."""
    if isinstance(message, (Announce, JoinRequest)):
        if message.peer_id != from_peer:
            raise PeerBindingError(f"announce claims peer {message.peer_id} but was published by {from_peer}")
        if message.mesh_id != mesh_id:
            raise PeerBindingError(f"announce for mesh {message.mesh_id!r}, this is {mesh_id!r}")


def open_gossip(raw: bytes, *, channel: Channel, verifier: EnvelopeVerifier, now_ms: int,
                max_bytes: int, from_peer: str | None = None, mesh_id: str = "",
                join_limit: JoinRateLimit | None = None) -> Verified:
    """Verify a gossip payload received on `channel`; raises RemoteProtocolError.

    Gossip is signed for no one: a signed-for (even this node's own hotkey) is refused,
    so no node relays a message its neighbours would refuse as addressed to someone else.
    With from_peer (the pubsub publisher), a peer-bound message must name that peer and
    this mesh; the uuid is spent only once everything passed, so a member re-publishing
    another's genuine Announce under its own peer id does not burn it (a replay refusal
    of the genuine copy would follow otherwise).

    A JoinRequest is the one message a stranger may send (OPEN_TO_STRANGERS); with
    join_limit, each publishing peer's join requests are rate-limited before their
    signature is checked."""
    if len(raw) > max_bytes:
        raise OversizedMessage(f"gossip payload of {len(raw)} bytes is over the {max_bytes}-byte limit")
    envelope = Envelope.from_gossip_bytes(raw)
    message = decode(envelope.body, channel=channel)
    if not message.BROADCAST:
        raise WrongChannel(f"{message.TYPE} is sent on a direct stream, not on gossip")
    stranger_ok = getattr(message, "OPEN_TO_STRANGERS", False)
    if stranger_ok and join_limit is not None and not join_limit.allow(from_peer or "", now_ms):
        raise JoinRateLimited(f"join requests published by {from_peer} are over the rate of "
                              f"{join_limit.burst} then 1 per {join_limit.every_ms} ms")
    member = verifier.preflight(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=True,
                                stranger_ok=stranger_ok)
    if from_peer is not None:
        check_peer_binding(message, from_peer, mesh_id)
    elif message.PEER_BOUND:
        raise GossipOnly(f"{message.TYPE} is bound to its publisher; opened without one")
    verifier.spend(envelope, now_ms=now_ms)
    return Verified(member, envelope, message)


def open_request(headers: Mapping[str, str], body: bytes, *, verifier: EnvelopeVerifier,
                 now_ms: int) -> Verified:
    """Verify an Epistula-signed request addressed to this node (never broadcast). A
    peer-bound message (Announce) is refused: only gossip knows who published it."""
    envelope = Envelope.from_headers(headers, body)
    message = decode(body)
    if message.PEER_BOUND:
        raise GossipOnly(f"{message.TYPE} is accepted on gossip only, where its publisher's peer id is known")
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    return Verified(member, envelope, message)


def open_direct(raw: bytes, *, verifier: EnvelopeVerifier, now_ms: int, max_bytes: int) -> Verified:
    """Verify a request that came on a stream: it must be signed for this node."""
    if len(raw) > max_bytes:
        raise OversizedMessage(f"request of {len(raw)} bytes is over the {max_bytes}-byte limit")
    envelope = Envelope.from_gossip_bytes(raw)
    message = decode(envelope.body)
    if message.PEER_BOUND:
        raise GossipOnly(f"{message.TYPE} is accepted on gossip only, where its publisher's peer id is known")
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    return Verified(member, envelope, message)


class UnexpectedRequest(MessageError):
    reason = "unexpected_message"


class PayloadTooLarge(MessageError):
    reason = "payload_too_large"


def admit_stream_envelope(envelope_bytes: bytes, *, verifier: EnvelopeVerifier, now_ms: int,
                          expect: tuple[type[Message], ...]) -> int:
    """The payload size a stream request's envelope signs for, judged before one payload
    byte is read (issue 11 finding 9); raises RemoteProtocolError.

    The request is `envelope || payload` and the signed message names the payload's length
    (and sha256), so the length is as authenticated as the signer: a stranger, a member
    whose role may not send the request, a stale or replayed envelope, a bad signature, or
    a length above the message type's PAYLOAD_LIMIT is refused having cost the receiver
    the envelope only. The uuid is not spent here (EnvelopeVerifier.preflight): the
    handler verifies the whole request again once the payload is in, with the same
    `now_ms` (when the request began to arrive), so a long upload is not aged by its
    own transfer time."""
    envelope = Envelope.from_gossip_bytes(envelope_bytes)
    message = decode(envelope.body)
    if not isinstance(message, expect):
        raise UnexpectedRequest(f"expected one of {[c.TYPE for c in expect]}, got {message.TYPE}")
    verifier.preflight(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    declared = signed_payload_bytes(message)
    limit = getattr(type(message), "PAYLOAD_LIMIT", 0)
    if declared > limit:
        raise PayloadTooLarge(f"{message.TYPE} announces {declared} payload bytes; its limit is {limit}")
    return declared


def signed_payload_bytes(message: Message) -> int:
    """The payload length a stream message signs for (0: it carries none)."""
    digest = message.payload_digest() if hasattr(message, "payload_digest") else None
    return 0 if digest is None else digest[0]
