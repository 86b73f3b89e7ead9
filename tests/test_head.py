"""The settlement head machine, driven event by event with no network (h11 test style).

Three validators with real sr25519 hotkeys; a tiny in-memory bus carries each Send to
the other parties, and tests drop or hold messages to make faults happen.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from crypto.identity import Hotkey
from protocol import head as h
from protocol import head_rules as rules
from protocol import messages as wire
from protocol.errors import RemoteProtocolError
from protocol.head_messages import (HeadAckSn, HeadClose, HeadContest, HeadDeposit, HeadNewTx,
                                    HeadReqSn)

T0 = 1_700_000_000_000
KEYS = sorted((Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie")),
              key=lambda k: k.ss58_address)
A, B, C = (k.ss58_address for k in KEYS)  # sorted: A leads snapshot 1, B 2, C 3
ESCROW = 90
ROUND_REWARD, EPOCH_REWARD = 40, 20


def parameters(agreed_rounds: int = 0, **overrides) -> h.HeadParameters:
    return dataclasses.replace(h.HeadParameters(
        "head-1", (A, B, C), contestation_period_ms=60_000, deposit_period_snapshots=2,
        sign_timeout_ms=10_000, agreed_rounds=agreed_rounds, escrow=ESCROW, round_limit=10,
        epoch_limit=10, round_reward=ROUND_REWARD, epoch_reward=EPOCH_REWARD), **overrides)


class Bus:
    """Parties, their machines, and the messages in flight between them."""

    def __init__(self) -> None:
        self.machines = {k.ss58_address: h.HeadMachine(k) for k in KEYS}
        self.keys = {k.ss58_address: k for k in KEYS}
        self.in_flight: list[tuple[str, str, h.HeadMessage]] = []
        self.records: dict[str, list[h.Record]] = {p: [] for p in self.machines}
        self.rejected: list[tuple[str, str]] = []  # (receiver, reason)
        self.down: set[str] = set()
        self.now = T0

    def do(self, party: str, event: h.Event) -> list[h.Effect]:
        effects = self.machines[party].handle(event)
        self._route(party, effects)
        return effects

    def inject(self, sender: str, message: h.HeadMessage, to: tuple[str, ...] | None = None) -> None:
        # Every message is encoded and strictly decoded, as the mesh would.
        message = wire.decode(wire.encode(message), channel=wire.Channel.SETTLE)
        for party in to or self.machines:
            if party != sender:
                self.in_flight.append((sender, party, message))

    def _route(self, party: str, effects: list[h.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, h.Send):
                self.inject(party, effect.message)
            elif isinstance(effect, h.Record):
                self.records[party].append(effect)

    def flush(self, keep=lambda sender, receiver, message: False) -> None:
        """Deliver everything in flight (and what it causes), except what `keep` holds back."""
        held = []
        while self.in_flight:
            sender, receiver, message = self.in_flight.pop(0)
            if keep(sender, receiver, message):
                held.append((sender, receiver, message))
                continue
            if receiver in self.down:
                continue  # lost: gossip does not redeliver
            try:
                self.do(receiver, h.Receive(sender, message, self.now))
            except RemoteProtocolError as exc:
                self.rejected.append((receiver, exc.reason))
        self.in_flight = held

    def observe(self, number: int, contributors: tuple[str, ...] = (A, C),
                parties: tuple[str, ...] = (A, B, C)) -> None:
        """Each party's own rounds service finished round `number` (its RoundFinal)."""
        for party in parties:
            self.do(party, h.ObserveRound(number, f"adapter-{number}", list(contributors), self.now))

    def observe_epoch(self, epoch: int, scores: dict[str, float]) -> None:
        for party in self.machines:
            self.do(party, h.ObserveEpoch(epoch, scores, self.now))

    def kinds(self, party: str) -> list[str]:
        return [r.kind for r in self.records[party]]

    def check_invariants(self) -> None:
        for party, machine in self.machines.items():
            assert h.violated_invariants(machine) == [], party


def open_head(agreed_rounds: int = 0, **overrides) -> Bus:
    bus = Bus()
    bus.do(A, h.Init(parameters(agreed_rounds, **overrides), bus.now))
    bus.flush()
    for party in (A, B, C):
        bus.do(party, h.Commit(ESCROW, 1000, 500, bus.now))
    bus.flush()
    assert {m.phase for m in bus.machines.values()} == {h.Phase.OPEN}
    return bus


