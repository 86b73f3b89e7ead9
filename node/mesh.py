"""The libp2p gossip mesh: the only module in sealmesh that knows py-libp2p.

A ``Mesh`` wraps one py-libp2p 0.8.1 host (TCP + Noise + Yamux) running
GossipSub, plus length-prefixed request/response stream protocols, under trio.

py-libp2p's defaults drop gossip silently (docs/mesh.md has the list with
file:line); every limit is a field of ``MeshConfig`` and every drop we can see
is a counter in ``Mesh.stats``.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hashlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from collections import Counter
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair as ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ValidationError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.pubsub.validators import signature_validator
from libp2p.relay.circuit_v2 import PROTOCOL_ID as RELAY_HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, DCUtRProtocol, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from node.clock import now_ms
from node._libp2p_tuning import (
    MeshGossipSub,
    MeshPubsub,
    MeshScorer,
    MeshStats,
    PubsubHooks,
    TokenBucket,
    check_library_shape,
    install_signed_record_memo,
)
from node.relay_limits import watch_relay_limits

__all__ = [
    "CHANNELS",
    "DIAL_BACK_PROTOCOL",
    "EnvelopeFirst",
    "GossipMessage",
    "Mesh",
    "MeshConfig",
    "MeshRequestError",
    "MeshStats",
    "StreamRefused",
    "StreamStats",
    "ValidationResult",
    "topic_for",
]

logger = logging.getLogger(__name__)

CHANNELS = ("membership", "train", "fhe", "settle")

# An RPC frame carries the message plus signature, key, topic and seqno; keep
# headroom so a max-size payload never trips libp2p's 1 MiB frame limit, which
# would drop it as "oversized" (gossipsub.py send_rpc).
_RPC_OVERHEAD = 64 * 1024
_ERROR_FLAG = 0x8000_0000  # top bit of a response length prefix marks an error frame
_MAX_FRAME = _ERROR_FLAG - 1
_KEY_DOMAIN = b"sealmesh/libp2p-identity/v1"
# After refusing a request: how long the peer has to read the reason and hang up, and how
# much of what it keeps sending meanwhile is read and dropped.
_REFUSAL_GRACE_S = 2.0
_REFUSAL_DRAIN_BYTES = 1 << 20


@dataclass(frozen=True)
class MeshConfig:
    mesh_id: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0 = pick a free port
    bootstrap: tuple[str, ...] = ()  # multiaddrs incl. /p2p/<peer id>
    bootstrap_timeout_s: float = 20.0  # open() waits at most this long for a first bootstrap peer
    bootstrap_recheck_s: float = 10.0  # afterwards, re-dial lost bootstrap peers this often
    dial_timeout_s: float = 10.0

    # GossipSub mesh degree and timing: go-libp2p's defaults (D=6, Dlo=4, Dhi=12,
    # 1 s heartbeat).  py-libp2p has no defaults for D and a 120 s heartbeat.
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_interval_s: float = 1.0
    gossip_window: int = 3
    gossip_history: int = 5
    seen_ttl_s: int = 120

    # Forwarding rate limit per (forwarding peer, topic).  py-libp2p: 10 msg/s,
    # no burst, sliding window -> a 200-message burst loses 190.  A token bucket
    # lets honest bursts through and still caps floods.
    forward_rate_per_s: float = 1000.0
    forward_burst: float = 2000.0
    # Our own publishes are paced below what any neighbour forwards, so an honest
    # node never trips its neighbours' limit even when relaying for a second publisher.
    publish_rate_per_s: float = 500.0
    publish_burst: float = 1000.0

    # Per-peer outbound RPC queue (py-libp2p: 32, drop on full).  publish() waits
    # while any queue is above half of this, so only relaying can fill it.
    outbound_queue_size: int = 4096
    publish_backpressure_timeout_s: float = 10.0
    # Subscription channel handed to the caller (py-libp2p: 32, drop on full).
    # Counted in messages; worst case delivery_buffer * max_gossip_bytes if the consumer stalls.
    delivery_buffer: int = 16384
    # Messages kept for peers whose subscriptions are not known yet (py-libp2p: 100, 30 s).
    pending_per_peer: int = 1024
    pending_ttl_s: float = 30.0

    max_gossip_bytes: int = 256 * 1024  # payloads above this must use a stream protocol
    invalid_message_limit: int = 20  # peer disconnected (and not re-accepted for a while) after this many rejected messages
    blacklist_cooloff_s: float = 600.0
    # Stream requests, server side (issue 11 finding 9; docs/mesh.md "Stream admission").
    max_streams_per_peer: int = 8  # concurrent requests one peer may have in flight here
    max_streams: int = 256  # ... all peers together
    stream_memory_budget_bytes: int = 1 << 30  # request bodies being read or handled, all peers
    stream_peer_budget_bytes: int = 576 << 20  # ... one peer (above the largest FHE upload, 512 MiB)
    stream_budget_wait_s: float = 10.0  # a request waits this long for budget, then is refused
    stream_header_timeout_s: float = 10.0  # the length prefix and, where there is one, the envelope
    stream_read_floor_s: float = 10.0  # a body gets this long plus its size at the minimum rate
    stream_min_rate_bytes_per_s: float = float(1 << 20)
    stream_idle_timeout_s: float = 10.0  # ... and is dropped sooner if no byte comes for this long
    stream_timeout_s: float = 60.0  # the handler and the response, once the request is in

    # Circuit relay v2 (docs/mesh.md "Reachability"). Every mesh can be reached through a
    # relay (the STOP side) and dial through one; only relay_service offers the HOP side,
    # within these limits (enforced by py-libp2p; refusals and cuts counted by node/relay_limits.py).
    relay_service: bool = False
    relay_max_reservations: int = 32  # peers holding a slot at once
    relay_max_circuits: int = 64  # open circuits to one reserved peer (py-libp2p counts per reservation)
    relay_circuit_duration_s: int = 3600  # per circuit; checked when bytes cross it, so an idle one lingers
    relay_circuit_bytes: int = 1 << 30  # per circuit, both directions together
    dial_back_timeout_s: float = 5.0  # a dial-back probe's TCP connect, server side
    hole_punch: bool = True  # DCUtR: try to turn a relayed connection into a direct one

    # Peer score: P4 (invalid messages) only; see docs/mesh.md.
    score_invalid_weight: float = 1.0
    score_invalid_decay: float = 0.99  # per heartbeat: ~70 s half-life

    def __post_init__(self) -> None:
        if self.max_gossip_bytes + _RPC_OVERHEAD > DefaultMaxMessageSize:
            raise ValueError(f"max_gossip_bytes must be <= {DefaultMaxMessageSize - _RPC_OVERHEAD}")
        if not (0 < self.degree_low <= self.degree <= self.degree_high):
            raise ValueError("need 0 < degree_low <= degree <= degree_high")
        if self.invalid_message_limit < 1 or self.outbound_queue_size < 2:
            raise ValueError("invalid_message_limit >= 1 and outbound_queue_size >= 2 required")
        if not (1 <= self.max_streams_per_peer <= self.max_streams):
            raise ValueError("need 1 <= max_streams_per_peer <= max_streams")
        if not (0 < self.stream_peer_budget_bytes <= self.stream_memory_budget_bytes):
            raise ValueError("need 0 < stream_peer_budget_bytes <= stream_memory_budget_bytes")
        for name in ("stream_budget_wait_s", "stream_header_timeout_s", "stream_read_floor_s",
                     "stream_min_rate_bytes_per_s", "stream_idle_timeout_s", "stream_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


class ValidationResult(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # counts against the forwarding peer
    IGNORE = "ignore"  # dropped, not forwarded, no penalty


Validator = Callable[[str, bytes], "tuple[ValidationResult, str] | Awaitable[tuple[ValidationResult, str]]"]
StreamHandler = Callable[[str, bytes], Awaitable[bytes]]

# When the stream request now being handled began to arrive (its length prefix), in ms.
# A handler checks a signature's freshness against it: a 40 MB upload's transfer time is
# the link's doing, not the signature's age. Per task: every stream is served in its own.
_request_started_ms: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_started_ms",
                                                                                  default=None)


def request_started_ms() -> int | None:
    """When the current stream request's first bytes arrived (ms since the epoch), or None
    outside a stream handler."""
    return _request_started_ms.get()


@dataclass(frozen=True)
class GossipMessage:
    channel: str
    topic: str
    from_peer: str  # base58 peer id of the ORIGINAL publisher (signed pubsub 'from')
    data: bytes
    received_ms: int
    seqno: bytes


class MeshRequestError(Exception):
    """A stream request failed: refused by the remote, protocol violation, or no stream."""


class StreamRefused(Exception):
    """This host refuses a stream request; `reason` is the label it is counted and answered under."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason, self.hint = reason, hint


