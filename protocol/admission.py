"""Joining and leaving a running mesh: the requests, and the admission rules (issue 15).

A node that is not a member signs a JoinRequest (its hotkey is the envelope's signer)
and publishes it on the membership channel; it is the one message accepted from a
stranger (protocol/inbound.py). The validators put the signed request, whole, into a
membership record of the settlement head (protocol/member_book.py), which every
validator checks against the rules below before it co-signs the snapshot. A member
leaves by a signed LeaveRequest the same way. The rules are plain functions of the
request, the confirmed membership and the policy (specs/Membership.tla names them).

Every refusal is a (reason, hint) pair: the reason is a /metrics label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from protocol.membership import ALL_ROLES, Role, SenderPolicy
from protocol.messages import Channel, Message, message_type

MAX_JOIN_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_PEER_ID_CHARS = 128

Refusal = tuple[str, str]  # (reason, hint)


@message_type
@dataclass(frozen=True)
class JoinRequest(Message):
    """A stranger asks to become a member with `roles`, offering `stake` into escrow.

    joins_before: how many times this hotkey was admitted before (0 the first time).
    It makes a request good for one admission only: a replayed request, even one
    replayed after its member left, names a count the membership has passed."""

    TYPE: ClassVar[str] = "join_request"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 4096
    PEER_BOUND: ClassVar[bool] = True  # peer_id must be its gossip publisher
    OPEN_TO_STRANGERS: ClassVar[bool] = True

    mesh_id: str
    peer_id: str
    addrs: list[str]
    roles: list[str]
    stake: int
    joins_before: int
    requested_ms: int


@message_type
@dataclass(frozen=True)
class LeaveRequest(Message):
    """A member asks to leave; it takes effect with the snapshot that confirms it (the
    next round opens without it) and its escrow, less any penalty, is released.

    joins_before: its admission count (the JoinRequest's joins_before + 1; 0 for a
    founding member): a leave is good for one membership only."""

    TYPE: ClassVar[str] = "leave_request"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 512

    mesh_id: str
    joins_before: int
    requested_ms: int


@message_type
@dataclass(frozen=True)
class MembershipUpdate(Message):
    """A validator's latest confirmed head snapshot, fully signed: how every node (not
    only the head's parties) learns the membership, and how one that was offline catches
    up. The receiver checks every party's signature itself (node/membership.py)."""

    TYPE: ClassVar[str] = "membership_update"
    CHANNEL: ClassVar[Channel] = Channel.MEMBERSHIP
    MAX_BYTES: ClassVar[int] = 512 * 1024
    POLICY: ClassVar[SenderPolicy] = SenderPolicy(roles=frozenset({Role.VALIDATOR}))

    head_id: str
    snapshot: bytes


@dataclass(frozen=True)
class AdmissionPolicy:
    """What the validators admit. Every validator must hold the same policy (it comes
    from the mesh's settings): one that differs refuses to co-sign, which stalls the
    admission but admits no one against the rule."""

    min_stake: dict[str, int] = field(default_factory=lambda: {
        Role.TRAINER.value: 10, Role.VALIDATOR.value: 100, Role.MINER.value: 10})
    max_members: int = 64  # founding members still in, plus admitted ones
    slash_cooldown_rounds: int = 10  # settled rounds before a slashed hotkey may join again
    min_rounds_before_leave: int = 2  # leaving sooner forfeits early_leave_penalty_pct
    early_leave_penalty_pct: int = 10


def request_shape_problem(request: JoinRequest) -> Refusal | None:
    """Bounds on a join request's fields, checked before anything else."""
    if not request.roles or len(set(request.roles)) != len(request.roles) or not set(request.roles) <= {
            r.value for r in ALL_ROLES}:
        return ("bad_roles", f"roles must be distinct, non-empty, of {sorted(r.value for r in ALL_ROLES)}")
    if not 0 < len(request.peer_id) <= MAX_PEER_ID_CHARS:
        return ("bad_peer_id", "a join request names its libp2p peer id")
    if len(request.addrs) > MAX_JOIN_ADDRS or any(not 0 < len(a) <= MAX_ADDR_CHARS for a in request.addrs):
        return ("bad_addrs", f"at most {MAX_JOIN_ADDRS} addresses of at most {MAX_ADDR_CHARS} characters")
    if request.stake <= 0 or request.joins_before < 0:
        return ("bad_stake", "the stake offered is a positive whole number")
    return None