def round_result(number: int, author: str = A, rewards: dict[str, int] | None = None) -> h.RoundResult:
    """Round `number` as rank 0 (A) authors it: contributors A and C, rewards by the rule."""
    rule = rules.round_rewards([A, C], ROUND_REWARD)
    return h.RoundResult(author, number, f"adapter-{number}", [A, C], rule if rewards is None else rewards)


def confirmed_numbers(bus: Bus) -> set[int]:
    return {m.confirmed.number for m in bus.machines.values()}


# --- lifecycle -------------------------------------------------------------------------


def test_full_lifecycle_settles_rounds_scores_and_transfers():
    bus = open_head(agreed_rounds=1)
    bus.observe(1)
    bus.observe_epoch(4, {"miner-7": 0.75})
    bus.do(A, h.NewTx(round_result(1), bus.now))
    bus.flush()
    bus.do(A, h.NewTx(h.ScoreReport(A, 4, {"miner-7": 0.75}, {"miner-7": 20}), bus.now))
    bus.flush()
    bus.do(A, h.NewTx(h.Transfer(A, B, 250, nonce=0), bus.now))
    bus.flush()
    assert confirmed_numbers(bus) == {3}
    ledger = bus.machines[A].confirmed.ledger
    assert ledger.balances == {A: 770, B: 1250, C: 1020, "miner-7": 20, h.POOL: 1500 - 60}
    assert ledger.rounds == (1,) and ledger.epochs == (4,)
    assert "round_result" in bus.kinds(B) and "score_report" in bus.kinds(C)

    bus.do(C, h.Close(bus.now))
    bus.flush()
    assert {m.phase for m in bus.machines.values()} == {h.Phase.CLOSED}
    with pytest.raises(h.HeadMisuse, match="deadline"):
        bus.do(A, h.Fanout(bus.now + 59_999))
    bus.now += 60_000
    for party in (A, B, C):
        bus.do(party, h.Tick(bus.now))
        assert bus.machines[party].phase == h.Phase.FANOUT_POSSIBLE
        bus.do(party, h.Fanout(bus.now))
    payouts = {p: m.payouts for p, m in bus.machines.items()}
    assert payouts[A] == payouts[B] == payouts[C]
    assert payouts[A][A] == 770 + ESCROW and payouts[A]["miner-7"] == 20
    assert sum(payouts[A].values()) == 3 * (1000 + 500 + ESCROW)
    assert bus.rejected == []
    bus.check_invariants()


def test_every_state_survives_its_wire_form():
    bus = open_head()
    bus.observe(1)
    bus.do(A, h.NewTx(round_result(1), bus.now))
    for _ in range(6):  # deliver one message at a time and round-trip every machine
        if not bus.in_flight:
            break
        bus.flush(keep=lambda s, r, m, n=[0]: n.__setitem__(0, n[0] + 1) or n[0] > 1)
        for party, machine in list(bus.machines.items()):
            copy = h.HeadMachine.from_wire(machine.to_wire(), bus.keys[party])
            assert copy.state_hash() == machine.state_hash()
            assert copy.pending_ledger == machine.pending_ledger


def test_abort_returns_every_commit():
    bus = Bus()
    bus.do(A, h.Init(parameters(), bus.now))
    bus.flush()
    bus.do(B, h.Commit(ESCROW, 10, 5, bus.now))
    bus.flush()
    with pytest.raises(h.HeadMisuse, match="committed"):
        bus.do(B, h.Abort(bus.now))
    bus.do(C, h.Abort(bus.now))
    bus.flush()
    assert {m.phase for m in bus.machines.values()} == {h.Phase.FINAL}
    assert bus.machines[A].payouts == {B: ESCROW + 15}
    bus.check_invariants()


