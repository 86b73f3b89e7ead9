"""Issue 11's settlement-head findings, each attack run against the real machines.

Finding 2: one party authored RoundResults for rounds that never happened (10^9 and
10^9+1) paying itself the reward pool, the others co-signed, the real round 0 was then
refused (`insufficient_pool`) and the party closed early unslashed, since the early-close
rule counted every settled round id. Now a party co-signs a record only if the
scheduled author wrote it, its id is in the agreed range, it equals the party's own
RoundFinal and its rewards equal the rule (protocol/head_rules.py).
"""

from __future__ import annotations

import pytest
import trio

from protocol import head as h
from protocol import head_rules as rules
from protocol.head_messages import HeadAckSn, HeadClose, HeadDeposit, HeadNewTx, HeadReqSn
from tests.test_head import A, B, C, ESCROW, KEYS, ROUND_REWARD, Bus, open_head, round_result

KEY = {k.ss58_address: k for k in KEYS}
FAKE_ROUNDS = (10**9, 10**9 + 1)


def signed(author: str, tx: h.Tx) -> tuple[bytes, bytes]:
    raw = h.encode_tx(tx)
    return raw, KEY[author].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))


def hand_made_request(bus: Bus, leader: str, txs: list[tuple[bytes, bytes]]) -> HeadReqSn:
    """The ReqSn a leader sends when it bypasses its own machine: valid ledger arithmetic."""
    confirmed = bus.machines[leader].confirmed
    ledger = confirmed.ledger
    for raw, _ in txs:
        ledger = h.apply_tx(ledger, h.decode_tx(raw), h.tx_id(raw))
    return HeadReqSn("head-1", confirmed.number + 1, [raw for raw, _ in txs],
                     [sig for _, sig in txs], "", ledger.hash())


def refusals(bus: Bus, party: str) -> list[str]:
    """Why `party` would not take or sign: messages it rejected, requests it refused (NackSn)."""
    return [reason for receiver, reason in bus.rejected if receiver == party] + [
        r.data["reason"] for r in bus.records[party] if r.kind == "refused"]


