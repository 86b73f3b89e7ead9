"""Pairwise sealed channels between two parties' ephemeral X25519 keys (pure, no I/O).

Used by the key ceremony (protocol/keygen_channel.py), where every member makes one
ephemeral X25519 key per ceremony and signs its public half with its sr25519 hotkey.
Two members then share one key per direction:

    key(A -> B) = HKDF-SHA256(X25519(a, B), salt = context,
                              info = LABEL | "A->B" identities | A's and B's public keys)

and every frame is ChaCha20-Poly1305 under that key, nonce = the frame's sequence number,
associated data = the caller's header (who, to whom, which ceremony, which sequence
number). The direction and both identities are in the key, so a frame cannot be
reflected back to its sender or moved to another pair; the ephemeral keys are in the
key too, so a frame from another ceremony (or a restarted member) does not open.

A sequence number is used once per key: the sender counts up, the receiver remembers
every number it has opened and refuses a second frame with the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crypto.errors import RemoteProtocolError

LABEL = b"sealmesh/channel/v1"
PUBLIC_KEY_BYTES = 32
MAX_SEQUENCE = 2**64 - 1  # the nonce holds 64 bits of it
HeaderFn = Callable[[int], bytes]  # sequence number -> associated data


class ChannelError(RemoteProtocolError):
    reason = "channel"


class BadPeerKey(ChannelError):
    reason = "bad_channel_key"


class BadCiphertext(ChannelError):
    reason = "bad_ciphertext"


class DuplicateSequence(ChannelError):
    """A frame whose sequence number was already opened on this channel."""

    reason = "duplicate_sequence"


@dataclass(frozen=True)
class EphemeralKey:
    """One party's X25519 key for one ceremony; never written to disk."""

    private: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> "EphemeralKey":
        return cls(X25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def direction_key(own: EphemeralKey, peer_public: bytes, *, context: bytes, sender: bytes,
                  receiver: bytes, sender_public: bytes, receiver_public: bytes) -> bytes:
    """The 32-byte key of the channel sender -> receiver (the same at both ends).

    `sender` and `receiver` are the parties' long-term identities (hotkey public keys),
    `context` names the session (the ceremony id)."""
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise BadPeerKey(f"a channel key is {PUBLIC_KEY_BYTES} bytes")
    try:
        shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point: the shared secret would be all zeros
        raise BadPeerKey(f"unusable channel key: {exc}") from exc
    info = b"|".join([LABEL, b"direction", sender, receiver, sender_public, receiver_public])
    return HKDF(hashes.SHA256(), 32, salt=context, info=info).derive(shared)


def _nonce(sequence: int) -> bytes:
    return b"\x00\x00\x00\x00" + sequence.to_bytes(8, "big")


class SendingChannel:
    """One direction, sending end: numbers frames 0, 1, 2, ... and seals them."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.next_sequence = 0

    def seal(self, plaintext: bytes, header: HeaderFn) -> tuple[int, bytes]:
        """(sequence, ciphertext); `header(sequence)` is the associated data."""
        sequence = self.next_sequence
        if sequence > MAX_SEQUENCE:
            raise OverflowError("channel exhausted; start a new session")
        self.next_sequence += 1
        return sequence, self._aead.encrypt(_nonce(sequence), plaintext, header(sequence))


class ReceivingChannel:
    """One direction, receiving end: opens each sequence number at most once."""

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._opened: set[int] = set()

    def open(self, sequence: int, ciphertext: bytes, associated_data: bytes) -> bytes:
        if type(sequence) is not int or not 0 <= sequence <= MAX_SEQUENCE:
            raise BadCiphertext(f"sequence number {sequence!r} out of range")
        if sequence in self._opened:
            raise DuplicateSequence(f"frame {sequence} was already received")
        try:
            plaintext = self._aead.decrypt(_nonce(sequence), ciphertext, associated_data)
        except InvalidTag:
            raise BadCiphertext(f"frame {sequence} does not authenticate (tampered, or sealed "
                                f"for another channel)") from None
        self._opened.add(sequence)  # only once authentic: a forgery burns no number
        return plaintext

    def __len__(self) -> int:
        return len(self._opened)


__all__ = ["EphemeralKey", "direction_key", "SendingChannel", "ReceivingChannel",
           "ChannelError", "BadPeerKey", "BadCiphertext", "DuplicateSequence", "LABEL"]