def test_local_misuse_raises_with_a_reason():
    bus = open_head(agreed_rounds=2)
    cases = [
        (A, h.NewTx(h.Transfer(B, A, 1, 0), bus.now), "not_author"),
        (A, h.NewTx(h.Transfer(A, B, 5000, 0), bus.now), "insufficient_funds"),
        (A, h.Close(bus.now), "early_close"),
        (A, h.Commit(ESCROW, 1, 1, bus.now), "wrong_phase"),
        (A, h.Recover("00" * 32, bus.now), "unknown_deposit"),
    ]
    for party, event, reason in cases:
        with pytest.raises(h.HeadMisuse) as info:
            bus.do(party, event)
        assert info.value.reason == reason
    fresh = h.HeadMachine(KEYS[0])
    with pytest.raises(h.HeadMisuse) as info:
        fresh.handle(h.Init(h.HeadParameters("x", (C, A), 1, 1, 1, 0, 0), T0))
    with pytest.raises(h.HeadMisuse) as info:  # rounds it agrees to that could never settle
        fresh.handle(h.Init(h.HeadParameters("x", (A, C), 1, 1, 1, 3, 0, round_limit=2), T0))
    assert info.value.reason == "bad_parameters"
    assert info.value.reason == "bad_parameters"


# --- transactions and the ledger -------------------------------------------------------


def test_tx_id_is_the_sha256_of_the_canonical_encoding():
    tx = h.Transfer(A, B, 5, nonce=1)
    raw = h.encode_tx(tx)
    assert h.tx_id(raw) == h.tx_id(h.encode_tx(h.Transfer(A, B, 5, nonce=1)))
    assert h.tx_id(raw) != h.tx_id(h.encode_tx(h.Transfer(A, B, 5, nonce=2)))
    assert h.decode_tx(raw) == tx
    fields = {"kind": "transfer", "nonce": 1, "amount": 5, "recipient": B, "author": A}
    reordered = msgpack.packb(fields, use_bin_type=True)  # same content, other key order
    with pytest.raises(RemoteProtocolError) as info:
        h.decode_tx(reordered)
    assert info.value.reason == "non_canonical_tx"


@pytest.mark.parametrize("raw, reason", [
    (b"\xc1", "malformed_tx"),
    (h.canonical({"kind": "mint", "author": "x"}), "malformed_tx"),
    (h.canonical({"kind": "transfer", "author": "x", "recipient": "y", "amount": -1, "nonce": 0}),
     "malformed_tx"),
    (h.canonical({"kind": "transfer", "author": "x", "recipient": h.POOL, "amount": 1, "nonce": 0}),
     "malformed_tx"),
    (h.canonical({"kind": "slash_vote", "author": "x", "target": "x", "grounds": "early_close",
                  "evidence": 0}), "malformed_tx"),
    (h.canonical({"kind": "slash_vote", "author": "x", "target": "y", "grounds": "dislike",
                  "evidence": 0}), "malformed_tx"),
])
def test_malformed_transactions_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(RemoteProtocolError) as info:
        h.decode_tx(raw)
    assert info.value.reason == reason


def test_ledger_rules_conserve_value_and_refuse_double_spends():
    ledger = h.Ledger({A: 10, h.POOL: 40})
    pay = h.RoundResult(B, 1, "ad", [C], {C: 30})
    after = h.apply_tx(ledger, pay, "t1")
    assert after.balances == {A: 10, h.POOL: 10, C: 30} and after.total == ledger.total
    vectors = [
        # a record's replay is refused by its round (its id is not kept), a transfer's by its id
        (h.apply_tx(after, h.Transfer(A, B, 1, 0), "t0"), h.Transfer(A, B, 1, 0), "t0", "duplicate_tx"),
        (after, pay, "t1", "round_already_recorded"),
        (after, pay, "t2", "round_already_recorded"),
        (after, h.RoundResult(B, 2, "ad", [C], {C: 11}), "t3", "insufficient_pool"),
        (after, h.Transfer(A, B, 11, 0), "t4", "insufficient_funds"),
        (after, h.SlashVote(A, B, "early_close", 0), "t5", "not_a_ledger_tx"),
    ]
    for start, tx, txid, reason in vectors:
        with pytest.raises(RemoteProtocolError) as info:
            h.apply_tx(start, tx, txid)
        assert info.value.reason == reason
    scored = h.apply_tx(after, h.ScoreReport(B, 3, {"m": 1.0}, {"m": 10}), "t6")
    with pytest.raises(RemoteProtocolError, match="epoch 3"):
        h.apply_tx(scored, h.ScoreReport(B, 3, {"m": 1.0}, {"m": 0 + 1}), "t7")


