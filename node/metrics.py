"""Prometheus metrics of one node, in its own registry (no process-global state).

prometheus_client's metrics are thread-safe, which the API thread relies on.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("sealmesh_messages_received", "Verified messages delivered",
                                ["channel", "type"], registry=self.registry)
        self.published = Counter("sealmesh_messages_published", "Messages this node published",
                                 ["channel", "type"], registry=self.registry)
        self.rejected = Counter("sealmesh_messages_rejected", "Messages rejected, by reason",
                                ["source", "reason"], registry=self.registry)
        self.peers = Gauge("sealmesh_peers", "Connected libp2p peers", registry=self.registry)
        self.members_heard = Gauge("sealmesh_members_heard",
                                   "Members whose signed announcement arrived",
                                   registry=self.registry)
        self.delivery_latency = Histogram(
            "sealmesh_gossip_delivery_seconds", "Publish-to-delivery latency of pings",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=self.registry)

    def reject(self, source: str, reason: str) -> None:
        self.rejected.labels(source=source, reason=reason).inc()

    def add_counters(self, name: str, doc: str, read: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Expose counters kept elsewhere (the mesh's drop counts), read at scrape time."""
        self.registry.register(_ReadAtScrape(name, doc, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadAtScrape(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc, labels=["kind"])
        for kind, value in self.read():
            family.add_metric([kind], value)
        yield family
