"""The seam between the daemon and a role loop (trainer, validator, miner, settlement).

The daemon owns the mesh, the API, the blob store and the status file. A RoleService
owns one protocol: it gets every gossip message of its channels (already verified:
Epistula, strict decode, sender policy), may serve stream protocols, runs its loop in
the daemon's nursery, and reports a section of the node's status. `sealmesh testnet`
reads those sections: a section whose "done" is true tells it this node's scenario is
finished, and node/testnet.py merges the sections of every node into report.json.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, Protocol, TypeVar, runtime_checkable

import trio

from node.clock import now_ms  # node/roles/rounds.py takes it from here
from node.blobs import BlobFetchError, Holder, fetch_from_holders, partial_dir_for
from node.mesh import Mesh
from node.metrics import NodeMetrics
from node.registry.genesis import Genesis
from node.settings import NodeSettings
from node.storage import BlobStore, StorageError
from protocol.epistula import EnvelopeVerifier, Signer
from protocol.messages import Channel, Message

log = logging.getLogger("sealmesh.roles")

StreamHandler = Callable[[str, bytes], Awaitable[bytes]]
T = TypeVar("T")


@runtime_checkable
class SettlementBackend(Protocol):
    """What the other roles ask of this node's settlement service, whichever backend runs
    it: node/roles/settlement.py's SettlementService (the embedded head) or
    HydraSettlementService (a hydra-node's head). Reached as `RoleContext.settlement`."""

    def record_round(self, doc: dict[str, Any]) -> None:
        """A finished round (node/roles/rounds.py): this party's view, and the record if it authors."""

    def record_scores(self, doc: dict[str, Any]) -> None:
        """An epoch's miner scores (node/roles/challenger.py), the same way."""

    def is_author(self) -> bool:
        """Whether this node authors the head's records (rank 0 of its parties)."""

    async def step(self) -> None:
        """One pass of the backend's loop: open, record what is queued, close when done."""

    def awaits_round_view(self, round_id: int) -> bool:
        """Whether the head waits for this party's view of a round nothing queued will give
        (the rounds service then adopts one by quorum, protocol/round_catchup.py)."""

    def round_confirmed(self, round_id: int) -> bool | None:
        """Whether the head needs nothing more of the round (None: no head that judges views)."""


@dataclass
class RoleContext:
    """What a role may use. Everything here belongs to the trio thread except `report`."""

    settings: NodeSettings
    hotkey: Signer
    genesis: Genesis
    mesh: Mesh
    store: BlobStore
    verifier: EnvelopeVerifier
    metrics: NodeMetrics
    data_dir: Path  # this role's own directory under the node's data dir
    publish: Callable[[Message], Awaitable[None]]
    peer_of: Callable[[str], str | None]  # hotkey -> libp2p peer id, once announced
    services: dict[str, "RoleService"] = field(default_factory=dict)  # by name, this node's
    # hotkey -> when (ms) any verified message of it last came, None if never: who is live
    # is protocol/liveness.py live_members over these
    last_seen: Callable[[str], int | None] = lambda hotkey: None
    addrs_of: Callable[[str], list[str]] = lambda hotkey: []  # hotkey -> its announced addresses
    _sections: dict[str, Any] = field(default_factory=dict)
    _problems: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, section: str, doc: dict[str, Any]) -> None:
        """Replace this role's status section (thread-safe; shown on /status and kept at exit)."""
        with self._lock:
            self._sections[section] = doc

    def service(self, name: str) -> "RoleService | None":
        """Another role service of this node, by its name, if running."""
        return self.services.get(name)

    @property
    def settlement(self) -> SettlementBackend | None:
        """This node's settlement backend, if it runs one (validators do)."""
        service = self.services.get("settlement")
        if service is None:
            return None
        if not isinstance(service, SettlementBackend):
            raise TypeError(f"the settlement service {type(service).__name__} lacks the SettlementBackend "
                            "methods (node/roles/base.py)")
        return service

    def sections(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._sections)

    def set_problem(self, problem: str, fix: str) -> None:
        """Something keeps a role of this node from working: shown on /status under "problems"."""
        with self._lock:
            self._problems.setdefault(problem, {"problem": problem, "fix": fix, "since_ms": now_ms()})

    def clear_problem(self, problem: str) -> None:
        with self._lock:
            self._problems.pop(problem, None)

    def problems(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self._problems.values()]

    async def fetch(self, cid: str, holders: list[str], *, max_bytes: int, timeout_s: float = 120) -> bytes:
        """The blob `cid`: from our store, else from the holders (hotkeys) that have it, in
        chunks from all of them at once when it is big (node/blobs.py fetch_from_holders:
        `timeout_s` bounds a one-chunk blob; a bigger one's deadline scales with its size).

        A fetched blob is verified (sha256) and kept in our store, so it is served onward.
        """
        try:
            return self.store.get(cid)
        except StorageError:
            pass
        peers = [Holder(peer, holder) for holder in holders
                 if (peer := self.peer_of(holder)) is not None and holder != self.hotkey.ss58_address]
        data = await fetch_from_holders(self.mesh, self.hotkey, cid=cid, holders=peers, max_bytes=max_bytes,
                                        partial_dir=partial_dir_for(self.store, self.data_dir), timeout_s=timeout_s)
        self.store.put(data)
        return data


async def remind(ctx: RoleContext, problem: str, fix: str, *, every_s: float = 60.0,
                 retry: Callable[[], T] | None = None,
                 still: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> T:
    """Say what keeps a role from working and how to fix it, until it is fixed: a WARNING
    now and every `every_s`, and the problem on /status. An operator who missed the first
    line of a long log still sees it. Each time, `retry()` is tried; once it no longer
    raises `still`, the problem is cleared and its result returned, so the role goes on
    without a restart. Without `retry`, it reminds until the node stops."""
    ctx.set_problem(problem, fix)  # kept if the node stops first: the final status shows it
    while True:
        log.warning("problem: %s; fix: %s", problem, fix)
        await trio.sleep(every_s)
        if retry is None:
            continue
        try:
            result = retry()
        except still:
            continue
        ctx.clear_problem(problem)
        log.info("fixed: %s", problem)
        return result


class RoleService:
    """Base class: override what the role needs."""

    name: ClassVar[str]
    channels: ClassVar[frozenset[Channel]] = frozenset()

    def stream_handlers(self) -> dict[str, tuple[StreamHandler, int]]:
        """protocol id -> (handler(peer_id, request) -> response, max request bytes)."""
        return {}

    def on_message(self, sender: str, message: Message, received_ms: int) -> None:
        """A verified gossip message of one of `channels` (called on the trio thread)."""

    async def run(self, ctx: RoleContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


class GuardedWork:
    """For a role that starts many pieces of work in its nursery: one that fails is logged
    and kept in `errors` (shown in the role's status), and ends neither the role nor the
    node. The subclass sets `nursery` and `errors` and has a `report()` method."""

    nursery: trio.Nursery
    errors: list[str]

    def report(self) -> None:
        raise NotImplementedError

    def _start(self, work, *args) -> None:
        self.nursery.start_soon(self._guarded, work, *args)

    async def _guarded(self, work, *args) -> None:
        try:
            await work(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of one task is reported, not fatal
            self.errors.append(f"{work.__name__}: {type(exc).__name__}: {exc}")
            log.exception("%s failed", work.__name__)
            self.report()
