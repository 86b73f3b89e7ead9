"""Hotkeys (sr25519) and SS58 addresses.

Signing and verification go through bittensor-wallet's Keypair, the same code btcli
uses, so a hotkey made by btcli signs here unchanged. Files and wallets are the node's
business (node/wallet.py); this module only does the math.
"""

from __future__ import annotations

from dataclasses import dataclass

from bittensor_wallet import Keypair

SS58_FORMAT = 42  # generic Substrate prefix, which Bittensor uses


class InvalidAddress(ValueError):
    """An SS58 string that does not decode to an sr25519 public key."""


@dataclass(frozen=True)
class Hotkey:
    """A signing hotkey. Holds the secret; never serialized by this module."""

    keypair: Keypair

    @classmethod
    def generate(cls) -> tuple["Hotkey", str]:
        """A fresh hotkey and its 12-word mnemonic (btcli's default length)."""
        mnemonic = Keypair.generate_mnemonic(12)
        return cls(Keypair.create_from_mnemonic(mnemonic)), mnemonic

    @classmethod
    def from_uri(cls, uri: str) -> "Hotkey":
        """Dev keys such as //Alice, handy for deterministic tests."""
        return cls(Keypair.create_from_uri(uri))

    @classmethod
    def from_seed(cls, seed: bytes) -> "Hotkey":
        return cls(Keypair.create_from_seed(seed.hex()))

    @property
    def ss58_address(self) -> str:
        return self.keypair.ss58_address

    @property
    def public_key(self) -> bytes:
        return bytes(self.keypair.public_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self.keypair.sign(message))


def public_key_of(address: str) -> bytes:
    """The 32-byte public key an SS58 address names; InvalidAddress otherwise."""
    try:
        return bytes(Keypair(ss58_address=address).public_key)
    except (ValueError, TypeError) as exc:
        raise InvalidAddress(f"not an SS58 address: {address!r} ({exc})") from exc


def is_valid_address(address: str) -> bool:
    try:
        public_key_of(address)
    except InvalidAddress:
        return False
    return True


def verify_signature(address: str, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is an sr25519 signature of `message` by `address`."""
    if len(signature) != 64:
        return False
    try:
        return bool(Keypair(ss58_address=address).verify(message, signature))
    except (ValueError, TypeError):
        return False
