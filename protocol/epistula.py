"""Epistula v2 envelopes: sign and verify, sans-IO (time is an argument).

The signed string is "{sha256hex(body)}.{uuid}.{timestamp}.{signed_for}", signed with
the sender's sr25519 hotkey; the signature travels as "0x" + hex. The same envelope
wraps HTTP requests (real headers) and gossip messages (a msgpack map).

Verification runs in a fixed order and stops at the first failure, each with its own
reason: well-formed -> known, allowed signer -> addressed to us -> fresh timestamp ->
not a replay -> valid signature. The cheap checks come first so that junk costs no
signature verification; the replay cache only records a uuid once the signature holds,
so a forger cannot burn an honest message's uuid, and it keys every uuid by its signer,
so a member cannot burn another member's uuid by signing it itself.

Gossip is signed for no one: a gossip envelope with a signed-for is refused by every
receiver, the one it names included. A relay that accepted messages signed for itself
would forward them to neighbours that must refuse them, and be blamed for it.
"""

from __future__ import annotations

import hashlib
import re
import uuid as uuidlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import msgpack

from crypto.identity import is_valid_address, verify_signature
from protocol._wire import unpack_strict
from protocol.errors import RemoteProtocolError
from protocol.membership import Member, MemberDirectory, SenderPolicy

VERSION = "2"
DEFAULT_WINDOW_MS = 8_000  # Brainlock's window; the Epistula spec says 5 s
# uuids remembered per signer; memory is bounded by members x this (about 150 B an entry).
# An honest signer stays below it unless it signs over 500 messages a second for a window.
DEFAULT_REPLAY_CAPACITY = 8_192

HEADER_VERSION = "Epistula-Version"
HEADER_TIMESTAMP = "Epistula-Timestamp"
HEADER_UUID = "Epistula-Uuid"
HEADER_SIGNED_BY = "Epistula-Signed-By"
HEADER_SIGNED_FOR = "Epistula-Signed-For"
HEADER_SIGNATURE = "Epistula-Request-Signature"

# Matched with fullmatch and ASCII classes only: "$" also matches before a trailing
# newline, and str.isdigit() accepts digits such as "¹²³" that int() refuses.
_TIMESTAMP = re.compile(r"[0-9]{1,15}", re.ASCII)
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.ASCII)
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{128}", re.ASCII)
_GOSSIP_KEYS = ("version", "timestamp", "uuid", "signed_by", "signed_for", "signature", "body")


class EpistulaError(RemoteProtocolError):
    reason = "epistula"


class MalformedEnvelope(EpistulaError):
    reason = "malformed_envelope"


class UnknownSigner(EpistulaError):
    reason = "unknown_signer"


class SignerNotAllowed(EpistulaError):
    reason = "signer_not_allowed"


class WrongRecipient(EpistulaError):
    reason = "wrong_recipient"


class StaleTimestamp(EpistulaError):
    reason = "stale_timestamp"


class FutureTimestamp(EpistulaError):
    reason = "future_timestamp"


class Replay(EpistulaError):
    reason = "replay"


class ReplayQuotaExceeded(EpistulaError):
    """The signer has more unexpired uuids here than its quota, none of them forgettable."""

    reason = "replay_quota"


class BadSignature(EpistulaError):
    reason = "bad_signature"


class Signer(Protocol):
    @property
    def ss58_address(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class Envelope:
    version: str
    timestamp_ms: int
    uuid: str
    signed_by: str
    signed_for: str  # "" for broadcast
    signature: str  # "0x" + 128 hex digits
    body: bytes

    def to_headers(self) -> dict[str, str]:
        return {
            HEADER_VERSION: self.version,
            HEADER_TIMESTAMP: str(self.timestamp_ms),
            HEADER_UUID: self.uuid,
            HEADER_SIGNED_BY: self.signed_by,
            HEADER_SIGNED_FOR: self.signed_for,
            HEADER_SIGNATURE: self.signature,
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], body: bytes) -> "Envelope":
        """From HTTP headers (any case). Raises MalformedEnvelope."""
        lower = {k.lower(): v for k, v in headers.items()}

        def get(name: str) -> str:
            value = lower.get(name.lower())
            if value is None:
                raise MalformedEnvelope(f"missing header {name}")
            return value

        return _checked(
            version=get(HEADER_VERSION),
            timestamp=get(HEADER_TIMESTAMP),
            uuid=get(HEADER_UUID),
            signed_by=get(HEADER_SIGNED_BY),
            signed_for=lower.get(HEADER_SIGNED_FOR.lower(), ""),
            signature=get(HEADER_SIGNATURE),
            body=body,
        )

    def to_gossip_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "version": self.version,
                "timestamp": self.timestamp_ms,
                "uuid": self.uuid,
                "signed_by": self.signed_by,
                "signed_for": self.signed_for,
                "signature": self.signature,
                "body": self.body,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_gossip_bytes(cls, raw: bytes) -> "Envelope":
        """From a gossip payload: exactly the seven envelope fields. Raises MalformedEnvelope."""
        try:
            fields = unpack_strict(raw)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedEnvelope(f"not a msgpack envelope: {exc}") from exc
        if not isinstance(fields, dict) or set(fields) != set(_GOSSIP_KEYS):
            raise MalformedEnvelope(f"envelope must have exactly the fields {_GOSSIP_KEYS}")
        if not isinstance(fields["timestamp"], int) or isinstance(fields["timestamp"], bool):
            raise MalformedEnvelope("timestamp must be an integer")
        return _checked(
            version=fields["version"],
            timestamp=str(fields["timestamp"]),
            uuid=fields["uuid"],
            signed_by=fields["signed_by"],
            signed_for=fields["signed_for"],
            signature=fields["signature"],
            body=fields["body"],
        )



