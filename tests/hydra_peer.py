"""A stand-in hydra-node for tests: it speaks the published API and checks the client.

It serves the WebSocket channel `/` (websockets) and the HTTP endpoints (aiohttp) on
loopback, from one asyncio loop on its own thread. Behind them: a head state machine
(Idle -> Open -> Closed -> FanoutPossible -> Final; this API version opens the head
directly on Init and adds funds by deposit, so there is no Initializing state), a
layer-1 UTxO set and a head UTxO set. NewTx is decoded with pycardano and checked
like a ledger would (inputs exist, owners signed, value conserved, fee paid, metadata
hash matches); each valid transaction is confirmed in its own snapshot.

Every message the client sends is validated against the schema; a non-conforming one
is answered with InvalidInput, as hydra-node does, and recorded in `violations`, which
the test fixture asserts empty. Every message the peer emits is validated too, so the
peer cannot drift from the schema either (`inject` bypasses this on purpose).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import nacl.exceptions
import nacl.signing
from aiohttp import web
from pycardano import (
    Address,
    Network,
    ScriptHash,
    Transaction,
    TransactionBody,
    TransactionId,
    TransactionInput,
    TransactionOutput,
    TransactionWitnessSet,
    Value,
)
from websockets.asyncio.server import ServerConnection, serve

from node.settlement import hydra_schema as S
from node.settlement.hydra_schema import HydraApiSchema
from node.settlement.hydra_tx import txout_to_json, value_from_json, value_to_json

NODE_VERSION = "1.1.0-sealmesh-test-peer"
DEPOSIT_SCRIPT = ScriptHash(hashlib.blake2b(b"sealmesh test deposit validator", digest_size=28).digest())
DEPOSIT_ADDRESS = Address(payment_part=DEPOSIT_SCRIPT, network=Network.TESTNET)
ZERO_FEE_PARAMETERS: dict[str, Any] = {
    "protocolVersion": {"major": 10, "minor": 0}, "maxBlockHeaderSize": 1100,
    "maxBlockBodySize": 90112, "maxTxSize": 16384, "txFeeFixed": 0, "txFeePerByte": 0,
    "stakeAddressDeposit": 0, "stakePoolDeposit": 0, "minPoolCost": 0, "poolRetireMaxEpoch": 18,
    "stakePoolTargetNum": 500, "poolPledgeInfluence": 0.3, "monetaryExpansion": 0.003,
    "treasuryCut": 0.2, "costModels": {}, "executionUnitPrices": {"priceMemory": 0, "priceSteps": 0},
    "maxTxExecutionUnits": {"memory": 14000000, "cpu": 10000000000},
    "maxBlockExecutionUnits": {"memory": 62000000, "cpu": 20000000000}, "maxValueSize": 5000,
    "collateralPercentage": 150, "maxCollateralInputs": 3, "utxoCostPerByte": 0,
}


class Phase(enum.Enum):
    IDLE = "Idle"
    OPEN = "Open"
    CLOSED = "Closed"
    FANOUT_POSSIBLE = "FanoutPossible"
    FINAL = "Final"  # hydra-node reports a finalized head as Idle again

    @property
    def head_status(self) -> str:
        return "Idle" if self is Phase.FINAL else self.value


# Which client input each phase accepts (hydra-node answers CommandFailed otherwise).
ACCEPTS: dict[Phase, frozenset[str]] = {
    Phase.IDLE: frozenset({"Init"}),
    Phase.OPEN: frozenset({"NewTx", "Decommit", "Close", "SafeClose", "Recover"}),
    Phase.CLOSED: frozenset({"Contest"}),
    Phase.FANOUT_POSSIBLE: frozenset({"Fanout"}),
    Phase.FINAL: frozenset(),
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Deposit:
    tx_id: str
    utxo: dict[str, Any]
    deadline: datetime
    status: str = "drafted"  # drafted -> recorded -> finalized | expired -> recovered


@dataclass
class Snapshot:
    number: int
    version: int
    utxo: dict[str, Any]
    confirmed: list[dict[str, Any]] = field(default_factory=list)
    utxo_to_commit: dict[str, Any] | None = None
    utxo_to_decommit: dict[str, Any] | None = None


class LedgerRejection(Exception):
    """A transaction the ledger rules refuse; the message is hydra's validationError."""


