"""A head that keeps going (issue 12, item 5): continuous mode, a bounded ledger, Withdraw.

The machine is driven event by event on tests/test_head.py's in-memory bus (three real
sr25519 parties); the service test runs three real SettlementServices on the router of
tests/test_settlement_service.py and uses the operator's command path (`head withdraw`).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgpack
import pytest
import trio

from node import head_cli
from node.roles import settlement as st
from node.settings import NodeSettings
from protocol import head as h
from protocol import head_rules as rules
from protocol.errors import RemoteProtocolError
from protocol.head_messages import HeadNewTx
from protocol.membership import Member, Role
from tests.test_head import ESCROW, KEYS, ROUND_REWARD, A, B, C, Bus, parameters, round_result

OPENING, POOL = 1000, 5000  # each party's; 200 rounds of 40 fit in the 15000 pool


def open_continuous() -> Bus:
    """A head as a node with rounds = 0 opens it: nothing agreed, any round id."""
    bus = Bus()
    bus.do(A, h.Init(parameters(0, round_limit=rules.OPEN_ENDED, epoch_limit=rules.OPEN_ENDED), bus.now))
    bus.flush()
    for party in (A, B, C):
        bus.do(party, h.Commit(ESCROW, OPENING, POOL, bus.now))
    bus.flush()
    assert {m.phase for m in bus.machines.values()} == {h.Phase.OPEN}
    return bus


def settle(bus: Bus, number: int) -> None:
    bus.observe(number)
    bus.do(A, h.NewTx(round_result(number), bus.now))
    bus.flush()


def ledger(bus: Bus, party: str = A) -> h.Ledger:
    return bus.machines[party].confirmed.ledger


def reason_of(call) -> str:
    with pytest.raises((h.HeadMisuse, RemoteProtocolError)) as info:
        call()
    return info.value.reason


# --- continuous mode -------------------------------------------------------------------


def test_continuous_head_settles_any_round_id_and_is_never_due_to_close():
    bus = open_continuous()
    far = 10**12  # a mesh that ran a long time; the window starts over there
    settle(bus, far)
    assert ledger(bus).rounds_settled == 1 and ledger(bus).rounds_below == far - rules.RECORD_WINDOW + 1
    bus.check_invariants()
    # Nothing was agreed, so closing is never early and never required: the head stays open.
    assert {m.phase for m in bus.machines.values()} == {h.Phase.OPEN}
    bus.do(A, h.Close(bus.now))
    bus.flush()
    assert {m.phase for m in bus.machines.values()} == {h.Phase.CLOSED}
    assert not any(bus.machines[p].votes for p in (A, B, C))  # nobody voted against the closer


def _service(rounds: int, epochs: int = 0, trainers: bool = True) -> st.SettlementService:
    service = st.SettlementService(NodeSettings(role=Role.VALIDATOR, rounds=rounds, epochs=epochs))
    members = [Member(k.ss58_address, frozenset({Role.VALIDATOR}), 1.0) for k in KEYS]
    if trainers:
        members.append(Member("trainer-1", frozenset({Role.TRAINER}), 1.0))
    service.ctx = SimpleNamespace(genesis=SimpleNamespace(mesh_id="m", members=members))  # type: ignore[assignment]
    service.parties = sorted(k.ss58_address for k in KEYS)
    return service


def test_the_node_opens_a_continuous_head_for_rounds_0_and_the_fixed_one_as_before():
    continuous = _service(rounds=0)._parameters(1)
    assert (continuous.agreed_rounds, continuous.round_limit, continuous.epoch_limit) == (
        0, rules.OPEN_ENDED, rules.OPEN_ENDED)
    assert continuous.problems() == []
    assert _service(rounds=0).finished() is False  # never closes by itself: no machine needed
    fixed = _service(rounds=3, epochs=2)._parameters(1)
    assert (fixed.agreed_rounds, fixed.round_limit, fixed.epoch_limit) == (3, 3, 2)
    # A mesh without trainers can run no round: rounds = 0 stays the fixed count 0 there.
    assert not _service(rounds=0, trainers=False).continuous
    assert _service(rounds=0, trainers=False)._parameters(1).round_limit == 0


# --- the bounded ledger ----------------------------------------------------------------


def test_rounds_settle_out_of_order_inside_the_window_and_never_twice():
    bus = open_continuous()
    for number in (3, 1, 0, 2, 6):
        settle(bus, number)
    assert (ledger(bus).rounds_below, ledger(bus).rounds_recent, ledger(bus).rounds_settled) == (4, (6,), 5)
    assert ledger(bus).balances[h.POOL] == 3 * POOL - 5 * ROUND_REWARD
    bus.check_invariants()
    # A second result of a settled round, below the watermark or inside the window:
    assert reason_of(lambda: bus.do(A, h.NewTx(round_result(2), bus.now))) == "round_too_old"
    assert reason_of(lambda: bus.machines[A].handle(h.NewTx(round_result(6), bus.now))) == "round_already_recorded"


def test_a_replayed_old_round_result_is_refused_by_every_party():
    bus = open_continuous()
    settle(bus, 0)
    head_id = bus.machines[A].parameters.head_id
    raw = h.encode_tx(round_result(0))
    replay = HeadNewTx(head_id, raw, KEYS[0].sign(h.tx_signing_payload(head_id, h.tx_id(raw))))
    for number in range(1, rules.RECORD_WINDOW + 5):
        settle(bus, number)
    bus.rejected.clear()
    bus.inject(A, replay)  # the very bytes A once sent, signed by A
    bus.flush()
    assert sorted(bus.rejected) == [(B, "round_too_old"), (C, "round_too_old")]
    # A result far ahead moves the window: what it passes is skipped for good, and refused.
    settle(bus, 1000)
    bus.observe(900)
    assert ledger(bus).rounds_below == 1000 - rules.RECORD_WINDOW + 1
    assert reason_of(lambda: bus.do(A, h.NewTx(round_result(900), bus.now))) == "round_too_old"
    assert h.apply_tx(ledger(bus), round_result(990), "t").rounds_recent == (990, 1000)  # inside: fine
    bus.check_invariants()


def test_the_confirmed_snapshot_and_the_state_do_not_grow_with_the_history():
    bus = open_continuous()
    snapshot_size: dict[int, int] = {}
    state_size: dict[int, int] = {}
    for number in range(200):
        settle(bus, number)
        m = bus.machines[B]
        snapshot_size[number + 1] = len(m.confirmed.encode())
        state_size[number + 1] = len(h.canonical(m.to_wire()))
        assert len(m.observed_rounds) <= h.VIEWS_KEPT + 1
    assert ledger(bus, B).rounds_settled == 200 and ledger(bus, B).rounds_below == 200
    # The snapshot after round 200 is no larger than after round 20, but for the varints
    # of the counters (a few bytes) — it names no settled id.
    assert snapshot_size[200] <= snapshot_size[20] + 8, (snapshot_size[20], snapshot_size[200])
    # The state keeps at most VIEWS_KEPT own views: its size peaks, it does not climb.
    assert max(state_size[n] for n in range(140, 201)) <= max(state_size[n] for n in range(1, 140)) + 16
    bus.check_invariants()
    raw = h.encode_tx(round_result(5))
    assert reason_of(lambda: h.apply_tx(ledger(bus), round_result(5), h.tx_id(raw))) == "round_too_old"


# --- Withdraw while open ---------------------------------------------------------------


def withdraw(bus: Bus, party: str, amount: int) -> None:
    before = bus.machines[party].pending_ledger.withdrawn.get(party, 0)
    bus.do(party, h.NewTx(h.Withdraw(party, amount, before), bus.now))
    bus.flush()


def test_the_owner_withdraws_while_the_head_stays_open_and_value_is_conserved():
    bus = open_continuous()
    settle(bus, 0)
    earned = ledger(bus).balances[A]
    assert earned == OPENING + ROUND_REWARD // 2
    withdraw(bus, A, 300)
    for party in (A, B, C):
        l = ledger(bus, party)
        assert l.balances[A] == earned - 300 and l.withdrawn == {A: 300}
        assert l.total + l.withdrawn_total == bus.machines[party].committed_total
        (paid,) = [r for r in bus.records[party] if r.kind == "withdrawn"]
        assert paid.data["party"] == A and paid.data["amount"] == 300
        assert paid.data["snapshot"] == bus.machines[party].confirmed.number
    bus.check_invariants()
    settle(bus, 1)  # still open, still recording
    withdraw(bus, A, ledger(bus).balances[A])  # all of it
    assert ledger(bus).balances[A] == 0 and ledger(bus).withdrawn[A] == earned + ROUND_REWARD // 2
    bus.check_invariants()
    # Fanout pays the ledger; what was withdrawn was paid out already.
    bus.do(A, h.Close(bus.now))
    bus.flush()
    bus.now += 60_001
    for party in (A, B, C):
        bus.do(party, h.Tick(bus.now))
        bus.do(party, h.Fanout(bus.now))
    payouts = bus.machines[B].payouts
    assert A not in payouts or payouts[A] == ESCROW
    assert sum(payouts.values()) + ledger(bus, B).withdrawn_total == (
        bus.machines[B].committed_total + bus.machines[B].escrow_total)
    bus.check_invariants()


def test_a_withdraw_by_another_or_beyond_the_balance_or_replayed_is_refused_with_a_reason():
    bus = open_continuous()
    head_id = bus.machines[A].parameters.head_id
    # Another party's balance: our machine signs only our own transactions ...
    assert reason_of(lambda: bus.machines[B].handle(h.NewTx(h.Withdraw(A, 10, 0), bus.now))) == "not_author"
    # ... and one claiming A as author but signed by C is refused by every other party.
    raw = h.encode_tx(h.Withdraw(A, 10, 0))
    bus.inject(C, HeadNewTx(head_id, raw, KEYS[2].sign(h.tx_signing_payload(head_id, h.tx_id(raw)))))
    bus.flush()
    assert sorted(bus.rejected) == [(A, "bad_tx_signature"), (B, "bad_tx_signature")]
    # More than it holds:
    assert reason_of(lambda: bus.do(A, h.NewTx(h.Withdraw(A, OPENING + 1, 0), bus.now))) == "insufficient_funds"
    # Nothing, or a negative amount, is not a withdraw:
    assert reason_of(lambda: h.decode_tx(h.encode_tx(h.Withdraw(A, 0, 0)))) == "malformed_tx"
    # Once applied, the same signed withdraw never applies again:
    withdraw(bus, A, 100)
    signed = h.encode_tx(h.Withdraw(A, 100, 0))
    bus.rejected.clear()
    bus.inject(A, HeadNewTx(head_id, signed, KEYS[0].sign(h.tx_signing_payload(head_id, h.tx_id(signed)))))
    bus.flush()
    assert sorted(bus.rejected) == [(B, "stale_withdraw"), (C, "stale_withdraw")]
    assert ledger(bus).withdrawn == {A: 100} and ledger(bus).balances[A] == OPENING - 100
    bus.check_invariants()


def test_a_withdraw_survives_a_restart_pending_and_confirmed():
    bus = open_continuous()
    withdraw(bus, B, 50)
    # B's next one is sent while every message is held, then B restarts from its state.
    bus.do(B, h.NewTx(h.Withdraw(B, 70, 50), bus.now))
    state = msgpack.packb(bus.machines[B].to_wire(), use_bin_type=True)
    bus.machines[B] = h.HeadMachine.from_wire(msgpack.unpackb(state, raw=False), KEYS[1])
    assert bus.machines[B].confirmed.ledger.withdrawn == {B: 50}
    assert bus.machines[B].pending_ledger.withdrawn == {B: 120}
    bus.do(B, h.Restart(bus.now))
    bus.flush()
    for party in (A, B, C):
        assert ledger(bus, party).withdrawn == {B: 120}
        assert ledger(bus, party).balances[B] == OPENING - 120
    bus.check_invariants()
    again = h.HeadMachine.from_wire(bus.machines[B].to_wire(), KEYS[1])
    assert again.state_hash() == bus.machines[B].state_hash()


def test_the_cli_refuses_a_bad_amount_in_one_line():
    with pytest.raises(Exception, match="positive whole number"):
        head_cli._positive_amount("-3")
    with pytest.raises(Exception, match="positive whole number"):
        head_cli._positive_amount("lots")
    assert head_cli._positive_amount("25") == 25


# --- the service: open and recording until stopped; withdraw by command ------------------


def test_a_continuous_service_keeps_its_head_open_and_pays_a_withdraw_by_command(tmp_path, monkeypatch):
    from tests import test_settlement_service as svc
    monkeypatch.setattr(st, "RESEND_MS", 300)
    monkeypatch.setattr(st, "STEP_S", 0.05)

    async def main() -> dict:
        router = svc.Router()
        async with trio.open_nursery() as nursery:
            for key in svc.KEYS:
                await router.start(nursery, key, tmp_path, rounds=0)  # nothing else busy
            await router.until(lambda: all(router.phase(k) is h.Phase.OPEN for k in (svc.A, svc.B, svc.C)))
            for number in (0, 1):
                svc._record_everywhere(router, svc._round(number))
            await router.until(lambda: all(router.section(k)["rounds_settled"] == 2 for k in (svc.A, svc.B, svc.C)))
            await trio.sleep(1.0)  # every other role is done: a fixed-count head would close now
            assert all(router.phase(k) is h.Phase.OPEN for k in (svc.A, svc.B, svc.C))
            me = svc.B
            data_dir = router.contexts[me].data_dir.parent
            answer = await trio.to_thread.run_sync(lambda: head_cli.ask_node(
                data_dir, "withdraw", timeout_s=10, payload={"amount": 400}))
            assert answer["ok"], answer
            refused = await trio.to_thread.run_sync(lambda: head_cli.ask_node(
                data_dir, "withdraw", timeout_s=10, payload={"amount": 10**9}))
            assert not refused["ok"] and refused["reason"] == "insufficient_funds"
            await router.until(lambda: all(router.section(k)["withdrawn"] == {me: 400} for k in (svc.A, svc.B, svc.C)))
            doc = router.section(me)
            status = head_cli.read_head(head_cli.find_head(data_dir))
            nursery.cancel_scope.cancel()
        return {"doc": doc, "status": status, "me": me}

    out = trio.run(main)
    doc, status, me = out["doc"], out["status"], out["me"]
    assert doc["state"] == "Open" and doc["conserved"] and doc["continuous"]
    assert doc["rounds"] == [0, 1]
    assert doc["balances"][me] == st.OPENING_BALANCE - 400
    (paid,) = [r for r in status["records"] if r["kind"] == "withdrawn"]
    assert paid["party"] == me and paid["amount"] == 400 and paid["snapshot"] >= 1
    assert status["withdrawn"] == {me: 400} and status["invariants_violated"] == []
    assert "withdrawn by" in head_cli.format_status(status)
    assert json.dumps(status)  # what `head status --json` prints