def _checked(*, version, timestamp, uuid, signed_by, signed_for, signature, body) -> Envelope:
    for name, value in (("version", version), ("timestamp", timestamp), ("uuid", uuid),
                        ("signed_by", signed_by), ("signed_for", signed_for),
                        ("signature", signature)):
        if not isinstance(value, str):
            raise MalformedEnvelope(f"{name} must be a string")
    if not isinstance(body, bytes):
        raise MalformedEnvelope("body must be bytes")
    if version != VERSION:
        raise MalformedEnvelope(f"unsupported Epistula version {version!r}, expected {VERSION!r}")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise MalformedEnvelope(f"timestamp must be milliseconds since the epoch, got {timestamp!r}")
    if not _UUID4.fullmatch(uuid):
        raise MalformedEnvelope(f"uuid must be a lowercase uuid4, got {uuid!r}")
    if not is_valid_address(signed_by):
        raise MalformedEnvelope(f"signed-by is not an SS58 address: {signed_by!r}")
    if signed_for and not is_valid_address(signed_for):
        raise MalformedEnvelope(f"signed-for is not an SS58 address: {signed_for!r}")
    if not _SIGNATURE.fullmatch(signature):
        raise MalformedEnvelope("signature must be 0x followed by 128 hex digits")
    return Envelope(VERSION, int(timestamp), uuid, signed_by, signed_for, signature, body)


def signing_payload(body: bytes, uuid: str, timestamp_ms: int, signed_for: str) -> bytes:
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp_ms}.{signed_for}".encode()


def seal(signer: Signer, body: bytes, *, now_ms: int, signed_for: str = "",
         uuid: str | None = None) -> Envelope:
    """Sign `body` for `signed_for` ("" = broadcast) at time `now_ms`."""
    uuid = uuid or str(uuidlib.uuid4())
    signature = signer.sign(signing_payload(body, uuid, now_ms, signed_for))
    return Envelope(VERSION, now_ms, uuid, signer.ss58_address, signed_for,
                    "0x" + signature.hex(), body)