# (peer id, envelope bytes, when the request began to arrive in ms) -> the payload length
# the envelope signs for; raises StreamRefused.
EnvelopeAdmission = Callable[[str, bytes, int], int]


@dataclass(frozen=True)
class EnvelopeFirst:
    """A protocol whose request is `u32 len(envelope) || envelope || payload`, the envelope
    signing for the payload's length (protocol/challenge_messages.py frames). The mesh reads
    the envelope alone, has `admit` verify it, and reads only the payload it signs for."""

    max_envelope_bytes: int
    admit: EnvelopeAdmission


@dataclass
class StreamStats:
    """Server-side stream counters (MeshStats keeps served/refused totals)."""

    stream_refused_by_reason: dict[str, int] = field(default_factory=dict)
    stream_bytes_read: int = 0  # request bytes read from peers, headers and envelopes included
    streams_open: int = 0
    stream_reserved_bytes: int = 0  # request bodies being read or handled now
    stream_reserved_peak_bytes: int = 0

    def count_refusal(self, reason: str) -> None:
        self.stream_refused_by_reason[reason] = self.stream_refused_by_reason.get(reason, 0) + 1

    # Our relay service (relay_service): reservations and circuits refused, circuits cut (node/relay_limits.py).
    relay_refused_by_reason: dict[str, int] = field(default_factory=dict)

    def count_relay_refusal(self, reason: str) -> None:
        self.relay_refused_by_reason[reason] = self.relay_refused_by_reason.get(reason, 0) + 1


def topic_for(mesh_id: str, channel: str) -> str:
    return f"/sealmesh/{mesh_id}/1/{channel}"


def derive_key_pair(key_seed: bytes) -> KeyPair:
    """Deterministic ed25519 identity; domain-separated so the seed can be reused elsewhere."""
    if len(key_seed) != 32:
        raise ValueError("key_seed must be 32 bytes")
    return ed25519_key_pair(hashlib.sha256(_KEY_DOMAIN + key_seed).digest())


@dataclass
class _Subscription:
    channel: str
    validator: Validator
    send: trio.MemorySendChannel[GossipMessage]


class _BanNotifee(INotifee):
    """Reports every new connection so banned peers can be dropped again."""

    def __init__(self, on_connected: Callable[[ID], None]) -> None:
        self._on_connected = on_connected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn.muxed_conn.peer_id)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class _StreamLimits:
    """What stream requests may hold here at once: streams per peer and in all, and the
    bytes of request bodies, per peer and in all (a body's declared length is reserved
    before it is read and released when its handler is done)."""

    def __init__(self, config: MeshConfig, stats: StreamStats) -> None:
        self._config, self._stats = config, stats
        self._streams: Counter[ID] = Counter()
        self._reserved: Counter[ID] = Counter()
        self._released = trio.Event()

    @contextlib.contextmanager
    def stream(self, peer: ID) -> Iterator[None]:
        if self._streams[peer] >= self._config.max_streams_per_peer:
            raise StreamRefused("too_many_streams", f"{self._streams[peer]} requests from this peer are "
                                f"in flight; at most {self._config.max_streams_per_peer}")
        if self._stats.streams_open >= self._config.max_streams:
            raise StreamRefused("streams_busy", f"{self._stats.streams_open} requests are in flight; "
                                f"at most {self._config.max_streams}")
        self._streams[peer] += 1
        self._stats.streams_open += 1
        try:
            yield
        finally:
            self._stats.streams_open -= 1
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    @contextlib.asynccontextmanager
    async def reservation(self, peer: ID, n: int) -> AsyncIterator[None]:
        """Hold `n` bytes of the budget; waits for room at most stream_budget_wait_s."""
        if n > self._config.stream_peer_budget_bytes:
            raise StreamRefused("memory_budget", f"{n} bytes is over the {self._config.stream_peer_budget_bytes}"
                                "-byte budget of one peer")
        with trio.move_on_after(self._config.stream_budget_wait_s):
            while not self._has_room(peer, n):
                await self._released.wait()
        if not self._has_room(peer, n):
            raise StreamRefused("memory_budget", f"no room for {n} bytes within "
                                f"{self._config.stream_budget_wait_s}s ({self._stats.stream_reserved_bytes} "
                                f"bytes of requests in flight, this peer's {self._reserved[peer]})")
        self._take(peer, n)
        try:
            yield
        finally:
            self._give_back(peer, n)

    def _has_room(self, peer: ID, n: int) -> bool:
        return (self._stats.stream_reserved_bytes + n <= self._config.stream_memory_budget_bytes
                and self._reserved[peer] + n <= self._config.stream_peer_budget_bytes)

    def _take(self, peer: ID, n: int) -> None:
        self._reserved[peer] += n
        self._stats.stream_reserved_bytes += n
        self._stats.stream_reserved_peak_bytes = max(self._stats.stream_reserved_peak_bytes,
                                                     self._stats.stream_reserved_bytes)

    def _give_back(self, peer: ID, n: int) -> None:
        self._reserved[peer] -= n
        if not self._reserved[peer]:
            del self._reserved[peer]
        self._stats.stream_reserved_bytes -= n
        self._released.set()
        self._released = trio.Event()


