"""Prometheus metrics of one node, in its own registry (no process-global state).

Names follow Prometheus' conventions: a `sealmesh_` prefix, the unit in the name
(`_seconds`, `_bytes`), counters end in `_total` (prometheus_client adds it to a
Counter's name). docs/observability.md lists every one; deploy/prometheus/ holds a
scrape config and the rules that read them.

Two kinds of source:
- counters the node increments as things happen (messages, rejections, latencies);
- families read from the node's /status document at scrape time (rounds, FHE
  challenges, the head), so the role services need no metrics code of their own. Rounds
  are counted once each as they reach a terminal phase (_RoundTally), which keeps the
  counters monotonic although /status lists only the rounds still kept.

prometheus_client's metrics are thread-safe, which the API thread relies on.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# mesh_stats keys (node/mesh.py) that are levels, not counts: exposed as gauges.
MESH_GAUGES = {
    "streams_open": ("sealmesh_mesh_streams_open", "Stream requests being served now"),
    "stream_reserved_bytes": ("sealmesh_mesh_stream_reserved_bytes", "Bytes reserved for stream requests now"),
    "stream_reserved_peak_bytes": ("sealmesh_mesh_stream_reserved_peak_bytes",
                                   "Most bytes ever reserved for stream requests at once"),
}
MESH_BYTE_COUNTERS = {"stream_bytes_read": ("sealmesh_mesh_stream_read_bytes", "Bytes read from stream requests")}
TERMINAL_ROUND_PHASES = ("final", "aborted")
FHE_OUTCOMES = ("ok", "wrong", "timeout", "error")


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("sealmesh_messages_received", "Verified messages delivered",
                                ["channel", "type"], registry=self.registry)
        self.published = Counter("sealmesh_messages_published", "Messages this node published",
                                 ["channel", "type"], registry=self.registry)
        self.rejected = Counter("sealmesh_messages_rejected", "Messages rejected, by reason",
                                ["source", "reason"], registry=self.registry)
        self.peers = Gauge("sealmesh_connected_peers", "Connected libp2p peers", registry=self.registry)
        self.members_heard = Gauge("sealmesh_members_heard",
                                   "Members whose signed announcement arrived",
                                   registry=self.registry)
        self.delivery_latency = Histogram(
            "sealmesh_gossip_delivery_seconds", "Publish-to-delivery latency of pings",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=self.registry)
        self._status_watched = False

    def reject(self, source: str, reason: str) -> None:
        self.rejected.labels(source=source, reason=reason).inc()

    def add_counters(self, name: str, doc: str, read: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Expose counters kept elsewhere (the mesh's drop counts), read at scrape time."""
        self.registry.register(_ReadAtScrape(name, doc, read))

    def watch_status(self, status: Callable[[], dict[str, Any]]) -> None:
        """Expose what the /status document knows (rounds, FHE, head) at scrape time; once."""
        if not self._status_watched:
            self._status_watched = True
            self.registry.register(StatusCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadAtScrape(Collector):
    """The mesh's counters as `<name>_total{kind}`; its levels and byte counts under
    names of their own (MESH_GAUGES, MESH_BYTE_COUNTERS)."""

    def __init__(self, name: str, doc: str, read: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc, labels=["kind"])
        gauges = {key: GaugeMetricFamily(n, d) for key, (n, d) in MESH_GAUGES.items()}
        byte_counters = {key: CounterMetricFamily(n, d) for key, (n, d) in MESH_BYTE_COUNTERS.items()}
        for kind, value in self.read():
            if kind in gauges:
                gauges[kind].add_metric([], value)
            elif kind in byte_counters:
                byte_counters[kind].add_metric([], value)
            else:
                family.add_metric([kind], value)
        yield family
        yield from (g for g in gauges.values() if g.samples)
        yield from (c for c in byte_counters.values() if c.samples)


class _RoundTally:
    """Rounds counted once each when /status first shows them final or aborted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counted: set[int] = set()
        self.final = 0
        self.aborted: dict[str, int] = {}

    def update(self, rounds: list[dict[str, Any]]) -> None:
        with self._lock:
            for r in rounds:
                number, phase = r.get("round"), r.get("phase")
                if not isinstance(number, int) or phase not in TERMINAL_ROUND_PHASES or number in self._counted:
                    continue
                self._counted.add(number)
                if phase == "final":
                    self.final += 1
                else:
                    reason = r.get("abort_reason") or "unknown"
                    self.aborted[reason] = self.aborted.get(reason, 0) + 1
            kept = [r["round"] for r in rounds if isinstance(r.get("round"), int)]
            if kept:  # retention drops only ended rounds: ids below the oldest kept never return
                self._counted = {n for n in self._counted if n >= min(kept)}


class StatusCollector(Collector):
    """Families drawn from the /status document (node/daemon.py _refresh_status)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status
        self.rounds = _RoundTally()

    def collect(self):
        doc = self.status() or {}
        sections = doc.get("sections") or {}
        info = GaugeMetricFamily("sealmesh_node_info", "This node: mesh, role and hotkey (always 1)",
                                 labels=["mesh_id", "role", "hotkey", "name"])
        info.add_metric([str(doc.get(k) or "") for k in ("mesh_id", "role", "hotkey", "name")], 1)
        yield info
        yield _gauge("sealmesh_uptime_seconds", "Seconds since the node started", doc.get("uptime_s"))
        members = (doc.get("presence") or {}).get("members") or []
        yield _gauge("sealmesh_members_alive", "Other members heard within the liveness window",
                     sum(1 for m in members if isinstance(m, dict) and m.get("alive")))
        yield _gauge("sealmesh_problems", "Problems that keep a role of this node from working",
                     len(doc.get("problems") or []))
        yield from self._training(sections.get("training"))
        yield from _fhe(sections.get("fhe"))
        yield from _head(sections.get("settlement"))

    def _training(self, section: Any):
        if not isinstance(section, dict) or section.get("role") != "validator":
            return
        rounds = [r for r in section.get("rounds") or [] if isinstance(r, dict)]
        self.rounds.update(rounds)
        final = CounterMetricFamily("sealmesh_rounds_final", "Training rounds that reached final here")
        final.add_metric([], self.rounds.final)
        aborted = CounterMetricFamily("sealmesh_rounds_aborted", "Training rounds aborted, by reason",
                                      labels=["reason"])
        for reason, count in sorted(self.rounds.aborted.items()):
            aborted.add_metric([reason], count)
        yield final
        yield aborted
        open_rounds = [r for r in rounds if r.get("phase") not in TERMINAL_ROUND_PHASES]
        phase = GaugeMetricFamily("sealmesh_round_phase", "The open round's phase (1 for the current one)",
                                  labels=["phase"])
        if open_rounds:
            phase.add_metric([str(open_rounds[-1].get("phase"))], 1)
        yield phase
        if rounds:
            yield _gauge("sealmesh_round_current", "Number of the newest round this node knows",
                         rounds[-1].get("round"))
        evaluated = [r for r in rounds if isinstance(r.get("loss_after"), (int, float))]
        if evaluated:
            yield _gauge("sealmesh_round_eval_loss", "Eval loss after the newest evaluated round",
                         evaluated[-1]["loss_after"])
        finished = [r for r in rounds if r.get("phase") == "final" and isinstance(r.get("seconds"), dict)]
        if finished:
            seconds = GaugeMetricFamily("sealmesh_round_phase_duration_seconds",
                                        "Seconds each phase of the newest final round took", labels=["phase"])
            for name, value in sorted(finished[-1]["seconds"].items()):
                if isinstance(value, (int, float)):
                    seconds.add_metric([name], value)
            yield seconds


def _fhe(section: Any):
    if not isinstance(section, dict) or section.get("role") != "validator":
        return
    challenges = CounterMetricFamily("sealmesh_fhe_challenges",
                                     "FHE challenges this validator judged, by miner and outcome",
                                     labels=["miner", "outcome"])
    score = GaugeMetricFamily("sealmesh_fhe_miner_score", "Each miner's score over its window", labels=["miner"])
    latency = GaugeMetricFamily("sealmesh_fhe_miner_median_latency_seconds",
                                "Median latency of each miner's ok answers", labels=["miner"])
    for miner, m in sorted((section.get("miners") or {}).items()):
        for outcome in FHE_OUTCOMES:
            challenges.add_metric([miner, outcome], float(m.get(outcome) or 0))
        if isinstance(m.get("score"), (int, float)):
            score.add_metric([miner], m["score"])
        if isinstance(m.get("median_latency_s"), (int, float)):
            latency.add_metric([miner], m["median_latency_s"])
    yield challenges
    yield score
    yield latency
    epochs = CounterMetricFamily("sealmesh_fhe_epochs", "FHE challenge epochs this validator finished")
    epochs.add_metric([], len(section.get("epochs_done") or []))
    yield epochs


def _head(section: Any):
    if not isinstance(section, dict):
        return
    yield _gauge("sealmesh_head_snapshots_confirmed", "Snapshots of the head confirmed by every party",
                 section.get("snapshots_confirmed"))
    state = GaugeMetricFamily("sealmesh_head_state", "The head's state (1 for the current one)", labels=["state"])
    state.add_metric([str(section.get("state") or "unknown")], 1)
    yield state
    yield _gauge("sealmesh_head_pending_txs", "Transactions submitted, not yet in a confirmed snapshot",
                 section.get("pending_txs"))
    yield _gauge("sealmesh_head_queued", "Records queued for the head", section.get("queued"))
    yield _gauge("sealmesh_head_conserved", "1 while the ledger conserves value, else 0",
                 1 if section.get("conserved") else 0)
    balances = GaugeMetricFamily("sealmesh_head_balance", "Balance of each account in the head's ledger",
                                 labels=["account"])
    for account, value in sorted((section.get("balances") or {}).items()):
        if isinstance(value, (int, float)):
            balances.add_metric([account], value)
    yield balances


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if isinstance(value, (int, float)):
        family.add_metric([], value)
    return family