class ReplayCache:
    """(signer, uuid) pairs seen within the time window, in bounded memory.

    Keyed by signer: a uuid is the signer's nonce, so a member that reuses an honest
    message's uuid in its own signed message burns nothing but its own uuid. Each signer
    has its own quota of `capacity` entries and its own floor, so one signer's flood can
    only ever refuse that signer's messages.

    Entries older than the window expire. When a signer's quota is full its oldest entry
    is forgotten and that entry's timestamp becomes the signer's floor: anything the
    signer signed at or before the floor is refused from then on, so forgetting never
    re-opens a replay. An entry stamped in the receiver's future is never forgotten (it
    would lift the floor over messages not yet signed): while the signer's oldest entry
    is one, its new messages are refused (ReplayQuotaExceeded) until that time passes.
    """

    def __init__(self, window_ms: int, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("replay capacity must be >= 1")
        self.window_ms = window_ms
        self.capacity = capacity  # per signer
        self._seen: dict[str, OrderedDict[str, int]] = {}  # signer -> uuid -> timestamp, by insertion
        self._floors: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(map(len, self._seen.values()))

    def floor_ms(self, signer: str) -> int:
        return self._floors.get(signer, -1)

    def seen(self, signer: str, uuid: str, timestamp_ms: int) -> bool:
        return uuid in self._seen.get(signer, ()) or timestamp_ms <= self.floor_ms(signer)

    def record(self, signer: str, uuid: str, timestamp_ms: int, now_ms: int) -> None:
        """Remember (signer, uuid); ReplayQuotaExceeded if the signer's quota is full and
        nothing in it can be forgotten safely."""
        entries = self._seen.setdefault(signer, OrderedDict())
        self._expire(entries, now_ms)
        while len(entries) >= self.capacity:
            self._forget_oldest(signer, entries, now_ms)
        entries[uuid] = timestamp_ms

    def _forget_oldest(self, signer: str, entries: OrderedDict[str, int], now_ms: int) -> None:
        oldest_uuid, oldest_ts = next(iter(entries.items()))
        if oldest_ts > now_ms:
            raise ReplayQuotaExceeded(
                f"{signer} has {len(entries)} unexpired uuids here, the oldest signed "
                f"{oldest_ts - now_ms} ms in the future")
        del entries[oldest_uuid]
        self._floors[signer] = max(self.floor_ms(signer), oldest_ts)

    def _expire(self, entries: OrderedDict[str, int], now_ms: int) -> None:
        # Insertion order is close to timestamp order; stop at the first live entry and
        # let later stragglers expire on a later pass.
        horizon = now_ms - 2 * self.window_ms
        while entries:
            uuid, ts = next(iter(entries.items()))
            if ts >= horizon:
                break
            del entries[uuid]


class EnvelopeVerifier:
    """Checks envelopes addressed to one node, in the Epistula order."""

    def __init__(self, directory: MemberDirectory, own_hotkey: str, *,
                 window_ms: int = DEFAULT_WINDOW_MS,
                 replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
                 signature_check: Callable[[str, bytes, bytes], bool] = verify_signature) -> None:
        self.directory = directory
        self.own_hotkey = own_hotkey
        self.window_ms = window_ms
        self.replays = ReplayCache(window_ms, replay_capacity)
        self._signature_check = signature_check

    def verify(self, envelope: Envelope, *, now_ms: int, policy: SenderPolicy,
               broadcast: bool) -> Member:
        """The signing member if the envelope is acceptable; raises an EpistulaError.

        broadcast=True for gossip (signed-for must be empty), False for a request that
        came to this node directly (signed-for must be this node)."""
        member = self.preflight(envelope, now_ms=now_ms, policy=policy, broadcast=broadcast)
        self.spend(envelope, now_ms=now_ms)
        return member

    def spend(self, envelope: Envelope, *, now_ms: int) -> None:
        """Record the uuid of an envelope preflight() passed: from now on it is a replay."""
        self.replays.record(envelope.signed_by, envelope.uuid, envelope.timestamp_ms, now_ms)

    def preflight(self, envelope: Envelope, *, now_ms: int, policy: SenderPolicy,
                  broadcast: bool, stranger_ok: bool = False) -> Member:
        """Every check of verify() without recording the uuid; raises an EpistulaError.

        For a stream request whose envelope arrives before its payload: the envelope is
        checked before any payload byte is read (so a stranger is refused after a few
        hundred bytes, not hundreds of MB), and verify() runs on the whole request once it
        is in, which is where the uuid is spent."""
        member = self.directory.member(envelope.signed_by)
        if member is None and stranger_ok:  # a join request (protocol/admission.py): a stranger, no roles
            member = Member(envelope.signed_by, frozenset(), 0.0)
        elif member is None:
            raise UnknownSigner(f"{envelope.signed_by} is not a member of this mesh")
        elif not policy.allows(member):
            raise SignerNotAllowed(
                f"{envelope.signed_by} (roles {sorted(r.value for r in member.roles)}, "
                f"stake {member.stake}) may not send this message "
                f"(needs one of {sorted(r.value for r in policy.roles)}, stake >= {policy.min_stake})")
        self._check_recipient(envelope, broadcast)
        self._check_time(envelope, now_ms)
        if self.replays.seen(envelope.signed_by, envelope.uuid, envelope.timestamp_ms):
            raise Replay(f"uuid {envelope.uuid} was already used by {envelope.signed_by}")
        payload = signing_payload(envelope.body, envelope.uuid, envelope.timestamp_ms,
                                  envelope.signed_for)
        if not self._signature_check(envelope.signed_by, payload, bytes.fromhex(envelope.signature[2:])):
            raise BadSignature(f"signature does not verify for {envelope.signed_by}")
        return member

    def _check_recipient(self, envelope: Envelope, broadcast: bool) -> None:
        """broadcast: it came on gossip and must be signed for no one, whoever receives it
        (so the verdict is the same at every node, and a relay is never blamed for it).
        Otherwise it came to us directly and must be signed for this node."""
        if broadcast:
            if envelope.signed_for:
                raise WrongRecipient(f"gossip must be signed for no one, this is signed for "
                                     f"{envelope.signed_for}")
            return
        if envelope.signed_for == "":
            raise WrongRecipient("an empty signed-for is only valid on broadcast topics")
        if envelope.signed_for != self.own_hotkey:
            raise WrongRecipient(f"signed for {envelope.signed_for}, not this node")

    def _check_time(self, envelope: Envelope, now_ms: int) -> None:
        age = now_ms - envelope.timestamp_ms
        if age > self.window_ms:
            raise StaleTimestamp(f"signed {age} ms ago; the window is {self.window_ms} ms")
        if -age > self.window_ms:
            raise FutureTimestamp(f"signed {-age} ms in the future; the window is {self.window_ms} ms")