def test_a_tx_applied_twice_or_overspending_is_rejected_by_peers():
    bus = open_head()
    bus.do(A, h.NewTx(h.Transfer(A, B, 600, 0), bus.now))
    sent = [m for _, _, m in bus.in_flight if isinstance(m, HeadNewTx)][0]
    bus.flush()
    bus.inject(A, sent)  # the same signed tx again
    bus.flush()
    assert ("duplicate_tx" in {r for _, r in bus.rejected})
    with pytest.raises(h.HeadMisuse) as info:
        bus.do(A, h.NewTx(h.Transfer(A, C, 600, 1), bus.now))  # only 400 left
    assert info.value.reason == "insufficient_funds"
    assert {m.confirmed.ledger.balances[A] for m in bus.machines.values()} == {400}
    bus.check_invariants()


def test_a_tx_with_a_forged_signature_or_author_is_rejected():
    bus = open_head()
    raw = h.encode_tx(h.Transfer(B, A, 100, 0))
    forged = KEYS[0].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))  # A signs B's spend
    bus.inject(A, HeadNewTx("head-1", raw, forged))
    outsider = Hotkey.from_uri("//Eve").ss58_address
    raw2 = h.encode_tx(h.Transfer(outsider, A, 1, 0))
    bus.inject(A, HeadNewTx("head-1", raw2, b"\x00" * 64))
    bus.inject(A, HeadNewTx("head-2", raw, forged))
    bus.flush()
    assert sorted({r for _, r in bus.rejected}) == ["bad_tx_signature", "unknown_author", "wrong_head"]
    assert confirmed_numbers(bus) == {0}


# --- snapshots -------------------------------------------------------------------------


def test_forged_snapshot_signature_is_rejected_and_blocks_confirmation():
    bus = open_head()
    bus.do(B, h.NewTx(h.Transfer(B, C, 10, 0), bus.now))
    # Hold B's honest AckSn back and send one signed over another ledger instead.
    bus.flush(keep=lambda s, r, m: s == B and isinstance(m, HeadAckSn))
    bus.in_flight = []
    proposal = bus.machines[A].proposal
    forged_ledger = h.Ledger({**proposal.ledger.balances, B: 10_000})
    payload = h.snapshot_signing_payload("head-1", 1, proposal.tx_ids, "", forged_ledger.hash())
    bus.inject(B, HeadAckSn("head-1", 1, KEYS[1].sign(payload)))
    bus.flush()
    assert [(r, reason) for r, reason in bus.rejected] == [(A, "bad_snapshot_signature"),
                                                           (C, "bad_snapshot_signature")]
    assert bus.machines[A].confirmed.number == bus.machines[C].confirmed.number == 0
    assert bus.machines[B].confirmed.number == 1  # B holds all genuine acks, the others do not
    bus.check_invariants()


def test_a_request_that_is_not_the_leaders_or_lies_about_the_ledger_is_refused():
    bus = open_head()
    bus.do(A, h.NewTx(h.Transfer(A, C, 10, 0), bus.now))
    request = next(m for _, _, m in bus.in_flight if isinstance(m, HeadReqSn))
    bus.in_flight = []
    lying = dataclasses.replace(request, ledger_hash="ab" * 32)
    unsigned = dataclasses.replace(request, signatures=[b"\x00" * 64])
    overspent = h.Transfer(A, C, 5000, 1)
    raw = h.encode_tx(overspent)
    overspending = dataclasses.replace(request, txs=[raw], signatures=[
        KEYS[0].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))])
    bus.inject(C, request, to=(B,))  # C does not lead snapshot 1
    for bad in (lying, unsigned, overspending, dataclasses.replace(request, number=0)):
        bus.inject(A, bad, to=(B,))
    bus.flush()
    assert [reason for _, reason in bus.rejected] == ["not_leader", "stale_snapshot"]
    # A request from the leader that B cannot sign gets B's signed refusal (NackSn), reason and all.
    assert [r.data["reason"] for r in bus.records[B] if r.kind == "refused"] == [
        "ledger_hash_mismatch", "invalid_snapshot_tx", "invalid_snapshot_tx"]
    assert [r.data["party"] for r in bus.records[A] if r.kind == "refusal"] == [B]  # the newest per party
    assert bus.machines[B].proposal is None
    bus.inject(A, request, to=(B,))  # the genuine one is still signed
    bus.flush()
    assert bus.machines[B].proposal is not None


