"""Settlement role: validators co-sign round results and miner scores on a head.

Runs on every validator, over the settle channel. Backend "embedded" (default) is the
validators' own multi-signed head (protocol/head/ in node/settlement/embedded.py);
backend "hydra" drives a hydra-node (HydraSettlementService below). Lifecycle of the
embedded head, as this service drives it (docs/settlement.md, "Running it"):

  every validator heard -> rank 0 (lowest hotkey) Inits -> every party Commits ->
  Open: every party feeds its own round results and epoch scores to its machine
  (ObserveRound/ObserveEpoch); rank 0 authors one RoundResult per round and one
  ScoreReport per epoch; the others co-sign only records equal to their own view ->
  this node's other role sections say done and the agreed records are confirmed ->
  rank 0 Closes -> contestation period -> every party Fans out -> "Final"

Only rank 0 authors records (protocol/head_rules.scheduled_author): every validator
reaches the same round result, and a round or epoch can be settled once, so one author
avoids racing duplicates that the ledger would refuse. Other validators check each
record against their own RoundFinal and the reward rule (issue 11, finding 2) and
co-sign each snapshot.

Gossip gives no delivery guarantee while a topic's mesh is forming, so while the head
is Initializing each party repeats its Init/Commit, and while a snapshot waits for
signatures each party repeats its AckSn (the leader its ReqSn; a party that refused
it, its signed NackSn). These are the same
bytes again; the machine treats them as duplicates.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import trio

from node.clock import now_ms
from node.roles.base import RoleContext, RoleService
from node.settings import NodeSettings, SettingsError
from node.settlement.embedded import EmbeddedHead, Outbound
from protocol import head as h
from protocol import head_rules as rules
from protocol import member_book as mb
from protocol import round_catchup as rc
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.head_messages import (HeadAckSn, HeadClose, HeadCommit, HeadInit, HeadMessage, HeadNackSn,
                                    HeadReqSn)
from protocol.membership import Role
from protocol.messages import Channel, Message
from protocol.offences import OffenceViews, named_offenders

log = logging.getLogger("sealmesh.settlement")

REPORT_SECTION = "settlement"
# Opening amounts each party commits (ledger units, not tokens): the reward pool pays
# ROUND_REWARD per settled round among its contributors and EPOCH_REWARD per epoch
# among miners by weight.
ESCROW = 100
OPENING_BALANCE = 1_000
POOL_SHARE = 10_000
ROUND_REWARD = 120
EPOCH_REWARD = 120
# Longer than a node restart, so an outage does not look like withholding: a restart on a
# busy 2-core machine (imports, model load, rejoining gossip) was measured at 38 s, past
# the 30 s this was, and the restarted validator was slashed. A withholding party still
# costs the head only this long, while rounds go on.
SIGN_TIMEOUT_MS = 120_000
DEPOSIT_PERIOD_SNAPSHOTS = 6  # a deposit may be absorbed by the next 6 snapshots (two turns of 3 leaders)
RESEND_MS = 2_000
STEP_S = 0.2
INBOX = 1024
COMMANDS_DIR = "settlement-commands"  # `sealmesh head close|fanout` drop a file here
COMMANDS = ("close", "fanout", "withdraw", "member_slash")
OFFENCES_FILE = "offences.json"  # this validator's round views that a MemberSlash must match


split_reward = rules.split_reward  # the reward rule lives in protocol/head_rules


def round_rewards(doc: dict[str, Any]) -> dict[str, int]:
    return rules.round_rewards(sorted(set(doc.get("contributors", []))), ROUND_REWARD)


def epoch_rewards(doc: dict[str, Any]) -> dict[str, int]:
    return rules.epoch_rewards({k: float(v) for k, v in doc["scores"].items()}, EPOCH_REWARD)


class SettlementService(RoleService):
    name = "settlement"
    channels = frozenset({Channel.SETTLE})

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, HeadMessage, int]](INBOX)
        self.head: EmbeddedHead | None = None
        self.parties: list[str] = []
        self.me = ""
        self.queue: list[dict[str, Any]] = []  # our views, and (rank 0) records waiting for an Open head
        self.rejected: dict[str, int] = {}
        self.errors: list[str] = []
        self.offences = OffenceViews()  # whom our own rounds named (protocol/offences.py)
        self.misbehaved = False
        self.inbox_dropped = 0
        self._lock = trio.Lock()
        self._unsent = False
        self._resent_at = 0
        self._reported_at = 0.0

    # -- what other services call ---------------------------------------------------------

    def record_round(self, doc: dict[str, Any]) -> None:
        """A finished round (node/roles/rounds.py): every party's machine learns its own
        view of it (what it will co-sign against); rank 0 also authors its RoundResult."""
        view = {"round": int(doc["round"]), "adapter_id": str(doc["adapter_id"]),
                "contributors": sorted(set(doc.get("contributors", [])))}
        # Whom the round named, kept before the head hears the round: a MemberSlash that
        # waited for our view of it is judged again when the head does.
        named = named_offenders([(r["trainer"], r["reason"]) for r in doc.get("rejected", [])],
                                doc.get("bad_contributors") or {})
        if self.offences.observe(view["round"], named):
            self._save_offences()
        self._enqueue({"kind": "observe_round", **view})
        if self.is_author():
            self._enqueue({"kind": "round", **view, "rewards": round_rewards(doc)})
            for target, grounds in self._slashable(named).items():
                log.info("phase=member-slash-proposed round=%d member=%s grounds=%s", view["round"], target, grounds)
                self._enqueue({"kind": "member_slash", "target": target, "grounds": grounds, "round": view["round"]})

    def awaits_round_view(self, round_id: int) -> bool:
        """Whether this head waits for a view of `round_id` that nothing queued will give
        (protocol/round_catchup.py: the rounds service then adopts one by quorum)."""
        if self.head is None or any(r["kind"] == "observe_round" and r["round"] == round_id for r in self.queue):
            return False
        try:
            return round_id in rc.rounds_awaiting_view(self.head.machine)
        except RuntimeError:  # read while a worker thread applies an event: the next message asks again
            return False

    def round_confirmed(self, round_id: int) -> bool | None:
        """Whether this head needs nothing more of `round_id` (None: no head yet)."""
        return None if self.head is None else rc.round_confirmed(self.head.machine, round_id)

    def _slashable(self, named: dict[str, str]) -> dict[str, str]:
        """The named whom the author slashes unasked: admitted members, whose stake is in the
        head's escrow. A founding member has no escrow there, and removing one from the
        genesis set is its operators' call (`sealmesh member slash`, the same evidence rule)."""
        machine = self.head.machine if self.head is not None else None
        confirmed = getattr(machine, "confirmed", None)
        book = confirmed.ledger.book if confirmed is not None else None
        return {t: g for t, g in named.items() if book is not None and t in book.members}

    def record_scores(self, doc: dict[str, Any]) -> None:
        """An epoch's miner scores (node/roles/challenger.py): every party's own view;
        rank 0 also authors the ScoreReport."""
        view = {"epoch": int(doc["epoch"]), "scores": {k: float(v) for k, v in doc["scores"].items()}}
        self._enqueue({"kind": "observe_epoch", **view})
        if self.is_author():
            self._enqueue({"kind": "epoch", **view, "rewards": epoch_rewards(doc)})

    def is_author(self) -> bool:
        return bool(self.parties) and self.parties[0] == self.me

    async def submit_tx(self, tx: Any) -> bool:
        """Author a transaction (a membership record, node/membership.py) on the open head."""
        assert self.head is not None
        return await self._apply(tx.KIND, lambda now: self.head.handle(h.NewTx(tx, now)))

    def _enqueue(self, record: dict[str, Any]) -> None:
        self.queue.append(record)
        self._save_queue()

    # -- gossip in -----------------------------------------------------------------------

    def on_message(self, sender: str, message: Message, received_ms: int) -> None:
        if not isinstance(message, HeadMessage):
            return
        try:
            self._inbox_send.send_nowait((sender, message, received_ms))
        except trio.WouldBlock:
            self.inbox_dropped += 1  # a later Sync recovers what a dropped message carried

    def _is_repeat(self, sender: str, message: HeadMessage) -> bool:
        """A message we repeat for liveness (see module doc) that this head already applied."""
        assert self.head is not None
        m = self.head.machine
        if isinstance(message, HeadCommit):
            return m.commits.get(sender) == (message.escrow, message.balance, message.pool)
        if isinstance(message, HeadReqSn):
            return m.confirmed is not None and message.number <= m.confirmed.number
        if isinstance(message, HeadInit):
            return m.params is not None and m.params == h.HeadParameters.from_message(message)
        return False

    # -- running -------------------------------------------------------------------------

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ctx = ctx
        self.me = ctx.hotkey.ss58_address
        founding = getattr(ctx.genesis, "founding", ctx.genesis)  # a validator admitted later is no party
        self.parties = sorted(m.hotkey for m in founding.members if Role.VALIDATOR in m.roles)
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        (ctx.data_dir / COMMANDS_DIR).mkdir(exist_ok=True)
        from node.membership import membership_rules  # admission rules for membership records (issue 15)
        self._load_offences()
        self.head = await trio.to_thread.run_sync(functools.partial(
            EmbeddedHead, ctx.data_dir / "head.sqlite", ctx.hotkey,
            membership=membership_rules(ctx.genesis, offences=self.offences)))
        self.queue = self._load_queue() + self.queue
        try:
            async with trio.open_nursery() as nursery:
                if self.head.reloaded:
                    log.info("phase=settle-resume state=%s", self.head.machine.phase.value)
                    await self._apply("resume", self.head.resume)
                self.report()
                task_status.started()
                nursery.start_soon(self._inbox_loop)
                nursery.start_soon(self._drive_loop)
        finally:
            self.report()
            self.head.close()

    async def _inbox_loop(self) -> None:
        assert self.head is not None
        async for sender, message, _ in self._inbox:
            if self._is_repeat(sender, message):
                continue
            await self._apply(message.TYPE, lambda now: self.head.receive(sender, message, now),
                              sender=sender)

    async def _drive_loop(self) -> None:
        while True:
            await self.step()
            await trio.sleep(STEP_S)

    async def _apply(self, what: str, event: Callable[[int], list[Outbound]], *,
                     sender: str | None = None) -> bool:
        """Apply one head event durably (in a worker thread: SQLite fsyncs), then publish
        what it produced. A refused event changes nothing and is counted by reason."""
        async with self._lock:
            try:
                outbound = await trio.to_thread.run_sync(event, now_ms())
            except RemoteProtocolError as exc:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
                self.ctx.metrics.reject("settle", exc.reason)
                log.warning("settle: refused %s from %s reason=%s: %s", what, sender, exc.reason, exc.hint)
                return False
            except LocalProtocolError as exc:
                self._error(f"{what}: {exc}")
                return False
            await self._publish(outbound)
        self.report()
        return True

    async def _publish(self, outbound: list[Outbound]) -> None:
        assert self.head is not None
        sent = []
        for out in outbound:
            try:
                await self.ctx.publish(out.message)
            except Exception as exc:  # the mesh can fail in many ways; the outbox keeps it
                self._unsent = True
                log.warning("settle: publish %s failed, kept in the outbox: %r", out.message.TYPE, exc)
                break
            sent.append(out.seq)
        if sent:
            await trio.to_thread.run_sync(lambda: [self.head.delivered(seq) for seq in sent])

    # -- the lifecycle, one step at a time ---------------------------------------------------

    async def step(self) -> None:
        """Take whatever local action the head's state calls for now."""
        head = self.head
        assert head is not None
        await self._run_commands()
        if self._unsent:
            self._unsent = False
            async with self._lock:
                await self._publish(head.pending_outbound())
        timer = head.next_timer_ms()
        if timer is not None and timer <= now_ms():
            await self._apply("tick", head.tick)
        for record in list(self.queue):  # our own views at any time; records once Open
            if not await self._record(record):
                break
        m = head.machine
        if self.misbehaved:
            pass
        elif m.phase is h.Phase.IDLE:
            if self.is_author() and all(self.ctx.peer_of(p) for p in self.parties if p != self.me):
                await self._apply("init", lambda now: head.handle(h.Init(self._parameters(now), now)))
        elif m.phase is h.Phase.INITIALIZING:
            if self.me not in m.commits:
                await self._apply("commit", lambda now: head.handle(
                    h.Commit(ESCROW, OPENING_BALANCE, POOL_SHARE, now)))
            else:
                await self._repeat_initializing()
        elif m.phase is h.Phase.OPEN:
            await self._open_step()
        elif m.phase is h.Phase.FANOUT_POSSIBLE:
            await self._apply("fanout", lambda now: head.handle(h.Fanout(now)))
        if time.monotonic() - self._reported_at > 1.0:
            self.report()

    @property
    def continuous(self) -> bool:
        """rounds = 0: rounds until the node is stopped. The head then settles any round
        id, is never due to close, and stays open and recording until an operator closes
        it (`sealmesh head close`); members take out what they earned by `head withdraw`.

        A mesh whose genesis has no trainer can run no round at all: there rounds = 0 is
        the fixed count 0 (`sealmesh testnet` with trainers=0), due to close once the
        node's other roles are done, as before."""
        if self.settings.rounds != 0 or not self.settings.training:
            return False
        genesis = getattr(getattr(self, "ctx", None), "genesis", None)
        return genesis is None or any(Role.TRAINER in m.roles for m in genesis.members)

    def _parameters(self, now: int) -> h.HeadParameters:
        if self.continuous:
            agreed, round_limit = 0, rules.OPEN_ENDED
            epoch_limit = self.settings.epochs or rules.OPEN_ENDED
        else:  # a fixed count (`sealmesh testnet`, tests): due to close after it
            agreed, round_limit, epoch_limit = self.settings.rounds, self.settings.rounds, self.settings.epochs
        return h.HeadParameters(
            head_id=f"{self.ctx.genesis.mesh_id}/head/{now}", parties=tuple(self.parties),
            contestation_period_ms=max(1, int(self.settings.contestation_period_s * 1000)),
            deposit_period_snapshots=DEPOSIT_PERIOD_SNAPSHOTS, sign_timeout_ms=SIGN_TIMEOUT_MS,
            agreed_rounds=agreed, escrow=ESCROW, round_limit=round_limit, epoch_limit=epoch_limit,
            round_reward=ROUND_REWARD, epoch_reward=EPOCH_REWARD)

    async def _repeat_initializing(self) -> None:
        m = self.head.machine  # type: ignore[union-attr]
        if now_ms() - self._resent_at < RESEND_MS:
            return
        self._resent_at = now_ms()
        head_id = m.parameters.head_id
        if self.is_author():
            await self.ctx.publish(m.parameters.to_message())
        await self.ctx.publish(HeadCommit(head_id, *m.commits[self.me]))

    async def _open_step(self) -> None:
        head = self.head
        assert head is not None
        m = head.machine
        if self.settings.behaviour == "close-early":
            await self._close_early()
            return
        if m.proposal is not None and now_ms() - max(m.proposal.requested_at_ms, self._resent_at) > RESEND_MS:
            self._resent_at = now_ms()
            head_id = m.parameters.head_id
            if m.parameters.leader(m.proposal.number) == self.me:
                await self.ctx.publish(m.proposal.request(head_id))
            await self.ctx.publish(HeadAckSn(head_id, m.proposal.number, m.proposal.acks[self.me]))
        own = m.refusals.get(self.me)
        if (m.proposal is None and own is not None and m.confirmed is not None
                and own[0] == m.confirmed.number + 1 and now_ms() - self._resent_at > RESEND_MS):
            self._resent_at = now_ms()  # our signed refusal, repeated like an AckSn
            await self.ctx.publish(HeadNackSn(m.parameters.head_id, *own))
        if self.is_author() and not self.continuous and self.finished():
            log.info("phase=settle-close snapshot=%d", m.confirmed.number if m.confirmed else 0)
            await self._apply("close", lambda now: head.handle(h.Close(now)))

    async def _record(self, record: dict[str, Any]) -> bool:
        """Submit one queued record; False when the head cannot take it yet."""
        head = self.head
        assert head is not None
        if record["kind"] == "observe_round":
            event = lambda now: head.handle(h.ObserveRound(  # noqa: E731
                record["round"], record["adapter_id"], record["contributors"], now))
        elif record["kind"] == "observe_epoch":
            event = lambda now: head.handle(h.ObserveEpoch(record["epoch"], record["scores"], now))  # noqa: E731
        elif record["kind"] == "member_slash":
            tx = mb.MemberSlash(self.me, record["target"], record["grounds"], record["round"])
            event = lambda now: head.handle(h.NewTx(tx, now))  # noqa: E731
        elif record["kind"] == "round":
            event = lambda now: head.record_round_result(record["round"], record["adapter_id"],  # noqa: E731
                                                         record["contributors"], record["rewards"], now)
        else:
            event = lambda now: head.record_score_report(record["epoch"], record["scores"],  # noqa: E731
                                                         record["rewards"], now)
        try:
            async with self._lock:
                outbound = await trio.to_thread.run_sync(event, now_ms())
                await self._publish(outbound)
        except h.HeadMisuse as exc:
            if exc.reason in ("wrong_phase", "no_head"):
                return False
            if record["kind"] == "member_slash" and exc.reason == "not_a_member":
                log.info("settle: %s is gone already (left, or slashed for an earlier round)", record["target"])
            else:
                self._error(f"{record['kind']} record refused ({exc.reason}): {exc}")
        self.queue.remove(record)
        self._save_queue()
        self.report()
        return True

    def finished(self) -> bool:
        """Every other role of this node is done, the agreed records are confirmed, and
        nothing is pending: time for rank 0 to close. Never in continuous mode."""
        if self.continuous:
            return False
        m = self.head.machine  # type: ignore[union-attr]
        others = [doc for name, doc in self.ctx.sections().items() if name != REPORT_SECTION]
        if any(not (isinstance(doc, dict) and doc.get("done") is True) for doc in others):
            return False
        if self.queue or m.pending or m.proposal is not None or m.confirmed is None:
            return False
        epochs = self.settings.epochs if self.ctx.service("challenger") is not None else 0
        ledger = m.confirmed.ledger
        return ledger.rounds_settled >= m.parameters.agreed_rounds and ledger.epochs_settled >= epochs

    async def _close_early(self) -> None:
        """Fault injection ("close-early"): close on the opening snapshot before the agreed
        rounds, bypassing our own machine's refusal. The other parties must vote us out."""
        m = self.head.machine  # type: ignore[union-attr]
        if self.misbehaved or m.confirmed is None:
            return
        await trio.sleep(2 * RESEND_MS / 1000)  # let every party see the head open first
        log.warning("phase=settle-misbehave behaviour=close-early snapshot=%d", m.confirmed.number)
        await self.ctx.publish(HeadClose(m.parameters.head_id, m.confirmed.encode(), now_ms(), []))
        self.misbehaved = True
        self.report()

    # -- operator commands (`sealmesh head close|fanout`) -----------------------------------

    async def _run_commands(self) -> None:
        """Commands are files: only someone who can write the node's data dir can send one."""
        folder = self.ctx.data_dir / COMMANDS_DIR
        for path in sorted(folder.glob("*.request")):
            command = path.stem
            try:
                request = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                request = {}
            path.unlink(missing_ok=True)
            result = await self._command(command, request if isinstance(request, dict) else {})
            tmp = folder / f"{command}.result.tmp"
            tmp.write_text(json.dumps(result))
            tmp.replace(folder / f"{command}.result")

    async def _command(self, command: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        head = self.head
        assert head is not None
        if command not in COMMANDS:
            return {"ok": False, "reason": "unknown_command", "error": f"use one of {COMMANDS}"}
        if command == "withdraw":
            return await self._withdraw((request or {}).get("amount"))
        if command == "member_slash":
            return await self._member_slash(request or {})
        event = h.Close if command == "close" else h.Fanout
        async with self._lock:
            try:
                outbound = await trio.to_thread.run_sync(lambda: head.handle(event(now_ms())))
            except LocalProtocolError as exc:
                return {"ok": False, "reason": getattr(exc, "reason", "refused"), "error": str(exc),
                        "state": head.machine.phase.value}
            await self._publish(outbound)
        self.report()
        return {"ok": True, "state": head.machine.phase.value}

    async def _withdraw(self, amount: Any) -> dict[str, Any]:
        """`sealmesh head withdraw --amount X`: take X of our balance out of the open head.
        It is a transaction like any other: paid out (a "withdrawn" record in head.sqlite)
        once a snapshot that every party signed confirms it."""
        head = self.head
        assert head is not None
        if type(amount) is not int or amount <= 0:
            return {"ok": False, "reason": "bad_amount", "error": "--amount is a positive whole number"}
        m = head.machine
        async with self._lock:
            try:
                before = m.pending_ledger.withdrawn.get(self.me, 0) if m.confirmed else 0
                tx = h.Withdraw(self.me, amount, before)
                outbound = await trio.to_thread.run_sync(lambda: head.handle(h.NewTx(tx, now_ms())))
            except LocalProtocolError as exc:
                return {"ok": False, "reason": getattr(exc, "reason", "refused"), "error": str(exc),
                        "state": m.phase.value}
            await self._publish(outbound)
        self.report()
        return {"ok": True, "state": m.phase.value, "amount": amount, "tx_id": h.tx_id(h.encode_tx(tx)),
                "withdrawn_before": before,
                "note": "paid out once a snapshot confirms it: see `sealmesh head status`"}

    async def _member_slash(self, request: dict[str, Any]) -> dict[str, Any]:
        """`sealmesh member slash --hotkey H --grounds G --round R`: propose a MemberSlash.
        Judged here first by the rule every co-signer applies (protocol/offences.py): our
        own round R must have named H on grounds G, else it is refused and nothing is sent."""
        head = self.head
        assert head is not None
        target, grounds, round_id = request.get("hotkey"), request.get("grounds"), request.get("round")
        if not (isinstance(target, str) and 0 < len(target) <= 64 and grounds in mb.MEMBER_SLASH_GROUNDS
                and type(round_id) is int and round_id >= 0):
            return {"ok": False, "reason": "bad_request",
                    "error": f"--hotkey SS58, --grounds one of {mb.MEMBER_SLASH_GROUNDS}, --round N"}
        m = head.machine
        tx = mb.MemberSlash(self.me, target, grounds, round_id)
        async with self._lock:
            try:
                outbound = await trio.to_thread.run_sync(lambda: head.handle(h.NewTx(tx, now_ms())))
            except LocalProtocolError as exc:
                return {"ok": False, "reason": getattr(exc, "reason", "refused"), "error": str(exc),
                        "state": m.phase.value}
            await self._publish(outbound)
        log.info("phase=member-slash-proposed round=%d member=%s grounds=%s by=operator", round_id, target, grounds)
        self.report()
        return {"ok": True, "state": m.phase.value, "tx_id": h.tx_id(h.encode_tx(tx)),
                "note": "confirmed once every validator co-signs it; each does only if its own round "
                        f"{round_id} named {target} for {grounds} (see `sealmesh status`, membership)"}

    def _offences_path(self) -> Path:
        return self.ctx.data_dir / OFFENCES_FILE

    def _load_offences(self) -> None:
        """Views kept at the last run, and any that rounds reported before we started."""
        path = self._offences_path()
        try:
            kept = OffenceViews.from_wire(json.loads(path.read_text())) if path.exists() else OffenceViews()
        except (OSError, ValueError) as exc:
            log.warning("settle: ignoring %s: %s", path, exc)
            kept = OffenceViews()
        for round_id, named in sorted(kept.rounds.items()):
            self.offences.observe(round_id, named)
        self._save_offences()

    def _save_offences(self) -> None:
        if not hasattr(self, "ctx"):
            return
        tmp = self._offences_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(self.offences.to_wire()))
        tmp.replace(self._offences_path())

    # -- status ----------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        log.error("settle: %s", text)
        self.errors = (self.errors + [text])[-20:]

    def _queue_path(self) -> Path:
        return self.ctx.data_dir / "settlement-queue.json"

    def _load_queue(self) -> list[dict[str, Any]]:
        path = self._queue_path()
        return json.loads(path.read_text()) if path.exists() else []

    def _save_queue(self) -> None:
        if not hasattr(self, "ctx"):
            return
        tmp = self._queue_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(self.queue))
        tmp.replace(self._queue_path())

    def report(self) -> None:
        head = getattr(self, "head", None)
        if head is None or not hasattr(self, "ctx"):
            return
        self._reported_at = time.monotonic()
        self.ctx.report(REPORT_SECTION, section_of(head, self.parties, self.me, behaviour=self.settings.behaviour,
                                                  misbehaved=self.misbehaved, queued=len(self.queue),
                                                  rejected=self.rejected, errors=self.errors))


