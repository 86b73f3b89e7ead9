"""Typed mesh messages and their strict msgpack wire form.

Wire form of a message body (what an Epistula envelope signs):
    {"v": PROTOCOL_VERSION, "type": "<name>", "fields": {<exactly the class's fields>}}

Decoding is strict: no msgpack extension types, no pickle, no unknown type, no missing
or extra field, every field of its declared type, and the raw size within the type's
limit. Each class also says which channel carries it and who may send it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from protocol._wire import unpack_strict
from protocol.errors import RemoteProtocolError
from protocol.membership import ALL_ROLES, Role, SenderPolicy

PROTOCOL_VERSION = 1


class Channel(str, enum.Enum):
    MEMBERSHIP = "membership"
    TRAIN = "train"
    FHE = "fhe"
    SETTLE = "settle"


class MessageError(RemoteProtocolError):
    reason = "malformed_message"


class OversizedMessage(MessageError):
    reason = "oversized"


class UnknownMessageType(MessageError):
    reason = "unknown_type"


class UnsupportedVersion(MessageError):
    reason = "unsupported_version"


class WrongChannel(MessageError):
    reason = "wrong_channel"


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    CHANNEL: ClassVar[Channel | None]  # None: direct (stream) only, never on gossip
    MAX_BYTES: ClassVar[int]
    POLICY: ClassVar[SenderPolicy] = SenderPolicy()
    BROADCAST: ClassVar[bool] = True  # sent on a gossip topic with an empty signed-for
    # Bound to the libp2p peer that published it on gossip (protocol/inbound.py
    # check_peer_binding): it means nothing off gossip, so a direct request carrying it is refused.
    PEER_BOUND: ClassVar[bool] = False


_REGISTRY: dict[str, type[Message]] = {}


def message_type(cls: type[Message]) -> type[Message]:
    """Class decorator: register a message class under its TYPE."""
    if cls.TYPE in _REGISTRY:
        raise TypeError(f"message type {cls.TYPE!r} registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


# Each protocol keeps its messages beside its machine; they register on import. Loading
# them here, once, lets any decoder know every type whatever the caller imported.
PROTOCOL_MESSAGE_MODULES = (
    "protocol.admission",
    "protocol.aggregation_messages",
    "protocol.blob_messages",
    "protocol.challenge_messages",
    "protocol.head_messages",
)


@functools.cache
def _load_protocol_messages() -> None:
    for name in PROTOCOL_MESSAGE_MODULES:
        importlib.import_module(name)


def message_class(type_name: str) -> type[Message]:
    _load_protocol_messages()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise UnknownMessageType(f"unknown message type {type_name!r}") from None


def registered_types() -> dict[str, type[Message]]:
    _load_protocol_messages()
    return dict(_REGISTRY)


# --- the foundation's messages ------------------------------------------------------


@message_type
@dataclass(frozen=True)
class Announce(Message):
    """Binds a hotkey (the envelope's signer) to a libp2p peer id and its addresses.

    The receiver also checks that peer_id is the gossip message's original publisher,
    whose libp2p key signed the pubsub message: both keys vouch for the binding.
    """

    TYPE: ClassVar[str] = "announce"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 4096
    PEER_BOUND: ClassVar[bool] = True

    mesh_id: str
    peer_id: str
    addrs: list[str]
    roles: list[str]
    started_ms: int


@message_type
@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 256

    seq: int
    sent_ms: int


@message_type
@dataclass(frozen=True)
class MembershipView(Message):
    """A validator's view of which members it has heard announce, for status and audit."""

    TYPE: ClassVar[str] = "membership_view"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 64 * 1024
    POLICY: ClassVar[SenderPolicy] = SenderPolicy(roles=frozenset({Role.VALIDATOR}))

    at_ms: int
    members: list[str]


@message_type
@dataclass(frozen=True)
class BlobRequest(Message):
    """Ask a peer, over the blob stream protocol, for the blob with this sha256."""

    TYPE: ClassVar[str] = "blob_request"
    CHANNEL: ClassVar[Channel | None] = None
    MAX_BYTES: ClassVar[int] = 512
    BROADCAST: ClassVar[bool] = False

    cid: str


MAX_MESSAGE_BYTES = 1024 * 1024  # no type may declare more; bigger payloads use streams


# --- encoding -----------------------------------------------------------------------


def encode(message: Message) -> bytes:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    raw = msgpack.packb({"v": PROTOCOL_VERSION, "type": message.TYPE, "fields": fields},
                        use_bin_type=True)
    if len(raw) > message.MAX_BYTES:
        raise ValueError(f"{message.TYPE} encodes to {len(raw)} bytes, over its limit "
                         f"of {message.MAX_BYTES}")
    return raw


def decode(raw: bytes, *, channel: Channel | None = None) -> Message:
    """Strictly decode a message body; raises a MessageError subclass with a reason."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise OversizedMessage(f"{len(raw)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        top = unpack_strict(raw)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"not a msgpack message: {exc}") from exc
    if not isinstance(top, dict) or set(top) != {"v", "type", "fields"}:
        raise MessageError("a message is a map with exactly the keys v, type, fields")
    if top["v"] != PROTOCOL_VERSION or isinstance(top["v"], bool):
        raise UnsupportedVersion(f"message version {top['v']!r}, this node speaks {PROTOCOL_VERSION}")
    if not isinstance(top["type"], str):
        raise MessageError("type must be a string")
    cls = message_class(top["type"])
    if len(raw) > cls.MAX_BYTES:
        raise OversizedMessage(f"{cls.TYPE} of {len(raw)} bytes is over its {cls.MAX_BYTES}-byte limit")
    if channel is not None and cls.CHANNEL != channel:
        where = cls.CHANNEL.value if cls.CHANNEL else "a direct stream"
        raise WrongChannel(f"{cls.TYPE} belongs on {where}, not {channel.value}")
    return _build(cls, top["fields"])



def _build(cls: type[Message], fields: Any) -> Message:
    if not isinstance(fields, dict):
        raise MessageError(f"{cls.TYPE}: fields must be a map")
    hints = _field_types(cls)
    expected = hints.keys()
    if set(fields) != expected:
        missing, extra = expected - set(fields), set(fields) - expected
        raise MessageError(f"{cls.TYPE}: missing fields {sorted(missing)}, unknown fields {sorted(map(str, extra))}")
    for name in expected:
        if not _is_instance(fields[name], hints[name]):
            raise MessageError(f"{cls.TYPE}.{name}: expected {hints[name]}, got {type(fields[name]).__name__}")
    return cls(**fields)


@functools.cache
def _field_types(cls: type[Message]) -> dict[str, Any]:
    """Declared field types of a message class (get_type_hints is too slow per message)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_instance(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _is_instance(k, key) and _is_instance(v, item) for k, v in value.items())
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64
    if hint is float:
        return isinstance(value, float)
    return isinstance(value, hint)


__all__ = [
    "ALL_ROLES", "Announce", "BlobRequest", "Channel", "MembershipView", "Message", "MessageError",
    "OversizedMessage", "Ping", "UnknownMessageType", "UnsupportedVersion", "WrongChannel",
    "decode", "encode", "message_type", "registered_types",
]
