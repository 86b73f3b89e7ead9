"""Who may speak: members, roles, stake, and each message type's sender policy.

Registries (node/registry/) produce `Member`s from a genesis file or a Bittensor
metagraph; protocol code only sees this interface.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Role(str, enum.Enum):
    TRAINER = "trainer"
    VALIDATOR = "validator"
    MINER = "miner"


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True)
class Member:
    hotkey: str  # SS58 address
    roles: frozenset[Role]
    stake: float = 0.0


class MemberDirectory(Protocol):
    def member(self, hotkey: str) -> Member | None: ...


@dataclass(frozen=True)
class SenderPolicy:
    """Which members may send a message type: any of `roles`, with stake >= min_stake."""

    roles: frozenset[Role] = ALL_ROLES
    min_stake: float = 0.0

    def allows(self, member: Member) -> bool:
        return bool(member.roles & self.roles) and member.stake >= self.min_stake


@dataclass(frozen=True)
class StaticDirectory:
    """A directory over a fixed member list (genesis file, a metagraph snapshot)."""

    members: tuple[Member, ...]

    def member(self, hotkey: str) -> Member | None:
        return self._by_hotkey.get(hotkey)

    @property
    def _by_hotkey(self) -> dict[str, Member]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {m.hotkey: m for m in self.members}
            object.__setattr__(self, "_index", cached)
        return cached
