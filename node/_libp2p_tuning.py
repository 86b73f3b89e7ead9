"""Subclasses of py-libp2p 0.8.1 pubsub internals that make its silent drops visible.

py-libp2p drops gossip messages in several places without telling the caller
(docs/mesh.md lists them with file:line).  Each override below either replaces a
hard-coded limit with a configurable one or counts what the library drops, so
that node/mesh.py can export the numbers.  All limits live on instances created
by one Mesh; the one module-level change is ``install_signed_record_memo``, a pure
cache in front of the library's own signed-record check (same answer, less CPU).

These overrides touch private attributes of py-libp2p 0.8.1 (``RpcQueue._queue``,
``GossipSub._pending_messages``); ``check_library_shape`` fails loudly at start-up
if an upgrade moved them, instead of letting the limits silently fall back.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.pubsub.score import PeerScorer
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

logger = logging.getLogger(__name__)

_SIGNING_PREFIX = PUBSUB_SIGNING_PREFIX.encode()
IDONTWANT_MIN_BYTES = 1024


@dataclass
class MeshStats:
    """Counters for /metrics.  Every ``dropped_*`` is a message libp2p would drop silently."""

    published: int = 0
    delivered: int = 0
    accepted: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    # router.publish: per-(forwarder, topic) rate limit; message delivered locally, not forwarded
    dropped_rate_limited: int = 0
    # send_rpc: per-peer outbound queue full / RPC above the max frame size
    dropped_outbound_queue_full: int = 0
    dropped_outbound_oversized: int = 0
    # our subscription channel full / closed by the consumer
    dropped_delivery_buffer_full: int = 0
    dropped_subscriber_closed: int = 0
    # identify-pending queue for peers whose subscriptions are not known yet
    # (TTL expiry or overflow).  Mostly messages for peers that never subscribe.
    dropped_pending_evicted: int = 0
    dropped_equivocation: int = 0
    # RPCs still queued for a peer whose stream died (pubsub closes the queue);
    # e.g. a yamux write that waited >5 s for a window update under CPU load.
    dropped_peer_gone_queued: int = 0
    publish_backpressure_waits: int = 0
    disconnects: int = 0
    rejected_connections: int = 0
    stream_requests_served: int = 0
    stream_requests_refused: int = 0

    def count_reject(self, reason: str) -> None:
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def count_ignore(self, reason: str) -> None:
        self.ignored_by_reason[reason] = self.ignored_by_reason.get(reason, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """A copy safe to hand to a metrics exporter while the mesh keeps counting."""
        out: dict[str, object] = dict(self.__dict__)
        out["rejected_by_reason"] = dict(self.rejected_by_reason)
        out["ignored_by_reason"] = dict(self.ignored_by_reason)
        return out


class TokenBucket:
    """Classic token bucket: allows bursts of ``burst`` and ``rate`` per second sustained.

    Replaces libp2p's sliding-window list, whose cost is O(limit) per message
    (a flood at the limit costs O(limit^2) CPU per second).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 if available now); does not take it."""
        self._refill(now)
        if self.tokens >= 1.0 or self.rate <= 0:
            return 0.0 if self.tokens >= 1.0 else math.inf
        return (1.0 - self.tokens) / self.rate


class ResizingQueueMap(dict[ID, RpcQueue]):
    """``Pubsub.peer_queues`` replacement that resizes each per-peer outbound queue.

    pubsub.py creates every queue as ``RpcQueue()`` (32 slots, rpc_queue.py
    OutBoundQueueSize) and stores it here before the first push, so resizing on
    insert is the one hook that needs no copy of ``_handle_new_peer``.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self._size
        super().__setitem__(peer_id, queue)


class MeshScorer(PeerScorer):
    """PeerScorer whose P4 (invalid messages) counts REJECT but not IGNORE.

    push_msg calls ``on_invalid_message`` for every failed validation; libp2p has
    no IGNORE verdict.  ``ignore_next`` marks the forwarder whose next failure is
    an IGNORE: validate_msg raises and push_msg calls this hook with no await in
    between, so the mark cannot leak onto another message.
    """

    def __init__(self, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params)
        self._ignore_next: set[ID] = set()

    def ignore_next(self, peer: ID) -> None:
        self._ignore_next.add(peer)

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        if peer in self._ignore_next:
            self._ignore_next.discard(peer)
            return
        super().on_invalid_message(peer, topic)


