"""The key ceremony's channel: every message signed, every payload sealed pairwise.

The ceremony (node/keygen.py) carries TNO's protocol and ours over HTTP between the
members' host:ports. Without this a passive observer on the path read every key share,
and anyone who could reach a port could speak for a member (TNO told senders apart by
source IP and a port cookie). Now (sans-IO: bytes and time in, bytes or deliveries out):

- The ceremony has a member roster: member i is a hotkey at a host:port, in an order
  every member is given alike. Its id (`CeremonyRoster.ceremony_id`) hashes the roster.
- Each member makes one ephemeral X25519 key per ceremony (crypto/channel.py) and
  announces it to every other member, signed with its sr25519 hotkey and bound to the
  ceremony id, sender and recipient. A member never changes its key within a ceremony.
- Every HTTP body is one Epistula envelope (protocol/epistula.py) signed by the sender's
  hotkey for the recipient's hotkey; the receiver accepts only roster hotkeys, fresh
  timestamps and unseen (signer, uuid) pairs. Inside, a frame names the ceremony, the
  sender's and recipient's positions and the sender's channel key, and (except in an
  announce) carries the payload sealed with ChaCha20-Poly1305 under the pairwise key of
  that direction; the associated data is the frame's header, sequence number included.
- Each sequence number is opened once. A sender that retries after a lost response signs
  a fresh envelope around the same frame; the receiver answers DuplicateSequence and
  delivers nothing, which tells that sender the frame arrived.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import msgpack

from crypto.channel import (EphemeralKey, ReceivingChannel, SendingChannel, direction_key,
                            DuplicateSequence)
from crypto.identity import public_key_of
from protocol._wire import unpack_strict
from protocol.epistula import (Envelope, EnvelopeVerifier, Signer, seal as epistula_seal)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.membership import ALL_ROLES, Member, SenderPolicy, StaticDirectory

CEREMONY_LABEL = b"sealmesh/keygen/ceremony/v1"
FRAME_LABEL = "sealmesh/keygen/frame/v1"
# Wider than the mesh's 8 s: a member's event loop can sit in one synchronous TNO step
# for seconds before it reads a request. Replays inside the window are caught by uuid.
WINDOW_MS = 120_000
# uuids remembered per member: a 512-bit ceremony sends tens of messages a second.
REPLAY_CAPACITY = 65_536
MAX_WIRE_BYTES = 64 * 2**20  # TNO's largest message at 2048 bits is well under 1 MiB
_ANNOUNCE_KEYS = {"kind", "ceremony", "from", "to", "channel_key"}
_SEALED_KEYS = _ANNOUNCE_KEYS | {"seq", "ciphertext"}
_ANY_MEMBER = SenderPolicy()


class KeygenChannelError(RemoteProtocolError):
    reason = "keygen_channel"


class MalformedFrame(KeygenChannelError):
    reason = "malformed_frame"


class WrongCeremony(KeygenChannelError):
    reason = "wrong_ceremony"


class WrongSender(KeygenChannelError):
    reason = "wrong_sender"


class MisaddressedFrame(KeygenChannelError):
    reason = "misaddressed_frame"


class ChannelKeyChanged(KeygenChannelError):
    reason = "channel_key_changed"


# Refusals no retry can cure: the member runs another ceremony (or equivocates).
PERMANENT_REASONS = frozenset({"wrong_ceremony", "wrong_sender", "misaddressed_frame",
                               "channel_key_changed"})


@dataclass(frozen=True)
class CeremonyRoster:
    """Member i (1-based) is hotkeys[i-1] at addresses[i-1] ("host:port")."""

    hotkeys: tuple[str, ...]
    addresses: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.hotkeys) != len(self.addresses):
            raise LocalProtocolError("one hotkey per address")
        if len(set(self.hotkeys)) != len(self.hotkeys):
            raise LocalProtocolError("the roster names one hotkey twice")
        for hotkey in self.hotkeys:
            public_key_of(hotkey)  # InvalidAddress for a bad SS58 string

    @property
    def ceremony_id(self) -> bytes:
        roster = json.dumps([f"{h}@{a}" for h, a in zip(self.hotkeys, self.addresses)])
        return hashlib.sha256(CEREMONY_LABEL + b"|" + roster.encode()).digest()

    def index_of(self, hotkey: str) -> int | None:
        try:
            return self.hotkeys.index(hotkey) + 1
        except ValueError:
            return None

    @property
    def directory(self) -> StaticDirectory:
        return StaticDirectory(tuple(Member(h, ALL_ROLES) for h in self.hotkeys))


@dataclass(frozen=True)
class Delivery:
    sender: int  # roster position
    payload: bytes | None  # None for an announce (it only brings the sender's channel key)


def frame_header(ceremony: bytes, sender: int, recipient: int, sequence: int) -> bytes:
    """The associated data of a sealed frame."""
    return msgpack.packb([FRAME_LABEL, ceremony, sender, recipient, sequence], use_bin_type=True)


class KeygenChannel:
    """One member's end of the ceremony's channels to every other member."""

    def __init__(self, signer: Signer, roster: CeremonyRoster, index: int, *,
                 ephemeral: EphemeralKey | None = None, window_ms: int = WINDOW_MS) -> None:
        if not 1 <= index <= len(roster.hotkeys):
            raise LocalProtocolError(f"member {index} is not in the roster")
        if roster.hotkeys[index - 1] != signer.ss58_address:
            raise LocalProtocolError(
                f"this hotkey is {signer.ss58_address}, but the roster names "
                f"{roster.hotkeys[index - 1]} as member {index}")
        self.signer, self.roster, self.index = signer, roster, index
        self.ceremony = roster.ceremony_id
        self.ephemeral = ephemeral or EphemeralKey.generate()
        self.verifier = EnvelopeVerifier(roster.directory, signer.ss58_address,
                                         window_ms=window_ms, replay_capacity=REPLAY_CAPACITY)
        self._peer_keys: dict[int, bytes] = {}
        self._sending: dict[int, SendingChannel] = {}
        self._receiving: dict[int, ReceivingChannel] = {}

    # -- sending -------------------------------------------------------------------------

    def knows(self, member: int) -> bool:
        """Whether `member`'s channel key has arrived (sealing to it is possible)."""
        return member in self._peer_keys

    def announce(self, to: int, *, now_ms: int) -> bytes:
        """Our channel key for member `to`, signed (the wire bytes of one request)."""
        return self.sign(to, self._frame("announce", to), now_ms=now_ms)

    def seal(self, to: int, payload: bytes) -> dict[str, Any]:
        """A sealed frame for `to`, numbered once; sign it (again, on each retry) with
        `sign`. LocalProtocolError before `to`'s channel key arrived."""
        sending = self._sending.get(to)
        if sending is None:
            raise LocalProtocolError(f"member {to}'s channel key has not arrived yet")
        seq, ciphertext = sending.seal(
            payload, lambda s: frame_header(self.ceremony, self.index, to, s))
        return {**self._frame("sealed", to), "seq": seq, "ciphertext": ciphertext}

    def sign(self, to: int, frame: dict[str, Any], *, now_ms: int) -> bytes:
        body = msgpack.packb(frame, use_bin_type=True)
        envelope = epistula_seal(self.signer, body, now_ms=now_ms,
                                 signed_for=self.roster.hotkeys[to - 1])
        return envelope.to_gossip_bytes()

    def _frame(self, kind: str, to: int) -> dict[str, Any]:
        if not 1 <= to <= len(self.roster.hotkeys) or to == self.index:
            raise LocalProtocolError(f"no channel to member {to}")
        return {"kind": kind, "ceremony": self.ceremony, "from": self.index, "to": to,
                "channel_key": self.ephemeral.public}

    # -- receiving -----------------------------------------------------------------------

    def receive(self, wire: bytes, *, now_ms: int) -> Delivery:
        """The sender and payload of one request body; raises a RemoteProtocolError
        (EpistulaError, KeygenChannelError or ChannelError) with the reason otherwise."""
        if len(wire) > MAX_WIRE_BYTES:
            raise MalformedFrame(f"{len(wire)} bytes; the limit is {MAX_WIRE_BYTES}")
        envelope = Envelope.from_gossip_bytes(wire)  # MalformedEnvelope: unsigned bytes
        self.verifier.verify(envelope, now_ms=now_ms, policy=_ANY_MEMBER, broadcast=False)
        sender = self.roster.index_of(envelope.signed_by)
        assert sender is not None  # the verifier accepts roster hotkeys only
        frame = self._parse(envelope.body)
        if frame["ceremony"] != self.ceremony:
            raise WrongCeremony(f"member {sender} runs ceremony {frame['ceremony'].hex()[:16]}, "
                                f"we run {self.ceremony.hex()[:16]}: give every member the "
                                f"same --members (hotkeys, addresses, order)")
        if frame["from"] != sender:
            raise WrongSender(f"{envelope.signed_by} (member {sender}) signed a frame "
                              f"claiming to come from member {frame['from']}")
        if frame["to"] != self.index:
            raise MisaddressedFrame(f"member {sender}'s frame is for member {frame['to']}, "
                                    f"we are member {self.index}")
        self._learn_key(sender, frame["channel_key"])
        if frame["kind"] == "announce":
            return Delivery(sender, None)
        header = frame_header(self.ceremony, sender, self.index, frame["seq"])
        return Delivery(sender, self._receiving[sender].open(frame["seq"], frame["ciphertext"],
                                                             header))

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            frame = unpack_strict(body)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedFrame(f"frame is not msgpack: {exc}") from exc
        if not isinstance(frame, dict):
            raise MalformedFrame("frame must be a map")
        kind = frame.get("kind")
        expected = {"announce": _ANNOUNCE_KEYS, "sealed": _SEALED_KEYS}.get(kind)
        if expected is None or set(frame) != expected:
            # map() to str: unpack_strict admits str keys only, but this refusal must not
            # itself fail on whatever keys a frame carries (issue 11, sound today)
            raise MalformedFrame(f"frame of kind {str(kind)[:40]!r} with fields {sorted(map(str, frame))}")
        for name in ("from", "to") + (("seq",) if kind == "sealed" else ()):
            if type(frame[name]) is not int:
                raise MalformedFrame(f"{name} must be an integer")
        for name in ("ceremony", "channel_key") + (("ciphertext",) if kind == "sealed" else ()):
            if not isinstance(frame[name], bytes):
                raise MalformedFrame(f"{name} must be bytes")
        return frame

    def _learn_key(self, sender: int, channel_key: bytes) -> None:
        known = self._peer_keys.get(sender)
        if known is not None:
            if known != channel_key:
                raise ChannelKeyChanged(f"member {sender} announced another channel key in "
                                        f"this ceremony (a replay from an older run, or "
                                        f"equivocation)")
            return
        me, peer = self.roster.hotkeys[self.index - 1], self.roster.hotkeys[sender - 1]
        ids = {"context": self.ceremony}
        send_key = direction_key(self.ephemeral, channel_key, **ids, sender=public_key_of(me),
                                 receiver=public_key_of(peer), sender_public=self.ephemeral.public,
                                 receiver_public=channel_key)
        recv_key = direction_key(self.ephemeral, channel_key, **ids, sender=public_key_of(peer),
                                 receiver=public_key_of(me), sender_public=channel_key,
                                 receiver_public=self.ephemeral.public)
        self._sending[sender] = SendingChannel(send_key)
        self._receiving[sender] = ReceivingChannel(recv_key)
        self._peer_keys[sender] = channel_key


__all__ = ["CeremonyRoster", "KeygenChannel", "Delivery", "frame_header", "KeygenChannelError",
           "MalformedFrame", "WrongCeremony", "WrongSender", "MisaddressedFrame",
           "ChannelKeyChanged", "DuplicateSequence", "PERMANENT_REASONS", "WINDOW_MS",
           "MAX_WIRE_BYTES"]