def section_of(head: EmbeddedHead, parties: list[str], me: str, *, behaviour: str = "honest",
               misbehaved: bool = False, queued: int = 0, rejected: dict[str, int] | None = None,
               errors: list[str] | None = None) -> dict[str, Any]:
    """This validator's "settlement" status section (also what `sealmesh head status` prints)."""
    m = head.machine
    doc = head.status()
    ledger = m.confirmed.ledger if m.confirmed else None
    deposits = m.committed_total + m.escrow_total + (ledger.deposited if ledger else 0)
    # What left the head by Withdraw was paid out while it stayed open (issue 12).
    paid_ledger = m.closing.snapshot.ledger if m.closing and m.payouts is not None else ledger
    withdrawn = dict(paid_ledger.withdrawn) if paid_ledger else {}
    held = sum(doc["balances"].values()) + (0 if m.payouts is not None else m.escrow_total)
    held += sum(withdrawn.values())
    final = m.phase is h.Phase.FINAL
    doc.update({
        "done": final or misbehaved, "role": "validator", "behaviour": behaviour, "me": me,
        "rank": parties.index(me) if me in parties else None, "parties": parties,
        "head_id": m.params.head_id if m.params else None,
        "deposits": deposits if m.commits else 0, "held": held if m.commits else 0,
        # Before the head opens there is no ledger yet to hold what was committed.
        "conserved": bool(doc["conserved"] and (
            (m.confirmed is None and m.payouts is None) or held == deposits)),
        "slashed": m.slashed(), "queued": queued, "pending_txs": len(m.pending),
        "rounds": _named_settled(ledger.rounds_below, ledger.rounds_recent, ledger.rounds_settled)
        if ledger else [],
        "epochs": _named_settled(ledger.epochs_below, ledger.epochs_recent, ledger.epochs_settled)
        if ledger else [],
        "rounds_settled": ledger.rounds_settled if ledger else 0,
        "epochs_settled": ledger.epochs_settled if ledger else 0,
        "withdrawn": withdrawn, "continuous": bool(m.params and m.params.agreed_rounds == 0
                                                   and m.params.round_limit == rules.OPEN_ENDED),
        "rejected": dict(rejected or {}), "errors": list(errors or []),
    })
    return doc