class _StallWatch:
    """Cancels `scope` once `buf` has not grown for `idle_s`, counted in ticks of the event
    loop rather than wall time: when this process's own loop is held up (a long synchronous
    call), the ticks wait with it, so an upload is not blamed for our stall."""

    TICKS = 4

    def __init__(self, buf: bytearray, idle_s: float, scope: trio.CancelScope) -> None:
        self.buf, self.idle_s, self.scope = buf, idle_s, scope
        self.stalled = False

    async def run(self) -> None:
        seen, quiet_ticks = len(self.buf), 0
        while quiet_ticks < self.TICKS:
            await trio.sleep(self.idle_s / self.TICKS)
            seen, quiet_ticks = (len(self.buf), 0) if len(self.buf) > seen else (seen, quiet_ticks + 1)
        self.stalled = True
        self.scope.cancel()


@dataclass(frozen=True)
class _Route:
    protocol_id: str
    handler: StreamHandler
    max_request_bytes: int
    envelope_first: EnvelopeFirst | None


class Mesh:
    """One libp2p host with GossipSub and request/response protocols.  Use ``Mesh.open``."""

    def __init__(self, config: MeshConfig, key_pair: KeyPair) -> None:
        check_library_shape()
        install_signed_record_memo()
        self.config = config
        self.stats = MeshStats()
        self._host = new_host(
            key_pair=key_pair,
            # Only Noise: new_host's default also offers secio and *plaintext*.
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=x25519_key_pair().private_key)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        )
        self._scorer = MeshScorer(_score_params(config))
        self._router = _make_router(config, self.stats)
        self._router.scorer = self._scorer
        self._pubsub = MeshPubsub(
            self._host,
            self._router,
            hooks=PubsubHooks(validate=self._validate, deliver=self._deliver),
            stats=self.stats,
            outbound_queue_size=config.outbound_queue_size,
            seen_ttl=config.seen_ttl_s,
        )
        self.stream_stats = StreamStats()
        self._stream_limits = _StreamLimits(config, self.stream_stats)
        self._subs: dict[str, _Subscription] = {}
        self._publish_buckets: dict[str, TokenBucket] = {}
        self._invalid_counts: dict[ID, int] = {}
        self._banned_until: dict[ID, float] = {}
        self._ban_send, self._ban_recv = trio.open_memory_channel[ID](math.inf)
        self._notifee = _BanNotifee(self._on_connected)
        self.peer_id = self._host.get_id().to_base58()
        self.listen_addrs: list[str] = []
        limits = RelayLimits(duration=config.relay_circuit_duration_s, data=config.relay_circuit_bytes,
                             max_circuit_conns=config.relay_max_circuits,
                             max_reservations=config.relay_max_reservations)
        self._relay = CircuitV2Protocol(self._host, limits=limits, allow_hop=config.relay_service)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if config.relay_service else RelayRole(0))
        self._relay_transport = CircuitV2Transport(self._host, self._relay, RelayConfig(roles=roles, limits=limits))
        self.relay_reservations: dict[str, str] = {}  # relay peer id -> our address through it
        self._reserved_over: dict[str, INetConn] = {}  # relay peer id -> the connection we reserved on
        self._nursery: trio.Nursery | None = None
        self._host.set_stream_handler(TProtocol(DIAL_BACK_PROTOCOL), self._serve_dial_back)
        self._dcutr = DCUtRProtocol(self._host) if config.hole_punch else None

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: MeshConfig, key_seed: bytes) -> AsyncIterator[Mesh]:
        mesh = cls(config, derive_key_pair(key_seed))
        listen = multiaddr.Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.listen_port}")
        network = mesh._host.get_network()
        async with mesh._host.run(listen_addrs=[listen]):
            network.register_notifee(mesh._notifee)
            try:
                async with background_trio_service(mesh._pubsub), background_trio_service(mesh._router), \
                        background_trio_service(mesh._relay):
                    await mesh._pubsub.wait_until_ready()
                    await mesh._relay.event_started.wait()
                    mesh.listen_addrs = [str(a) for a in mesh._host.get_addrs()]
                    # The services stop before the nursery is cancelled: stopping one inside
                    # an already cancelled scope raised Cancelled over the body's exception,
                    # the nursery then absorbed it, and a node that crashed exited 0.
                    async with trio.open_nursery() as nursery:
                        try:
                            async with contextlib.AsyncExitStack() as services:
                                if mesh._dcutr is not None:
                                    await services.enter_async_context(background_trio_service(mesh._dcutr))
                                if config.relay_service:
                                    services.callback(watch_relay_limits(mesh._relay,
                                                                         mesh.stream_stats.count_relay_refusal))
                                mesh._nursery = nursery
                                nursery.start_soon(mesh._enforce_bans)
                                nursery.start_soon(mesh._expire_bans)
                                await mesh._start_bootstrap(nursery)
                                yield mesh
                        finally:
                            nursery.cancel_scope.cancel()
                            mesh._close_subscriptions()
            finally:
                network.remove_notifee(mesh._notifee)

    def _close_subscriptions(self) -> None:
        # Consumers iterating their channel see a clean end of stream.
        for sub in self._subs.values():
            sub.send.close()

    # ---- peers -----------------------------------------------------------

    async def connect(self, multiaddr_str: str) -> None:
        """Dial a peer at a multiaddr ending in /p2p/<id>; a relayed one
        (<relay addr>/p2p/<relay>/p2p-circuit/p2p/<id>) goes through that relay."""
        maddr = multiaddr.Multiaddr(multiaddr_str)
        if is_relayed_addr(multiaddr_str):
            await self._connect_relayed(maddr)
            return
        info = info_from_p2p_addr(maddr)
        if self._is_banned(info.peer_id):
            raise MeshRequestError(f"peer {info.peer_id} is blacklisted")
        self._unblock(info.peer_id)
        with trio.fail_after(self.config.dial_timeout_s):
            await self._host.connect(info)

    async def _connect_relayed(self, maddr: multiaddr.Multiaddr) -> None:
        # py-libp2p's swarm drops p2p-circuit addresses from every dial (swarm.py dial_peer,
        # "Skip relay (p2p-circuit) addresses"), so host.connect cannot use them: dial the
        # circuit transport ourselves; its connection is upgraded into the swarm like any other.
        relay_addr, target = self._relay_transport.parse_circuit_ma(maddr)
        if self._is_banned(target):
            raise MeshRequestError(f"peer {target} is blacklisted")
        relay_id = ID.from_base58(relay_addr.get_peer_id())
        # An explicit relayed address is news (a relay that was down is back, a member
        # announced a new reservation): the swarm's 60 s memory of a failed dial to the
        # relay or the target must not refuse it.
        self._unblock(relay_id)
        self._unblock(target)
        with trio.fail_after(self.config.dial_timeout_s):
            if not self._host.get_network().get_connections(relay_id):
                await self._host.connect(info_from_p2p_addr(relay_addr))
            await self._relay_transport.dial(maddr)

    async def reserve_relay(self, relay_multiaddr: str) -> str:
        """Reserve a slot on the relay at `relay_multiaddr` (ending in /p2p/<relay id>) and
        return the address others reach us by through it. MeshRequestError if refused."""
        assert self._nursery is not None, "reserve_relay needs an open mesh"
        relay_addr = multiaddr.Multiaddr(relay_multiaddr)
        relay_id = info_from_p2p_addr(relay_addr).peer_id
        self._unblock(relay_id)  # a relay that was down a minute ago may be back
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                await self._host.connect(info_from_p2p_addr(relay_addr))
                stream = await self._host.new_stream(relay_id, [RELAY_HOP_PROTOCOL_ID])
        except Exception as exc:
            raise MeshRequestError(f"no relay at {relay_multiaddr}: {exc!r}") from exc
        try:
            ok = await self._relay_transport.reserve(stream, relay_id, self._nursery)
        finally:
            await _close_quietly(stream)
        if not ok:
            raise MeshRequestError(f"relay {relay_id} refused a reservation")
        relayed = f"{relay_multiaddr}/p2p-circuit/p2p/{self.peer_id}"
        self.relay_reservations[relay_id.to_base58()] = relayed
        conns = self._host.get_network().get_connections(relay_id)
        if conns:
            self._reserved_over[relay_id.to_base58()] = conns[0]
        return relayed

    def relay_reservation_lost(self, relay_peer_id: str) -> str | None:
        """Why our reservation on `relay_peer_id` no longer holds, or None while it does.

        A relay keeps a reservation only as long as the connection it was made on (and
        forgets it when it restarts), and py-libp2p's refresher only re-asks before expiry
        on whatever connection is open: so the connection we reserved on being gone, or the
        expiry passed without a refresh, means nobody can reach us through it any more."""
        reserved_on = self._reserved_over.get(relay_peer_id)
        relay_id = ID.from_base58(relay_peer_id)
        if reserved_on is None or relay_peer_id not in self.relay_reservations:
            return "never reserved"
        open_now = self._host.get_network().get_connections(relay_id)
        if not any(c is reserved_on for c in open_now) or getattr(reserved_on, "is_closed", False):
            return "the connection to the relay closed"
        expires = self._relay_transport._reservations.get(relay_id)  # relay's expiry, unix seconds
        if expires is None or expires <= time.time():
            return "the reservation expired"
        return None

    def forget_relay_reservation(self, relay_peer_id: str) -> None:
        self.relay_reservations.pop(relay_peer_id, None)
        self._reserved_over.pop(relay_peer_id, None)

    def connection_kinds(self) -> dict[str, str]:
        """Each connected peer: "direct" if any of its connections is direct, else "relayed"."""
        kinds: dict[str, str] = {}
        network = self._host.get_network()
        for peer in self._host.get_connected_peers():
            relayed = [_is_relayed_conn(c) for c in network.get_connections(peer)]
            kinds[peer.to_base58()] = "relayed" if relayed and all(relayed) else "direct"
        return kinds

    # ---- dial-back probe (reachability) -----------------------------------

    async def probe_dial_back(self, peer_id: str, addrs: list[str], timeout_s: float = 15.0) -> str | None:
        """Ask `peer_id` to open a fresh TCP connection to one of `addrs` (our announced
        addresses); the address it reached, or None if it reached none. The peer only dials
        addresses on the IP it sees our connection come from (no amplification)."""
        payload = "\n".join(addrs).encode()
        try:
            with trio.fail_after(timeout_s):
                stream = await self._host.new_stream(ID.from_base58(peer_id), [TProtocol(DIAL_BACK_PROTOCOL)])
                try:
                    await _write_frame(stream, payload)
                    answer = await _read_response(stream, 4096)
                finally:
                    await _close_quietly(stream)
        except trio.TooSlowError:
            raise TimeoutError(f"dial-back probe to {peer_id}: no answer within {timeout_s}s") from None
        except MeshRequestError:
            raise
        except Exception as exc:
            raise MeshRequestError(f"dial-back probe to {peer_id}: {exc!r}") from exc
        return answer.decode() or None

    async def _serve_dial_back(self, stream: INetStream) -> None:
        try:
            observed = _observed_ip(stream)
            with trio.fail_after(self.config.stream_header_timeout_s):
                length = int.from_bytes(await _read_exact(stream, 4), "big")
                if length > 4096 or _is_relayed_conn_of(stream):
                    await _write_frame(stream, b"refused: too large or over a relay", error=True)
                    return
                addrs = (await _read_exact(stream, length)).decode(errors="replace").split("\n")
            reached = ""
            for addr in addrs:
                host_port = _tcp_host_port(addr)
                if host_port is None or observed is None or host_port[0] != observed:
                    continue
                with trio.move_on_after(self.config.dial_back_timeout_s):
                    with contextlib.suppress(OSError):
                        tcp = await trio.open_tcp_stream(*host_port)
                        await tcp.aclose()
                        reached = addr
                if reached:
                    break
            await _write_frame(stream, reached.encode())
        except Exception as exc:
            logger.debug("dial-back probe failed: %r", exc)
        finally:
            await _close_quietly(stream)

    def _unblock(self, peer: ID) -> None:
        # The swarm refuses to dial a peer for 60 s after all its addresses
        # failed once (network/swarm.py _NegativePeerCache); explicit dials and
        # our own backoff should not be blocked by that.
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def topic_peers(self, channel: str) -> list[str]:
        """Peers known to be subscribed to ``channel`` (what a publish can reach)."""
        peers = self._pubsub.peer_topics.get(topic_for(self.config.mesh_id, channel), set())
        return [p.to_base58() for p in peers]

    def peer_scores(self, channel: str) -> dict[str, float]:
        """GossipSub score of each peer subscribed to ``channel`` (negative = sent invalid messages)."""
        topic = topic_for(self.config.mesh_id, channel)
        peers = self._pubsub.peer_topics.get(topic, set())
        return {p.to_base58(): self._scorer.score(p, [topic]) for p in peers}

    async def wait_for_topic_peers(self, channel: str, count: int, timeout_s: float = 10.0) -> None:
        """Block until at least ``count`` peers are subscribed to ``channel``; TimeoutError otherwise."""
        with trio.move_on_after(timeout_s):
            while len(self.topic_peers(channel)) < count:
                await trio.sleep(0.02)
            return
        raise TimeoutError(f"{channel}: {len(self.topic_peers(channel))}/{count} peers after {timeout_s}s")

    async def _start_bootstrap(self, nursery: trio.Nursery) -> None:
        """Dial bootstrap peers in the background; return once one is up or all gave up."""
        if not self.config.bootstrap:
            return
        first = trio.Event()
        remaining = [len(self.config.bootstrap)]

        def initial_phase_done(connected: bool) -> None:
            remaining[0] -= 1
            if connected or remaining[0] == 0:
                first.set()

        for addr in self.config.bootstrap:
            nursery.start_soon(self._keep_bootstrap_peer, addr, initial_phase_done)
        await first.wait()

    async def _keep_bootstrap_peer(self, addr: str, initial_phase_done: Callable[[bool], None]) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        if info.peer_id == self._host.get_id():
            initial_phase_done(False)
            return
        connected = await self._dial_with_backoff(info, self.config.bootstrap_timeout_s)
        if not connected:
            logger.warning("bootstrap peer %s unreachable after %.0fs", addr, self.config.bootstrap_timeout_s)
        initial_phase_done(connected)
        # Keep the mesh attached to its bootstrap peers if a connection drops, or if it is
        # up without a pubsub stream: under load py-libp2p's protocol negotiation can time
        # out (seen on a 2-core machine: "/meshsub/1.2.0 ... response timed out after 10s")
        # and is never retried, leaving a connected peer that gossips nothing to us.
        without_pubsub = 0
        while True:
            await trio.sleep(self.config.bootstrap_recheck_s)
            if self._is_banned(info.peer_id):
                continue
            if not self._host.get_network().get_connections(info.peer_id):
                await self._dial_with_backoff(info, self.config.bootstrap_recheck_s)
                continue
            without_pubsub = 0 if info.peer_id in self._pubsub.peers else without_pubsub + 1
            if without_pubsub >= 2:  # two rechecks in a row: reconnect, so pubsub negotiates again
                logger.warning("bootstrap peer %s is connected without a pubsub stream; reconnecting",
                               info.peer_id)
                with contextlib.suppress(Exception):
                    await self._host.disconnect(info.peer_id)
                await self._dial_with_backoff(info, self.config.bootstrap_recheck_s)
                without_pubsub = 0

    async def _dial_with_backoff(self, info, budget_s: float) -> bool:  # type: ignore[no-untyped-def]
        deadline = trio.current_time() + budget_s
        delay = 0.2
        while True:
            self._unblock(info.peer_id)
            try:
                with trio.fail_after(min(self.config.dial_timeout_s, max(0.1, deadline - trio.current_time()))):
                    await self._host.connect(info)
                return True
            except Exception as exc:  # any dial failure is retried the same way
                logger.debug("dial %s failed: %r", info.peer_id, exc)
            if trio.current_time() + delay > deadline:
                return False
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # ---- bans ------------------------------------------------------------

    def _is_banned(self, peer: ID) -> bool:
        until = self._banned_until.get(peer)
        return until is not None and until > trio.current_time()

    def _count_invalid(self, forwarder: ID) -> None:
        if forwarder == self._host.get_id():
            return
        count = self._invalid_counts.get(forwarder, 0) + 1
        self._invalid_counts[forwarder] = count
        if count > self.config.invalid_message_limit and not self._is_banned(forwarder):
            logger.warning("peer %s sent %d invalid messages: disconnecting", forwarder, count)
            self._banned_until[forwarder] = trio.current_time() + self.config.blacklist_cooloff_s
            self._pubsub.add_to_blacklist(forwarder)  # pubsub drops its messages and stream
            self._ban_send.send_nowait(forwarder)

    def _on_connected(self, peer: ID) -> None:
        if self._is_banned(peer):
            self.stats.rejected_connections += 1
            self._ban_send.send_nowait(peer)

    async def _enforce_bans(self) -> None:
        async for peer in self._ban_recv:
            self.stats.disconnects += 1
            try:
                await self._host.disconnect(peer)
            except Exception as exc:  # already gone is fine
                logger.debug("disconnect %s: %r", peer, exc)

    async def _expire_bans(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for peer in [p for p, until in self._banned_until.items() if until <= now]:
                del self._banned_until[peer]
                self._invalid_counts.pop(peer, None)
                self._pubsub.remove_from_blacklist(peer)

    # ---- gossip ----------------------------------------------------------

    async def subscribe(self, channel: str, validator: Validator) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Join ``channel``; ``validator(from_peer, data)`` gates delivery AND forwarding."""
        topic = topic_for(self.config.mesh_id, channel)
        if topic in self._subs:
            raise ValueError(f"already subscribed to {channel}")
        send, recv = trio.open_memory_channel[GossipMessage](self.config.delivery_buffer)
        self._subs[topic] = _Subscription(channel, validator, send)
        await self._pubsub.subscribe(topic)
        return recv

    async def publish(self, channel: str, data: bytes) -> None:
        if len(data) > self.config.max_gossip_bytes:
            raise ValueError(
                f"{len(data)} bytes > max_gossip_bytes={self.config.max_gossip_bytes}; use a stream protocol"
            )
        topic = topic_for(self.config.mesh_id, channel)
        await self._pace(topic)
        await self._pubsub.publish(topic, data)
        self.stats.published += 1
        # libp2p's publish path may never yield; let the per-peer senders drain.
        await trio.lowlevel.checkpoint()

    async def _pace(self, topic: str) -> None:
        bucket = self._publish_buckets.get(topic)
        if bucket is None:
            bucket = TokenBucket(self.config.publish_rate_per_s, self.config.publish_burst, trio.current_time())
            self._publish_buckets[topic] = bucket
        while not bucket.try_take(trio.current_time()):
            await trio.sleep(bucket.wait_time(trio.current_time()))
        await self._wait_for_outbound_room()

    async def _wait_for_outbound_room(self) -> None:
        """Back-pressure instead of libp2p's drop-on-full; bounded so one stuck peer cannot stall us."""
        high_water = self.config.outbound_queue_size // 2
        if max(map(len, self._pubsub.peer_queues.values()), default=0) <= high_water:
            return
        self.stats.publish_backpressure_waits += 1
        with trio.move_on_after(self.config.publish_backpressure_timeout_s):
            while max(map(len, self._pubsub.peer_queues.values()), default=0) > high_water:
                await trio.sleep(0.002)

    async def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> None:
        """MeshPubsub.validate_msg: count the verdict and raise to drop (not deliver, not forward)."""
        result, reason = await self._verdict(forwarder, msg)
        if result is ValidationResult.ACCEPT:
            self.stats.accepted += 1
            return
        if result is ValidationResult.IGNORE:
            self.stats.count_ignore(reason)
            self._scorer.ignore_next(forwarder)
            # The library marks only accepted messages as seen, so every copy of an
            # ignored one is validated again and every IHAVE for it draws an IWANT: a
            # mesh under load turned ~40 late messages into ~5800 re-validations. An
            # ignored message stays ignored (REJECT keeps per-forwarder counting).
            self._pubsub._mark_msg_seen(msg)
        else:
            self.stats.count_reject(reason)
            self._count_invalid(forwarder)
            if forwarder == self._host.get_id():
                logger.warning("own message on %s rejected by local validator: %s", msg.topicIDs, reason)
        raise ValidationError(reason)

    async def _verdict(self, forwarder: ID, msg: rpc_pb2.Message) -> tuple[ValidationResult, str]:
        local = forwarder == self._host.get_id()
        if len(msg.topicIDs) != 1:
            return ValidationResult.REJECT, "bad_topic"
        sub = self._subs.get(msg.topicIDs[0])
        if sub is None:
            # Publishing to a channel we do not read is allowed (fanout); receiving one is not.
            return (ValidationResult.ACCEPT, "") if local else (ValidationResult.REJECT, "bad_topic")
        if len(msg.data) > self.config.max_gossip_bytes:
            return ValidationResult.REJECT, "oversized"
        if not local and not signature_validator(msg):
            return ValidationResult.REJECT, "bad_signature"
        return await self._run_validator(sub, ID(msg.from_id).to_base58(), msg.data)

    @staticmethod
    async def _run_validator(sub: _Subscription, from_peer: str, data: bytes) -> tuple[ValidationResult, str]:
        try:
            verdict = sub.validator(from_peer, data)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            result, reason = verdict
        except Exception:
            # A crashing validator is our bug, not the sender's: drop without penalty.
            logger.exception("validator for %s raised", sub.channel)
            return ValidationResult.IGNORE, "validator_error"
        if not isinstance(result, ValidationResult):
            logger.error("validator for %s returned %r", sub.channel, result)
            return ValidationResult.IGNORE, "validator_error"
        return result, reason or result.value

    def _deliver(self, msg: rpc_pb2.Message) -> None:
        """MeshPubsub.notify_subscriptions: hand a validated message to the subscriber."""
        sub = self._subs.get(msg.topicIDs[0]) if msg.topicIDs else None
        if sub is None:
            return
        message = GossipMessage(
            channel=sub.channel,
            topic=msg.topicIDs[0],
            from_peer=ID(msg.from_id).to_base58(),
            data=msg.data,
            received_ms=now_ms(),
            seqno=msg.seqno,
        )
        try:
            sub.send.send_nowait(message)
            self.stats.delivered += 1
        except trio.WouldBlock:
            self.stats.dropped_delivery_buffer_full += 1
            logger.warning("subscriber for %s is %d messages behind: dropping", sub.channel, self.config.delivery_buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats.dropped_subscriber_closed += 1

    # ---- request/response streams ---------------------------------------

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler, max_request_bytes: int, *,
                           envelope_first: EnvelopeFirst | None = None) -> None:
        """Serve ``protocol_id``: one length-prefixed request, one length-prefixed response per
        stream. With ``envelope_first`` the request's envelope is verified before its payload
        is read, and only the payload it signs for is read."""
        route = _Route(protocol_id, handler, max_request_bytes, envelope_first)

        async def serve(stream: INetStream) -> None:
            await self._serve(stream, route)

        self._host.set_stream_handler(TProtocol(protocol_id), serve)

    async def _serve(self, stream: INetStream, route: _Route) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            if self._is_banned(peer):
                raise StreamRefused("blacklisted", "this peer is blacklisted here")
            with self._stream_limits.stream(peer):
                await self._serve_one(stream, peer, route)
        except StreamRefused as refusal:
            await self._refuse(stream, peer, route.protocol_id, refusal)
        except Exception as exc:  # one bad stream must never take the host down
            logger.debug("%s from %s failed: %r", route.protocol_id, peer, exc)
            await _reset_quietly(stream)
        else:
            await _close_quietly(stream)

    async def _serve_one(self, stream: INetStream, peer: ID, route: _Route) -> None:
        length, head, body_length = await self._read_head(stream, peer, route)
        async with self._stream_limits.reservation(peer, length):
            request = head + await self._read_body(stream, body_length)
            with trio.move_on_after(self.config.stream_timeout_s) as handling:
                await self._answer(stream, peer, route, request)
            if handling.cancelled_caught:
                raise TimeoutError(f"handler and response took over {self.config.stream_timeout_s}s")

    async def _read_head(self, stream: INetStream, peer: ID, route: _Route) -> tuple[int, bytes, int]:
        """(request length, the bytes read so far, the body length still to read): the length
        prefix and, for an envelope-first protocol, the envelope, verified."""
        with trio.move_on_after(self.config.stream_header_timeout_s):
            length = int.from_bytes(await self._read(stream, 4), "big")
            started_ms = now_ms()
            _request_started_ms.set(started_ms)
            if length > route.max_request_bytes:
                raise StreamRefused("request_too_large",
                                    f"request of {length} bytes is over the {route.max_request_bytes}-byte limit")
            if route.envelope_first is None:
                return length, b"", length
            head = await self._read_envelope(stream, route.envelope_first, length)
            payload = self._admit(peer, route.envelope_first, head[4:], started_ms)
            if len(head) + payload != length:
                raise StreamRefused("length_mismatch", f"request of {length} bytes, but its "
                                    f"{len(head) - 4}-byte envelope signs for {payload} payload bytes")
            return length, head, payload
        raise StreamRefused("read_timeout", f"no request header within {self.config.stream_header_timeout_s}s")

    async def _read_envelope(self, stream: INetStream, rule: EnvelopeFirst, length: int) -> bytes:
        prefix = await self._read(stream, 4)
        envelope_length = int.from_bytes(prefix, "big")
        if envelope_length > rule.max_envelope_bytes or 4 + envelope_length > length:
            raise StreamRefused("envelope_too_large", f"envelope of {envelope_length} bytes in a "
                                f"{length}-byte request; at most {rule.max_envelope_bytes}")
        return prefix + await self._read(stream, envelope_length)

    @staticmethod
    def _admit(peer: ID, rule: EnvelopeFirst, envelope: bytes, started_ms: int) -> int:
        payload = rule.admit(peer.to_base58(), envelope, started_ms)
        if not (isinstance(payload, int) and payload >= 0):
            raise TypeError(f"envelope admission returned {payload!r}, not a byte count")
        return payload

    async def _read_body(self, stream: INetStream, n: int) -> bytes:
        # A deadline that scales with the size: an honest upload at the minimum rate makes
        # it, a peer that trickles holds its reservation for the floor plus that at most,
        # and one that stalls for the idle timeout.
        allowed_s = self.config.stream_read_floor_s + n / self.config.stream_min_rate_bytes_per_s
        body = bytearray()
        with trio.move_on_after(allowed_s) as deadline:
            async with trio.open_nursery() as nursery:
                watch = _StallWatch(body, self.config.stream_idle_timeout_s, nursery.cancel_scope)
                nursery.start_soon(watch.run)
                await self._read_into(stream, body, n)
                nursery.cancel_scope.cancel()
        if watch.stalled:
            raise StreamRefused("read_timeout", f"no byte for {watch.idle_s}s after {len(body)} of {n} bytes")
        if deadline.cancelled_caught:
            raise StreamRefused("read_timeout", f"{n}-byte request body not in within {allowed_s:.1f}s")
        return bytes(body)

    async def _read(self, stream: INetStream, n: int) -> bytes:
        buf = bytearray()
        await self._read_into(stream, buf, n)
        return bytes(buf)

    async def _read_into(self, stream: INetStream, buf: bytearray, n: int) -> None:
        while len(buf) < n:
            chunk = await stream.read(n - len(buf))
            if not chunk:
                raise EOFError(f"stream ended after {len(buf)}/{n} bytes")
            buf += chunk
            self.stream_stats.stream_bytes_read += len(chunk)

    async def _answer(self, stream: INetStream, peer: ID, route: _Route, request: bytes) -> None:
        try:
            response = await route.handler(peer.to_base58(), request)
        except Exception as exc:
            logger.exception("handler for %s raised", route.protocol_id)
            await _write_frame(stream, f"handler error: {type(exc).__name__}".encode(), error=True)
            return
        if len(response) > _MAX_FRAME:
            await _write_frame(stream, b"response too large for framing", error=True)
            return
        self.stats.stream_requests_served += 1
        await _write_frame(stream, response)

    async def _refuse(self, stream: INetStream, peer: ID, protocol_id: str, refusal: StreamRefused) -> None:
        """Count and log the refusal, tell the peer why, then drop the stream and whatever
        it still has buffered here."""
        self.stats.stream_requests_refused += 1
        self.stream_stats.count_refusal(refusal.reason)
        logger.info("refused %s from %s reason=%s: %s", protocol_id, peer, refusal.reason, refusal.hint)
        with trio.CancelScope(shield=True), trio.move_on_after(_REFUSAL_GRACE_S):
            try:
                await _write_frame(stream, f"{refusal.reason}: {refusal.hint}".encode(), error=True)
                await stream.close()
                await _wait_for_hang_up(stream)
            except Exception as exc:
                logger.debug("refusal to %s: %r", peer, exc)
        # py-libp2p frees a stream's buffer on reset, and a reset received before the error
        # frame is read discards that frame: so reset once the peer hung up (our client does
        # on the error frame) or the grace is over, not at once.
        await _reset_quietly(stream)

    def allow_redial(self, peer_id: str) -> None:
        """Let the next request dial `peer_id` again now. py-libp2p 0.8.1 refuses to dial a
        peer for 60 s after one failed dial (swarm.py _NegativePeerCache); a caller that
        retries a restarting peer on its own backoff (node/blobs.py) clears that first."""
        unblock = getattr(self._host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(ID.from_base58(peer_id))

    async def request(
        self, peer_id: str, protocol_id: str, payload: bytes, max_response_bytes: int, timeout_s: float = 30
    ) -> bytes:
        """One request/response exchange.  MeshRequestError if refused/broken, TimeoutError if slow."""
        if len(payload) > _MAX_FRAME:
            raise ValueError("payload too large for framing")
        try:
            with trio.fail_after(timeout_s):
                return await self._exchange(ID.from_base58(peer_id), protocol_id, payload, max_response_bytes)
        except trio.TooSlowError:
            raise TimeoutError(f"{protocol_id} to {peer_id}: no response within {timeout_s}s") from None

    async def _exchange(self, peer: ID, protocol_id: str, payload: bytes, max_response: int) -> bytes:
        try:
            stream = await self._host.new_stream(peer, [TProtocol(protocol_id)])
        except Exception as exc:
            raise MeshRequestError(f"cannot open {protocol_id} to {peer}: {exc}") from exc
        outcome: bytes | MeshRequestError = MeshRequestError("no response")
        try:
            # Write and read concurrently: a server refusing an oversized request
            # answers without reading it, so a sequential writer would block on
            # flow control.  The writer is stopped by a stream reset, never by
            # cancellation: in py-libp2p 0.8.1 cancelling a yamux write blocked
            # on flow control makes the next stream open on that connection fail.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_quietly, stream, len(payload).to_bytes(4, "big") + payload)
                try:
                    outcome = await _read_response(stream, max_response)
                except MeshRequestError as exc:
                    outcome = exc  # raised below: from inside the nursery it would arrive wrapped in an ExceptionGroup
                    await _reset_quietly(stream)
        finally:
            await (_close_quietly(stream) if isinstance(outcome, bytes) else _reset_quietly(stream))
        if isinstance(outcome, MeshRequestError):
            raise outcome
        return outcome


# ---- helpers --------------------------------------------------------------


DIAL_BACK_PROTOCOL = "/sealmesh/dial-back/1"


def is_relayed_addr(addr: str) -> bool:
    return "/p2p-circuit" in addr


def _tcp_host_port(addr: str) -> tuple[str, int] | None:
    try:
        maddr = multiaddr.Multiaddr(addr)
        return maddr.value_for_protocol("ip4"), int(maddr.value_for_protocol("tcp"))
    except Exception:
        return None


def _observed_ip(stream: INetStream) -> str | None:
    try:
        remote = stream.get_remote_address()
    except Exception:
        return None
    return remote[0] if remote else None


def _is_relayed_conn(conn: INetConn) -> bool:
    # The connection type, set from the raw connection (RawConnection(connection_type=RELAYED)
    # in circuit_v2) or tagged by the relay's STOP handler; transport addresses fall back to
    # peerstore addresses, which may list a relayed address for a direct connection.
    try:
        kind = conn._get_connection_type_metadata()  # type: ignore[attr-defined]
    except Exception:
        kind = None
    if kind is not None and getattr(kind, "name", "") != "UNKNOWN":
        return kind.name == "RELAYED"
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:
        return False


def _is_relayed_conn_of(stream: INetStream) -> bool:
    conn = getattr(stream, "swarm_conn", None)
    if conn is not None:
        return _is_relayed_conn(conn)
    return _observed_ip(stream) is None


def _make_router(config: MeshConfig, stats: MeshStats) -> MeshGossipSub:
    return MeshGossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],  # 1.1+ for scoring, 1.2 for IDONTWANT
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        gossip_window=config.gossip_window,
        gossip_history=config.gossip_history,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=config.heartbeat_interval_s,  # type: ignore[arg-type]  # int in the signature, float works
        # Adaptive gossip can stretch the heartbeat to 30-60 s on "poor health";
        # eclipse protection wants 3 distinct IPs (meaningless on one host / behind NAT).
        adaptive_gossip_enabled=False,
        eclipse_protection_enabled=False,
        spam_protection_enabled=True,  # replaced by MeshGossipSub's token bucket
        max_pending_messages_per_peer=config.pending_per_peer,
        pending_messages_ttl=config.pending_ttl_s,
        stats=stats,
        forward_rate=config.forward_rate_per_s,
        forward_burst=config.forward_burst,
    )