def test_conflicting_txs_seen_in_different_orders_do_not_stall_the_snapshot():
    bus = open_head()
    spend_1, spend_2 = h.Transfer(C, A, 700, 0), h.Transfer(C, B, 700, 1)
    signed = []
    for tx in (spend_1, spend_2):
        raw = h.encode_tx(tx)
        signed.append(HeadNewTx("head-1", raw, KEYS[2].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))))
    bus.inject(C, signed[1], to=(B,))  # B sees the second spend first, the leader A the first
    bus.inject(C, signed[0], to=(A, B))
    bus.inject(C, signed[1], to=(A,))
    bus.flush()
    assert sorted(bus.rejected) == sorted([(A, "insufficient_funds"), (B, "insufficient_funds")])
    assert confirmed_numbers(bus) == {1}
    assert {m.confirmed.ledger.balances[C] for m in bus.machines.values()} == {300}
    assert {m.confirmed.ledger.balances[A] for m in bus.machines.values()} == {1700}
    assert all(not m.pending for m in bus.machines.values())
    bus.check_invariants()


def test_acks_and_requests_arriving_out_of_order_still_confirm():
    bus = open_head()
    bus.do(A, h.NewTx(h.Transfer(A, C, 10, 0), bus.now))
    # Deliver B's and A's acks to C before the NewTx and the ReqSn reach it.
    first = lambda s, r, m: r == C and not isinstance(m, HeadAckSn)  # noqa: E731
    bus.flush(keep=first)
    bus.flush()
    assert confirmed_numbers(bus) == {1}
    assert bus.rejected == []


def test_snapshot_leadership_rotates_round_robin():
    bus = open_head()
    leaders = []
    for i, author in enumerate((A, B, C, A)):
        bus.do(author, h.NewTx(h.Transfer(author, C if author != C else A, 1, i), bus.now))
        leaders += [s for s, _, m in bus.in_flight if isinstance(m, HeadReqSn)][:1]
        bus.flush()
    assert leaders == [A, B, C, A]
    assert confirmed_numbers(bus) == {4}


# --- faults: early close, withheld signatures, restarts --------------------------------


def test_early_close_on_an_old_snapshot_is_contested_and_slashed():
    bus = open_head(agreed_rounds=2)
    bus.observe(1)
    bus.do(A, h.NewTx(round_result(1), bus.now))
    bus.flush()
    assert confirmed_numbers(bus) == {1}
    # A is byzantine: it closes at once, on the opening snapshot, with one round of two settled.
    snapshot0 = h.Snapshot(0, (), "", h.Ledger({A: 1000, B: 1000, C: 1000, h.POOL: 1500}), {})
    bus.inject(A, HeadClose("head-1", snapshot0.encode(), bus.now, []))
    bus.flush()
    # A's own machine never closed, so only A refuses the others' contests and votes.
    assert {receiver for receiver, _ in bus.rejected} <= {A}
    for party in (B, C):
        machine = bus.machines[party]
        assert machine.phase == h.Phase.CLOSED
        assert machine.closing.snapshot.number == 1  # contested up to the newest confirmed
        assert machine.slashed() == [A]
        assert {"contested", "slashed"} <= set(bus.kinds(party))
    bus.now += 60_000
    for party in (B, C):
        bus.do(party, h.Fanout(bus.now))
    payouts = bus.machines[B].payouts
    assert payouts == bus.machines[C].payouts
    assert payouts[A] == 1020  # its balance, with its round reward, without its escrow
    assert payouts[B] == 1000 + ESCROW + ESCROW // 2 and payouts[C] == 1020 + ESCROW + ESCROW // 2
    assert sum(payouts.values()) == 3 * (1500 + ESCROW)
    bus.check_invariants()


