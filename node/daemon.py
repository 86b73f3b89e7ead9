"""One node: the mesh, the HTTP API and the role loops under one trio nursery.

Runs until SIGINT/SIGTERM, then cancels the nursery, which shuts every part down in
order; the final status is written under the data dir so nothing observed is lost.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import secrets
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import trio

from node.clock import now_ms
from node.addresses import announced_addrs
from node.reachability import Reachability, keep_reachability
from node.api import ApiServer
from node.files import write_atomic
from node.blobs import BLOB_PROTOCOL, MAX_BLOB_REQUEST_BYTES, PROBE_PROTOCOL, BlobService, handle_probe
from node.mesh import EnvelopeFirst, Mesh, MeshConfig, StreamRefused, ValidationResult
from node.metrics import NodeMetrics
from node.presence import Presence
from node.membership import MembershipService, live_genesis
from protocol.admission import JoinRateLimit
from protocol.liveness import liveness_window_ms
from node.registry.genesis import Genesis
from node.settings import NodeSettings
from node.roles import RoleContext, RoleService, services_for
from node.storage import BlobStore, open_store
from protocol.epistula import EnvelopeVerifier, Envelope, Signer
from protocol.errors import RemoteProtocolError
from protocol.challenge_messages import FHE_PROTOCOL, MAX_ENVELOPE_BYTES, REQUESTS
from protocol.inbound import admit_stream_envelope, forwarder_is_at_fault, open_gossip, open_request, seal_message
from protocol.messages import Announce, Channel, MembershipView, Message, Ping, decode

log = logging.getLogger("sealmesh.node")

MEMBERSHIP_VIEW_INTERVAL_S = 5.0
STATUS_INTERVAL_S = 0.5
DIAL_ANNOUNCED_INTERVAL_S = 5.0  # how often members heard of but not connected to are dialled
DIAL_ANNOUNCED_BACKOFF_S = 30.0  # ... and how long one that could not be reached is left alone


def load_or_create_node_key(data_dir: Path) -> bytes:
    """The libp2p identity seed, kept so a restarted node keeps its peer id."""
    path = data_dir / "node_key"
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} is not a 32-byte node key; delete it to make a new identity")
        return seed
    seed = secrets.token_bytes(32)
    write_atomic(path, seed, mode=0o600)
    return seed


class Node:
    def __init__(self, settings: NodeSettings, hotkey: Signer, genesis: Genesis) -> None:
        genesis = live_genesis(genesis)  # the genesis plus the confirmed membership records (issue 15)
        self.settings = settings
        self.hotkey = hotkey
        self.genesis = genesis
        self.verifier = EnvelopeVerifier(genesis.directory, hotkey.ss58_address,
                                         window_ms=settings.epistula_window_ms)
        self.metrics = NodeMetrics()
        self.presence = Presence(hotkey.ss58_address, frozenset(m.hotkey for m in genesis.members),
                                 window_ms=liveness_window_ms(settings.announce_interval_s),
                                 names=dict(genesis.names),
                                 roles={m.hotkey: sorted(r.value for r in m.roles) for m in genesis.members})
        self.mesh: Mesh | None = None
        self.api_port: int | None = None
        self.started_ms = now_ms()
        self.membership_views: dict[str, list[str]] = {}
        self.services: list[RoleService] = services_for(settings)
        self.join_limit = JoinRateLimit()
        self.membership = MembershipService(
            settings, hotkey, genesis, metrics=self.metrics, publish=self.publish,
            services=lambda: {s.name: s for s in self.services},
            peer_id=lambda: self.mesh.peer_id if self.mesh else "", addrs=lambda: self.addrs,
            on_change=self._on_membership_change)
        self.store: BlobStore | None = None
        self.role_context: RoleContext | None = None
        self.addrs: list[str] = []  # announced: set once the mesh listens
        self.reachability = Reachability()
        self._status_lock = threading.Lock()
        self._status: dict[str, Any] = {}

    # --- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM; the final status file is written however it ends."""
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("phase=start role=%s hotkey=%s mesh=%s", self.settings.role.value,
                 self.hotkey.ss58_address, self.genesis.mesh_id)
        async with Mesh.open(self._mesh_config(), load_or_create_node_key(data_dir)) as mesh:
            self.mesh = mesh
            # what others dial: --announce-addr, else the listen addresses, wildcards expanded
            self.addrs = announced_addrs(mesh.listen_addrs, self.settings.announce_addrs, mesh.peer_id)
            self._serve_streams(mesh, data_dir)
            try:
                async with trio.open_nursery() as nursery:
                    await self._start_services(nursery)
                    await _until_signalled()
                    log.info("phase=stopping")
                    nursery.cancel_scope.cancel()
            finally:
                self._refresh_status(with_samples=True)
                write_atomic(data_dir / "status.json", json.dumps(self.status()).encode())
                log.info("phase=stopped")

    def _mesh_config(self) -> MeshConfig:
        return MeshConfig(
            mesh_id=self.genesis.mesh_id, listen_host=self.settings.listen_host,
            listen_port=self.settings.listen_port,
            bootstrap=tuple(self.genesis.bootstrap) + tuple(self.settings.bootstrap),
            invalid_message_limit=self.settings.invalid_message_limit,
            relay_service=self.settings.relay or self.settings.role.value == "validator")

    def _serve_streams(self, mesh: Mesh, data_dir: Path) -> None:
        # Read from the status snapshot: the mesh's own counters belong to the trio thread.
        self.metrics.add_counters("sealmesh_mesh_events", "libp2p mesh counters (drops, disconnects)",
                                  lambda: self.status().get("mesh_stats", {}).items())
        self.store = open_store(self.settings.storage, data_dir, env=os.environ)
        blobs = BlobService(self.store, self.verifier,
                            on_reject=functools.partial(self._rejected, "stream"))
        mesh.set_stream_handler(BLOB_PROTOCOL, blobs.handle, MAX_BLOB_REQUEST_BYTES)
        mesh.set_stream_handler(PROBE_PROTOCOL, handle_probe, 64)
        for service in self.services:
            for protocol_id, (handler, max_bytes) in service.stream_handlers().items():
                mesh.set_stream_handler(protocol_id, handler, max_bytes, envelope_first=envelope_first_for(
                    protocol_id, self.verifier, on_reject=functools.partial(self._rejected, "stream")))

    async def _start_services(self, nursery: trio.Nursery) -> None:
        assert self.mesh is not None
        for channel in Channel:
            receive = await self.mesh.subscribe(channel.value, self._gossip_validator(channel))
            nursery.start_soon(self._consume, channel, receive)
        if self.settings.pings:
            # Before the API serves /status: the SIGUSR1 handler must be in place before
            # anyone can see that this node is up and signal it.
            await nursery.start(self._ping_scenario)
        api = ApiServer(self.settings.api_host, self.settings.api_port, status=self.status,
                        metrics=self.metrics, on_message=self._on_http_message)
        self.api_port = await nursery.start(api.serve)
        self._refresh_status()
        write_atomic(self.settings.data_dir / "ready.json", json.dumps(self._ready_doc()).encode())
        log.info("phase=ready peer_id=%s addrs=%s api_port=%d", self.mesh.peer_id,
                 self.addrs, self.api_port)
        nursery.start_soon(self._announce_loop)
        nursery.start_soon(self._status_loop)
        # Relays to try when no peer can dial us: the bootstrap peers (validators relay).
        relays = list(self.genesis.bootstrap) + list(self.settings.bootstrap)
        nursery.start_soon(functools.partial(keep_reachability, self.mesh, self.reachability, self.addrs, relays))
        nursery.start_soon(self._dial_announced_loop)
        if self.settings.role.value == "validator":
            nursery.start_soon(self._membership_view_loop)
        nursery.start_soon(self.membership.run)
        await self._start_roles(nursery)

    async def _start_roles(self, nursery: trio.Nursery) -> None:
        assert self.mesh is not None and self.store is not None
        if not self.membership.admitted.is_set():  # --join: the roles start once admitted
            log.info("phase=waiting-for-admission")
            await self.membership.admitted.wait()
            # Members ignored our Announces until now (unknown_signer); tell them at once.
            await self._announce()
        self.role_context = RoleContext(
            settings=self.settings, hotkey=self.hotkey, genesis=self.genesis, mesh=self.mesh,
            store=self.store, verifier=self.verifier, metrics=self.metrics,
            data_dir=self.settings.data_dir / "roles", publish=self.publish,
            peer_of=self.presence.peer_of.get, services={s.name: s for s in self.services},
            last_seen=self.presence.last_seen.get,
            addrs_of=lambda hotkey: list(self.presence.addrs_of.get(hotkey, ())))
        self.role_context.data_dir.mkdir(parents=True, exist_ok=True)
        await nursery.start(self._run_roles)

    async def _run_roles(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The roles, until a confirmed snapshot says this node left the mesh (issue 15):
        from then on the others ignore its messages (unknown_signer) and serve it nothing,
        so its roles would only burn CPU; the API, /status and its escrow stay visible."""
        assert self.role_context is not None
        async with trio.open_nursery() as roles:
            for service in self.services:
                log.info("phase=role-start service=%s", service.name)
                await roles.start(functools.partial(service.run, self.role_context))
            task_status.started()
            await self.membership.left.wait()
            log.info("phase=roles-stopped reason=left the mesh; the node can be stopped")
            roles.cancel_scope.cancel()

    def _on_membership_change(self, added: list[str], removed: list[str], book: Any) -> None:
        """Members admitted by a confirmed snapshot are dialled at the peer id and announce
        addresses of their signed join request (_dial_announced_loop), members that left
        no longer (issue 15)."""
        for hotkey in added:
            entry = book.members.get(hotkey)
            if entry is not None and self.presence.on_admitted(hotkey, entry.peer_id, list(entry.addrs)):
                log.info("phase=member-endpoint member=%s peer_id=%s addrs=%s", hotkey, entry.peer_id,
                         list(entry.addrs))
        for hotkey in removed:
            self.presence.forget(hotkey)

    def _ready_doc(self) -> dict[str, Any]:
        assert self.mesh is not None
        return {"hotkey": self.hotkey.ss58_address, "peer_id": self.mesh.peer_id,
                "addrs": self.addrs, "api_port": self.api_port, "pid": os.getpid()}

    # --- inbound ---------------------------------------------------------------

    def _gossip_validator(self, channel: Channel):
        return gossip_validator(channel, self.verifier, mesh_id=self.genesis.mesh_id,
                                max_bytes=self.mesh.config.max_gossip_bytes,
                                on_reject=functools.partial(self._rejected, "gossip"), join_limit=self.join_limit)

    def _rejected(self, source: str, reason: str) -> None:
        """Count a refused message; a stranger's (unknown_signer) may have registered on
        the chain since the registry's last read, so it nudges a re-read (rate-limited)."""
        self.metrics.reject(source, reason)
        if reason == "unknown_signer":
            self.membership.stranger_spoke()

    async def _consume(self, channel: Channel, receive) -> None:
        async for gossip in receive:
            # The validator already verified these bytes; here they are only parsed.
            envelope = Envelope.from_gossip_bytes(gossip.data)
            if envelope.signed_by == self.hotkey.ss58_address:
                continue
            message = decode(envelope.body, channel=channel)
            self.metrics.received.labels(channel=channel.value, type=message.TYPE).inc()
            self.membership.on_gossip(envelope.signed_by, message, gossip.data)  # it needs the signed bytes
            self._dispatch(envelope.signed_by, message, gossip.received_ms)

    def _dispatch(self, sender: str, message: Message, received_ms: int) -> None:
        self.presence.on_heard(sender, received_ms)  # any verified message says the sender is live
        if isinstance(message, Announce):
            if self.presence.on_announce(sender, message):
                log.info("heard member=%s (%s) peer_id=%s", self.genesis.name_of(sender),
                         sender, message.peer_id)
                self.metrics.members_heard.set(len(self.presence.peer_of))
        elif isinstance(message, Ping):
            self.presence.on_ping(sender, message, received_ms)
            self.metrics.delivery_latency.observe(max(0, received_ms - message.sent_ms) / 1000)
        elif isinstance(message, MembershipView):
            self.membership_views[sender] = list(message.members)
        for service in self.services:
            if message.CHANNEL in service.channels:
                service.on_message(sender, message, received_ms)

    async def _on_http_message(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict]:
        try:
            verified = open_request(headers, body, verifier=self.verifier, now_ms=now_ms())
        except RemoteProtocolError as exc:
            self._rejected("http", exc.reason)
            log.warning("rejected http reason=%s: %s", exc.reason, exc.hint)
            return 401 if exc.reason in _AUTH_REASONS else 400, {"error": exc.hint, "reason": exc.reason}
        self.metrics.received.labels(channel="http", type=verified.message.TYPE).inc()
        self._dispatch(verified.member.hotkey, verified.message, now_ms())
        return 200, {"ok": True, "type": verified.message.TYPE}

    # --- outbound --------------------------------------------------------------

    async def publish(self, message: Message) -> None:
        assert self.mesh is not None
        envelope = seal_message(self.hotkey, message, now_ms=now_ms())
        await self.mesh.publish(message.CHANNEL.value, envelope.to_gossip_bytes())
        self.metrics.published.labels(channel=message.CHANNEL.value, type=message.TYPE).inc()

    async def _announce_loop(self) -> None:
        """Announce often until every member is heard, then rarely (for late joiners)."""
        assert self.mesh is not None
        while True:
            if not self.membership.left.is_set():  # a node that left is nobody's member
                await self._announce()
            fast = not self.presence.heard_everyone()
            # A relayed address gained or lost is announced at once (node/reachability.py).
            with trio.move_on_after(self.settings.announce_interval_s * (1 if fast else 10)):
                await self.reachability.changed.wait()

    async def _announce(self) -> None:
        assert self.mesh is not None
        await self.publish(Announce(self.genesis.mesh_id, self.mesh.peer_id,
                                    self.addrs + self.reachability.relayed_addrs,
                                    [self.settings.role.value], self.started_ms))

    async def _dial_announced_loop(self) -> None:
        """Dial members we hear of but are not connected to, at the addresses their signed
        Announce carries (direct ones first, then relayed): a joiner needs one reachable
        bootstrap peer, the rest of the mesh it learns from gossip."""
        assert self.mesh is not None
        next_try: dict[str, float] = {}
        while True:
            await trio.sleep(DIAL_ANNOUNCED_INTERVAL_S)
            connected = set(self.mesh.connected_peers())
            for hotkey, peer_id in list(self.presence.peer_of.items()):
                if peer_id in connected or peer_id == self.mesh.peer_id:
                    continue
                addrs = sorted(self.presence.addrs_of.get(hotkey, []), key=lambda a: "/p2p-circuit" in a)
                # Backoff per (peer, addresses): a member that announces a new (relayed) address is tried at once.
                attempt = (peer_id, tuple(addrs))
                if next_try.get(attempt, 0.0) > trio.current_time():
                    continue
                next_try[attempt] = trio.current_time() + DIAL_ANNOUNCED_BACKOFF_S
                for addr in addrs:
                    try:
                        await self.mesh.connect(addr)
                    except Exception as exc:  # unreachable from here; the next address or next time
                        log.debug("dial announced %s of %s failed: %r", addr, self.genesis.name_of(hotkey), exc)
                        continue
                    log.info("phase=dialled-announced member=%s addr=%s", self.genesis.name_of(hotkey), addr)
                    break

    async def _ping_scenario(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send the configured number of pings once every member is heard, or, with
        ping_start = "signal", on SIGUSR1: `sealmesh testnet` starts all nodes' pings
        together once the whole mesh is up, so no ping competes with a node's start-up."""
        if self.settings.ping_start == "signal":
            with trio.open_signal_receiver(signal.SIGUSR1) as signals:
                task_status.started()
                log.info("phase=pings-armed waiting for SIGUSR1")
                await signals.__anext__()
        else:
            task_status.started()
            while not self.presence.heard_everyone():
                await trio.sleep(0.1)
            # Others may hear us a little later than we hear them; give their mesh a moment.
            await trio.sleep(2 * self.settings.announce_interval_s)
        # Start at a random point of the first interval: nodes signalled together would
        # otherwise publish in lockstep, a burst no real mesh sees.
        await trio.sleep(random.uniform(0, self.settings.ping_interval_s))
        log.info("phase=pings count=%d", self.settings.pings)
        for seq in range(self.settings.pings):
            await self.publish(Ping(seq=seq, sent_ms=now_ms()))
            self.presence.pings_sent += 1
            await trio.sleep(self.settings.ping_interval_s)
        log.info("phase=pings-done sent=%d", self.presence.pings_sent)

    async def _membership_view_loop(self) -> None:
        while True:
            await trio.sleep(MEMBERSHIP_VIEW_INTERVAL_S)
            await self.publish(MembershipView(now_ms(), sorted(self.presence.peer_of)))

    # --- status ----------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            self._refresh_status()
            await trio.sleep(STATUS_INTERVAL_S)

    def _refresh_status(self, *, with_samples: bool = False) -> None:
        mesh = self.mesh
        peers = mesh.connected_peers() if mesh else []
        self.metrics.peers.set(len(peers))
        doc = {
            "hotkey": self.hotkey.ss58_address,
            "name": self.genesis.name_of(self.hotkey.ss58_address),
            "role": self.settings.role.value,
            "mesh_id": self.genesis.mesh_id,
            "peer_id": mesh.peer_id if mesh else None,
            "peers": peers,
            "topics": [f"/sealmesh/{self.genesis.mesh_id}/1/{c.value}" for c in Channel],
            "api_port": self.api_port,
            "uptime_s": round((now_ms() - self.started_ms) / 1000, 3),
            "presence": self.presence.snapshot(now_ms(), with_samples=with_samples),
            "membership_views": dict(self.membership_views),
            "membership": self.membership.status(),  # joins, leaves, this node's escrow (issue 15)
            "rejected": _rejected_counts(self.metrics),
            "mesh_stats": dict([*_flatten_stats(mesh.stats), *_flatten_stats(mesh.stream_stats)]) if mesh else {},
            "sections": self.role_context.sections() if self.role_context else {},
            # what keeps a role of this node from working, and how to fix it (roles/base.py remind)
            "problems": self.role_context.problems() if self.role_context else [],
            "addrs": list(getattr(self, "addrs", None) or (mesh.listen_addrs if mesh else [])),
            # public / relayed / unknown (node/reachability.py), and how each peer is connected
            "reachability": {**self.reachability.snapshot(),
                             "connections": mesh.connection_kinds() if mesh else {}},
        }
        with self._status_lock:
            self._status = doc

    def status(self) -> dict[str, Any]:
        """Thread-safe: the API thread calls this."""
        with self._status_lock:
            return dict(self._status)


# Stream protocols whose request is a signed envelope, then the payload it signs for:
# protocol id -> (the request types it carries, the largest envelope).
ENVELOPE_FIRST_PROTOCOLS: dict[str, tuple[tuple[type[Message], ...], int]] = {
    FHE_PROTOCOL: (REQUESTS, MAX_ENVELOPE_BYTES),
}


def envelope_first_for(protocol_id: str, verifier: EnvelopeVerifier, *,
                       on_reject: Callable[[str], None] = lambda reason: None) -> EnvelopeFirst | None:
    """How the mesh admits a request of `protocol_id` before reading its payload (issue 11
    finding 9): the envelope must verify (protocol/inbound.py admit_stream_envelope),
    judged at the time the request began to arrive, and names the payload's length."""
    rule = ENVELOPE_FIRST_PROTOCOLS.get(protocol_id)
    if rule is None:
        return None
    expect, max_envelope_bytes = rule

    def admit(peer_id: str, envelope: bytes, started_ms: int) -> int:
        try:
            return admit_stream_envelope(envelope, verifier=verifier, now_ms=min(started_ms, now_ms()),
                                         expect=expect)
        except RemoteProtocolError as exc:
            on_reject(exc.reason)
            raise StreamRefused(exc.reason, exc.hint) from exc

    return EnvelopeFirst(max_envelope_bytes, admit)


def gossip_validator(channel: Channel, verifier: EnvelopeVerifier, *, mesh_id: str, max_bytes: int,
                     on_reject: Callable[[str], None] = lambda reason: None,
                     join_limit: JoinRateLimit | None = None):
    """The mesh validator for one channel: verify, then ACCEPT; REJECT (the forwarder is
    charged) only for refusals every node makes alike; IGNORE for those that depend on the
    receiver (its clock, its replay cache): protocol/inbound.py forwarder_is_at_fault."""
    def validate(from_peer: str, data: bytes) -> tuple[ValidationResult, str]:
        try:
            open_gossip(data, channel=channel, verifier=verifier, now_ms=now_ms(), max_bytes=max_bytes,
                        from_peer=from_peer, mesh_id=mesh_id, join_limit=join_limit)
        except RemoteProtocolError as exc:
            on_reject(exc.reason)
            log.warning("rejected gossip reason=%s from_peer=%s channel=%s: %s",
                        exc.reason, from_peer, channel.value, exc.hint)
            verdict = ValidationResult.REJECT if forwarder_is_at_fault(exc.reason) else ValidationResult.IGNORE
            return verdict, exc.reason
        return ValidationResult.ACCEPT, "ok"
    return validate


_AUTH_REASONS = {"unknown_signer", "signer_not_allowed", "wrong_recipient", "stale_timestamp",
                 "future_timestamp", "replay", "replay_quota", "bad_signature", "malformed_envelope"}


def _rejected_counts(metrics: NodeMetrics) -> dict[str, int]:
    counts: dict[str, int] = {}
    for family in metrics.rejected.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels["reason"]
                counts[reason] = counts.get(reason, 0) + int(sample.value)
    return counts


def _flatten_stats(stats: Any) -> Iterable[tuple[str, float]]:
    """The mesh's counter dataclass as (name, value) pairs, dict fields expanded."""
    if stats is None:
        return []
    items = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)
    flat = []
    for name, value in items.items():
        if isinstance(value, dict):
            flat.extend((f"{name}.{k}", float(v)) for k, v in value.items())
        elif isinstance(value, (int, float)):
            flat.append((name, float(value)))
    return flat


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            return
