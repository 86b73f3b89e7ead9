"""Joining and leaving a running mesh (issue 15), driven with no network: the admission
rules, the membership records in the head (three real validators on tests/test_head's
bus), the live directory, and the gossip pipeline's verdicts on strangers.

Each attack of the issue is performed: a bad signature, a replayed join, too little
stake, a slashed hotkey inside its cool-down, a flood of join requests from one peer;
each is refused with its reason and changes nothing."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from crypto.identity import Hotkey
from protocol import head as h
from protocol import member_book as mb
from protocol.admission import (AdmissionPolicy, JoinRateLimit, JoinRequest, LeaveRequest, MembershipUpdate,
                                admission_problem, leave_penalty)
from protocol.epistula import EnvelopeVerifier
from protocol.errors import RemoteProtocolError
from protocol.inbound import forwarder_is_at_fault, open_gossip, seal_message
from protocol.membership import Member, Role
from protocol.membership_sync import checked_update
from protocol.aggregation import NAMED_OUT_OF_RANGE, NAMED_SILENT
from protocol.offences import OffenceViews, named_offenders
from protocol.messages import Channel, Ping
from protocol.head_messages import HeadNewTx
from tests.test_head import A, B, C, KEYS, T0, open_head

KEY_A = KEYS[0]

MESH = "m1"
DAVE = Hotkey.from_uri("//Dave")
EVE = Hotkey.from_uri("//Eve")
FOUNDING = (Member(A, frozenset({Role.VALIDATOR})), Member(B, frozenset({Role.VALIDATOR})),
            Member(C, frozenset({Role.VALIDATOR})))
POLICY = AdmissionPolicy(min_stake={"trainer": 10, "validator": 100, "miner": 10}, max_members=5,
                         slash_cooldown_rounds=2, min_rounds_before_leave=2, early_leave_penalty_pct=10)
RULES = mb.MembershipRules(MESH, frozenset(m.hotkey for m in FOUNDING), POLICY)
PEER = "12D3KooWDaveDaveDaveDaveDaveDaveDaveDaveDave"


def join_bytes(key=DAVE, *, stake=50, joins_before=0, roles=("trainer",), at=T0, mesh=MESH) -> bytes:
    request = JoinRequest(mesh, PEER, ["/ip4/10.0.0.4/tcp/9000"], list(roles), stake, joins_before, at)
    return seal_message(key, request, now_ms=at).to_gossip_bytes()


def leave_bytes(key=DAVE, *, joins_before=1, at=T0) -> bytes:
    return seal_message(key, LeaveRequest(MESH, joins_before, at), now_ms=at).to_gossip_bytes()


def membership_head():
    bus = open_head()
    for m in bus.machines.values():
        m.membership = RULES
    return bus


def submit(bus, tx) -> None:
    bus.do(A, h.NewTx(tx, bus.now))
    bus.flush()


def ledger(bus) -> h.Ledger:
    ledgers = {m.confirmed.ledger.hash() for m in bus.machines.values()}
    assert len(ledgers) == 1, "the parties disagree"
    return bus.machines[A].confirmed.ledger


def admitted(bus, **join) -> h.Ledger:
    submit(bus, mb.Admit(A, join_bytes(**join)))
    bus.check_invariants()
    return ledger(bus)


# --- the rules, as plain functions -------------------------------------------------------


def rule(request: JoinRequest, **over):
    args = dict(mesh_id=MESH, is_member=False, joins_before=0, member_count=3, slashed_at_round=None,
                rounds_settled=0, policy=POLICY)
    args.update(over)
    return admission_problem(DAVE.ss58_address, request, **args)


def test_admission_rules_each_refusal_has_its_reason():
    ok = JoinRequest(MESH, PEER, [], ["trainer"], 10, 0, T0)
    assert rule(ok) is None
    assert rule(dataclasses.replace(ok, stake=9))[0] == "stake_too_low"
    assert rule(dataclasses.replace(ok, roles=["trainer", "validator"], stake=99))[0] == "stake_too_low"
    assert rule(ok, member_count=5)[0] == "member_cap"
    assert rule(ok, slashed_at_round=4, rounds_settled=5)[0] == "slashed_cooldown"
    assert rule(ok, slashed_at_round=4, rounds_settled=6) is None  # the cool-down is over
    assert rule(ok, joins_before=1)[0] == "stale_join"
    assert rule(ok, is_member=True)[0] == "already_member"
    assert rule(dataclasses.replace(ok, mesh_id="other"))[0] == "wrong_mesh"
    assert rule(dataclasses.replace(ok, roles=["king"]))[0] == "bad_roles"
    assert rule(dataclasses.replace(ok, addrs=["x"] * 9))[0] == "bad_addrs"


def test_leave_penalty_only_before_the_minimum_rounds():
    assert leave_penalty(50, admitted_at_round=3, rounds_settled=4, policy=POLICY) == 5
    assert leave_penalty(50, admitted_at_round=3, rounds_settled=5, policy=POLICY) == 0


def test_join_rate_limit_is_per_peer_and_refills():
    limit = JoinRateLimit(burst=3, every_ms=10_000)
    assert [limit.allow("p", T0) for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow("q", T0)  # another peer has its own bucket
    assert limit.allow("p", T0 + 10_000) and not limit.allow("p", T0 + 10_000)


# --- the records in the head ------------------------------------------------------------


def test_admit_locks_the_stake_in_escrow_and_every_party_cosigns():
    bus = membership_head()
    before = ledger(bus)
    after = admitted(bus)
    entry = after.book.members[DAVE.ss58_address]
    assert entry.roles == ("trainer",) and entry.stake == 50 and entry.peer_id == PEER
    assert after.escrowed == 50 and after.deposited == before.deposited + 50
    assert after.balances == before.balances  # escrow is outside the balances
    assert "member_admitted" in bus.kinds(B)
    directory = mb.LiveDirectory(FOUNDING)
    assert directory.member(DAVE.ss58_address) is None
    assert directory.apply(after.book) == ([DAVE.ss58_address], [])
    assert directory.member(DAVE.ss58_address).roles == frozenset({Role.TRAINER})


def test_leave_releases_escrow_minus_the_early_penalty():
    bus = membership_head()
    admitted(bus)
    submit(bus, mb.Leave(A, leave_bytes(), penalty=5))  # no round settled since: early
    after = ledger(bus)
    assert DAVE.ss58_address not in after.book.members and after.escrowed == 0
    assert after.withdrawn[DAVE.ss58_address] == 45 and after.balances[h.POOL] == 1500 + 5
    assert "member_left" in bus.kinds(C)
    bus.check_invariants()
    assert not mb.LiveDirectory(FOUNDING).apply(after.book)[0]  # not a member any more


def test_a_leave_with_the_wrong_penalty_is_not_cosigned():
    bus = membership_head()
    admitted(bus)
    before = ledger(bus)
    waived = mb.Leave(B, leave_bytes(), penalty=0)  # B would waive the early-leave penalty
    with pytest.raises(h.HeadMisuse) as refused:
        bus.do(B, h.NewTx(waived, bus.now))
    assert refused.value.reason == "wrong_penalty"
    raw = h.encode_tx(waived)
    signature = KEYS[1].sign(h.tx_signing_payload("head-1", h.tx_id(raw)))
    with pytest.raises(RemoteProtocolError) as theirs:  # sent anyway: the others refuse it too
        bus.machines[A].handle(h.Receive(B, HeadNewTx("head-1", raw, signature), bus.now))
    assert theirs.value.reason == "wrong_penalty"
    assert ledger(bus) == before


@pytest.mark.parametrize("label, tx, reason", [
    ("too little stake", lambda: mb.Admit(A, join_bytes(stake=9)), "stake_too_low"),
    ("wrong mesh", lambda: mb.Admit(A, join_bytes(mesh="other")), "wrong_mesh"),
    ("validator stake", lambda: mb.Admit(A, join_bytes(roles=("validator",), stake=50)), "stake_too_low"),
])
def test_a_refused_join_changes_nothing(label, tx, reason):
    bus = membership_head()
    before = ledger(bus)
    with pytest.raises(h.HeadMisuse) as refused:
        bus.do(A, h.NewTx(tx(), bus.now))
    assert refused.value.reason == reason, label
    bus.flush()
    assert ledger(bus) == before and not bus.machines[A].pending


def test_a_join_with_a_bad_signature_is_refused():
    doc = msgpack.unpackb(join_bytes(), raw=False)
    doc["signature"] = "0x" + "11" * 64
    forged = msgpack.packb(doc, use_bin_type=True)
    bus = membership_head()
    before = ledger(bus)
    with pytest.raises(RemoteProtocolError) as refused:
        h.decode_tx(h.encode_tx(mb.Admit(A, forged)))
    assert refused.value.reason == "bad_signature"
    with pytest.raises(RemoteProtocolError):  # a party's NewTx carrying it is refused the same
        bus.machines[B].handle(h.Receive(A, HeadNewTx("head-1", h.encode_tx(mb.Admit(A, forged)), b"x" * 64),
                                         bus.now))
    assert ledger(bus) == before and not bus.machines[B].pending


def test_a_replayed_join_is_refused_even_after_the_member_left():
    bus = membership_head()
    original = join_bytes()
    submit(bus, mb.Admit(A, original))
    with pytest.raises(h.HeadMisuse) as refused:
        bus.do(A, h.NewTx(mb.Admit(A, original), bus.now + 1))
    assert refused.value.reason == "already_member"
    submit(bus, mb.Leave(A, leave_bytes(), penalty=5))
    before = ledger(bus)
    with pytest.raises(h.HeadMisuse) as refused:  # the same signed request, replayed later
        bus.do(A, h.NewTx(mb.Admit(A, original), bus.now + 2))
    assert refused.value.reason == "stale_join"
    assert ledger(bus) == before
    rejoin = admitted(bus, joins_before=1, at=T0 + 5)  # a fresh request is fine
    assert rejoin.book.joins[DAVE.ss58_address] == 2


def with_views(bus) -> dict[str, OffenceViews]:
    """Each party its own round views (what its rounds named), as a node holds them."""
    views = {}
    for party, m in bus.machines.items():
        views[party] = OffenceViews()
        m.membership = dataclasses.replace(RULES, offences=views[party])
    return views


def round_ended(bus, views, party, round_id, rejected=(), bad=None) -> None:
    """`party`'s round `round_id` ended: its view first, then its head hears the round
    (node/roles/settlement.py record_round does the same, in that order)."""
    views[party].observe(round_id, named_offenders(rejected, bad or {}))
    bus.do(party, h.ObserveRound(round_id, f"adapter-{round_id}", [A], bus.now))
    bus.flush()


def test_a_slashed_member_loses_its_escrow_and_waits_out_the_cooldown():
    """Round 0 rejected Dave's contribution at every validator (its range proof does not
    verify): the record author slashes him for it and every party co-signs."""
    bus = membership_head()
    views = with_views(bus)
    admitted(bus)
    for party in (A, B, C):
        round_ended(bus, views, party, 0, rejected=[(DAVE.ss58_address, "bad_proof")])
    submit(bus, mb.MemberSlash(A, DAVE.ss58_address, "invalid_contribution", 0))
    after = ledger(bus)
    assert after.escrowed == 0 and after.balances[h.POOL] == 1500 + 50
    assert after.book.slashed == {DAVE.ss58_address: 0}
    bus.check_invariants()
    with pytest.raises(h.HeadMisuse) as refused:
        bus.do(A, h.NewTx(mb.Admit(A, join_bytes(joins_before=1, at=T0 + 9)), bus.now))
    assert refused.value.reason == "slashed_cooldown"
    assert ledger(bus) == after


def test_a_slash_named_by_the_blame_step_waits_for_a_cosigner_that_has_not_ended_the_round():
    bus = membership_head()
    views = with_views(bus)
    admitted(bus)
    named = {DAVE.ss58_address: NAMED_OUT_OF_RANGE}
    round_ended(bus, views, A, 0, bad=named)
    before = ledger(bus)
    submit(bus, mb.MemberSlash(A, DAVE.ss58_address, "invalid_contribution", 0))
    assert ledger(bus) == before  # B and C have not ended round 0: they wait, unsigned
    round_ended(bus, views, B, 0, bad=named)
    assert ledger(bus) == before
    round_ended(bus, views, C, 0, bad=named)
    bus.flush()
    assert ledger(bus).book.slashed == {DAVE.ss58_address: 0}
    bus.check_invariants()


@pytest.mark.parametrize("label, rejected, bad, grounds", [
    ("the round named nobody", [], {}, "invalid_contribution"),
    ("its blob could not be fetched", [("DAVE", "unavailable")], {}, "invalid_contribution"),
    ("it stayed silent in the blame step", [], {"DAVE": NAMED_SILENT}, "invalid_contribution"),
    ("other grounds than the round's", [("DAVE", "bad_proof")], {}, "sabotage"),
])
def test_a_slash_without_evidence_is_refused_by_the_cosigners_and_changes_nothing(label, rejected, bad, grounds):
    """The author's view names Dave (or it says so anyway); the co-signers' own round 0
    did not, on those grounds: they refuse the record, and the ledger stays as it was."""
    bus = membership_head()
    views = with_views(bus)
    admitted(bus)
    dave = DAVE.ss58_address
    rejected = [(dave if t == "DAVE" else t, r) for t, r in rejected]
    bad = {dave if t == "DAVE" else t: why for t, why in bad.items()}
    round_ended(bus, views, A, 0, rejected=[(dave, "bad_proof")])
    views[A].rounds[0] = {dave: grounds}  # the author believes what it slashes for
    for party in (B, C):
        round_ended(bus, views, party, 0, rejected=rejected, bad=bad)
    before = ledger(bus)
    bus.rejected.clear()
    submit(bus, mb.MemberSlash(A, dave, grounds, 0))
    assert sorted(bus.rejected) == [(B, "no_offence_evidence"), (C, "no_offence_evidence")], label
    assert ledger(bus) == before and ledger(bus).book.members[dave].stake == 50, label
    # an author whose own round agrees with theirs does not author it at all
    views[A].rounds[0] = named_offenders(rejected, bad)
    with pytest.raises(h.HeadMisuse) as own:
        bus.do(A, h.NewTx(mb.MemberSlash(A, dave, grounds, 0), bus.now))
    assert own.value.reason == "no_offence_evidence", label


def test_a_slash_for_a_round_not_ended_here_is_not_authored():
    bus = membership_head()
    with_views(bus)
    admitted(bus)
    with pytest.raises(h.HeadMisuse) as refused:
        bus.do(A, h.NewTx(mb.MemberSlash(A, DAVE.ss58_address, "invalid_contribution", 3), bus.now))
    assert refused.value.reason == "round_not_observed"


def test_named_offenders_takes_only_what_the_bytes_prove():
    rejected = [("t1", "bad_proof"), ("t2", "unavailable"), ("t3", "malformed_contribution"), ("t4", "wrong_size")]
    bad = {"t5": NAMED_OUT_OF_RANGE, "t6": NAMED_SILENT}
    assert named_offenders(rejected, bad) == {t: "invalid_contribution" for t in ("t1", "t3", "t4", "t5")}
    views = OffenceViews()
    assert views.observe(4, {"t1": "invalid_contribution"}) and not views.observe(4, {})
    assert OffenceViews.from_wire(views.to_wire()).rounds == {4: {"t1": "invalid_contribution"}}
    with pytest.raises(ValueError):
        OffenceViews.from_wire({"x": {}})


def test_one_membership_record_per_snapshot():
    bus = membership_head()
    hold = lambda sender, receiver, message: True  # noqa: E731 - keep everything in flight
    bus.do(A, h.NewTx(mb.Admit(A, join_bytes()), bus.now))
    bus.do(A, h.NewTx(mb.Admit(A, join_bytes(EVE)), bus.now))
    bus.flush(keep=hold)
    request = next(m for _, _, m in bus.in_flight if isinstance(m, h.HeadReqSn))
    assert len(request.txs) == 1
    bus.in_flight = []
    second = h.encode_tx(mb.Admit(A, join_bytes(EVE)))
    signature = KEY_A.sign(h.tx_signing_payload("head-1", h.tx_id(second)))
    forged = dataclasses.replace(request, txs=request.txs + [second], signatures=request.signatures + [signature])
    effects = bus.machines[B].handle(h.Receive(A, forged, bus.now))
    assert any(isinstance(e, h.Record) and e.data.get("reason") == "one_membership_record_per_snapshot"
               for e in effects)


def test_value_is_conserved_through_fanout_with_escrow_back():
    bus = membership_head()
    admitted(bus)
    payouts = h.final_payouts(ledger(bus), {A: 90, B: 90, C: 90}, [])
    assert payouts[DAVE.ss58_address] == 50


def test_ledger_without_records_hashes_as_before():
    bus = open_head()
    wire = ledger(bus).to_wire()
    assert "members" not in wire and h.Ledger.from_wire(wire) == ledger(bus)
    with pytest.raises(RemoteProtocolError):  # an empty book is never written
        h.Ledger.from_wire({**wire, "members": mb.EMPTY_BOOK.to_wire()})


# --- every node follows the head ---------------------------------------------------------


def test_a_fully_signed_snapshot_updates_any_node_and_a_forged_one_does_not():
    bus = membership_head()
    admitted(bus)
    snapshot = bus.machines[A].confirmed
    update = MembershipUpdate("head-1", snapshot.encode())
    got = checked_update(update, (A, B, C), current_head=None, current_number=0)
    assert DAVE.ss58_address in got.ledger.book.members
    with pytest.raises(RemoteProtocolError) as stale:
        checked_update(update, (A, B, C), current_head="head-1", current_number=snapshot.number)
    assert stale.value.reason == "stale_update"
    unsigned = dataclasses.replace(snapshot, signatures={A: snapshot.signatures[A]})
    with pytest.raises(RemoteProtocolError) as forged:
        checked_update(MembershipUpdate("head-1", unsigned.encode()), (A, B, C), current_head=None,
                       current_number=0)
    assert forged.value.reason == "not_fully_signed"
    tampered = dataclasses.replace(snapshot, ledger=dataclasses.replace(snapshot.ledger, book=mb.EMPTY_BOOK))
    with pytest.raises(RemoteProtocolError) as bad:
        checked_update(MembershipUpdate("head-1", tampered.encode()), (A, B, C), current_head=None,
                       current_number=0)
    assert bad.value.reason == "bad_snapshot_signature"


# --- the gossip pipeline: strangers ------------------------------------------------------


def verifier_of(directory) -> EnvelopeVerifier:
    return EnvelopeVerifier(directory, A)


def test_a_join_request_is_the_one_message_a_stranger_may_send():
    verifier = verifier_of(mb.LiveDirectory(FOUNDING))
    now = T0
    joined = open_gossip(join_bytes(at=now), channel=Channel.MEMBERSHIP, verifier=verifier, now_ms=now,
                         max_bytes=65536, from_peer=PEER, mesh_id=MESH)
    assert isinstance(joined.message, JoinRequest) and joined.member.roles == frozenset()
    ping = seal_message(DAVE, Ping(1, now), now_ms=now).to_gossip_bytes()
    with pytest.raises(RemoteProtocolError) as refused:
        open_gossip(ping, channel=Channel.MEMBERSHIP, verifier=verifier, now_ms=now, max_bytes=65536,
                    from_peer=PEER, mesh_id=MESH)
    # IGNOREd, never charged to the relay: its neighbour may already have it as a member
    assert refused.value.reason == "unknown_signer" and not forwarder_is_at_fault("unknown_signer")
    with pytest.raises(RemoteProtocolError) as bound:  # it must come from the peer it names
        open_gossip(join_bytes(at=now + 1), channel=Channel.MEMBERSHIP, verifier=verifier, now_ms=now,
                    max_bytes=65536, from_peer="12D3KooWSomeoneElse", mesh_id=MESH)
    assert bound.value.reason == "peer_binding"


def test_a_flood_of_join_requests_from_one_peer_is_rate_limited_and_not_charged():
    verifier = verifier_of(mb.LiveDirectory(FOUNDING))
    limit = JoinRateLimit(burst=3, every_ms=10_000)
    reasons = []
    for i in range(10):
        try:
            open_gossip(join_bytes(at=T0 + i), channel=Channel.MEMBERSHIP, verifier=verifier, now_ms=T0 + i,
                        max_bytes=65536, from_peer=PEER, mesh_id=MESH, join_limit=limit)
            reasons.append("ok")
        except RemoteProtocolError as exc:
            reasons.append(exc.reason)
    assert reasons == ["ok"] * 3 + ["join_rate_limited"] * 7
    assert not forwarder_is_at_fault("join_rate_limited")


def test_the_directory_admits_a_member_without_a_restart():
    directory = mb.LiveDirectory(FOUNDING)
    verifier = verifier_of(directory)
    bus = membership_head()
    directory.apply(admitted(bus).book)
    ping = seal_message(DAVE, Ping(1, T0), now_ms=T0).to_gossip_bytes()
    verified = open_gossip(ping, channel=Channel.MEMBERSHIP, verifier=verifier, now_ms=T0, max_bytes=65536,
                           from_peer=PEER, mesh_id=MESH)
    assert verified.member.hotkey == DAVE.ss58_address


# --- the node's side: a validator judging requests, counted in /metrics -------------------


def test_a_validator_counts_each_refused_join_in_metrics_and_records_only_a_good_one(tmp_path):
    import types

    import trio

    from node.membership import LiveGenesis, MembershipService
    from node.metrics import NodeMetrics
    from node.registry.genesis import Genesis
    from tests.nodes import rejected_metric

    bus = membership_head()
    views = with_views(bus)
    machine = bus.machines[A]
    submitted = []

    async def submit_tx(tx):
        submitted.append(tx)
        bus.do(A, h.NewTx(tx, bus.now))
        bus.flush()
        return True

    settlement = types.SimpleNamespace(head=types.SimpleNamespace(machine=machine), is_author=lambda: True,
                                       submit_tx=submit_tx)
    metrics = NodeMetrics()
    genesis = LiveGenesis(Genesis(MESH, FOUNDING))
    settings = types.SimpleNamespace(data_dir=tmp_path, join=False, stake=0, role=Role.VALIDATOR)
    service = MembershipService(settings, KEY_A, genesis, metrics=metrics, publish=lambda m: None,
                                services=lambda: {"settlement": settlement}, peer_id=lambda: "", addrs=lambda: [])
    service.rules = RULES

    doc = msgpack.unpackb(join_bytes(at=T0 + 1), raw=False)
    doc["signature"] = "0x" + "11" * 64
    attacks = {"stake_too_low": join_bytes(stake=9), "bad_signature": msgpack.packb(doc, use_bin_type=True),
               "wrong_mesh": join_bytes(mesh="other")}

    async def feed(raw):
        try:
            await service._on_request(DAVE.ss58_address, JoinRequest(MESH, PEER, [], ["trainer"], 1, 0, T0), raw)
        except RemoteProtocolError as exc:
            service._count(exc.reason)

    async def main():
        for raw in attacks.values():
            await feed(raw)
        assert not submitted and ledger(bus).book == mb.EMPTY_BOOK  # no state change
        good = join_bytes()
        await feed(good)
        assert len(submitted) == 1 and DAVE.ss58_address in ledger(bus).book.members
        await feed(good)  # replayed after admission
        for party in (A, B, C):
            round_ended(bus, views, party, 0, rejected=[(DAVE.ss58_address, "bad_proof")])
        submit(bus, mb.MemberSlash(A, DAVE.ss58_address, "invalid_contribution", 0))
        await feed(join_bytes(joins_before=1, at=T0 + 7))  # slashed, inside the cool-down
        assert len(submitted) == 1

    trio.run(main)
    text = metrics.render().decode()
    for reason in [*attacks, "already_member", "slashed_cooldown"]:
        assert rejected_metric(text, "membership", reason) == 1, reason
    assert service.status()["refused"]["stake_too_low"] == 1


def test_a_kept_snapshot_file_that_is_garbage_or_not_strict_is_ignored(tmp_path):
    """DATA_DIR/membership.snapshot holds a snapshot that came from peers: read strictly,
    and a bad one is ignored (the node follows the head again), never trusted or fatal."""
    import msgpack

    from node.membership import SNAPSHOT_FILE, load_persisted

    path = tmp_path / SNAPSHOT_FILE
    assert load_persisted(tmp_path, ("5Fake",)) is None  # none kept yet
    for raw in (b"\xc1 not msgpack", msgpack.packb({"head_id": "h", "snapshot": b"x"}) + b"\xc0",
                msgpack.packb({"head_id": "h", "snapshot": b"x", "head_id2": msgpack.ExtType(1, b"")}),
                msgpack.packb({"head_id": "h", "snapshot": b"not a snapshot"})):
        path.write_bytes(raw)
        assert load_persisted(tmp_path, ("5Fake",)) is None


def test_an_admitted_member_is_dialled_at_its_join_requests_endpoint_and_forgotten_when_it_leaves(tmp_path):
    """Issue 15 over separate hosts: members learn an admitted joiner's peer id and
    announce addresses from the confirmed record (its signed join request), so they dial it
    at once instead of waiting for its next Announce; an Announce heard first is newer and
    kept; a member that left is no longer dialled."""
    import types

    from node.daemon import Node
    from node.membership import LiveGenesis, MembershipService
    from node.metrics import NodeMetrics
    from node.presence import Presence
    from node.registry.genesis import Genesis

    presence = Presence(B, frozenset(m.hotkey for m in FOUNDING))
    node = types.SimpleNamespace(presence=presence)
    settings = types.SimpleNamespace(data_dir=tmp_path, join=False, stake=0, role=Role.TRAINER)
    service = MembershipService(settings, KEYS[1], LiveGenesis(Genesis(MESH, FOUNDING)), metrics=NodeMetrics(),
                                publish=lambda m: None, services=lambda: {}, peer_id=lambda: "",
                                addrs=lambda: [], on_change=lambda *args: Node._on_membership_change(node, *args))
    bus = membership_head()
    admitted(bus)
    head_id = bus.machines[A].params.head_id
    service._take(head_id, bus.machines[A].confirmed)
    assert presence.peer_of[DAVE.ss58_address] == PEER
    assert presence.addrs_of[DAVE.ss58_address] == ["/ip4/10.0.0.4/tcp/9000"]

    submit(bus, mb.Leave(A, leave_bytes(), 5))
    service._take(head_id, bus.machines[A].confirmed)
    assert DAVE.ss58_address not in presence.peer_of and DAVE.ss58_address not in presence.addrs_of

    announced = Presence(B, frozenset())
    announced.peer_of[DAVE.ss58_address], announced.addrs_of[DAVE.ss58_address] = "12D3KooWnewer", ["/ip4/1.2.3.4"]
    assert not announced.on_admitted(DAVE.ss58_address, PEER, ["/ip4/10.0.0.4/tcp/9000"])
    assert announced.peer_of[DAVE.ss58_address] == "12D3KooWnewer"


def test_a_node_whose_leave_is_confirmed_stops_its_roles_and_its_announces(tmp_path):
    """After a confirmed leave the others ignore the node (unknown_signer) and serve it no
    blob: its roles would train, seal and publish for nobody. They stop; the node, its API
    and its status (state left, escrow released) stay."""
    import trio

    from node.daemon import Node
    from node.registry.genesis import Genesis
    from node.roles.base import RoleService
    from node.settings import NodeSettings

    node = Node(NodeSettings(role=Role.TRAINER, data_dir=tmp_path), KEYS[1], Genesis(MESH, FOUNDING))
    ran = {"started": 0, "cancelled": 0}

    class Working(RoleService):
        name = "working"

        async def run(self, ctx, *, task_status=trio.TASK_STATUS_IGNORED):
            ran["started"] += 1
            task_status.started()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                ran["cancelled"] += 1
                raise

    node.services = [Working()]
    node.role_context, node.mesh = object(), object()  # neither is used by these loops
    announced = []

    async def announce():
        announced.append(1)
    node._announce = announce

    async def main():
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(node._run_roles)
                await trio.sleep(0.05)
                assert ran == {"started": 1, "cancelled": 0}
                node.membership.left.set()
                await trio.sleep(0.05)
                assert ran == {"started": 1, "cancelled": 1}
                nursery.start_soon(node._announce_loop)
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    trio.run(main)
    assert announced == []