def test_close_with_a_forged_snapshot_is_rejected():
    bus = open_head()
    bus.do(B, h.NewTx(h.Transfer(B, A, 10, 0), bus.now))
    bus.flush()
    good = bus.machines[A].confirmed
    richer = h.Ledger({**good.ledger.balances, A: 5000})
    forged = h.Snapshot(1, good.tx_ids, "", richer, dict(good.signatures))
    partial = h.Snapshot(1, good.tx_ids, "", good.ledger, {A: good.signatures[A]})
    bus.inject(A, HeadClose("head-1", forged.encode(), bus.now, []), to=(B,))
    bus.inject(A, HeadClose("head-1", partial.encode(), bus.now, []), to=(B,))
    bus.inject(A, HeadClose("head-1", good.encode(), bus.now - 3_600_000, []), to=(B,))
    bus.inject(A, HeadClose("head-1", b"\x93\x01", bus.now, []), to=(B,))
    bus.flush()
    assert [r for _, r in bus.rejected] == ["bad_snapshot_signature", "not_fully_signed",
                                           "stale_close", "malformed_snapshot"]
    assert bus.machines[B].phase == h.Phase.OPEN


def test_contests_must_be_newer_and_in_time():
    bus = open_head()
    bus.do(A, h.NewTx(h.Transfer(A, B, 10, 0), bus.now))
    bus.flush()
    s1 = bus.machines[A].confirmed
    bus.do(B, h.Close(bus.now))
    bus.flush()
    s0 = h.Snapshot(0, (), "", h.Ledger({A: 1000, B: 1000, C: 1000, h.POOL: 1500}), {})
    bus.inject(C, HeadContest("head-1", s1.encode()), to=(A,))  # the same snapshot: no-op
    bus.inject(C, HeadContest("head-1", s0.encode()), to=(A,))
    bus.flush()
    bus.now += 60_000
    bus.inject(C, HeadContest("head-1", s1.encode()), to=(B,))
    bus.inject(C, HeadClose("head-1", s1.encode(), bus.now, []), to=(B,))  # nor a late close (TLC)
    bus.flush()
    assert [r for _, r in bus.rejected] == ["contest_not_newer", "contest_after_deadline",
                                           "close_after_deadline"]


def test_withheld_signature_times_out_into_a_slash_and_excuses_an_early_close():
    bus = open_head(agreed_rounds=5)
    bus.do(A, h.NewTx(h.Transfer(A, B, 10, 0), bus.now))
    bus.flush(keep=lambda s, r, m: s == C and isinstance(m, HeadAckSn))  # C's ack never leaves
    bus.in_flight = []
    assert [m.confirmed.number for m in bus.machines.values()] == [0, 0, 1]
    bus.now += 10_000
    for party in (A, B):
        bus.do(party, h.Tick(bus.now))
    bus.flush()
    for party in (A, B, C):
        assert bus.machines[party].slashed() == [C]
    bus.do(A, h.Close(bus.now))  # before the agreed rounds, but excused by the votes on C
    bus.flush()
    assert bus.machines[B].slashed() == [C]
    assert "slash_vote" not in [r.kind for r in bus.records[B][-3:]]
    assert A not in bus.machines[B].votes and A not in bus.machines[C].votes
    # C alone holds snapshot 1, fully signed: it contests with it, and that is what pays out.
    assert bus.machines[B].closing.snapshot.number == 1
    bus.now += 60_000
    bus.do(B, h.Fanout(bus.now))
    assert bus.machines[B].payouts[C] == 1000 and bus.machines[B].payouts[A] == 990 + ESCROW * 3 // 2
    bus.check_invariants()


def test_one_vote_short_of_a_majority_slashes_nobody():
    bus = open_head()
    vote = h.SlashVote(A, B, "withheld_signature", 1)
    raw = h.encode_tx(vote)
    signature = KEYS[0].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))
    for _ in range(2):  # the same voter twice still counts once
        bus.inject(A, HeadNewTx("head-1", raw, signature))
    bus.flush()
    assert bus.machines[C].slashed() == [] and len(bus.machines[C].votes[B]) == 1
    bus.check_invariants()