def _named_settled(below: int, recent: tuple[int, ...], settled: int) -> list[int]:
    """The settled ids worth naming in a status: the window's, and, while nothing was
    skipped, the last ones under the watermark; at most 2 windows, whatever the history."""
    under = range(max(0, below - rules.RECORD_WINDOW), below) if settled == below + len(recent) else ()
    return list(under) + list(recent)


class HydraSettlementService(RoleService):
    """Backend "hydra": the same records, as metadata of transactions in a hydra-node's head.

    Each validator drives its own hydra-node (settings.hydra_url); the Hydra head itself
    co-signs among the nodes, so nothing travels on the settle channel. Rank 0 inits,
    records and closes, as with the embedded head; every node's view reports. Needs, in
    DATA_DIR/roles: hydra-payment.skey (a cardano-cli payment signing key owning head
    funds) and optionally hydra-l1-utxo.json (layer-1 UTxO to deposit once the head opens).
    """

    name = "settlement"

    def __init__(self, settings: NodeSettings, *, client_settings=None, api_dir: Path | None = None) -> None:
        if not settings.hydra_url and client_settings is None:
            raise SettingsError('settlement = "hydra" needs hydra_url = "ws://HOST:4001" of this validator\'s '
                                "hydra-node")
        self.settings = settings
        self.client_settings = client_settings
        self.api_dir = api_dir
        self.queue: list[Any] = []  # hydra_tx records waiting for an Open head
        self.recorded = {"rounds": [], "epochs": []}
        self.errors: list[str] = []
        self.parties: list[str] = []
        self.me = ""
        self.client = None
        self._asked: set[str] = set()  # lifecycle commands already sent (init, close, fanout, deposit)

    def is_author(self) -> bool:
        return bool(self.parties) and self.parties[0] == self.me

    def awaits_round_view(self, round_id: int) -> bool:
        return False  # a hydra-node's head takes no party's view of a round: nothing to adopt

    def round_confirmed(self, round_id: int) -> bool | None:
        return None  # no head here that judges views, so no outcome is re-published for it

    def record_round(self, doc: dict[str, Any]) -> None:
        from node.settlement.hydra_tx import RoundResultRecord
        if self.is_author():
            self.queue.append(RoundResultRecord(int(doc["round"]), str(doc["adapter_id"]),
                                                tuple(sorted(doc.get("contributors", []))), round_rewards(doc)))

    def record_scores(self, doc: dict[str, Any]) -> None:
        from node.settlement.hydra_tx import ScoreReportRecord
        if self.is_author():
            ppm = {k: int(round(float(v) * 1_000_000)) for k, v in doc["scores"].items()}
            self.queue.append(ScoreReportRecord(int(doc["epoch"]), ppm, epoch_rewards(doc)))

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from pycardano import PaymentSigningKey

        from node.settlement.hydra import HydraClient, HydraSettings
        from node.settlement.hydra_schema import HydraApiSchema, find_hydra_api_dir
        self.ctx, self.me = ctx, ctx.hotkey.ss58_address
        self.parties = sorted(m.hotkey for m in ctx.genesis.members if Role.VALIDATOR in m.roles)
        api_dir = self.api_dir or find_hydra_api_dir(Path(__file__).resolve().parents[2])
        if api_dir is None:
            raise SettingsError("hydra-node's API schema (json-schemas/api.yaml) was not found at "
                                "../shared/hydra-api next to the repository")
        key_path = ctx.data_dir / "hydra-payment.skey"
        if not key_path.exists():
            raise SettingsError(f"{key_path} is missing: put the payment signing key that owns this "
                                "validator's head funds there (cardano-cli address key-gen)")
        self.key = PaymentSigningKey.load(str(key_path))
        self.client = HydraClient(self.client_settings or HydraSettings(ws_url=self.settings.hydra_url),
                                  HydraApiSchema.load(api_dir),
                                  on_peer_error=lambda reason: ctx.metrics.reject("hydra", reason))
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.run)
            self.report()
            task_status.started()
            while True:
                await self.step()
                await trio.sleep(STEP_S)

    async def step(self) -> None:
        from node.settlement.hydra import HydraRefused
        head = self.client.head
        try:
            if self.is_author() and head.status == "Idle" and head.finalized_utxo is None:
                await self._once("init", self.client.init)
            elif head.status == "Open":
                await self._fund()
                while self.queue:
                    await self._submit(self.queue[0])
                    self.queue.pop(0)
                if self.is_author() and self._finished():
                    await self._once("close", self.client.close)
            elif head.status == "FanoutPossible" and self.is_author():
                await self._once("fanout", self.client.fanout)
        except (HydraRefused, LocalProtocolError) as exc:
            self.errors = (self.errors + [f"{type(exc).__name__}: {exc}"])[-20:]
            log.warning("settle(hydra): %s", exc)
        self.report()

    async def _once(self, what: str, command) -> None:
        if what not in self._asked:
            self._asked.add(what)
            await command()

    async def _fund(self) -> None:
        path = self.ctx.data_dir / "hydra-l1-utxo.json"
        if path.exists() and "deposit" not in self._asked:
            self._asked.add("deposit")
            await self.client.deposit(json.loads(path.read_text()), [self.key])

    def _address(self):
        from pycardano import Address, Network, PaymentVerificationKey
        return Address(payment_part=PaymentVerificationKey.from_signing_key(self.key).hash(),
                       network=Network.TESTNET)

    async def _submit(self, record: Any) -> None:
        """A transaction that spends one of our head UTxO back to us and carries the record."""
        from node.settlement.hydra_tx import LedgerRules, RoundResultRecord, build_head_tx, owned_utxo
        spend = owned_utxo(self.client.head.confirmed_utxo, self._address())
        if not spend:
            raise LocalProtocolError(f"no head UTxO owned by {self._address()}: fund the head first")
        rules = LedgerRules.from_protocol_parameters(await self.client.get_protocol_parameters())
        tx = build_head_tx(spend[:1], [], self._address(), [self.key], [record], rules)
        await self.client.submit_tx(tx)
        kind = "rounds" if isinstance(record, RoundResultRecord) else "epochs"
        self.recorded[kind].append(record.round if kind == "rounds" else record.epoch)

    def _finished(self) -> bool:
        others = [doc for name, doc in self.ctx.sections().items() if name != REPORT_SECTION]
        return (not self.queue and all(isinstance(d, dict) and d.get("done") is True for d in others)
                and len(self.recorded["rounds"]) >= self.settings.rounds)

    def report(self) -> None:
        head = self.client.head
        final = head.finalized_utxo is not None
        self.ctx.report(REPORT_SECTION, {
            "backend": "hydra", "role": "validator", "behaviour": self.settings.behaviour, "me": self.me,
            "rank": self.parties.index(self.me) if self.me in self.parties else None,
            "state": "Final" if final else head.status, "done": final, "head_id": head.head_id,
            "snapshots_confirmed": head.snapshot_number or 0,
            "balances": _lovelace_by_address(head.finalized_utxo if final else head.confirmed_utxo),
            "conserved": True,  # hydra-node's ledger checks every transaction's balance
            "slashed": [], "queued": len(self.queue), "rounds": sorted(self.recorded["rounds"]),
            "epochs": sorted(self.recorded["epochs"]), "records": [], "deposits": 0, "held": 0,
            "rejected": dict(self.client.peer_errors), "errors": list(self.errors)})


