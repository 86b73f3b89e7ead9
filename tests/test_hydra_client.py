"""The hydra-node settlement client against a peer that speaks (and checks) the published API."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio
from pycardano import (
    Address,
    Network,
    PaymentSigningKey,
    PaymentVerificationKey,
    Transaction,
    TransactionOutput,
    UTxO,
)

from node.settlement.hydra import (
    DepositOutcome,
    HeadView,
    HydraClient,
    HydraPostTxFailed,
    HydraRefused,
    HydraSettings,
    HydraUnreachable,
    InputRejectedByNode,
    TxDropped,
    TxRejected,
)
from node.settlement.hydra_schema import (
    HydraApiSchema,
    HydraSchemaUnavailable,
    IncomingMessageInvalid,
    OutgoingMessageInvalid,
    find_hydra_api_dir,
)
from node.settlement.hydra_tx import (
    METADATA_LABEL,
    BadTransaction,
    BlobRef,
    LedgerRules,
    MalformedRecord,
    RoundResultRecord,
    ScoreReportRecord,
    build_head_tx,
    decode_record,
    join_text,
    owned_utxo,
    parse_txin,
    produced_utxo,
    records_in,
    records_metadata,
    split_text,
    tx_envelope,
    tx_from_envelope,
    tx_id_hex,
)
from protocol.errors import LocalProtocolError

ROOT = Path(__file__).resolve().parent.parent
API_DIR = find_hydra_api_dir(ROOT)
pytestmark = pytest.mark.skipif(
    API_DIR is None,
    reason="hydra-node API schema not found at ../shared/hydra-api next to the repository; "
           "these tests validate against it")

ADA = 1_000_000


def _schema() -> HydraApiSchema:
    assert API_DIR is not None
    return HydraApiSchema.load(API_DIR)


def _address(key: PaymentSigningKey) -> Address:
    return Address(payment_part=PaymentVerificationKey.from_signing_key(key).hash(), network=Network.TESTNET)


@pytest.fixture
def party_key() -> PaymentSigningKey:
    return PaymentSigningKey.generate()


@pytest.fixture
def peer(party_key: PaymentSigningKey):
    from tests.hydra_peer import HydraPeer

    owner = str(_address(party_key))
    funds = {f"{os.urandom(32).hex()}#{i}": {"address": owner, "value": {"lovelace": 30 * ADA}}
             for i in range(3)}
    hydra = HydraPeer(_schema(), l1_utxo=funds).start()
    yield hydra
    hydra.stop()
    assert hydra.violations == [], "the client sent messages the schema rejects"
    assert hydra.errors == [], "the test peer failed"


def run_client(peer: Any, scenario: Callable[[HydraClient], Awaitable[None]], *, limit_s: float = 10,
               **overrides: Any) -> HydraClient:
    on_peer_error = overrides.pop("on_peer_error", None)
    options = {"ws_url": peer.ws_url, "http_url": peer.http_url, "reconnect_initial_s": 0.02,
               "reconnect_max_s": 0.1, **overrides}
    settings = HydraSettings(**options)
    client = HydraClient(settings, _schema(), on_peer_error=on_peer_error)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(limit_s):
                await nursery.start(client.run)
                await scenario(client)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return client


def l1_entry(peer: Any) -> dict[str, Any]:
    ref = sorted(peer.l1_utxo)[0]
    return {ref: peer.l1_utxo[ref]}


async def open_and_fund(client: HydraClient, peer: Any, key: PaymentSigningKey) -> DepositOutcome:
    await client.init()
    outcome = await client.deposit(l1_entry(peer), [key], timeout_s=5)
    assert outcome.status == "committed"
    return outcome


def record_tx(client: HydraClient, key: PaymentSigningKey, record: Any, pay: int = 2 * ADA,
              rules: LedgerRules = LedgerRules()) -> Transaction:
    other = _address(PaymentSigningKey.generate())
    spend = owned_utxo(client.head.confirmed_utxo, _address(key))
    return build_head_tx(spend[:1], [TransactionOutput(other, pay)], _address(key), [key], [record], rules)


ROUND = RoundResultRecord(
    round=7, adapter_id="sha256:" + hashlib.sha256(b"adapter r7").hexdigest(),
    contributors=("5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
                  "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"),
    rewards={"5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY": 600,
             "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty": 400},
    blobs=(BlobRef("blob/" + "ab" * 40, hashlib.sha256(b"update 1").digest()),))
SCORES = ScoreReportRecord(epoch=3, scores_ppm={"5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY": 875_000},
                           rewards={"5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY": 90})


# -- the head's whole life ------------------------------------------------------------------


def test_full_lifecycle_with_contest_and_fanout(peer, party_key):
    seen: dict[str, Any] = {}

    async def scenario(client: HydraClient) -> None:
        assert client.head.status == "Idle"
        opened = await client.init()
        assert client.head.status == "Open" and client.head.head_id == opened["headId"] == peer.head_id
        funded = await client.deposit(l1_entry(peer), [party_key], timeout_s=5)
        assert funded.status == "committed" and set(funded.utxo) <= set(client.head.confirmed_utxo)

        params = await client.get_protocol_parameters()
        round_tx = record_tx(client, party_key, ROUND, rules=LedgerRules.from_protocol_parameters(params))
        confirmed = await client.submit_tx(round_tx)
        assert confirmed.tx_id == tx_id_hex(round_tx) and confirmed.snapshot_number == 2
        snapshot = await client.get_snapshot()
        [carried] = snapshot["snapshot"]["confirmed"]
        assert records_in(tx_from_envelope(carried)) == [ROUND]

        scores_tx = record_tx(client, party_key, SCORES)
        assert (await client.submit_tx(scores_tx)).snapshot_number == 3
        assert set(produced_utxo(scores_tx)) <= set(await client.get_snapshot_utxo())
        assert (await client.get_head())["tag"] == "Open"

        # Another party closes with snapshot 2; we hold 3, so the client contests.
        peer.close_by_other_party(2)
        await client.wait_until(lambda head: head.status == "FanoutPossible")
        assert client.head.closed_snapshot_number == 3
        finalized = await client.fanout()
        seen["finalized"] = finalized["finalizedUTxO"]

    client = run_client(peer, scenario)
    tags = [m["tag"] for m in peer.received]
    assert tags == ["Init", "NewTx", "NewTx", "Contest", "Fanout"]
    # The fanout paid out snapshot 3 (contested in), not the stale snapshot 2.
    assert seen["finalized"] == peer.snapshots[3].utxo != peer.snapshots[2].utxo
    assert client.head.status == "Idle" and client.head.finalized_utxo == seen["finalized"]
    assert client.peer_errors == {}


def test_refusals_surface_as_typed_errors(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        with pytest.raises(HydraRefused) as refused:
            await client.close()  # nothing to close yet
        assert refused.value.reason == "command_failed" and "Idle" in refused.value.hint
        await client.init()
        closed = await client.close(safe=True)
        assert closed["snapshotNumber"] == 0
        with pytest.raises(HydraPostTxFailed) as failed:
            await client.contest()  # the head was closed with our latest snapshot
        assert "FailedToConstructContestTx" in failed.value.hint
        peer.refuse_parse_next = True  # a node whose parser disagrees with the schema
        with pytest.raises(InputRejectedByNode, match="unknown field"):
            await client.fanout()
        assert isinstance(InputRejectedByNode("x"), LocalProtocolError)

    run_client(peer, scenario)


# -- rejected transactions ----------------------------------------------------------------------


def test_tx_invalid_reaches_the_caller(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await open_and_fund(client, peer, party_key)
        [owned] = owned_utxo(client.head.confirmed_utxo, _address(party_key))
        ghost = UTxO(parse_txin("00" * 32 + "#5"), owned.output)  # an input the head never had
        with pytest.raises(TxRejected) as missing:
            await client.submit_tx(build_head_tx([ghost], [], _address(party_key), [party_key], [ROUND]))
        assert missing.value.reason == "tx_invalid" and "BadInputsUTxO" in missing.value.hint

        thief = PaymentSigningKey.generate()  # signs for an output it does not own
        stolen = UTxO(owned.input, TransactionOutput(_address(thief), owned.output.amount))
        with pytest.raises(TxRejected) as unsigned:
            await client.submit_tx(build_head_tx([stolen], [], _address(thief), [thief], [ROUND]))
        assert "MissingVKeyWitnesses" in unsigned.value.hint

        with pytest.raises(TxRejected):  # same rules over HTTP POST /transaction
            await client.post_transaction(build_head_tx([ghost], [], _address(party_key), [party_key]))
        assert client.head.confirmed_utxo == peer.head_utxo  # nothing moved

    run_client(peer, scenario)


# -- a dropped WebSocket ------------------------------------------------------------------------


def test_lost_newtx_is_resubmitted_after_reconnect(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await open_and_fund(client, peer, party_key)
        tx = record_tx(client, party_key, ROUND)
        peer.drop_on_next_newtx = "before"  # the node never sees it; the socket dies
        confirmed = await client.submit_tx(tx)
        assert confirmed.snapshot_number == peer.snapshots[-1].number

    client = run_client(peer, scenario)
    assert client.connections == 2
    sent = [m["transaction"]["txId"] for m in peer.received if m["tag"] == "NewTx"]
    assert len(sent) == 2 and sent[0] == sent[1]


@pytest.mark.parametrize("history", [False, True], ids=["greetings", "history-replay"])
def test_confirmation_missed_while_disconnected_is_learnt_on_reconnect(peer, party_key, history):
    async def scenario(client: HydraClient) -> None:
        await open_and_fund(client, peer, party_key)
        tx = record_tx(client, party_key, SCORES)
        peer.drop_on_next_newtx = "after"  # applied and confirmed, but we miss the outputs
        confirmed = await client.submit_tx(tx)
        assert confirmed.snapshot_number == peer.snapshots[-1].number
        # With history the replayed SnapshotConfirmed may settle it before Greetings.
        await client.wait_until(lambda _: client.connections == 2)
        assert client.head.confirmed_utxo == peer.head_utxo

    client = run_client(peer, scenario, history=history)
    assert client.connections == 2
    assert [m["tag"] for m in peer.received].count("NewTx") == 1  # not resubmitted
    if history:  # the replay filled the gap; outputs seen before were skipped by seq
        assert client.head.last_seq == peer.last_seq
    else:  # the gap stays a gap; Greetings and GET /snapshot carried the state across it
        assert client.head.last_seq < peer.last_seq


def test_newtx_whose_inputs_were_spent_meanwhile_is_reported_dropped(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await open_and_fund(client, peer, party_key)
        ours = record_tx(client, party_key, ROUND, pay=1 * ADA)
        peer.conflict_on_drop = record_tx(client, party_key, SCORES, pay=3 * ADA)  # same input
        peer.drop_on_next_newtx = "before"
        with pytest.raises(TxDropped) as dropped:
            await client.submit_tx(ours)
        assert dropped.value.reason == "tx_dropped" and "rebuild" in dropped.value.hint

    run_client(peer, scenario)


# -- deposits -------------------------------------------------------------------------------------


def test_jammed_deposit_times_out_and_is_recovered(peer, party_key):
    deposited = l1_entry(peer)

    async def scenario(client: HydraClient) -> None:
        await client.init()
        peer.jam_deposits = True  # recorded, never approved
        outcome = await client.deposit(deposited, [party_key], timeout_s=0.1)
        assert outcome.status == "recovered"
        assert [o["value"] for o in outcome.utxo.values()] == [o["value"] for o in deposited.values()]
        assert set(outcome.utxo) <= set(peer.l1_utxo)  # back on layer 1
        assert await client.pending_deposits() == []
        assert client.head.confirmed_utxo == {}  # never reached the head

    run_client(peer, scenario)
    assert [m["tag"] for m in peer.received] == ["Init", "Recover"]


def test_recover_before_the_deposit_deadline_is_refused(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await client.init()
        peer.jam_deposits = True
        from node.settlement.hydra_tx import sign_transaction
        draft = await client.draft_commit(l1_entry(peer))
        deposit = sign_transaction(draft, [party_key])
        await client.submit_l1_tx(deposit)
        assert await client.pending_deposits() == [tx_id_hex(deposit)]
        with pytest.raises(HydraPostTxFailed) as early:
            await client.recover(tx_id_hex(deposit))
        assert "deadline has not passed" in early.value.hint

    run_client(peer, scenario)


def test_decommit_moves_outputs_to_layer_one(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await open_and_fund(client, peer, party_key)
        spend = owned_utxo(client.head.confirmed_utxo, _address(party_key))
        tx = build_head_tx(spend, [], _address(party_key), [party_key])
        finalized = await client.decommit(tx)
        assert set(finalized["distributedUTxO"]) == set(produced_utxo(tx))
        assert set(produced_utxo(tx)) <= set(peer.l1_utxo)
        assert client.head.confirmed_utxo == {}

    run_client(peer, scenario)


# -- a peer that breaks the schema -----------------------------------------------------------------


def test_schema_invalid_server_messages_are_peer_errors_not_fatal(peer, party_key):
    reported: list[str] = []

    async def scenario(client: HydraClient) -> None:
        peer.inject({"tag": "HeadIsClosed", "headId": "00", "snapshotNumber": -1,
                     "contestationDeadline": "tomorrow", "seq": 99, "timestamp": "2026-01-01T00:00:00Z"})
        peer.inject("{not json")
        peer.inject({"tag": "HeadIsExploded", "seq": 100})
        await client.init()  # the same connection still works
        assert client.head.status == "Open"
        peer.http_override["/snapshot/utxo"] = (200, {"not-a-txin": {"address": 1}})
        with pytest.raises(IncomingMessageInvalid, match="UTxO"):
            await client.get_snapshot_utxo()

    client = run_client(peer, scenario, on_peer_error=reported.append)
    assert client.peer_errors == {"schema_violation": 2, "not_json": 1, "unknown_tag": 1}
    assert sorted(reported) == sorted(client.peer_errors.elements())
    assert client.connections == 1


def test_unreachable_http_api_says_what_to_check(peer):
    async def scenario(client: HydraClient) -> None:
        with pytest.raises(HydraUnreachable, match="--hydra-url"):
            await client.get_head()

    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    run_client(peer, scenario, http_url=f"http://127.0.0.1:{dead}")


def test_client_refuses_to_send_what_the_schema_rejects(peer, party_key):
    async def scenario(client: HydraClient) -> None:
        await client.init()
        with pytest.raises(OutgoingMessageInvalid, match="utxoToCommit"):
            await client.deposit({"not-a-txin": {"address": "x", "value": {}}}, [party_key])

    run_client(peer, scenario)
    assert [m["tag"] for m in peer.received] == ["Init"]  # nothing else left the client


def test_schema_directory_is_found_next_to_the_repository(tmp_path):
    repo = tmp_path / "main"
    repo.mkdir()
    assert find_hydra_api_dir(repo) is None
    with pytest.raises(HydraSchemaUnavailable, match="api.yaml"):
        HydraApiSchema(tmp_path)
    assert find_hydra_api_dir(ROOT) == API_DIR


def test_outgoing_messages_are_checked_before_sending():
    schema = _schema()
    with pytest.raises(OutgoingMessageInvalid, match="transaction"):
        schema.check_client_input({"tag": "NewTx"})
    with pytest.raises(OutgoingMessageInvalid, match="description"):
        schema.check_client_input({"tag": "NewTx", "transaction": {"type": "Tx ConwayEra", "cborHex": "00"}})
    with pytest.raises(OutgoingMessageInvalid, match="not a client input"):
        schema.check_client_input({"tag": "HeadIsOpen"})
    with pytest.raises(OutgoingMessageInvalid, match="history"):
        schema.check_ws_query({"history": "maybe"})
    with pytest.raises(OutgoingMessageInvalid):
        schema.check_outgoing("components/schemas/SimpleCommitRequest", {"utxoToCommit": {"nonsense": {}}})
    schema.check_client_input({"tag": "Recover", "recoverTxId": "ab" * 32})
    assert isinstance(OutgoingMessageInvalid("x"), LocalProtocolError)


# -- pure parts -------------------------------------------------------------------------------------


def test_head_view_follows_outputs_and_ignores_replays():
    view = HeadView()
    view.apply({"tag": "Greetings", "headStatus": "Open", "hydraHeadId": "ab" * 16,
                "hydraNodeVersion": "1.0", "snapshotUtxo": {"x#0": {}}})
    assert (view.status, view.head_id, view.confirmed_utxo) == ("Open", "ab" * 16, {"x#0": {}})
    view.apply({"tag": "SnapshotConfirmed", "seq": 4, "snapshot": {"number": 2, "utxo": {"y#1": {}}}})
    assert view.snapshot_number == 2 and not view.is_new({"tag": "TxValid", "seq": 4})
    view.apply({"tag": "HeadIsClosed", "seq": 5, "snapshotNumber": 1, "contestationDeadline": "t"})
    view.apply({"tag": "HeadIsContested", "seq": 6, "snapshotNumber": 2, "contestationDeadline": "u"})
    assert (view.status, view.closed_snapshot_number, view.contestation_deadline) == ("Closed", 2, "u")
    view.apply({"tag": "ReadyToFanout", "seq": 7})
    assert view.status == "FanoutPossible"


def test_settings_urls():
    s = HydraSettings(ws_url="ws://10.0.0.5:4001")
    assert s.channel_url() == "ws://10.0.0.5:4001/?history=no"
    assert s.http_base() == "http://10.0.0.5:4001"
    assert HydraSettings(ws_url="wss://h:1", snapshot_utxo=False).channel_url() == \
        "wss://h:1/?history=no&snapshot-utxo=no"
    with pytest.raises(LocalProtocolError, match="ws://"):
        HydraSettings(ws_url="http://h:4001").http_base()


def test_metadata_text_respects_64_bytes_and_round_trips():
    for text in ["", "a" * 64, "a" * 65, "é" * 33, "€" * 50, "x" + "😀" * 30]:
        encoded = split_text(text)
        parts = [encoded] if isinstance(encoded, str) else encoded
        assert all(len(p.encode()) <= 64 for p in parts)
        assert join_text(encoded) == text
    aux = records_metadata([ROUND, SCORES])
    value = aux.data.metadata[METADATA_LABEL]

    def strings(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [x for k, v in node.items() for x in strings(k) + strings(v)]
        if isinstance(node, list):
            return [x for item in node for x in strings(item)]
        return [node] if isinstance(node, (str, bytes)) else []

    assert all(len(s.encode() if isinstance(s, str) else s) <= 64 for s in strings(value))
    assert isinstance(value["records"][0]["adapter"], list)  # 71 characters: split


def test_bad_records_are_refused_both_ways():
    with pytest.raises(LocalProtocolError, match="sha256"):
        records_metadata([RoundResultRecord(1, "a", (), {}, (BlobRef("b", b"short"),))])
    with pytest.raises(LocalProtocolError, match="rewards"):
        records_metadata([RoundResultRecord(1, "a", ("p",), {"p": -5})])
    with pytest.raises(LocalProtocolError, match="ppm"):
        records_metadata([ScoreReportRecord(1, {"m": 1_000_001})])
    with pytest.raises(MalformedRecord):
        decode_record({"type": "round_result", "round": 1})
    with pytest.raises(MalformedRecord):
        decode_record({"type": "score_report", "epoch": "3", "scores_ppm": [], "rewards": []})
    with pytest.raises(MalformedRecord, match="unknown record type"):
        decode_record({"type": "bribe"})


def test_build_head_tx_pays_the_linear_fee_and_checks_funds(party_key):
    utxo = {f"{'cd' * 32}#0": {"address": str(_address(party_key)), "value": {"lovelace": 5 * ADA}}}
    rules = LedgerRules(fee_fixed=155_381, fee_per_byte=44)
    owner = _address(party_key)
    tx = build_head_tx(owned_utxo(utxo, owner), [], owner, [party_key], [ROUND], rules)
    assert tx.transaction_body.fee == rules.fee_for(len(tx.to_cbor())) == 155_381 + 44 * len(tx.to_cbor())
    [change] = tx.transaction_body.outputs
    assert change.amount + tx.transaction_body.fee == 5 * ADA
    with pytest.raises(LocalProtocolError, match="inputs hold"):
        build_head_tx(owned_utxo(utxo, _address(party_key)),
                      [TransactionOutput(_address(party_key), 6 * ADA)], _address(party_key), [party_key])
    many = RoundResultRecord(1, "a", tuple(f"hotkey-{i:042d}" for i in range(400)), {})
    with pytest.raises(LocalProtocolError, match="split the records"):
        build_head_tx(owned_utxo(utxo, owner), [], owner, [party_key], [many], rules)
    with pytest.raises(LocalProtocolError, match="no signing key"):
        build_head_tx(owned_utxo(utxo, _address(party_key)), [], _address(party_key),
                      [PaymentSigningKey.generate()])


def test_transaction_envelopes_are_checked(party_key):
    utxo = {f"{'ef' * 32}#1": {"address": str(_address(party_key)), "value": {"lovelace": 3 * ADA}}}
    tx = build_head_tx(owned_utxo(utxo, _address(party_key)), [], _address(party_key), [party_key], [SCORES])
    envelope = tx_envelope(tx)
    _schema().check_outgoing("components/schemas/Transaction", envelope)
    assert records_in(tx_from_envelope(envelope)) == [SCORES]
    with pytest.raises(BadTransaction, match="does not match"):
        tx_from_envelope({**envelope, "txId": "00" * 32})
    with pytest.raises(BadTransaction, match="not a Conway"):
        tx_from_envelope({**envelope, "cborHex": "deadbeef"})
