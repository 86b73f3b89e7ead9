"""Settlement on a Hydra head: a client of hydra-node's published WebSocket/HTTP API.

Concurrency: trio, like the rest of the node. The WebSocket is trio-websocket and HTTP
is httpx (which runs on trio through anyio), so `HydraClient.run()` is one more task
in the daemon's nursery; no second event loop, no thread.

Contract with hydra-node (api.yaml, AsyncAPI 2.3; see node/settlement/hydra_schema.py):
- every client input and HTTP request body is validated before it is sent; a failure
  is our bug and raises OutgoingMessageInvalid (a LocalProtocolError);
- every server output and HTTP response is validated before it is used; a failure is
  the peer's, is logged and counted by reason (`peer_errors`, `on_peer_error`) and the
  message is dropped; the connection stays up.

Reconnection: when the WebSocket drops, `run()` reconnects with capped exponential
backoff, each wait jittered to 50-100 %. The new Greetings (headStatus, hydraHeadId,
snapshotUtxo) and GET /snapshot replace the head view. NewTx still pending (sent, neither confirmed nor
rejected) are then settled against the confirmed UTxO: a transaction any of whose
outputs is there, or which the latest snapshot lists, is reported confirmed; one whose
inputs are all still unspent is resubmitted (same bytes, same id: a head cannot apply
it twice); any other is reported to its caller as TxDropped, to be rebuilt.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import trio
import trio_websocket
from pycardano import PaymentSigningKey, Transaction

from node.settlement import hydra_schema as schemas
from node.settlement.hydra_schema import HydraApiSchema, IncomingMessageInvalid, parse_json_frame
from node.settlement.hydra_tx import (
    produced_utxo,
    sign_transaction,
    spent_refs,
    tx_envelope,
    tx_from_envelope,
    tx_id_hex,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger("sealmesh.settlement.hydra")

DEFAULT_WS_URL = "ws://127.0.0.1:4001"
# Events the client makes itself while resyncing; they never come from the wire.
RESYNC_CONFIRMED = "sealmesh.TxConfirmedOnResync"
RESYNC_DROPPED = "sealmesh.TxDroppedOnResync"


@dataclass(frozen=True)
class HydraSettings:
    ws_url: str = DEFAULT_WS_URL
    http_url: str | None = None  # hydra-node serves HTTP on the WebSocket's host:port
    history: bool = False  # replaying the node's whole history is for explorers
    snapshot_utxo: bool = True
    auto_contest: bool = True  # contest a Close that used an older snapshot than ours
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 10.0
    deposit_timeout_s: float = 600.0
    http_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 2**20  # a Greetings carries the whole head UTxO

    def channel_url(self) -> str:
        """The WebSocket channel `/` with the query options the schema defines."""
        parts = urlsplit(self.ws_url)
        query = {"history": "yes" if self.history else "no"}
        if not self.snapshot_utxo:
            query["snapshot-utxo"] = "no"
        return urlunsplit((parts.scheme, parts.netloc, "/", urlencode(query), ""))

    def http_base(self) -> str:
        if self.http_url:
            return self.http_url.rstrip("/")
        parts = urlsplit(self.ws_url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
        if scheme is None:
            raise LocalProtocolError(f"hydra URL {self.ws_url!r} must start with ws:// or wss://")
        return f"{scheme}://{parts.netloc}"


# -- errors ----------------------------------------------------------------------------


class HydraRefused(RemoteProtocolError):
    """hydra-node answered a well-formed command with a refusal (CommandFailed...)."""

    reason = "command_failed"

    def __init__(self, hint: str, *, output: Mapping[str, Any] | None = None, reason: str | None = None):
        super().__init__(hint, reason=reason)
        self.output = output


class HydraPostTxFailed(HydraRefused):
    reason = "post_tx_failed"


class HydraUnsynced(HydraRefused):
    reason = "node_unsynced"


class TxRejected(HydraRefused):
    reason = "tx_invalid"


class TxDropped(HydraRefused):
    """A NewTx lost while disconnected whose inputs are now gone: rebuild it."""

    reason = "tx_dropped"


class DecommitRejected(HydraRefused):
    reason = "decommit_invalid"


class DepositJammed(HydraRefused):
    reason = "deposit_jammed"


class HydraHttpError(RemoteProtocolError):
    reason = "http_error"

    def __init__(self, hint: str, *, status: int) -> None:
        super().__init__(hint)
        self.status = status


class HydraUnreachable(ConnectionError):
    """The HTTP API did not answer at all (refused, reset, timed out)."""


class InputRejectedByNode(LocalProtocolError):
    """hydra-node could not parse our input (InvalidInput): our encoder and its disagree."""

    reason = "invalid_input"


# -- the head as the node reports it (sans-IO) ---------------------------------------------

# Server output -> head status after it (HeadStatus values of the schema).
STATUS_AFTER = {
    "HeadIsOpen": "Open", "HeadIsClosed": "Closed", "HeadIsContested": "Closed",
    "ReadyToFanout": "FanoutPossible", "HeadPartiallyFannedOut": "FanningOut", "HeadIsFinalized": "Idle",
}


@dataclass
class HeadView:
    """What the node last told us about the head; fed validated outputs in order."""

    status: str = "Idle"
    head_id: str | None = None
    snapshot_number: int | None = None
    confirmed_utxo: dict[str, Any] = field(default_factory=dict)
    closed_snapshot_number: int | None = None
    contestation_deadline: str | None = None
    finalized_utxo: dict[str, Any] | None = None
    node_version: str | None = None
    last_seq: int = -1

    def is_new(self, output: Mapping[str, Any]) -> bool:
        """False for an output already applied (a history replay after reconnecting)."""
        seq = output.get("seq")
        return seq is None or seq > self.last_seq

    def apply(self, output: Mapping[str, Any]) -> None:
        tag = output["tag"]
        if isinstance(output.get("seq"), int):
            self.last_seq = max(self.last_seq, output["seq"])
        if tag == "Greetings":
            self.status, self.head_id = output["headStatus"], output.get("hydraHeadId")
            self.node_version = output["hydraNodeVersion"]
            if "snapshotUtxo" in output:
                self.confirmed_utxo = dict(output["snapshotUtxo"])
            return
        self.status = STATUS_AFTER.get(tag, self.status)
        if tag == "HeadIsOpen":
            self.head_id, self.snapshot_number, self.confirmed_utxo = output["headId"], 0, {}
            self.finalized_utxo = self.closed_snapshot_number = self.contestation_deadline = None
        elif tag == "SnapshotConfirmed":
            self.snapshot_number = output["snapshot"]["number"]
            self.confirmed_utxo = dict(output["snapshot"].get("utxo", self.confirmed_utxo))
        elif tag in ("HeadIsClosed", "HeadIsContested"):
            self.closed_snapshot_number = output["snapshotNumber"]
            self.contestation_deadline = output["contestationDeadline"]
        elif tag == "HeadIsFinalized":
            self.finalized_utxo = dict(output["finalizedUTxO"])
            self.confirmed_utxo, self.snapshot_number = {}, None


@dataclass(frozen=True)
class TxConfirmed:
    tx_id: str
    snapshot_number: int | None  # None when learnt from a resync without a snapshot


@dataclass(frozen=True)
class DepositOutcome:
    status: Literal["committed", "recovered"]
    deposit_tx_id: str
    utxo: dict[str, Any]  # committed into the head, or recovered back on layer 1


def _envelope_id(envelope: Mapping[str, Any]) -> str | None:
    if "txId" in envelope:
        return envelope["txId"]
    try:
        return tx_id_hex(tx_from_envelope(envelope))
    except RemoteProtocolError:
        return None


def _refusal_of(output: Mapping[str, Any], input_tag: str, post_tx: Callable[[Mapping], bool]) -> bool:
    """Does `output` refuse our `input_tag` command?"""
    tag = output["tag"]
    if tag in ("CommandFailed", "RejectedInputBecauseUnsynced", "SideLoadSnapshotRejected"):
        return output["clientInput"].get("tag") == input_tag
    if tag == "PostTxOnChainFailed":
        return post_tx(output["postChainTx"])
    if tag == "InvalidInput":
        try:
            return json.loads(output["input"]).get("tag") == input_tag
        except (ValueError, AttributeError):
            return False
    return False


def _raise_refusal(output: Mapping[str, Any]) -> None:
    tag = output["tag"]
    if tag == "PostTxOnChainFailed":
        error = output["postTxError"]
        raise HydraPostTxFailed(f"{output['postChainTx']['tag']} failed on chain: {error.get('tag')} "
                                f"{error.get('failureReason', '')}".strip(), output=output)
    if tag == "RejectedInputBecauseUnsynced":
        raise HydraUnsynced(f"node is {output['drift']}s behind the chain; retry when it reports NodeSynced",
                            output=output)
    if tag == "InvalidInput":
        raise InputRejectedByNode(f"hydra-node could not parse our input: {output['reason']}")
    state = output.get("state", {}).get("tag", "?")
    raise HydraRefused(f"hydra-node refused {output['clientInput'].get('tag')} in head state {state}",
                       output=output)


# -- the client ------------------------------------------------------------------------


class HydraClient:
    """One connection to one hydra-node; start `run()` in a nursery, then call commands."""

    def __init__(self, settings: HydraSettings, schema: HydraApiSchema, *,
                 on_peer_error: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.schema = schema
        self.head = HeadView()
        self.peer_errors: Counter[str] = Counter()
        self.connections = 0  # WebSocket sessions that reached Greetings
        self._on_peer_error = on_peer_error
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._connected = trio.Event()
        self._changed = trio.Event()
        self._subscribers: list[tuple[Callable[[Mapping[str, Any]], bool], trio.MemorySendChannel]] = []
        self._pending: dict[str, Transaction] = {}  # NewTx sent, neither confirmed nor rejected
        self._http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None

    # -- connection ------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled; `started` once the first Greetings is in."""
        s = self.settings
        async with httpx.AsyncClient(base_url=s.http_base(), timeout=s.http_timeout_s) as http, \
                trio.open_nursery() as nursery:
            self._http, self._nursery = http, nursery
            backoff = s.reconnect_initial_s
            while True:
                try:
                    async with trio_websocket.open_websocket_url(
                            s.channel_url(), max_message_size=s.max_message_bytes,
                            connect_timeout=s.connect_timeout_s, disconnect_timeout=1) as ws:
                        await self._greet(ws)
                        if self.connections == 1:
                            task_status.started()
                        backoff = s.reconnect_initial_s
                        while True:
                            await self._receive(ws)
                except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError,
                        trio_websocket.DisconnectionTimeout, OSError) as exc:
                    log.warning("hydra-node WebSocket %s lost (%r); reconnecting", s.ws_url, exc)
                finally:
                    self._connected, self._ws = trio.Event(), None
                await trio.sleep(random.uniform(0.5, 1.0) * backoff)
                backoff = min(backoff * 2, s.reconnect_max_s)

    async def _greet(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Read (history, then) Greetings; adopt its view of the head and resync."""
        while True:
            output = await self._read_valid(ws)
            if output is None:
                continue
            if output["tag"] == "Greetings":
                break
            self._deliver(output)  # history replay: seq filters what we already saw
        self.head.apply(output)
        self.connections += 1
        log.info("hydra-node %s: head %s, status %s (connection %d)", output["hydraNodeVersion"],
                 output.get("hydraHeadId"), output["headStatus"], self.connections)
        self._ws = ws
        self._connected.set()
        await self._resync(output)
        self._wake()

    async def _read_valid(self, ws: trio_websocket.WebSocketConnection) -> dict[str, Any] | None:
        frame = await ws.get_message()
        try:
            output = parse_json_frame(frame)
            self.schema.check_server_output(output)
            return output
        except IncomingMessageInvalid as exc:
            self._peer_error(exc)
            return None

    async def _receive(self, ws: trio_websocket.WebSocketConnection) -> None:
        output = await self._read_valid(ws)
        if output is not None:
            self._deliver(output)

    def _peer_error(self, exc: RemoteProtocolError) -> None:
        self.peer_errors[exc.reason] += 1
        log.warning("hydra-node peer error (%s): %s", exc.reason, exc.hint)
        if self._on_peer_error is not None:
            self._on_peer_error(exc.reason)

    def _deliver(self, output: dict[str, Any]) -> None:
        if not self.head.is_new(output):
            return
        closed_older = (output["tag"] == "HeadIsClosed" and self.head.snapshot_number is not None
                        and output["snapshotNumber"] < self.head.snapshot_number)
        self.head.apply(output)
        self._notify(output)
        self._wake()
        if closed_older and self.settings.auto_contest and self._nursery is not None:
            self._nursery.start_soon(self._auto_contest, output["snapshotNumber"])

    def _notify(self, event: Mapping[str, Any]) -> None:
        for wants, channel in list(self._subscribers):
            if wants(event):
                channel.send_nowait(event)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _auto_contest(self, closed_number: int) -> None:
        log.warning("head closed with snapshot %d but we hold %s: contesting", closed_number,
                    self.head.snapshot_number)
        try:
            await self.contest()
        except HydraRefused as exc:  # the node may have contested on its own already
            log.warning("contest refused (%s): %s", exc.reason, exc.hint)

    async def _resync(self, greetings: Mapping[str, Any]) -> None:
        """After (re)connecting: snapshot number from GET /snapshot, then settle pending NewTx."""
        if greetings["headStatus"] == "Idle":
            return
        try:
            snapshot = await self.get_snapshot()
            utxo = greetings.get("snapshotUtxo")
            if utxo is None and self._pending:
                utxo = await self.get_snapshot_utxo()
        except (HydraHttpError, HydraUnreachable, IncomingMessageInvalid) as exc:
            # Pending NewTx stay pending: their SnapshotConfirmed may still come, or the next resync.
            log.warning("resync after reconnect incomplete: %s", exc)
            return
        confirmed_ids: set[str] = set()
        if snapshot["tag"] == "InitialSnapshot":
            self.head.snapshot_number = 0
        else:
            self.head.snapshot_number = snapshot["snapshot"]["number"]
            confirmed_ids = {i for i in map(_envelope_id, snapshot["snapshot"]["confirmed"]) if i}
        for tx_id, tx in list(self._pending.items()):
            assert utxo is not None
            if tx_id in confirmed_ids or any(ref in utxo for ref in produced_utxo(tx)):
                self._notify({"tag": RESYNC_CONFIRMED, "txId": tx_id,
                              "snapshotNumber": self.head.snapshot_number})
            elif all(ref in utxo for ref in spent_refs(tx)):
                log.info("resync: resubmitting NewTx %s sent before the connection dropped", tx_id)
                await self._send({"tag": "NewTx", "transaction": tx_envelope(tx)})
            else:
                self._notify({"tag": RESYNC_DROPPED, "txId": tx_id})

    # -- sending and waiting --------------------------------------------------------------

    async def _send(self, message: Mapping[str, Any]) -> None:
        """Validate, then send on the current connection (waiting for one if needed)."""
        self.schema.check_client_input(message)
        text = json.dumps(message)
        while True:
            await self._connected.wait()
            ws = self._ws
            if ws is None:
                continue
            try:
                await ws.send_message(text)
                return
            except trio_websocket.ConnectionClosed:
                await trio.sleep(0.01)  # not delivered; retry once run() has reconnected

    @contextmanager
    def _subscribe(self, wants: Callable[[Mapping[str, Any]], bool]) -> Iterator[trio.MemoryReceiveChannel]:
        send, receive = trio.open_memory_channel(math.inf)
        entry = (wants, send)
        self._subscribers.append(entry)
        try:
            yield receive
        finally:
            self._subscribers.remove(entry)

    async def _command(self, message: Mapping[str, Any], done: Callable[[Mapping[str, Any]], bool],
                       post_tx: Callable[[Mapping[str, Any]], bool] = lambda _: False) -> dict[str, Any]:
        """Send one client input; return the output that completes it, raise its refusal."""
        tag = message["tag"]
        self.schema.check_client_input(message)
        with self._subscribe(lambda o: done(o) or _refusal_of(o, tag, post_tx)) as inbox:
            await self._send(message)
            output = await inbox.receive()
        if done(output):
            return dict(output)
        _raise_refusal(output)
        raise AssertionError("unreachable")

    async def wait_until(self, ready: Callable[[HeadView], bool]) -> HeadView:
        """Block until the head view satisfies `ready` (wrap in trio.fail_after)."""
        while not ready(self.head):
            await self._changed.wait()
        return self.head

    # -- WebSocket commands -------------------------------------------------------------

    async def init(self) -> dict[str, Any]:
        return await self._command({"tag": "Init"}, lambda o: o["tag"] == "HeadIsOpen",
                                   lambda p: p["tag"] == "InitTx")

    async def submit_tx(self, tx: Transaction) -> TxConfirmed:
        """NewTx; returns once a snapshot confirms it. TxInvalid raises TxRejected."""
        tx_id = tx_id_hex(tx)
        message = {"tag": "NewTx", "transaction": tx_envelope(tx)}
        self.schema.check_client_input(message)

        def concerns(o: Mapping[str, Any]) -> bool:
            tag = o["tag"]
            if tag == "TxValid":
                return o["transactionId"] == tx_id
            if tag == "TxInvalid":
                return _envelope_id(o["transaction"]) == tx_id
            if tag == "SnapshotConfirmed":
                return tx_id in {_envelope_id(t) for t in o["snapshot"]["confirmed"]}
            if tag in (RESYNC_CONFIRMED, RESYNC_DROPPED):
                return o["txId"] == tx_id
            return _refusal_of(o, "NewTx", lambda _: False) and \
                _envelope_id(o.get("clientInput", {}).get("transaction", {})) in (tx_id, None)

        with self._subscribe(concerns) as inbox:
            self._pending[tx_id] = tx
            try:
                await self._send(message)
                async for output in inbox:
                    tag = output["tag"]
                    if tag == "TxValid":
                        continue  # valid against the local ledger; wait for the snapshot
                    if tag == "SnapshotConfirmed":
                        return TxConfirmed(tx_id, output["snapshot"]["number"])
                    if tag == RESYNC_CONFIRMED:
                        return TxConfirmed(tx_id, output["snapshotNumber"])
                    if tag == "TxInvalid":
                        reason = output["validationError"].get("reason", "no reason given")
                        raise TxRejected(f"transaction {tx_id} rejected by the head: {reason}", output=output)
                    if tag == RESYNC_DROPPED:
                        raise TxDropped(f"transaction {tx_id} was lost while disconnected and its inputs "
                                        "are spent; rebuild it from the confirmed UTxO")
                    _raise_refusal(output)
            finally:
                self._pending.pop(tx_id, None)
        raise AssertionError("unreachable")

    async def close(self, *, safe: bool = False) -> dict[str, Any]:
        """Close (or SafeClose, which refuses heads holding non-ADA assets)."""
        return await self._command({"tag": "SafeClose" if safe else "Close"},
                                   lambda o: o["tag"] == "HeadIsClosed", lambda p: p["tag"] == "CloseTx")

    async def contest(self) -> dict[str, Any]:
        return await self._command({"tag": "Contest"}, lambda o: o["tag"] == "HeadIsContested",
                                   lambda p: p["tag"] == "ContestTx")

    async def fanout(self) -> dict[str, Any]:
        return await self._command({"tag": "Fanout"}, lambda o: o["tag"] == "HeadIsFinalized",
                                   lambda p: p["tag"] == "FanoutTx")

    async def recover(self, deposit_tx_id: str) -> dict[str, Any]:
        """Take a deposit that never made it into the head back to layer 1."""
        return await self._command(
            {"tag": "Recover", "recoverTxId": deposit_tx_id},
            lambda o: o["tag"] == "CommitRecovered" and o["recoveredTxId"] == deposit_tx_id,
            lambda p: p["tag"] == "RecoverTx" and p["recoverTxId"] == deposit_tx_id)

    async def decommit(self, tx: Transaction) -> dict[str, Any]:
        """Move the outputs of `tx` out of the head to layer 1; returns DecommitFinalized."""
        tx_id = tx_id_hex(tx)
        message = {"tag": "Decommit", "decommitTx": tx_envelope(tx)}
        approved: list[bool] = []  # set by the reader as it delivers, so no Finalized is missed

        def concerns(o: Mapping[str, Any]) -> bool:
            tag = o["tag"]
            if tag in ("DecommitRequested", "DecommitInvalid"):
                return _envelope_id(o["decommitTx"]) == tx_id
            if tag == "DecommitApproved" and o["decommitTxId"] == tx_id:
                approved.append(True)  # hydra-node runs one decommit at a time: the next Finalized is ours
                return False
            return (tag == "DecommitFinalized" and bool(approved)) or _refusal_of(
                o, "Decommit", lambda p: p["tag"] == "DecrementTx")

        self.schema.check_client_input(message)
        with self._subscribe(concerns) as inbox:
            await self._send(message)
            async for output in inbox:
                tag = output["tag"]
                if tag == "DecommitFinalized":
                    return dict(output)
                if tag == "DecommitInvalid":
                    why = output["decommitInvalidReason"]
                    raise DecommitRejected(f"decommit {tx_id} refused: {why['tag']}", output=output)
                if tag != "DecommitRequested":
                    _raise_refusal(output)
        raise AssertionError("unreachable")

    # -- HTTP -----------------------------------------------------------------------------

    async def _http_json(self, method: str, path: str, response_schema: str | Mapping[int, str], *,
                         body: Any = None, body_schema: str | None = None) -> tuple[int, Any]:
        """One request; `response_schema` maps each accepted HTTP status to its payload schema."""
        if self._http is None:
            raise LocalProtocolError("HydraClient.run() must be running before HTTP calls")
        by_status = {200: response_schema} if isinstance(response_schema, str) else dict(response_schema)
        if body_schema is not None:
            self.schema.check_outgoing(body_schema, body)
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise HydraUnreachable(f"{method} {self._http.base_url}{path} failed: {exc!r}; is hydra-node "
                                   "running there (check --hydra-url)?") from exc
        if response.status_code not in by_status:
            raise HydraHttpError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}",
                                 status=response.status_code)
        try:
            data = response.json()
            self.schema.check_incoming(by_status[response.status_code], data)
        except ValueError:
            error = IncomingMessageInvalid(f"{method} {path}: response is not JSON")
            self._peer_error(error)
            raise error from None
        except IncomingMessageInvalid as exc:
            self._peer_error(exc)
            raise
        return response.status_code, data

    async def get_head(self) -> dict[str, Any]:
        return (await self._http_json("GET", "/head", schemas.HEAD_STATE))[1]

    async def get_snapshot(self) -> dict[str, Any]:
        return (await self._http_json("GET", "/snapshot", schemas.CONFIRMED_SNAPSHOT))[1]

    async def get_snapshot_utxo(self) -> dict[str, Any]:
        return (await self._http_json("GET", "/snapshot/utxo", schemas.UTXO))[1]

    async def get_protocol_parameters(self) -> dict[str, Any]:
        return (await self._http_json("GET", "/protocol-parameters", schemas.PROTOCOL_PARAMETERS))[1]

    async def pending_deposits(self) -> list[str]:
        return (await self._http_json("GET", "/commits", schemas.PENDING_DEPOSITS))[1]

    async def post_transaction(self, tx: Transaction) -> dict[str, Any]:
        """POST /transaction: submit to the head over HTTP; waits for confirmation there."""
        accepted = dict.fromkeys((200, 202, 400, 503), schemas.SUBMIT_L2_TX_RESPONSE)
        _, data = await self._http_json("POST", "/transaction", accepted,
                                        body=tx_envelope(tx), body_schema=schemas.TRANSACTION)
        if data["tag"] == "SubmitTxInvalid":
            raise TxRejected(f"transaction {tx_id_hex(tx)} rejected: {data['validationError']}", output=data)
        if data["tag"] == "SubmitTxRejected":
            raise HydraUnsynced(f"transaction {tx_id_hex(tx)} not taken: {data['reason']}", output=data)
        return data

    async def draft_commit(self, utxo: Mapping[str, Any]) -> Transaction:
        """POST /commit: hydra-node drafts a deposit transaction for `utxo` (layer-1 UTxO)."""
        status, data = await self._http_json(
            "POST", "/commit", {200: schemas.DRAFT_COMMIT_RESPONSE, 400: schemas.POST_TX_ERROR},
            body={"utxoToCommit": dict(utxo)}, body_schema=schemas.DRAFT_COMMIT_REQUEST)
        if status == 400:
            raise HydraPostTxFailed(f"hydra-node cannot draft a deposit: {data['tag']} "
                                    f"{data.get('failureReason', '')}".strip(), output=data)
        return tx_from_envelope(data)

    async def submit_l1_tx(self, tx: Transaction) -> None:
        """POST /cardano-transaction: hydra-node posts a signed transaction to layer 1."""
        status, data = await self._http_json(
            "POST", "/cardano-transaction", {200: schemas.L1_TX_SUBMITTED, 400: schemas.POST_TX_ERROR},
            body=tx_envelope(tx), body_schema=schemas.TRANSACTION)
        if status != 200:
            raise HydraPostTxFailed(f"layer-1 submission of {tx_id_hex(tx)} failed: {data.get('tag')} "
                                    f"{data.get('failureReason', '')}".strip(), output=data)

    async def deposit(self, utxo: Mapping[str, Any], signing_keys: Sequence[PaymentSigningKey], *,
                      timeout_s: float | None = None) -> DepositOutcome:
        """Commit layer-1 `utxo` into the open head by deposit; recover it if it jams.

        A deposit that is not committed within `timeout_s` (or that the node reports
        expired) is recovered once its deadline passes: hydra-node issues #2102, #2446,
        #2623 and #2797 report deposits that never get picked up and stall a head.
        """
        timeout = self.settings.deposit_timeout_s if timeout_s is None else timeout_s
        draft = await self.draft_commit(utxo)
        signed = sign_transaction(draft, signing_keys)
        deposit_id = tx_id_hex(signed)

        def concerns(o: Mapping[str, Any]) -> bool:
            return (o["tag"] == "CommitRecorded" and o["pendingDeposit"] == deposit_id) or \
                (o["tag"] in ("CommitFinalized", "DepositExpired") and o["depositTxId"] == deposit_id)

        deadline: datetime | None = None
        with self._subscribe(concerns) as inbox:
            await self.submit_l1_tx(signed)
            with trio.move_on_after(timeout):
                async for output in inbox:
                    if output["tag"] == "CommitRecorded":
                        deadline = datetime.fromisoformat(output["deadline"])
                    elif output["tag"] == "CommitFinalized":
                        return DepositOutcome("committed", deposit_id, dict(utxo))
                    else:
                        break  # DepositExpired
            log.warning("deposit %s not committed after %.1fs; recovering it", deposit_id, timeout)
            if deadline is not None:  # the node only allows Recover after the deposit deadline
                wait_s = (deadline - datetime.now(timezone.utc)).total_seconds()
                with trio.move_on_after(max(0.0, wait_s)):
                    async for output in inbox:
                        if output["tag"] == "CommitFinalized":  # it made it after all
                            return DepositOutcome("committed", deposit_id, dict(utxo))
                        if output["tag"] == "DepositExpired":
                            break
        try:
            recovered = await self.recover(deposit_id)
        except HydraPostTxFailed as exc:
            raise DepositJammed(f"deposit {deposit_id} is neither committed nor recoverable yet "
                                f"({exc.hint}); call recover({deposit_id!r}) after its deadline",
                                output=exc.output) from exc
        return DepositOutcome("recovered", deposit_id, recovered["recoveredUTxO"])