def _lovelace_by_address(utxo: dict[str, Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for out in utxo.values():
        totals[out["address"]] = totals.get(out["address"], 0) + int(out["value"].get("lovelace", 0))
    return dict(sorted(totals.items()))


def make_service(settings: NodeSettings) -> RoleService | None:
    if settings.role is not Role.VALIDATOR:
        return None
    if settings.settlement == "hydra":
        return HydraSettlementService(settings)
    if settings.settlement != "embedded":
        raise SettingsError(f"unknown settlement backend {settings.settlement!r}; use embedded or hydra")
    return SettlementService(settings)


# --- sealmesh testnet ----------------------------------------------------------------------

TESTNET_CONTESTATION_S = 3.0


def prepare_testnet(plan, nodes, root: Path) -> None:
    """A short contestation period, so a test mesh fans out seconds after it closes."""
    for node in nodes:
        if node.role is Role.VALIDATOR:
            with open(node.data_dir / "node.toml", "a") as f:
                f.write(f"contestation_period_s = {TESTNET_CONTESTATION_S}\n")


def summarize(plan, statuses: dict[str, dict | None]) -> dict[str, Any]:
    """report.json "settlement": the honest validators' agreed final state of the head."""
    sections = {name: (s or {}).get("sections", {}).get(REPORT_SECTION) for name, s in statuses.items()}
    sections = {name: doc for name, doc in sections.items() if doc}
    faults = dict(plan.faults)
    if not sections:
        return {"backend": None, "problems": ["settlement: no validator reported"] if plan.validators else []}
    names = {doc["me"]: name for name, doc in sections.items() if doc.get("me")}
    honest = {n: d for n, d in sections.items() if faults.get(n, "honest") == "honest"}
    problems = []
    for name, doc in honest.items():
        if doc["state"] != "Final":
            problems.append(f"settlement: {name} head is {doc['state']}, not Final")
        if not doc["conserved"]:
            problems.append(f"settlement: {name} ledger does not conserve value "
                            f"(holds {doc['held']}, deposits {doc['deposits']})")
    views = {json.dumps([d["balances"], d["snapshots_confirmed"], d["slashed"]], sort_keys=True)
             for d in honest.values() if d["state"] == "Final"}
    if len(views) > 1:
        problems.append(f"settlement: honest validators disagree on the final head ({len(views)} views)")
    first = next(iter(honest.values()), next(iter(sections.values())))
    records = first.get("records", [])
    rounds = {str(r["round"]): {"adapter_id": r["adapter_id"], "contributors": r["contributors"],
                                "rewards": r["rewards"], "snapshot": r["snapshot"]}
              for r in records if r["kind"] == "round_result"}
    epochs = {str(r["epoch"]): {"scores": r["scores"], "rewards": r["rewards"], "snapshot": r["snapshot"]}
              for r in records if r["kind"] == "score_report"}
    closers = [n for n, b in faults.items() if b == "close-early"]
    slashed = sorted(names.get(k, k) for k in first.get("slashed", []))
    if closers:
        for name in closers:
            if name not in slashed:
                problems.append(f"settlement: close-early {name} was not slashed")
    else:
        wanted_rounds = plan.rounds if plan.trainers else 0
        if len(rounds) < wanted_rounds:
            problems.append(f"settlement: {len(rounds)} of {wanted_rounds} rounds recorded")
        if plan.miners and len(epochs) < plan.epochs:
            problems.append(f"settlement: {len(epochs)} of {plan.epochs} epochs recorded")
    return {
        "backend": first["backend"], "state": first["state"],
        "snapshots_confirmed": first["snapshots_confirmed"],
        "balances": {names.get(k, k): v for k, v in first["balances"].items()},
        "deposits": first["deposits"], "conserved": all(d["conserved"] for d in honest.values()),
        "slashed": slashed, "rounds": rounds, "epochs": epochs,
        "validators": {n: {"state": d["state"], "snapshots_confirmed": d["snapshots_confirmed"],
                           "conserved": d["conserved"], "behaviour": d["behaviour"],
                           "rejected": d["rejected"]} for n, d in sections.items()},
        "problems": problems,
    }


__all__ = ["HydraSettlementService", "REPORT_SECTION", "SettlementService", "make_service", "prepare_testnet", "section_of",
           "split_reward", "summarize"]