class MeshGossipSub(GossipSub):
    """GossipSub with a configurable token-bucket rate limit and counted drops."""

    def __init__(
        self,
        *args,  # type: ignore[no-untyped-def]
        stats: MeshStats,
        forward_rate: float,
        forward_burst: float,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._stats = stats
        self._forward_rate = forward_rate
        self._forward_burst = forward_burst
        self._buckets: dict[tuple[ID, str], TokenBucket] = {}
        self._skip_idontwant: set[bytes] = set()

    def _check_spam_protection(self, peer_id: ID, msg: rpc_pb2.Message) -> bool:
        # libp2p applies this to our own publishes too (forwarder == self);
        # Mesh.publish paces those itself, so only remote forwarders are limited.
        if self.pubsub is None or peer_id == self.pubsub.my_id:
            return True
        now = trio.current_time()
        for topic in msg.topicIDs:
            bucket = self._buckets.get((peer_id, topic))
            if bucket is None:
                bucket = TokenBucket(self._forward_rate, self._forward_burst, now)
                self._buckets[(peer_id, topic)] = bucket
            if not bucket.try_take(now):
                self._stats.dropped_rate_limited += 1
                return False
        return True

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        ok = super()._check_equivocation(msg)
        if not ok:
            self._stats.dropped_equivocation += 1
        return ok

    def _handle_dropped_rpc(self, peer_id: ID, rpc: rpc_pb2.RPC, reason: str) -> None:
        if reason == "queue_full":
            self._stats.dropped_outbound_queue_full += len(rpc.publish)
        else:
            self._stats.dropped_outbound_oversized += len(rpc.publish)
        if rpc.publish:
            logger.warning("dropped %d gossip message(s) to %s: %s", len(rpc.publish), peer_id, reason)
        super()._handle_dropped_rpc(peer_id, rpc, reason)

    def _prune_pending_messages(self, peer_id: ID) -> None:
        # .get() so the defaultdict does not grow an entry just by being measured
        before = len(self._pending_messages.get(peer_id, ()))
        super()._prune_pending_messages(peer_id)
        after = len(self._pending_messages.get(peer_id, ()))
        self._stats.dropped_pending_evicted += before - after

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        # IDONTWANT only pays for itself on large messages: for a small one it is an
        # extra RPC to every mesh peer, as costly as the duplicate it prevents. go-libp2p
        # sends it only at or above 1 KiB (IDontWantMessageThreshold); so do we.
        if len(pubsub_msg.data) >= IDONTWANT_MIN_BYTES or self.pubsub is None:
            await super().publish(msg_forwarder, pubsub_msg)
            return
        msg_id = self.pubsub.get_message_id(pubsub_msg)
        self._skip_idontwant.add(msg_id)
        try:
            await super().publish(msg_forwarder, pubsub_msg)
        finally:
            self._skip_idontwant.discard(msg_id)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids) -> None:  # type: ignore[no-untyped-def]
        if msg_id not in self._skip_idontwant:
            await super()._emit_idontwant_for_message(msg_id, topic_ids)

    def remove_peer(self, peer_id: ID) -> None:
        super().remove_peer(peer_id)
        for key in [k for k in self._buckets if k[0] == peer_id]:
            del self._buckets[key]


@dataclass(frozen=True)
class PubsubHooks:
    """What MeshPubsub calls back into; keeps the subclass ignorant of Mesh."""

    validate: Callable[[ID, rpc_pb2.Message], Awaitable[None]]
    deliver: Callable[[rpc_pb2.Message], None]