def _score_params(config: MeshConfig) -> ScoreParams:
    limit = float(config.invalid_message_limit)
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(
            weight=config.score_invalid_weight, cap=4 * limit, decay=config.score_invalid_decay
        ),
        # Stop sending to a peer halfway to the hard limit; graylist at the limit.
        gossip_threshold=-0.5 * limit * config.score_invalid_weight,
        graylist_threshold=-limit * config.score_invalid_weight,
        # Never let the score gate *incoming* messages: they would be dropped
        # before validation, uncounted, and the peer would never reach the limit.
        publish_threshold=-math.inf,
        accept_px_threshold=-math.inf,
    )


async def _read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


async def _wait_for_hang_up(stream: INetStream) -> None:
    """Until the peer closes or resets; what it still sends is read and dropped (at most
    _REFUSAL_DRAIN_BYTES), so a refused request is never buffered."""
    dropped = 0
    while dropped < _REFUSAL_DRAIN_BYTES:
        try:
            chunk = await stream.read(65536)
        except Exception:  # reset or EOF: hung up
            return
        if not chunk:
            return
        dropped += len(chunk)


async def _write_frame(stream: INetStream, payload: bytes, *, error: bool = False) -> None:
    header = len(payload) | (_ERROR_FLAG if error else 0)
    await stream.write(header.to_bytes(4, "big") + payload)


async def _read_response(stream: INetStream, max_response: int) -> bytes:
    try:
        header = int.from_bytes(await _read_exact(stream, 4), "big")
        length = header & _MAX_FRAME
        if header & _ERROR_FLAG:
            detail = await _read_exact(stream, min(length, 4096))
            raise MeshRequestError(f"refused by remote: {detail.decode(errors='replace')}")
        if length > max_response:
            raise MeshRequestError(f"response too large: {length} bytes > limit {max_response}")
        return await _read_exact(stream, length)
    except MeshRequestError:
        raise
    except Exception as exc:
        raise MeshRequestError(f"stream broken: {exc!r}") from exc


async def _write_quietly(stream: INetStream, data: bytes) -> None:
    # Failures surface through the reader (error frame or EOF), which knows why.
    try:
        await stream.write(data)
    except Exception as exc:
        logger.debug("request write stopped: %r", exc)


async def _close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.close()
        except Exception:
            pass


async def _reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass
