"""Every state of specs/Membership.tla's model, explored breadth-first on the real code
(protocol/admission.py, protocol/member_book.py, the head's Ledger and apply_tx, and
the gossip pipeline for Speak), with the spec's invariants checked by name in each.

Bounds like specs/Membership.cfg: the founding set (the head's three validators), one
stranger, stakes below and above the minimum, a cap of one member beyond the founders,
a cool-down of 1 settled round, at most 2 settled rounds and 2 admissions, and two
validators' round views that differ in round 1 (so no slash there). The Python state is
the ledger itself (its hash) plus the requests published, so it is coarser than the
spec's (no ghosts, fixed views): 196 distinct states, 396 transitions, depth 10, 0.1 s
(240 and 480 before slashes needed evidence).
Requests are signed once each (sr25519 signatures are randomized): a replay is Admit of
a request already published, as in the spec."""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from crypto.identity import Hotkey
from protocol import head as h
from protocol import member_book as mb
from protocol.admission import AdmissionPolicy, JoinRequest, LeaveRequest, leave_penalty
from protocol.epistula import EnvelopeVerifier, seal
from protocol.errors import RemoteProtocolError
from protocol.inbound import open_gossip, seal_message
from protocol.membership import Member, Role
from protocol.messages import Channel, Ping, encode
from protocol.offences import OffenceViews
from tests.test_head import A, B, C, T0

MESH = "m1"
STRANGER = Hotkey.from_uri("//Dave")
D = STRANGER.ss58_address
FOUNDING = tuple(Member(p, frozenset({Role.VALIDATOR})) for p in (A, B, C))
STAKES = (1, 2)
POLICY = AdmissionPolicy(min_stake={"trainer": 2, "validator": 2, "miner": 2}, max_members=4,
                         slash_cooldown_rounds=1, min_rounds_before_leave=1, early_leave_penalty_pct=50)
MAX_ROUNDS, MAX_JOINS = 2, 1
# Two validators' round views (NameOffender in the spec): A's rounds named the stranger in
# every round, B's not in round 1. A slash needs both: it is enabled in rounds 0 and 2
# while the stranger is a member, refused in round 1 and on any other grounds.
RULES = mb.MembershipRules(MESH, frozenset(m.hotkey for m in FOUNDING), POLICY, offences=OffenceViews(
    {r: {D: "invalid_contribution"} for r in range(MAX_ROUNDS + 1)}))
RULES_B = dataclasses.replace(RULES, offences=OffenceViews(
    {r: ({} if r == 1 else {D: "invalid_contribution"}) for r in range(MAX_ROUNDS + 1)}))
PEER = "12D3KooWDaveDaveDaveDaveDaveDaveDaveDaveDave"
_signed: dict[tuple, bytes] = {}


def signed(kind: str, stake: int, joins_before: int) -> bytes:
    key = (kind, stake, joins_before)
    if key not in _signed:
        message = (JoinRequest(MESH, PEER, [], ["trainer"], stake, joins_before, T0) if kind == "join"
                   else LeaveRequest(MESH, joins_before, T0))
        _signed[key] = seal(STRANGER, encode(message), now_ms=T0,
                            uuid=f"00000000-0000-4000-8000-{abs(hash(key)) % 10**12:012d}").to_gossip_bytes()
    return _signed[key]


INITIAL = h.Ledger({A: 1000, B: 1000, C: 1000, h.POOL: 1500})


def apply(ledger: h.Ledger, tx) -> h.Ledger | None:
    """The ledger after a record every party co-signs, or None where a party refuses it."""
    if any(mb.record_problem(tx, ledger, rules) is not None for rules in (RULES, RULES_B)):
        return None
    try:
        return h.apply_tx(ledger, tx, "")
    except RemoteProtocolError:
        return None