def required_stake(roles: list[str], policy: AdmissionPolicy) -> int:
    """A member with several roles stakes the highest minimum among them."""
    return max(policy.min_stake.get(r, 0) for r in roles)


def admission_problem(hotkey: str, request: JoinRequest, *, mesh_id: str, is_member: bool,
                      joins_before: int, member_count: int, slashed_at_round: int | None,
                      rounds_settled: int, policy: AdmissionPolicy) -> Refusal | None:
    """Why `hotkey` may not be admitted by `request` now; None when it may.

    joins_before: the confirmed count of this hotkey's admissions; member_count: members
    now; slashed_at_round: the settled-round count when it was last slashed (None: never);
    rounds_settled: the head's settled-round count, the clock of the cool-down (every
    validator reads it from the same ledger, so none uses its own clock)."""
    shape = request_shape_problem(request)
    if shape:
        return shape
    if request.mesh_id != mesh_id:
        return ("wrong_mesh", f"the request is for mesh {request.mesh_id!r}, this is {mesh_id!r}")
    if is_member:
        return ("already_member", f"{hotkey} is a member already")
    if request.joins_before != joins_before:
        return ("stale_join", f"{hotkey} was admitted {joins_before} time(s), the request says "
                f"{request.joins_before}: it is a replay of an earlier join")
    need = required_stake(request.roles, policy)
    if request.stake < need:
        return ("stake_too_low", f"roles {sorted(request.roles)} need a stake of at least {need}, "
                f"{request.stake} offered")
    if member_count >= policy.max_members:
        return ("member_cap", f"the mesh has {member_count} members, its cap is {policy.max_members}")
    if slashed_at_round is not None and rounds_settled - slashed_at_round < policy.slash_cooldown_rounds:
        wait = policy.slash_cooldown_rounds - (rounds_settled - slashed_at_round)
        return ("slashed_cooldown", f"{hotkey} was slashed; it may join again after {wait} more settled rounds")
    return None


def leave_problem(hotkey: str, request: LeaveRequest, *, mesh_id: str, is_member: bool,
                  joins_before: int) -> Refusal | None:
    if request.mesh_id != mesh_id:
        return ("wrong_mesh", f"the request is for mesh {request.mesh_id!r}, this is {mesh_id!r}")
    if not is_member:
        return ("not_a_member", f"{hotkey} is not a member")
    if request.joins_before != joins_before:
        return ("stale_leave", f"{hotkey} was admitted {joins_before} time(s), the leave names "
                f"{request.joins_before}: it belongs to an earlier membership")
    return None


def leave_penalty(stake: int, admitted_at_round: int, rounds_settled: int, policy: AdmissionPolicy) -> int:
    """What a leaving member forfeits to the reward pool: a share of its stake if it
    leaves before min_rounds_before_leave rounds were settled since its admission (the
    seed design: no leaving at will mid-training), else nothing."""
    if rounds_settled - admitted_at_round >= policy.min_rounds_before_leave:
        return 0
    return stake * policy.early_leave_penalty_pct // 100


class JoinRateLimit:
    """Join requests are the one thing a stranger can make every node verify, so each
    publishing peer gets a token bucket: `burst` requests, then one per `every_ms`.
    Sans-IO: time is an argument. Memory is bounded by `max_peers` (oldest dropped)."""

    reason = "join_rate_limited"

    def __init__(self, *, burst: int = 3, every_ms: int = 10_000, max_peers: int = 4096) -> None:
        self.burst, self.every_ms, self.max_peers = burst, every_ms, max_peers
        self._buckets: dict[str, tuple[float, int]] = {}  # peer -> (tokens, at_ms)

    def allow(self, peer: str, now_ms: int) -> bool:
        tokens, at = self._buckets.pop(peer, (float(self.burst), now_ms))
        tokens = min(float(self.burst), tokens + max(0, now_ms - at) / self.every_ms)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now_ms)
        while len(self._buckets) > self.max_peers:
            del self._buckets[next(iter(self._buckets))]
        return allowed


__all__ = ["AdmissionPolicy", "JoinRateLimit", "JoinRequest", "LeaveRequest", "MembershipUpdate",
           "admission_problem", "leave_penalty", "leave_problem", "request_shape_problem",
           "required_stake"]