class HydraPeer:
    def __init__(self, schema: HydraApiSchema, *, l1_utxo: dict[str, Any] | None = None,
                 contestation_period_s: float = 0.3, deposit_period_s: float = 0.4,
                 protocol_parameters: dict[str, Any] | None = None) -> None:
        self.schema = schema
        self.party_key = nacl.signing.SigningKey.generate()
        self.contestation_period_s = contestation_period_s
        self.deposit_period_s = deposit_period_s
        self.protocol_parameters = dict(protocol_parameters or ZERO_FEE_PARAMETERS)
        self.l1_utxo: dict[str, Any] = dict(l1_utxo or {})
        self.phase = Phase.IDLE
        self.head_id = os.urandom(16).hex()
        self.head_seed = os.urandom(16).hex()
        self.snapshots: list[Snapshot] = []
        self.deposits: dict[str, Deposit] = {}
        self.closed_snapshot: Snapshot | None = None
        self.contested = False
        self.contestation_deadline: datetime | None = None
        self.finalized_utxo: dict[str, Any] = {}
        # Test controls and observations.
        self.jam_deposits = False  # deposits are recorded but never approved (hydra #2102, #2446)
        self.drop_on_next_newtx: str | None = None  # "before" or "after" applying it
        self.conflict_on_drop: Transaction | None = None  # another party's tx, applied during the drop
        self.refuse_parse_next = False  # answer the next input with InvalidInput (version skew)
        self.http_override: dict[str, tuple[int, Any]] = {}  # path -> raw (status, body), unvalidated
        self.violations: list[str] = []  # the client broke the schema
        self.errors: list[str] = []  # the peer itself failed (a bug in this file)
        self.received: list[dict[str, Any]] = []
        self.connections_served = 0
        self._seq = 0
        self._history: list[str] = []
        self._clients: set[ServerConnection] = set()
        self._fanout_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hydra-peer", daemon=True)
        self.ws_port = self.http_port = 0

    # -- lifecycle, called from the test thread -------------------------------------

    def start(self) -> "HydraPeer":
        self._thread.start()
        self._call(self._start_servers)
        return self

    def stop(self) -> None:
        self._call(self._stop_servers)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    async def _start_servers(self) -> None:
        self._ws_server = await serve(self._serve_ws, "127.0.0.1", 0)
        self.ws_port = next(iter(self._ws_server.sockets)).getsockname()[1]
        app = web.Application(middlewares=[self._overridden])
        app.add_routes([
            web.get("/head", self._http_head), web.post("/commit", self._http_commit),
            web.get("/commits", self._http_pending_deposits),
            web.delete("/commits/{tx_id}", self._http_recover),
            web.get("/snapshot", self._http_snapshot), web.get("/snapshot/utxo", self._http_snapshot_utxo),
            web.get("/protocol-parameters", self._http_protocol_parameters),
            web.post("/transaction", self._http_l2_transaction),
            web.post("/cardano-transaction", self._http_l1_transaction),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = self._runner.addresses[0][1]

    async def _stop_servers(self) -> None:
        if self._fanout_timer is not None:
            self._fanout_timer.cancel()
        self._ws_server.close()
        for connection in list(self._clients):
            connection.transport.abort()
        await self._runner.cleanup()

    # -- test controls ------------------------------------------------------------------

    def drop_connections(self) -> None:
        """Cut every WebSocket without a close frame, like a network failure."""
        self._call(self._drop_all)

    def _drop_all(self) -> None:
        for connection in list(self._clients):
            connection.transport.abort()

    def inject(self, frame: dict[str, Any] | str) -> None:
        """Send a raw frame to every client, unvalidated (to test the client's checks)."""
        text = frame if isinstance(frame, str) else json.dumps(frame)
        self._call(self._broadcast_raw, text)

    def close_by_other_party(self, snapshot_number: int) -> None:
        """Another participant posts a Close with an older confirmed snapshot."""
        self._call(self._close, self.snapshots[snapshot_number])

    @property
    def last_seq(self) -> int:
        return self._seq - 1

    @property
    def head_utxo(self) -> dict[str, Any]:
        return self.snapshots[-1].utxo if self.snapshots else {}

    # -- output -------------------------------------------------------------------------

    async def _broadcast_raw(self, text: str) -> None:
        for connection in list(self._clients):
            try:
                await connection.send(text)
            except Exception:  # a dropped client; it will reconnect
                self._clients.discard(connection)

    async def _emit(self, tag: str, **fields: Any) -> None:
        output = {"tag": tag, **fields, "seq": self._seq, "timestamp": _iso(_now())}
        self._seq += 1
        self.schema.check_server_output(output)  # the peer must conform as well
        text = json.dumps(output)
        self._history.append(text)
        await self._broadcast_raw(text)

    async def _reply(self, connection: ServerConnection, output: dict[str, Any]) -> None:
        # ClientMessage outputs (CommandFailed, InvalidInput...) go only to the sender.
        self.schema.check_server_output(output)
        await connection.send(json.dumps(output))

    def _greetings(self, with_utxo: bool) -> dict[str, Any]:
        party = {"vkey": self.party_key.verify_key.encode().hex()}
        greetings: dict[str, Any] = {
            "tag": "Greetings", "me": party, "headStatus": self.phase.head_status,
            "hydraNodeVersion": NODE_VERSION, "timestamp": _iso(_now()),
            "env": {"party": party, "otherParties": [], "participants": [],
                    "contestationPeriod": self.contestation_period_s,
                    "depositPeriod": self.deposit_period_s, "depositActivation": 0,
                    "unsyncedPeriod": 21600, "configuredPeers": ""},
            "networkInfo": {"networkConnected": True, "peersInfo": {}},
            "chainSyncedStatus": "InSync", "currentSlot": 1000 + self._seq,
        }
        if self.phase in (Phase.OPEN, Phase.CLOSED, Phase.FANOUT_POSSIBLE):
            greetings["hydraHeadId"] = self.head_id
        if with_utxo and self.snapshots:
            greetings["snapshotUtxo"] = self.head_utxo
        self.schema.check_server_output(greetings)
        return greetings

    # -- WebSocket --------------------------------------------------------------------

    async def _serve_ws(self, connection: ServerConnection) -> None:
        url = urlsplit(connection.request.path)
        query = dict(parse_qsl(url.query))
        try:
            if url.path != "/":
                raise S.OutgoingMessageInvalid(f"WebSocket path {url.path!r} is not the API channel '/'")
            self.schema.check_ws_query(query)
        except S.OutgoingMessageInvalid as exc:
            self.violations.append(f"connect: {exc}")
            await connection.close(code=1008, reason="bad query")
            return
        self.connections_served += 1
        if query.get("history", "yes") == "yes":
            for text in self._history:
                await connection.send(text)
        await connection.send(json.dumps(self._greetings(query.get("snapshot-utxo", "yes") == "yes")))
        self._clients.add(connection)
        try:
            async for frame in connection:
                await self._on_client_frame(connection, frame)
        except Exception:  # closed or aborted; nothing to clean beyond the set
            pass
        finally:
            self._clients.discard(connection)

    async def _on_client_frame(self, connection: ServerConnection, frame: str | bytes) -> None:
        try:
            message = json.loads(frame)
            self.schema.check_client_input(message)
        except (ValueError, S.OutgoingMessageInvalid) as exc:
            self.violations.append(f"client input: {exc}")
            await self._reply(connection, {"tag": "InvalidInput", "reason": str(exc)[:400],
                                           "input": frame if isinstance(frame, str) else frame.hex()})
            return
        self.received.append(message)
        if self.refuse_parse_next:
            self.refuse_parse_next = False
            await self._reply(connection, {"tag": "InvalidInput", "reason": "Error in $: unknown field",
                                           "input": frame if isinstance(frame, str) else frame.hex()})
            return
        tag = message["tag"]
        if tag not in ACCEPTS[self.phase]:
            await self._command_failed(connection, message)
            return
        try:
            await getattr(self, f"_on_{tag}")(connection, message)
        except Exception as exc:  # surfaced by the fixture, never swallowed
            self.errors.append(f"{tag}: {exc!r}")
            raise

    async def _command_failed(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        await self._reply(connection, {"tag": "CommandFailed", "clientInput": message,
                                       "state": self.head_state()})

    async def _on_Init(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        self.phase = Phase.OPEN
        self.snapshots = [Snapshot(number=0, version=0, utxo={})]
        await self._emit("HeadIsOpen", headId=self.head_id,
                         parties=[{"vkey": self.party_key.verify_key.encode().hex()}])

    async def _on_NewTx(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        drop, self.drop_on_next_newtx = self.drop_on_next_newtx, None
        if drop == "before":
            self._clients.discard(connection)
            connection.transport.abort()
            if self.conflict_on_drop is not None:
                conflict, self.conflict_on_drop = self.conflict_on_drop, None
                last = self.snapshots[-1]
                await self._confirm(Snapshot(number=last.number + 1, version=last.version,
                                             utxo=self._apply(self.head_utxo, conflict),
                                             confirmed=[_envelope(conflict)]))
            return
        try:
            tx = Transaction.from_cbor(message["transaction"]["cborHex"])
        except Exception as exc:
            await self._reply(connection, {"tag": "InvalidInput", "input": json.dumps(message),
                                           "reason": f"cannot decode transaction: {exc}"[:400]})
            return
        envelope = _envelope(tx)
        try:
            new_utxo = self._apply(self.head_utxo, tx)
        except LedgerRejection as exc:
            await self._emit("TxInvalid", headId=self.head_id, utxo=self.head_utxo, transaction=envelope,
                             validationError={"reason": str(exc)})
            return
        if drop == "after":
            self._clients.discard(connection)  # it misses what follows, as on a real drop
            connection.transport.abort()
        await self._emit("TxValid", headId=self.head_id, transactionId=envelope["txId"])
        await self._confirm(Snapshot(number=self.snapshots[-1].number + 1, version=self.snapshots[-1].version,
                                     utxo=new_utxo, confirmed=[envelope]))

    async def _on_Decommit(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        tx = Transaction.from_cbor(message["decommitTx"]["cborHex"])
        envelope = _envelope(tx)
        try:
            remaining = self._apply(self.head_utxo, tx)
        except LedgerRejection as exc:
            reason = {"tag": "DecommitTxInvalid", "localUTxO": self.head_utxo,
                      "validationError": {"reason": str(exc)}}
            await self._emit("DecommitInvalid", headId=self.head_id, decommitTx=envelope,
                             decommitInvalidReason=reason)
            return
        leaving = {ref: remaining.pop(ref) for ref in _produced(tx)}
        await self._emit("DecommitRequested", headId=self.head_id, decommitTx=envelope,
                         utxoToDecommit=leaving)
        await self._emit("DecommitApproved", headId=self.head_id, decommitTxId=envelope["txId"],
                         utxoToDecommit=leaving)
        last = self.snapshots[-1]
        await self._confirm(Snapshot(number=last.number + 1, version=last.version + 1, utxo=remaining,
                                     utxo_to_decommit=leaving))
        self.l1_utxo.update(leaving)
        await self._emit("DecommitFinalized", headId=self.head_id, distributedUTxO=leaving)

    async def _on_Close(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        await self._close(self.snapshots[-1])

    async def _on_SafeClose(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        if any(set(out["value"]) - {"lovelace"} for out in self.head_utxo.values()):
            await self._command_failed(connection, message)  # SafeClose refuses non-ADA assets
            return
        await self._close(self.snapshots[-1])

    async def _close(self, snapshot: Snapshot) -> None:
        self.phase = Phase.CLOSED
        self.closed_snapshot = snapshot
        self.contestation_deadline = _now() + timedelta(seconds=self.contestation_period_s)
        await self._emit("HeadIsClosed", headId=self.head_id, snapshotNumber=snapshot.number,
                         contestationDeadline=_iso(self.contestation_deadline))
        self._schedule_fanout()

    async def _on_Contest(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        latest = self.snapshots[-1]
        assert self.closed_snapshot is not None
        if self.contested or latest.number <= self.closed_snapshot.number:
            await self._reply(connection, {"tag": "PostTxOnChainFailed", "postChainTx": {
                "tag": "ContestTx", "headId": self.head_id, "headParameters": self._parameters(),
                "openVersion": latest.version, "contestingSnapshot": self._confirmed_json(latest)},
                "postTxError": {"tag": "FailedToConstructContestTx"}})
            return
        self.contested = True
        self.closed_snapshot = latest
        assert self.contestation_deadline is not None
        self.contestation_deadline += timedelta(seconds=self.contestation_period_s)
        await self._emit("HeadIsContested", headId=self.head_id, snapshotNumber=latest.number,
                         contestationDeadline=_iso(self.contestation_deadline))
        self._schedule_fanout()

    def _schedule_fanout(self) -> None:
        if self._fanout_timer is not None:
            self._fanout_timer.cancel()
        assert self.contestation_deadline is not None
        delay = max(0.0, (self.contestation_deadline - _now()).total_seconds())
        self._fanout_timer = self._loop.call_later(
            delay, lambda: self._loop.create_task(self._ready_to_fanout()))

    async def _ready_to_fanout(self) -> None:
        if self.phase is Phase.CLOSED:
            self.phase = Phase.FANOUT_POSSIBLE
            await self._emit("ReadyToFanout", headId=self.head_id)

    async def _on_Fanout(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        assert self.closed_snapshot is not None
        self.phase = Phase.FINAL
        self.finalized_utxo = dict(self.closed_snapshot.utxo)
        self.l1_utxo.update(self.finalized_utxo)
        await self._emit("HeadIsFinalized", headId=self.head_id, finalizedUTxO=self.finalized_utxo)

    async def _on_Recover(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        problem = await self._recover(message["recoverTxId"])
        if problem is not None:
            await self._reply(connection, problem)

    async def _recover(self, deposit_tx_id: str) -> dict[str, Any] | None:
        """Recover a deposit whose deadline passed; returns the failure output otherwise."""
        deposit = self.deposits.get(deposit_tx_id)
        if deposit is not None and deposit.status in ("recorded", "expired") and _now() >= deposit.deadline:
            recovered = _recover_outputs(deposit)
            del self.l1_utxo[f"{deposit_tx_id}#0"]
            self.l1_utxo.update(recovered)
            deposit.status = "recovered"
            await self._emit("CommitRecovered", headId=self.head_id, recoveredUTxO=recovered,
                             recoveredTxId=deposit_tx_id)
            return None
        why = "unknown deposit" if deposit is None else (
            f"deposit is {deposit.status}" if deposit.status not in ("recorded", "expired")
            else "deposit deadline has not passed")
        return {"tag": "PostTxOnChainFailed", "postChainTx": {
            "tag": "RecoverTx", "headId": self.head_id, "recoverTxId": deposit_tx_id,
            "recoverUTxO": deposit.utxo if deposit else {}, "deadline": 0},
            "postTxError": {"tag": "FailedToConstructRecoverTx", "failureReason": why}}

    async def _confirm(self, snapshot: Snapshot) -> None:
        self.snapshots.append(snapshot)
        await self._emit("SnapshotConfirmed", headId=self.head_id, snapshot=self._snapshot_json(snapshot))

    # -- ledger -------------------------------------------------------------------------

    def _apply(self, utxo: dict[str, Any], tx: Transaction) -> dict[str, Any]:
        """The UTxO after `tx`, or LedgerRejection with a ledger-style reason."""
        body = tx.transaction_body
        refs = [f"{i.transaction_id.payload.hex()}#{i.index}" for i in body.inputs]
        missing = [ref for ref in refs if ref not in utxo]
        if missing:
            raise LedgerRejection(f"BadInputsUTxO: {sorted(missing)}")
        signers = set()
        for witness in tx.transaction_witness_set.vkey_witnesses or ():
            try:
                nacl.signing.VerifyKey(witness.vkey.payload).verify(body.hash(), witness.signature)
                signers.add(witness.vkey.hash().payload)
            except nacl.exceptions.BadSignatureError:
                raise LedgerRejection("InvalidWitnessesUTXOW") from None
        for ref in refs:
            owner = Address.from_primitive(utxo[ref]["address"]).payment_part
            if owner is None or owner.payload not in signers:
                raise LedgerRejection(f"MissingVKeyWitnessesUTXOW: {ref}")
        consumed = sum((value_from_json(utxo[ref]["value"]) for ref in refs), Value(0))
        produced = sum((_value(o.amount) for o in body.outputs), Value(0)) + Value(body.fee)
        if consumed != produced:
            raise LedgerRejection(
                f"ValueNotConservedUTxO: consumed {consumed.coin}, produced {produced.coin}")
        min_fee = (int(self.protocol_parameters["txFeeFixed"])
                   + int(self.protocol_parameters["txFeePerByte"]) * len(tx.to_cbor()))
        if body.fee < min_fee:
            raise LedgerRejection(f"FeeTooSmallUTxO: {body.fee} < {min_fee}")
        aux_hash = tx.auxiliary_data.hash() if tx.auxiliary_data is not None else None
        if aux_hash != body.auxiliary_data_hash:
            raise LedgerRejection("ConflictingMetadataHash")
        after = {ref: out for ref, out in utxo.items() if ref not in refs}
        after.update(_produced(tx))
        return after

    # -- HTTP ---------------------------------------------------------------------------

    @web.middleware
    async def _overridden(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        if request.path in self.http_override:
            status, body = self.http_override[request.path]
            return web.json_response(body, status=status)
        return await handler(request)

    async def _json_body(self, request: web.Request, pointer: str) -> Any:
        try:
            body = await request.json()
            self.schema.check_outgoing(pointer, body)
        except (ValueError, S.OutgoingMessageInvalid) as exc:
            self.violations.append(f"{request.method} {request.path}: {exc}")
            raise web.HTTPBadRequest(text=json.dumps(str(exc)), content_type="application/json") from None
        return body

    def _respond(self, pointer: str, body: Any, status: int = 200) -> web.Response:
        self.schema.check_incoming(pointer, body)
        return web.json_response(body, status=status)

    async def _http_head(self, request: web.Request) -> web.Response:
        return self._respond(S.HEAD_STATE, self.head_state())

    async def _http_snapshot(self, request: web.Request) -> web.Response:
        if not self.snapshots:
            raise web.HTTPNotFound()
        return self._respond(S.CONFIRMED_SNAPSHOT, self._confirmed_json(self.snapshots[-1]))

    async def _http_snapshot_utxo(self, request: web.Request) -> web.Response:
        if not self.snapshots:
            raise web.HTTPNotFound()
        return self._respond(S.UTXO, self.head_utxo)

    async def _http_protocol_parameters(self, request: web.Request) -> web.Response:
        return self._respond(S.PROTOCOL_PARAMETERS, self.protocol_parameters)

    async def _http_pending_deposits(self, request: web.Request) -> web.Response:
        pending = [d.tx_id for d in self.deposits.values() if d.status in ("recorded", "expired")]
        return self._respond(S.PENDING_DEPOSITS, pending)

    async def _http_commit(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, S.DRAFT_COMMIT_REQUEST)
        utxo = body["utxoToCommit"]
        unknown = [ref for ref in utxo if self.l1_utxo.get(ref) != utxo[ref]]
        if self.phase is not Phase.OPEN or unknown or not utxo:
            reason = "head is not open" if self.phase is not Phase.OPEN else f"not on layer 1: {unknown}"
            error = {"tag": "FailedToConstructDepositTx", "failureReason": reason}
            return self._respond(S.POST_TX_ERROR, error, status=400)
        total = sum((value_from_json(out["value"]) for out in utxo.values()), Value(0))
        inputs = [TransactionInput(TransactionId(bytes.fromhex(ref[:64])), int(ref[65:])) for ref in utxo]
        body = TransactionBody(inputs=inputs, outputs=[TransactionOutput(DEPOSIT_ADDRESS, total)], fee=0)
        draft = Transaction(body, TransactionWitnessSet())
        envelope = _envelope(draft)
        deadline = _now() + timedelta(seconds=self.deposit_period_s)
        self.deposits[envelope["txId"]] = Deposit(envelope["txId"], dict(utxo), deadline)
        return self._respond(S.DRAFT_COMMIT_RESPONSE, envelope)

    async def _http_l1_transaction(self, request: web.Request) -> web.Response:
        envelope = await self._json_body(request, S.TRANSACTION)
        tx = Transaction.from_cbor(envelope["cborHex"])
        try:
            self.l1_utxo = self._apply(self.l1_utxo, tx)
        except LedgerRejection as exc:
            error = {"tag": "FailedToPostTx", "failureReason": str(exc), "failingTx": _envelope(tx)}
            return self._respond(S.POST_TX_ERROR, error, status=400)
        deposit = self.deposits.get(_envelope(tx)["txId"])
        if deposit is not None:
            self._loop.create_task(self._observe_deposit(deposit))
        return self._respond(S.L1_TX_SUBMITTED, {"tag": "TransactionSubmitted"})

    async def _observe_deposit(self, deposit: Deposit) -> None:
        """The deposit lands on L1: recorded, then (unless jammed) committed into the head."""
        deposit.status = "recorded"
        await self._emit("CommitRecorded", headId=self.head_id, utxoToCommit=deposit.utxo,
                         pendingDeposit=deposit.tx_id, deadline=_iso(deposit.deadline))
        if self.jam_deposits:
            await asyncio.sleep(max(0.0, (deposit.deadline - _now()).total_seconds()))
            if deposit.status != "recorded":
                return  # recovered at the deadline already
            deposit.status = "expired"
            await self._emit("DepositExpired", headId=self.head_id, depositTxId=deposit.tx_id,
                             deadline=_iso(deposit.deadline), chainTime=_iso(_now()))
            return
        await self._emit("DepositActivated", headId=self.head_id, depositTxId=deposit.tx_id,
                         deadline=_iso(deposit.deadline), chainTime=_iso(_now()))
        await self._emit("CommitApproved", headId=self.head_id, utxoToCommit=deposit.utxo)
        last = self.snapshots[-1]
        await self._confirm(Snapshot(number=last.number + 1, version=last.version + 1,
                                     utxo={**last.utxo, **deposit.utxo}, utxo_to_commit=deposit.utxo))
        del self.l1_utxo[f"{deposit.tx_id}#0"]
        deposit.status = "finalized"
        await self._emit("CommitFinalized", headId=self.head_id, depositTxId=deposit.tx_id)

    async def _http_recover(self, request: web.Request) -> web.Response:
        problem = await self._recover(request.match_info["tx_id"])
        if problem is not None:
            return self._respond(S.RECOVER_DEPOSIT_RESPONSE, problem["postTxError"]["failureReason"], 400)
        return self._respond(S.RECOVER_DEPOSIT_RESPONSE, "OK")

    async def _http_l2_transaction(self, request: web.Request) -> web.Response:
        envelope = await self._json_body(request, S.TRANSACTION)
        tx = Transaction.from_cbor(envelope["cborHex"])
        if self.phase is not Phase.OPEN:
            rejected = {"tag": "SubmitTxRejected", "reason": "head not open"}
            return self._respond(S.SUBMIT_L2_TX_RESPONSE, rejected, 503)
        try:
            new_utxo = self._apply(self.head_utxo, tx)
        except LedgerRejection as exc:
            return self._respond(S.SUBMIT_L2_TX_RESPONSE,
                                 {"tag": "SubmitTxInvalid", "validationError": str(exc)}, 400)
        await self._emit("TxValid", headId=self.head_id, transactionId=_envelope(tx)["txId"])
        last = self.snapshots[-1]
        await self._confirm(Snapshot(number=last.number + 1, version=last.version, utxo=new_utxo,
                                     confirmed=[_envelope(tx)]))
        return self._respond(S.SUBMIT_L2_TX_RESPONSE, {"tag": "SubmitTxConfirmed",
                                                        "snapshotNumber": self.snapshots[-1].number})

    # -- JSON views of the state ------------------------------------------------------------

    def _parameters(self) -> dict[str, Any]:
        return {"contestationPeriod": self.contestation_period_s, "depositPeriod": self.deposit_period_s,
                "parties": [{"vkey": self.party_key.verify_key.encode().hex()}]}

    def _snapshot_json(self, snapshot: Snapshot) -> dict[str, Any]:
        return {"headId": self.head_id, "version": snapshot.version, "number": snapshot.number,
                "confirmed": snapshot.confirmed, "utxo": snapshot.utxo,
                "utxoToCommit": snapshot.utxo_to_commit, "utxoToDecommit": snapshot.utxo_to_decommit}

    def _confirmed_json(self, snapshot: Snapshot) -> dict[str, Any]:
        if snapshot.number == 0:
            return {"tag": "InitialSnapshot", "headId": self.head_id, "initialUTxO": snapshot.utxo}
        body = self._snapshot_json(snapshot)
        # One party: its signature over the snapshot is the whole multi-signature.
        signature = self.party_key.sign(json.dumps(body, sort_keys=True).encode()).signature.hex()
        return {"tag": "ConfirmedSnapshot", "snapshot": body, "signatures": {"multiSignature": [signature]}}

    def head_state(self) -> dict[str, Any]:
        if self.phase in (Phase.IDLE, Phase.FINAL):
            return {"tag": "Idle", "contents": {"chainState": {}}}
        latest = self.snapshots[-1]
        if self.phase is Phase.OPEN:
            return {"tag": "Open", "contents": {
                "parameters": self._parameters(), "chainState": {}, "headId": self.head_id,
                "headSeed": self.head_seed, "coordinatedHeadState": {
                    "localUTxO": latest.utxo, "localTxs": [], "allTxs": {},
                    "confirmedSnapshot": self._confirmed_json(latest),
                    "seenSnapshot": {"tag": "NoSeenSnapshot"},
                    "currentDepositTxId": None, "decommitTx": None, "version": latest.version}}}
        assert self.closed_snapshot is not None and self.contestation_deadline is not None
        return {"tag": "Closed", "contents": {
            "parameters": self._parameters(), "confirmedSnapshot": self._confirmed_json(self.closed_snapshot),
            "contestationDeadline": _iso(self.contestation_deadline),
            "readyToFanoutSent": self.phase is Phase.FANOUT_POSSIBLE, "chainState": {},
            "headId": self.head_id, "headSeed": self.head_seed, "version": self.closed_snapshot.version}}


def _value(amount: Value | int) -> Value:
    return amount if isinstance(amount, Value) else Value(amount)


def _envelope(tx: Transaction) -> dict[str, str]:
    witnessed = bool(tx.transaction_witness_set.vkey_witnesses)
    return {"type": "Witnessed Tx ConwayEra" if witnessed else "Unwitnessed Tx ConwayEra",
            "description": "Ledger Cddl Format", "cborHex": tx.to_cbor_hex(),
            "txId": tx.transaction_body.hash().hex()}


def _produced(tx: Transaction) -> dict[str, Any]:
    tx_id = tx.transaction_body.hash().hex()
    return {f"{tx_id}#{i}": txout_to_json(out) for i, out in enumerate(tx.transaction_body.outputs)}


def _recover_outputs(deposit: Deposit) -> dict[str, Any]:
    """The recover transaction pays each deposited output back to its owner."""
    outputs = [TransactionOutput(Address.from_primitive(out["address"]), value_from_json(out["value"]))
               for out in deposit.utxo.values()]
    body = TransactionBody(inputs=[TransactionInput(TransactionId(bytes.fromhex(deposit.tx_id)), 0)],
                           outputs=outputs, fee=0)
    tx_id = body.hash().hex()
    return {f"{tx_id}#{i}": {"address": str(o.address), "value": value_to_json(o.amount)}
            for i, o in enumerate(outputs)}