def test_a_party_that_restarts_mid_snapshot_catches_up_from_its_persisted_state():
    bus = open_head()
    bus.do(A, h.NewTx(h.Transfer(A, B, 10, 0), bus.now))
    # C receives the tx and the request, signs, and goes down before any other AckSn.
    bus.flush(keep=lambda s, r, m: r == C and isinstance(m, HeadAckSn))
    persisted = bus.machines[C].to_wire()
    assert bus.machines[C].proposal is not None and confirmed_numbers(bus) == {0, 1}
    bus.down.add(C)
    bus.flush()  # the acks for C are lost
    bus.machines[C] = h.HeadMachine.from_wire(persisted, KEYS[2])
    bus.down.clear()
    bus.now += 5_000
    bus.do(C, h.Restart(bus.now))
    bus.flush()
    assert confirmed_numbers(bus) == {1}
    assert bus.machines[C].confirmed == bus.machines[A].confirmed
    bus.now += 10_000
    for party in (A, B, C):
        bus.do(party, h.Tick(bus.now))
    bus.flush()
    assert all(not m.votes for m in bus.machines.values())  # nobody is blamed for the outage
    bus.do(C, h.NewTx(h.Transfer(C, A, 1, 0), bus.now))  # and the head goes on
    bus.flush()
    assert confirmed_numbers(bus) == {2}
    bus.check_invariants()


# --- deposits ---------------------------------------------------------------------------


def test_deposit_is_absorbed_by_the_next_snapshot():
    bus = open_head()
    bus.do(B, h.Deposit(200, nonce=1, now_ms=bus.now))
    bus.flush()
    assert confirmed_numbers(bus) == {1}
    ledger = bus.machines[C].confirmed.ledger
    assert ledger.balances[B] == 1200 and ledger.deposited == 200
    deposit_id = ledger.deposits[0]
    bus.now += 30_000
    with pytest.raises(h.HeadMisuse) as info:
        bus.do(B, h.Recover(deposit_id, bus.now))
    assert info.value.reason == "deposit_absorbed"
    bus.check_invariants()


def test_deposit_that_never_lands_is_recovered_after_its_window():
    bus = open_head(deposit_period_snapshots=1)
    bus.do(C, h.Deposit(200, nonce=1, now_ms=bus.now))  # snapshot 1 at the latest may absorb it
    # The leader of snapshot 1 (A) never hears of it, so snapshot 1 is confirmed without it.
    bus.flush(keep=lambda s, r, m: r == A and isinstance(m, HeadDeposit))
    bus.in_flight = []
    deposit_id = next(iter(bus.machines[C].deposits))
    with pytest.raises(h.HeadMisuse) as info:
        bus.do(C, h.Recover(deposit_id, bus.now))
    assert info.value.reason == "deposit_not_expired"
    bus.do(A, h.NewTx(h.Transfer(A, B, 10, 0), bus.now))
    bus.flush()
    assert confirmed_numbers(bus) == {1} and not bus.machines[C].confirmed.ledger.deposits
    bus.do(C, h.Recover(deposit_id, bus.now))
    bus.inject(A, HeadDeposit("head-1", deposit_id, 200, 1, 1), to=(B,))  # a forged copy
    bus.flush()
    assert bus.machines[B].deposits[deposit_id].status == "recovered"
    # A never heard of the deposit; the forged copy's id names C, not its sender A.
    assert bus.rejected == [(A, "unknown_deposit"), (B, "bad_deposit")]
    # A later snapshot may no longer absorb it.
    bus.inject(B, HeadReqSn("head-1", 2, [], [], deposit_id, "00" * 32), to=(C,))
    bus.flush()
    assert [r.data["reason"] for r in bus.records[C] if r.kind == "refused"] == ["deposit_not_includable"]
    bus.check_invariants()


# --- messages from outside the head ------------------------------------------------------


def test_messages_from_non_parties_or_before_init_are_rejected():
    bus = Bus()
    eve = Hotkey.from_uri("//Eve").ss58_address
    bus.inject(A, HeadAckSn("head-1", 1, b"\x00" * 64), to=(B,))
    bus.flush()
    assert bus.rejected == [(B, "wrong_phase")]
    bus.do(A, h.Init(parameters(), bus.now))
    bus.flush()
    bus.in_flight.append((eve, B, HeadAckSn("head-1", 1, b"\x00" * 64)))
    bus.flush()
    assert bus.rejected[-1] == (B, "not_a_party")
