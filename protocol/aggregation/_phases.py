"""The three machines' phases (specs/SecureAggregation.tla's vPhase, cPhase, tPhase)."""

from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    OPEN = "open"
    COLLECT = "collect"
    AGGREGATE = "aggregate"
    DECRYPT = "decrypt"
    BLAME = "blame"  # the sum overflowed a slot: waiting for every contributor's slot proof
    FINAL = "final"
    ABORTED = "aborted"


class CommitteePhase(str, enum.Enum):
    WAITING = "waiting"  # no RoundOpen yet
    WATCH = "watch"  # waiting for a quorum of AcceptedSets
    DECRYPT = "decrypt"  # agreed: recompute the aggregate, then partially decrypt it
    RELEASED = "released"
    ABORTED = "aborted"


class TrainerPhase(str, enum.Enum):
    WAITING = "waiting"
    TRAINING = "training"
    CONTRIBUTED = "contributed"
    MISSED = "missed"  # training ended after the deadline: nothing sent
    FINAL = "final"
    ABORTED = "aborted"