class MeshPubsub(Pubsub):
    """Pubsub whose validation and local delivery are owned by node/mesh.py.

    * ``validate_msg`` is replaced: the library version caches verdicts by
      message id, so a second peer forwarding the same invalid message would not
      be counted against; ours runs for every forwarder and also checks the
      signature, so forged messages are counted instead of silently dropped.
      (That is why ``strict_signing`` is switched off after construction: the
      library would otherwise drop bad signatures before validate_msg is called.)
    * ``notify_subscriptions`` is replaced: the library pushes into a 32-slot
      channel and drops on full (pubsub.py SUBSCRIPTION_CHANNEL_SIZE).
    * ``publish`` keeps signing every message although ``strict_signing`` is off.
    """

    def __init__(self, host, router, *, hooks: PubsubHooks, stats: MeshStats, outbound_queue_size: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(host, router, strict_signing=True, **kwargs)
        self._hooks = hooks
        self._stats = stats
        self.peer_queues = ResizingQueueMap(outbound_queue_size)
        self.strict_signing = False  # verification moves into validate_msg (see class doc)

    async def validate_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        await self._hooks.validate(msg_forwarder, msg)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        self._hooks.deliver(publish_message)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        # The library closes the peer's outbound queue; whatever is still in it is lost.
        queue = self.peer_queues.get(peer_id)
        if queue is not None and len(queue):
            self._stats.dropped_peer_gone_queued += len(queue)
            logger.warning("peer %s gone with %d RPC(s) still queued", peer_id, len(queue))
        super()._handle_dead_peer(peer_id)

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        # The library's version awaits a stream reset and then does `del self.peers[id]`;
        # if the peer died meanwhile, the dead-peer handler already removed it and the
        # KeyError kills the whole pubsub service (seen in a 20-node run). Same steps,
        # tolerant of that race.
        stream = self.peers.get(peer_id)
        if stream is not None:
            try:
                await stream.reset()
            except Exception:  # already reset or closed: nothing left to do
                pass
            self.peers.pop(peer_id, None)
        self._forget_all_subscriptions(peer_id)

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        topic_ids = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        msg = rpc_pb2.Message(
            data=data, topicIDs=topic_ids, from_id=self.my_id.to_bytes(), seqno=self._next_seqno()
        )
        assert self.sign_key is not None  # set because we construct with strict_signing=True
        msg.signature = self.sign_key.sign(_SIGNING_PREFIX + msg.SerializeToString())
        msg.key = self.host.get_public_key().serialize()
        await self.push_msg(self.my_id, msg)


class SignedRecordMemo:
    """Remembers which signed peer records were already verified, per (host, sender).

    py-libp2p 0.8.1 attaches the sender's signed peer record to every pubsub RPC and
    verifies it (envelope parse + ed25519) on every receipt, twice for RPCs with control
    messages: about 15 % of a node's CPU under gossip load. The record is the same bytes
    until the sender's addresses change, so a verified (host, sender, bytes) triple is
    accepted from memory; it is re-verified after `refresh_s` so the peerstore's 2 h TTL
    keeps being renewed. Same inputs, same answer: only the repeated work is gone.
    """

    marker = "sealmesh_signed_record_memo"

    def __init__(self, verify, capacity: int = 4096, refresh_s: float = 600.0) -> None:  # type: ignore[no-untyped-def]
        self._verify = verify
        self._capacity, self._refresh_s = capacity, refresh_s
        self._verified: dict[tuple[ID, ID, bytes], float] = {}
        self.hits = 0

    def __call__(self, msg: rpc_pb2.RPC, host, peer_id: ID) -> bool:  # type: ignore[no-untyped-def]
        if not msg.HasField("senderRecord"):
            return True
        key = (host.get_id(), peer_id, msg.senderRecord)
        now = time.monotonic()
        verified_at = self._verified.get(key)
        if verified_at is not None and now - verified_at < self._refresh_s:
            self.hits += 1
            return True
        ok = self._verify(msg, host, peer_id)
        if ok:
            if len(self._verified) >= self._capacity:
                self._verified.pop(next(iter(self._verified)))  # oldest first
            self._verified[key] = now
        return ok


def install_signed_record_memo() -> None:
    """Route the pubsub modules' record check through one SignedRecordMemo (idempotent)."""
    import libp2p.pubsub.gossipsub as gossipsub_module
    import libp2p.pubsub.pubsub as pubsub_module

    current = pubsub_module.maybe_consume_signed_record
    if getattr(current, SignedRecordMemo.marker, False):
        return
    memo = SignedRecordMemo(current)
    setattr(memo, SignedRecordMemo.marker, True)
    pubsub_module.maybe_consume_signed_record = memo
    gossipsub_module.maybe_consume_signed_record = memo


def check_library_shape() -> None:
    """Fail at start-up if py-libp2p moved the internals the overrides rely on."""
    probe = RpcQueue()
    if not hasattr(probe, "_queue") or not hasattr(probe._queue, "max_size"):
        raise RuntimeError("py-libp2p RpcQueue internals changed; node/_libp2p_tuning.py needs updating")
    overridden = {
        GossipSub: ("_check_spam_protection", "_check_equivocation", "_handle_dropped_rpc",
                    "_prune_pending_messages", "_emit_idontwant_for_message"),
        Pubsub: ("validate_msg", "notify_subscriptions", "publish", "_handle_dead_peer",
                 "_teardown_if_connected", "_forget_all_subscriptions", "_mark_msg_seen"),
    }
    for cls, names in overridden.items():
        for name in names:
            if not hasattr(cls, name):
                raise RuntimeError(f"py-libp2p {cls.__name__}.{name} is gone; node/_libp2p_tuning.py needs updating")
