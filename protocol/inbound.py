"""From raw bytes to a verified, typed message, and back: the one pipeline every
gossip payload and every authenticated HTTP request goes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from protocol.epistula import Envelope, EnvelopeVerifier, Signer, seal
from protocol.membership import Member
from protocol.messages import Channel, Message, OversizedMessage, decode, encode


@dataclass(frozen=True)
class Verified:
    member: Member
    envelope: Envelope
    message: Message


def seal_message(signer: Signer, message: Message, *, now_ms: int, signed_for: str = "") -> Envelope:
    return seal(signer, encode(message), now_ms=now_ms, signed_for=signed_for)


def open_gossip(raw: bytes, *, channel: Channel, verifier: EnvelopeVerifier, now_ms: int,
                max_bytes: int) -> Verified:
    """Verify a gossip payload received on `channel`; raises RemoteProtocolError."""
    if len(raw) > max_bytes:
        raise OversizedMessage(f"gossip payload of {len(raw)} bytes is over the {max_bytes}-byte limit")
    envelope = Envelope.from_gossip_bytes(raw)
    message = decode(envelope.body, channel=channel)
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY,
                             broadcast=message.BROADCAST)
    return Verified(member, envelope, message)


def open_request(headers: Mapping[str, str], body: bytes, *, verifier: EnvelopeVerifier,
                 now_ms: int) -> Verified:
    """Verify an Epistula-signed request addressed to this node (never broadcast)."""
    envelope = Envelope.from_headers(headers, body)
    message = decode(body)
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    return Verified(member, envelope, message)


def open_direct(raw: bytes, *, verifier: EnvelopeVerifier, now_ms: int, max_bytes: int) -> Verified:
    """Verify a request that came on a stream: it must be signed for this node."""
    if len(raw) > max_bytes:
        raise OversizedMessage(f"request of {len(raw)} bytes is over the {max_bytes}-byte limit")
    envelope = Envelope.from_gossip_bytes(raw)
    message = decode(envelope.body)
    member = verifier.verify(envelope, now_ms=now_ms, policy=message.POLICY, broadcast=False)
    return Verified(member, envelope, message)