def test_finding2_fake_rounds_paying_their_author_are_not_cosigned():
    bus = open_head(agreed_rounds=2)
    # Snapshot 1 (led by A) settles a transfer, so the attacker B leads snapshot 2.
    bus.do(A, h.NewTx(h.Transfer(A, C, 1, 0), bus.now))
    bus.flush()
    assert bus.machines[A].confirmed.number == 1
    pool = bus.machines[A].confirmed.ledger.balances[h.POOL]
    fakes = [signed(B, h.RoundResult(B, r, f"fake-{r}", [B], {B: pool // 2})) for r in FAKE_ROUNDS]

    # 1. B gossips them as NewTx: A and C refuse them on arrival, with the rule that fails.
    for raw, sig in fakes:
        bus.inject(B, HeadNewTx("head-1", raw, sig))
    bus.flush()
    assert refusals(bus, A) == refusals(bus, C) == ["round_out_of_range"] * 2
    assert not bus.machines[A].pending and not bus.machines[C].pending

    # 2. B, leading snapshot 2, puts them in its request anyway: nobody co-signs it.
    bus.rejected.clear()
    bus.records = {p: [] for p in bus.records}
    bus.inject(B, hand_made_request(bus, B, fakes))
    bus.flush()
    assert refusals(bus, A) == refusals(bus, C) == ["round_out_of_range"]
    assert {m.confirmed.number for m in (bus.machines[A], bus.machines[C])} == {1}

    # 3. In range but not B's to author, or not by the rule: refused with those reasons.
    bus.rejected.clear()
    bus.records = {p: [] for p in bus.records}
    by_b = signed(B, h.RoundResult(B, 0, "adapter-0", [A, C], rules.round_rewards([A, C], ROUND_REWARD)))
    greedy = signed(A, h.RoundResult(A, 0, "adapter-0", [A, C], {A: ROUND_REWARD}))
    for raw, sig in (by_b, greedy):
        bus.inject(B, hand_made_request(bus, B, [(raw, sig)]))
        bus.flush()
    assert refusals(bus, A) == refusals(bus, C) == ["not_scheduled_author", "rewards_not_by_rule"]

    # 4. The real round 0 happens: every party's own RoundFinal, A authors, it is paid.
    bus.rejected.clear()
    bus.observe(0)
    bus.do(A, h.NewTx(round_result(0), bus.now))
    bus.flush()
    ledger = bus.machines[A].confirmed.ledger
    assert {m.confirmed.number for m in bus.machines.values()} == {2}
    assert (ledger.rounds_below, ledger.rounds_settled) == (1, 1)  # round 0 settled, once
    assert ledger.balances[h.POOL] == pool - ROUND_REWARD
    assert ledger.balances[B] == 1000 and bus.rejected == []

    # 5. B closes early (one of two agreed rounds settled): slashed by A and C.
    bus.inject(B, HeadClose("head-1", bus.machines[B].confirmed.encode(), bus.now, []))
    bus.flush()
    assert bus.machines[A].slashed() == bus.machines[C].slashed() == [B]
    bus.now += 60_000
    for party in (A, C):
        bus.do(party, h.Tick(bus.now))
        bus.do(party, h.Fanout(bus.now))
    assert bus.machines[A].payouts[B] == 1000  # its ledger balance, its escrow forfeited
    assert bus.machines[A].payouts == bus.machines[C].payouts
    bus.check_invariants()


def test_finding2_the_scheduled_author_cannot_invent_or_alter_a_round():
    """Rank 0 authors, but only what every co-signer saw: an unseen round waits, a round
    that differs from a co-signer's own RoundFinal is refused."""
    bus = open_head(agreed_rounds=1)
    bus.observe(0, parties=(A,))  # only A claims round 0 happened, with A and C paid
    bus.do(A, h.NewTx(round_result(0), bus.now))
    bus.flush()
    assert {m.confirmed.number for m in bus.machines.values()} == {0}
    assert "awaiting_own_view" in bus.kinds(B) and "refusal" in bus.kinds(A)
    assert bus.machines[B].waiting is not None
    # B's and C's own round 0 had only C as contributor: they refuse, and drop the record.
    bus.observe(0, contributors=(C,), parties=(B, C))
    assert bus.machines[B].waiting is None and not bus.machines[B].pending
    assert [r.data["reason"] for r in bus.records[B] if r.kind == "refused"] == [
        "round_not_observed", "round_mismatch"]  # each one signed: B is waiting, then refusing
    bus.now += 10_000  # past the signature timeout: A holds B's and C's refusals, votes for nobody
    bus.do(A, h.Tick(bus.now))
    assert bus.machines[A].slashed() == [] and not bus.machines[A].votes
    assert {m.confirmed.number for m in bus.machines.values()} == {0}
    with pytest.raises(h.HeadMisuse) as info:  # and a round beyond the agreed range never starts
        bus.do(A, h.ObserveRound(10**9, "fake", [A], bus.now))
    assert info.value.reason == "round_out_of_range"


def test_finding2_the_early_close_rule_counts_only_agreed_rounds():
    assert rules.settled_agreed_rounds((0, 10**9, 10**9 + 1), round_limit=2) == 1
    assert rules.settled_agreed_rounds((0, 1), round_limit=2) == 2


# --- the same attack against the real settlement services --------------------------------


@pytest.mark.parametrize("fake", FAKE_ROUNDS[:1])
def test_finding2_settlement_services_refuse_a_fake_round_and_pay_the_real_one(tmp_path, fake, monkeypatch):
    from tests import test_settlement_service as svc
    monkeypatch.setattr(svc.st, "RESEND_MS", 300)
    monkeypatch.setattr(svc.st, "STEP_S", 0.05)

    async def main():
        router = svc.Router()
        async with trio.open_nursery() as nursery:
            await svc._open_mesh(nursery, router, tmp_path, rounds=1)
            head_id = router.services[B].head.machine.parameters.head_id
            tx = h.RoundResult(B, fake, "fake", [B], {B: 3 * svc.st.POOL_SHARE})
            raw = h.encode_tx(tx)
            sig = KEY[B].sign(h.tx_signing_payload(head_id, h.tx_id(raw)))
            await router.contexts[B].publish(HeadNewTx(head_id, raw, sig))
            await router.until(lambda: all(router.services[k].rejected for k in (A, C)))
            for hotkey in (A, B, C):
                router.services[hotkey].record_round(svc._round(0))
            await router.until(lambda: all(router.phase(k) is h.Phase.FINAL for k in (A, B, C)))
            nursery.cancel_scope.cancel()
        return router

    router = trio.run(main)
    for hotkey in (A, C):
        assert router.services[hotkey].rejected == {"round_out_of_range": 1}
    doc = router.section(A)
    assert doc["rounds"] == [0] and doc["slashed"] == [] and doc["conserved"]
    assert doc["balances"][svc.T1] == doc["balances"][svc.T2] == svc.st.ROUND_REWARD // 2
    assert doc["balances"][B] == svc.st.OPENING_BALANCE + svc.st.ESCROW


# --- finding 6: a snapshot leader times a deposit so an honest party is slashed ------------
#
# Before the fix a deposit was includable until a clock deadline the depositor chose, each
# party judged it by its own clock, and whoever had not acked by the timeout was voted
# against: C, leading snapshot 3, sent its request to land 3 ms before the deadline at A
# and 3 ms after it at B; A signed, B refused (deposit_not_includable), A and C voted
# against B, and B was slashed. Now the window is counted in snapshot numbers (the same
# at every party), and a party that refuses says so, signed, which blocks the vote.

OLD_DEPOSIT_PERIOD_MS = 30_000  # where the deposit's clock deadline used to be
SIGN_TIMEOUT_MS = 10_000


def _head_at_snapshot_2_with_a_deposit_by_c(hold_deposit_from: tuple[str, ...] = ()):
    """Snapshots 1 and 2 (led by A and B) confirmed; C, who leads snapshot 3, deposits and
    holds back the request its machine made at once, to send it at a moment of its choice."""
    bus = open_head()
    for author, to in ((A, C), (B, C)):
        bus.do(author, h.NewTx(h.Transfer(author, to, 1, 0), bus.now))
        bus.flush()
    assert {m.confirmed.number for m in bus.machines.values()} == {2}
    deposited_at = bus.now
    bus.do(C, h.Deposit(200, nonce=1, now_ms=deposited_at))
    request = next(m for _, _, m in bus.in_flight if isinstance(m, HeadReqSn))
    c_ack = next(m for _, _, m in bus.in_flight if isinstance(m, HeadAckSn))
    held = [x for x in bus.in_flight if x[1] in hold_deposit_from and isinstance(x[2], HeadDeposit)]
    bus.in_flight = [x for x in bus.in_flight
                     if not isinstance(x[2], (HeadReqSn, HeadAckSn)) and x not in held]
    bus.flush()  # the Deposit reaches the others
    assert request.deposit_id and bus.machines[C].deposits[request.deposit_id].last_snapshot == 4
    return bus, request, c_ack, held, deposited_at + OLD_DEPOSIT_PERIOD_MS


def _deliver(bus: Bus, sender: str, message, receiver: str, at_ms: int) -> None:
    bus.now = at_ms
    bus.do(receiver, h.Receive(sender, message, at_ms))


def test_finding6_a_request_timed_at_the_deposit_deadline_slashes_no_one():
    bus, request, c_ack, _, deadline = _head_at_snapshot_2_with_a_deposit_by_c()
    _deliver(bus, C, request, A, deadline - 3)
    _deliver(bus, C, request, B, deadline + 3)  # 6 ms later: the same snapshot numbers decide
    bus.inject(C, c_ack)
    bus.flush()
    assert {m.confirmed.number for m in bus.machines.values()} == {3}  # both signed it
    assert all(m.confirmed.ledger.deposits == (request.deposit_id,) for m in bus.machines.values())
    assert not any(r.kind == "refused" for records in bus.records.values() for r in records)
    bus.now = deadline + 3 + SIGN_TIMEOUT_MS
    for party in (A, B, C):
        bus.do(party, h.Tick(bus.now))
    assert all(m.slashed() == [] and not m.votes for m in bus.machines.values())
    bus.check_invariants()


def test_finding6_a_signed_refusal_blocks_the_withheld_vote():
    """B has not seen the deposit when the request comes: it refuses, signed, and is not
    voted against; once the Deposit reaches it, it signs and the snapshot is confirmed."""
    bus, request, c_ack, held, deadline = _head_at_snapshot_2_with_a_deposit_by_c(hold_deposit_from=(B,))
    _deliver(bus, C, request, A, deadline - 3)
    _deliver(bus, C, request, B, deadline + 3)
    assert [(r.data["number"], r.data["reason"]) for r in bus.records[B] if r.kind == "refused"] == [
        (3, "deposit_not_seen")]
    bus.inject(C, c_ack)
    bus.flush(keep=lambda s, r, m: isinstance(m, HeadAckSn) and r == C)  # C never hears A's ack
    assert bus.machines[A].refused(B, 3)  # A holds B's signed refusal
    bus.now = deadline + 3 + SIGN_TIMEOUT_MS
    bus.do(A, h.Tick(bus.now))
    bus.do(C, h.Tick(bus.now))  # C never heard A's ack: it votes against A, alone, not against B
    bus.flush(keep=lambda s, r, m: isinstance(m, HeadAckSn) and r == C)
    assert B not in bus.machines[A].votes and B not in bus.machines[C].votes
    assert bus.machines[A].slashed() == [] and list(bus.machines[A].votes) == [A]
    assert bus.machines[B].slashed() == []
    bus.in_flight += held  # the Deposit reaches B at last: it signs what it waited for
    bus.flush()
    assert {m.confirmed.number for m in bus.machines.values()} == {3}
    bus.check_invariants()


def test_finding6_an_equivocating_leader_gets_no_honest_party_slashed():
    """C sends two different requests for snapshot 3, one reaching A first, the other B:
    each signs the one it got, refuses the other (signed), and neither is voted against.
    (TLC found that without the refusal the leader and one honest party outvote the other.)"""
    bus, request, c_ack, _, deadline = _head_at_snapshot_2_with_a_deposit_by_c()
    raw, sig = signed(C, h.Transfer(C, A, 5, 7))
    ledger = h.apply_tx(bus.machines[C].confirmed.ledger, h.decode_tx(raw), h.tx_id(raw))
    other = HeadReqSn("head-1", 3, [raw], [sig], "", ledger.hash())
    _deliver(bus, C, request, A, deadline)
    _deliver(bus, C, other, B, deadline)
    _deliver(bus, C, other, A, deadline)  # gossip brings each to everyone
    _deliver(bus, C, request, B, deadline)
    for party in (A, B):
        assert [r.data["reason"] for r in bus.records[party] if r.kind == "refused"] == ["conflicting_snapshot"]
    bus.inject(C, c_ack)
    bus.flush()
    bus.now = deadline + SIGN_TIMEOUT_MS
    for party in (A, B):
        bus.do(party, h.Tick(bus.now))
    bus.flush()
    assert bus.machines[A].slashed() == bus.machines[B].slashed() == []
    assert not bus.machines[A].votes.get(B) and not bus.machines[B].votes.get(A)
