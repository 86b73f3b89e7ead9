"""Membership of a running mesh: join, leave, and every node's directory following the
head (issue 15). The rules are protocol/admission.py and protocol/member_book.py; this
module only carries out their effects.

- Every node: its directory (the verifier's, the roles') is the genesis plus the book of
  the newest fully signed head snapshot it holds, kept in DATA_DIR/membership.snapshot so
  it survives a restart; validators publish theirs on the membership channel
  (MembershipUpdate) when it changes and every REPUBLISH_S, which is how a node that was
  offline catches up.
- Validators: judge each JoinRequest/LeaveRequest against the confirmed ledger (a refusal
  is counted in /metrics as source="membership"); rank 0 (the head's record author) puts
  an acceptable one into the head as a membership record, which every validator
  co-signs only if its own rules agree.
- `--join --stake X`: publish a signed JoinRequest every JOIN_RESEND_S until the
  directory lists this node; its roles start once it does.
- `sealmesh leave`: a request file in DATA_DIR/membership-commands/; the node publishes a
  LeaveRequest until a snapshot confirms it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import trio

from protocol import head as h
from protocol import member_book as mb
from node.clock import now_ms
from crypto.wire import unpack_strict
from protocol.admission import AdmissionPolicy, JoinRequest, LeaveRequest, MembershipUpdate, leave_penalty
from protocol.errors import RemoteProtocolError
from protocol.membership import Member, Role
from protocol.membership_sync import checked_update

log = logging.getLogger("sealmesh.membership")

SNAPSHOT_FILE = "membership.snapshot"
COMMANDS_DIR = "membership-commands"
JOIN_RESEND_S = 10.0  # the join limiter lets 3 through, then 1 per 10 s per peer
LEAVE_RESEND_S = 10.0
REPUBLISH_S = 15.0
STEP_S = 0.5
REPORT_SECTION = "membership"


class LiveGenesis:
    """The genesis with a live member list: `members` and `directory` are the founding set
    plus the confirmed book, read at each use, so code that asks `genesis.members` when it
    needs them (the rounds' live trainers) follows joins and leaves without a restart."""

    def __init__(self, genesis: Any) -> None:
        self.founding = genesis
        self.directory = mb.LiveDirectory(genesis.members)

    @property
    def mesh_id(self) -> str:
        return self.founding.mesh_id

    @property
    def bootstrap(self) -> tuple[str, ...]:
        return self.founding.bootstrap

    @property
    def names(self) -> tuple[tuple[str, str], ...]:
        return self.founding.names

    @property
    def members(self) -> tuple[Member, ...]:
        return self.directory.members

    def name_of(self, hotkey: str) -> str:
        return self.founding.name_of(hotkey)


def live_genesis(genesis: Any) -> LiveGenesis:
    return genesis if isinstance(genesis, LiveGenesis) else LiveGenesis(genesis)


def head_parties(genesis: Any) -> tuple[str, ...]:
    """The embedded head's parties: the genesis validators, sorted (node/roles/settlement.py)."""
    founding = getattr(genesis, "founding", genesis)
    return tuple(sorted(m.hotkey for m in founding.members if Role.VALIDATOR in m.roles))


def membership_rules(genesis: Any, policy: AdmissionPolicy | None = None,
                     offences: Any = None) -> mb.MembershipRules:
    """offences: this validator's round views (protocol/offences.OffenceViews) that a
    MemberSlash is judged against; the settlement role passes its own."""
    founding = getattr(genesis, "founding", genesis)
    return mb.MembershipRules(founding.mesh_id, frozenset(m.hotkey for m in founding.members),
                              policy or AdmissionPolicy(), offences=offences)


def load_persisted(data_dir: Path, parties: tuple[str, ...]) -> tuple[str, h.Snapshot] | None:
    """The snapshot kept at the last run, checked again (the file is ours, but a snapshot
    is only ever taken fully signed)."""
    path = Path(data_dir) / SNAPSHOT_FILE
    if not path.exists():
        return None
    try:
        doc = unpack_strict(path.read_bytes())  # its snapshot came from peers: read strictly
        update = MembershipUpdate(doc["head_id"], doc["snapshot"])
        return update.head_id, checked_update(update, parties, current_head=None, current_number=0)
    except (ValueError, KeyError, TypeError, RemoteProtocolError, msgpack.UnpackException) as exc:
        log.warning("membership: ignoring %s: %s", path, exc)
        return None


def is_known_member(data_dir: Path, genesis: Any, hotkey: str) -> bool:
    """A member by the genesis, or by the book this node kept (admitted at an earlier run)."""
    if any(m.hotkey == hotkey for m in genesis.members):
        return True
    kept = load_persisted(Path(data_dir), head_parties(genesis))
    return kept is not None and kept[1].ledger.book.is_member(hotkey, frozenset(m.hotkey for m in genesis.members))


class MembershipService:
    """Carries out membership on one node. Started by the daemon before the roles."""

    def __init__(self, settings: Any, hotkey: Any, genesis: LiveGenesis, *, metrics: Any,
                 publish: Callable[[Any], Any], services: Callable[[], dict[str, Any]],
                 peer_id: Callable[[], str], addrs: Callable[[], list[str]],
                 report: Callable[[str, dict[str, Any]], None] = lambda section, doc: None,
                 on_change: Callable[[list[str], list[str], mb.MemberBook], None] = lambda added, removed, book: None
                 ) -> None:
        self.settings, self.hotkey, self.genesis = settings, hotkey, genesis
        self.me = hotkey.ss58_address
        self.metrics, self.publish, self.services = metrics, publish, services
        self.peer_id, self.addrs, self._report = peer_id, addrs, report
        self.on_change = on_change  # the daemon dials admitted members, forgets departed ones
        self.parties = head_parties(genesis)
        self.rules = membership_rules(genesis)
        self.head_id: str | None = None
        self.snapshot: h.Snapshot | None = None
        self.admitted = trio.Event()
        self.left = trio.Event()  # a snapshot confirmed our leave: the daemon stops our roles
        self.refused: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []  # joins and leaves seen, newest last (bounded)
        self.join_started_ms: int | None = None
        self.admitted_ms: int | None = None
        self.leave_requested_ms: int | None = None
        self.left_ms: int | None = None
        self._send, self._inbox = trio.open_memory_channel[tuple[str, Any, bytes]](256)
        self._published_number = -1
        self._published_at = 0.0
        self.registry: Any = None  # a RegistryRefresher with --network/--netuid
        if self.genesis.directory.member(self.me) is not None:
            self.admitted.set()

    # -- inbound (the daemon calls these on the trio thread) -------------------------------

    def on_gossip(self, sender: str, message: Any, raw: bytes) -> None:
        if not isinstance(message, (MembershipUpdate, JoinRequest, LeaveRequest)):
            return
        try:
            self._send.send_nowait((sender, message, raw))
        except trio.WouldBlock:
            self._count("inbox_full")

    def stranger_spoke(self) -> None:
        """A message from a hotkey not in the directory was IGNOREd (unknown_signer): with
        a chain registry, it may have registered since the last read, so read early
        (rate-limited: node/registry/refresh.py). A genesis file has nothing to re-read."""
        if self.registry is not None:
            self.registry.nudge()

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        kept = load_persisted(self.settings.data_dir, self.parties)
        if kept is not None:
            self._take(*kept, persist=False)
        (self.settings.data_dir / COMMANDS_DIR).mkdir(parents=True, exist_ok=True)
        self.report()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._inbox_loop)
            nursery.start_soon(self._step_loop)
            if getattr(self.settings, "join", False) and not self.admitted.is_set():
                nursery.start_soon(self._join_loop)
            if getattr(self.settings, "network", None) is not None and self.settings.netuid is not None:
                from node.registry.metagraph import load_metagraph_directory
                from node.registry.refresh import RegistryRefresher
                network, netuid = self.settings.network, self.settings.netuid
                self.registry = RegistryRefresher(
                    self.genesis.directory, lambda: load_metagraph_directory(network, netuid),
                    on_change=lambda added, removed: self.report())
                nursery.start_soon(self.registry.run)

    async def _inbox_loop(self) -> None:
        async for sender, message, raw in self._inbox:
            try:
                if isinstance(message, MembershipUpdate):
                    self._on_update(message)
                else:
                    await self._on_request(sender, message, raw)
            except RemoteProtocolError as exc:
                if exc.reason != "stale_update":
                    self._count(exc.reason)
                    log.warning("membership: refused %s from %s reason=%s: %s", message.TYPE,
                                self.genesis.name_of(sender), exc.reason, exc.hint)

    async def _step_loop(self) -> None:
        while True:
            await self._validator_step()
            await self._run_commands()
            await trio.sleep(STEP_S)

    # -- every node: take newer fully signed snapshots ---------------------------------------

    def _on_update(self, update: MembershipUpdate) -> None:
        current = -1 if self.snapshot is None else self.snapshot.number
        snapshot = checked_update(update, self.parties, current_head=self.head_id, current_number=current)
        self._take(update.head_id, snapshot)

    def _take(self, head_id: str, snapshot: h.Snapshot, *, persist: bool = True) -> None:
        if self.head_id == head_id and self.snapshot is not None and snapshot.number <= self.snapshot.number:
            return
        self.head_id, self.snapshot = head_id, snapshot
        added, removed = self.genesis.directory.apply(snapshot.ledger.book)
        for hotkey in added:
            self._event("admitted", hotkey, snapshot.number)
        for hotkey in removed:
            self._event("removed", hotkey, snapshot.number)
        if added or removed:
            self.on_change(added, removed, snapshot.ledger.book)
        if self.genesis.directory.member(self.me) is not None and not self.admitted.is_set():
            self.admitted_ms = now_ms()
            self.admitted.set()
            took = "" if self.join_started_ms is None else f" after_s={(self.admitted_ms - self.join_started_ms) / 1000:.1f}"
            log.info("phase=admitted snapshot=%d%s", snapshot.number, took)
        if self.me in removed:
            self.left_ms = now_ms()
            released = snapshot.ledger.withdrawn.get(self.me, 0)
            log.info("phase=left snapshot=%d escrow_released=%d", snapshot.number, released)
            self.left.set()
        if persist:
            path = self.settings.data_dir / SNAPSHOT_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(msgpack.packb({"head_id": head_id, "snapshot": snapshot.encode()}, use_bin_type=True))
            tmp.replace(path)
        self.report()

    def _event(self, what: str, hotkey: str, number: int) -> None:
        log.info("phase=member-%s member=%s snapshot=%d", what, hotkey, number)
        self.events = (self.events + [{"event": what, "hotkey": hotkey, "snapshot": number, "at_ms": now_ms()}])[-50:]

    # -- validators: judge requests, author records, publish snapshots ----------------------

    def _settlement(self) -> Any:
        service = self.services().get("settlement")
        return service if service is not None and getattr(service, "head", None) is not None else None

    async def _on_request(self, sender: str, message: JoinRequest | LeaveRequest, raw: bytes) -> None:
        settlement = self._settlement()
        if settlement is None or not hasattr(settlement.head, "machine"):
            return  # not a validator of the embedded head: nothing to judge
        m = settlement.head.machine
        if m.confirmed is None or m.phase is not h.Phase.OPEN:
            return  # no open head yet; the requester repeats
        if isinstance(message, JoinRequest):
            tx: mb.MemberTx = mb.Admit(self.me, raw)
        else:
            entry = m.confirmed.ledger.book.members.get(sender)
            penalty = 0 if entry is None else leave_penalty(entry.stake, entry.admitted_at_round,
                                                               m.confirmed.ledger.rounds_settled, self.rules.policy)
            tx = mb.Leave(self.me, raw, penalty)
        try:
            h.decode_tx(h.encode_tx(tx))  # the embedded request's signature and shape
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(exc.hint, reason=exc.reason) from None
        problem = mb.record_problem(tx, m.confirmed.ledger, self.rules)
        if problem:
            raise RemoteProtocolError(problem[1], reason=problem[0])
        if not settlement.is_author():
            return
        try:
            h.apply_tx(m.pending_ledger, tx, "")
        except RemoteProtocolError:
            return  # already pending: the request was repeated
        log.info("membership: recording %s of %s", tx.KIND, self.genesis.name_of(sender))
        await settlement.submit_tx(tx)

    async def _validator_step(self) -> None:
        settlement = self._settlement()
        if settlement is None or not hasattr(settlement.head, "machine"):
            return
        m = settlement.head.machine
        if m.confirmed is None or m.params is None or m.confirmed.number == 0:
            return
        if self.head_id != m.params.head_id or self.snapshot is None or m.confirmed.number > self.snapshot.number:
            self._take(m.params.head_id, m.confirmed)
        due = time.monotonic() - self._published_at > REPUBLISH_S
        if m.confirmed.number != self._published_number or due:
            if m.confirmed.ledger.book.empty and not due:
                return  # nothing about membership changed: the periodic repeat will do
            self._published_number, self._published_at = m.confirmed.number, time.monotonic()
            try:
                await self.publish(MembershipUpdate(m.params.head_id, m.confirmed.encode()))
            except Exception as exc:  # the mesh can fail in many ways; the next step repeats
                log.warning("membership: publish failed: %r", exc)

    # -- joining and leaving ----------------------------------------------------------------

    def join_request(self) -> JoinRequest:
        book = self.genesis.directory.book
        roles = sorted({self.settings.role.value})
        return JoinRequest(self.genesis.mesh_id, self.peer_id(), list(self.addrs())[:8], roles,
                           int(self.settings.stake), book.joins.get(self.me, 0), now_ms())

    async def _join_loop(self) -> None:
        self.join_started_ms = now_ms()
        log.info("phase=join-requested stake=%d roles=%s", self.settings.stake, self.settings.role.value)
        while not self.admitted.is_set():
            try:
                await self.publish(self.join_request())
            except Exception as exc:  # not connected yet: the next try
                log.warning("membership: join request not published: %r", exc)
            self.report()
            with trio.move_on_after(JOIN_RESEND_S):
                await self.admitted.wait()

    async def _run_commands(self) -> None:
        folder = self.settings.data_dir / COMMANDS_DIR
        request = folder / "leave.request"
        if request.exists():
            request.unlink(missing_ok=True)
            result = await self._leave()
            tmp = folder / "leave.result.tmp"
            tmp.write_text(json.dumps(result))
            tmp.replace(folder / "leave.result")
        if self.leave_requested_ms is not None and self.left_ms is None \
                and now_ms() - self._leave_sent_ms > LEAVE_RESEND_S * 1000:
            await self._send_leave()

    async def _leave(self) -> dict[str, Any]:
        if self.genesis.directory.member(self.me) is None:
            return {"ok": False, "reason": "not_a_member", "error": f"{self.me} is not a member of this mesh"}
        self.leave_requested_ms = now_ms()
        await self._send_leave()
        self.report()
        return {"ok": True, "note": "takes effect with the next confirmed snapshot; "
                                    "see `sealmesh status` (membership section)"}

    async def _send_leave(self) -> None:
        self._leave_sent_ms = now_ms()
        book = self.genesis.directory.book
        try:
            await self.publish(LeaveRequest(self.genesis.mesh_id, book.joins.get(self.me, 0), now_ms()))
        except Exception as exc:
            log.warning("membership: leave request not published: %r", exc)

    _leave_sent_ms = 0

    # -- status -------------------------------------------------------------------------------

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.metrics.reject("membership", reason)
        self.report()

    def status(self) -> dict[str, Any]:
        book = self.genesis.directory.book
        entry = book.members.get(self.me)
        ledger = self.snapshot.ledger if self.snapshot is not None else None
        state = ("left" if self.left_ms is not None else "member" if self.admitted.is_set()
                 else "joining" if self.join_started_ms is not None else "not_a_member")
        return {
            "state": state, "members": len(self.genesis.directory.members),
            "admitted": sorted(book.members), "departed": list(book.departed),
            "head_id": self.head_id, "snapshot": None if self.snapshot is None else self.snapshot.number,
            "stake_in_escrow": 0 if entry is None else entry.stake,
            "escrow_released": 0 if ledger is None else ledger.withdrawn.get(self.me, 0),
            "join_requested_ms": self.join_started_ms, "admitted_ms": self.admitted_ms,
            "join_to_admission_s": None if self.admitted_ms is None or self.join_started_ms is None
            else (self.admitted_ms - self.join_started_ms) / 1000,
            "leave_requested_ms": self.leave_requested_ms, "left_ms": self.left_ms,
            "refused": dict(self.refused), "events": list(self.events[-20:]),
            # --network/--netuid: chain reads, and how many were brought forward by strangers
            "registry": None if self.registry is None else {
                "reads": self.registry.reads, "nudges": self.registry.nudges,
                "nudged_reads": self.registry.nudged_reads},
        }

    def report(self) -> None:
        self._report(REPORT_SECTION, self.status())


__all__ = ["LiveGenesis", "MembershipService", "head_parties", "is_known_member", "live_genesis",
           "load_persisted", "membership_rules"]