def successors(state):
    ledger, requests = state
    book = ledger.book
    member = book.is_member(D, RULES.founding)
    joins = book.joins.get(D, 0)
    out = []
    if not member and joins <= MAX_JOINS:
        for stake in STAKES:
            out.append(("RequestJoin", (ledger, requests | {(stake, joins)})))
    for stake, joins_before in requests:
        after = apply(ledger, mb.Admit(A, signed("join", stake, joins_before)))
        if after is not None:
            out.append(("Admit", (after, requests)))
    if member:
        entry = book.members[D]
        penalty = leave_penalty(entry.stake, entry.admitted_at_round, ledger.rounds_settled, POLICY)
        after = apply(ledger, mb.Leave(A, signed("leave", 0, joins), penalty))
        assert after is not None, "a member's own leave is refused"
        out.append(("Leave", (after, requests)))
        assert apply(ledger, mb.MemberSlash(A, D, "sabotage", ledger.rounds_settled)) is None  # no evidence
        after = apply(ledger, mb.MemberSlash(A, D, "invalid_contribution", ledger.rounds_settled))
        assert (after is None) == (ledger.rounds_settled == 1), "a slash on B's round 1, which named nobody"
        if after is not None:
            out.append(("Slash", (after, requests)))
    if ledger.rounds_settled < MAX_ROUNDS:
        out.append(("SettleRound", (dataclasses.replace(ledger, rounds_settled=ledger.rounds_settled + 1), requests)))
    return out


def speak_changes_nothing_for_a_stranger(ledger: h.Ledger) -> bool:
    """Speak: the stranger's signed Ping through the gossip pipeline of a node whose
    directory is this ledger's: a member's passes; a stranger's is refused, uncharged."""
    directory = mb.LiveDirectory(FOUNDING)
    directory.apply(ledger.book)
    raw = seal_message(STRANGER, Ping(1, T0), now_ms=T0).to_gossip_bytes()
    try:
        open_gossip(raw, channel=Channel.MEMBERSHIP, verifier=EnvelopeVerifier(directory, A), now_ms=T0,
                    max_bytes=65536, from_peer=PEER, mesh_id=MESH)
    except RemoteProtocolError as exc:
        return exc.reason == "unknown_signer" and not ledger.book.is_member(D, RULES.founding)
    return ledger.book.is_member(D, RULES.founding)


INVARIANTS = {
    "NonMemberNoEffect": lambda s: speak_changes_nothing_for_a_stranger(s[0]),
    "EscrowConserved": lambda s: (s[0].escrowed + s[0].withdrawn.get(D, 0) + s[0].book.forfeited
                                  == s[0].book.staked)
    and s[0].total + s[0].escrowed + s[0].withdrawn_total == INITIAL.total + s[0].deposited,
    "DepositLocked": lambda s: all(e.stake >= 2 for e in s[0].book.members.values()),
    "CapRespected": lambda s: s[0].book.member_count(RULES.founding) <= POLICY.max_members,
    "CooldownRespected": lambda s: all(
        e.admitted_at_round - s[0].book.slashed[k] >= POLICY.slash_cooldown_rounds
        for k, e in s[0].book.members.items() if k in s[0].book.slashed),
    "NoReplayedAdmission": lambda s: s[0].book.joins.get(D, 0) <= len(s[1]),
    "SlashOnlyOnEvidence": lambda s: all(views.rounds[r].get(k) == "invalid_contribution"
                                         for k, r in s[0].book.slashed.items()
                                         for views in (RULES.offences, RULES_B.offences)),
}


def test_every_reachable_state_keeps_the_membership_invariants():
    started = time.monotonic()
    first = (INITIAL, frozenset())
    seen = {(first[0].hash(), first[1])}
    queue, depth, transitions, kinds = deque([(first, 0)]), 0, 0, set()
    while queue:
        state, d = queue.popleft()
        depth = max(depth, d)
        broken = [name for name, holds in INVARIANTS.items() if not holds(state)]
        assert not broken, (broken, state[0].to_wire(), state[1])
        for kind, nxt in successors(state):
            transitions += 1
            kinds.add(kind)
            key = (nxt[0].hash(), nxt[1])
            if key not in seen:
                seen.add(key)
                queue.append((nxt, d + 1))
    print(f"\nmembership explore: {len(seen)} distinct states, {transitions} transitions, depth {depth}, "
          f"{time.monotonic() - started:.1f} s")
    assert kinds == {"RequestJoin", "Admit", "Leave", "Slash", "SettleRound"}
    assert len(seen) > 20
