"""What the parties agree on at Init: who they are, the periods, the escrow and the
records the head may settle."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.head_messages import HeadInit


@dataclass(frozen=True)
class HeadParameters:
    head_id: str
    parties: tuple[str, ...]  # validators' hotkeys, sorted: the snapshot leader rotation
    contestation_period_ms: int
    # A deposit may be absorbed by the next deposit_period_snapshots snapshots and no
    # later: counted in snapshot numbers, which every party agrees on, not on its own
    # clock (issue 11, finding 6).
    deposit_period_snapshots: int
    sign_timeout_ms: int
    agreed_rounds: int  # closing before this many RoundResults are settled is slashable
    escrow: int  # each party locks this much at commit
    # The records the head may settle (head_rules): round ids 0..round_limit-1, epochs
    # 0..epoch_limit-1, each paying its reward from the pool by the rule.
    round_limit: int = 0
    epoch_limit: int = 0
    round_reward: int = 0
    epoch_reward: int = 0

    def problems(self) -> list[str]:
        found = []
        if not self.head_id:
            found.append("head_id is empty")
        if not self.parties or list(self.parties) != sorted(set(self.parties)):
            found.append("parties must be a non-empty sorted list without repeats")
        if min(self.contestation_period_ms, self.deposit_period_snapshots, self.sign_timeout_ms) <= 0:
            found.append("periods and timeouts must be positive")
        if min(self.agreed_rounds, self.escrow, self.round_limit, self.epoch_limit,
               self.round_reward, self.epoch_reward) < 0:
            found.append("counts, escrow and rewards must not be negative")
        if self.agreed_rounds > self.round_limit:
            found.append("agreed_rounds cannot exceed round_limit: those rounds could never settle")
        return found

    def leader(self, number: int) -> str:
        """Round-robin by snapshot number, as in Hydra's coordinated head protocol."""
        return self.parties[(number - 1) % len(self.parties)]

    @property
    def majority(self) -> int:
        """Strictly more than half of the parties."""
        return len(self.parties) // 2 + 1

    def to_message(self) -> HeadInit:
        return HeadInit(self.head_id, list(self.parties), self.contestation_period_ms,
                        self.deposit_period_snapshots, self.sign_timeout_ms, self.agreed_rounds,
                        self.escrow, self.round_limit, self.epoch_limit, self.round_reward,
                        self.epoch_reward)

    @classmethod
    def from_message(cls, message: HeadInit) -> "HeadParameters":
        return cls(message.head_id, tuple(message.parties), message.contestation_period_ms,
                   message.deposit_period_snapshots, message.sign_timeout_ms, message.agreed_rounds,
                   message.escrow, message.round_limit, message.epoch_limit,
                   message.round_reward, message.epoch_reward)
