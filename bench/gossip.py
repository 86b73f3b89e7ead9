"""Gossip delivery on loopback: N node processes, M pings, latency and loss.

Every node is a real `sealmesh node` process (Epistula signing and verification,
GossipSub over Noise/Yamux). Each node publishes M/N pings once it has heard every
member; every other node must deliver each one. Baseline, measured in the same run:
a direct single-hop stream send (libp2p request on /sealmesh/probe/1) from this process
to one node, one-way, the bare transport with no gossip and no signatures.

    .venv/bin/python bench/gossip.py --nodes 20 --messages 200 --interval 10

Last line: gossip nodes=N messages=M p50_ms=x p99_ms=y loss=z direct_p99_ms=w
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.blobs import PROBE_PROTOCOL  # noqa: E402
from node.mesh import Mesh, MeshConfig  # noqa: E402
from node.presence import percentile  # noqa: E402
from node.testnet import TestnetPlan, _spawn, _stop_all, _watch, build_report, prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200, help="total pings, spread over the nodes")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between one node's pings (default: 20 nodes -> 2 msg/s in all)")
    parser.add_argument("--probes", type=int, default=200, help="direct stream sends for the baseline")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--dir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args()

    validators = max(1, args.nodes // 5)
    miners = args.nodes // 3
    plan = TestnetPlan(validators=validators, miners=miners, trainers=args.nodes - validators - miners,
                       pings=math.ceil(args.messages / args.nodes), rounds=1,
                       directory=args.dir or Path(tempfile.mkdtemp(prefix="sealmesh-bench-")),
                       timeout_s=args.timeout, mesh_id="bench", ping_interval_s=args.interval)
    nodes = prepare(plan)
    print(f"bench: starting {len(nodes)} node processes in {plan.directory}", flush=True)
    started = time.monotonic()
    try:
        for node in nodes:
            node.process = _spawn(node)
        complete = _watch(plan, nodes, deadline=time.monotonic() + plan.timeout_s)
        ready = json.loads((nodes[0].data_dir / "ready.json").read_text())
        direct = trio.run(probe_one_hop, ready["addrs"][0], ready["peer_id"], args.probes)
    finally:
        _stop_all(nodes)
    report = build_report(plan, nodes, complete, time.monotonic() - started)
    gossip = report["gossip"]
    loss = 1 - gossip["delivered"] / gossip["expected"]
    direct_p50, direct_p99 = percentile(direct, 50), percentile(direct, 99)
    messages = plan.pings * len(nodes)
    print(f"bench: {len(nodes)} nodes, {messages} pings at {len(nodes) / args.interval:.1f} msg/s in all; "
          f"deliveries {gossip['delivered']}/{gossip['expected']}, mesh drops {report['mesh_drops']}, "
          f"rejected {report['rejected']} (start-up: late announcements are dropped as stale)")
    print(f"bench: direct stream one-way p50={direct_p50:.2f} ms p99={direct_p99:.2f} ms "
          f"({len(direct)} probes); gossip p99 / direct p99 = {gossip['p99_ms'] / direct_p99:.1f}x")
    print(f"gossip nodes={len(nodes)} messages={messages} p50_ms={gossip['p50_ms']:.1f} "
          f"p99_ms={gossip['p99_ms']:.1f} loss={loss:.4f} direct_p99_ms={direct_p99:.2f}")
    return 0 if report["ok"] else 1


async def probe_one_hop(addr: str, peer_id: str, count: int) -> list[float]:
    """One-way latency of a bare libp2p stream send to one node, in ms."""
    latencies = []
    async with Mesh.open(MeshConfig(mesh_id="bench", bootstrap=(addr,)), os.urandom(32)) as mesh:
        await mesh.connect(addr)  # the bootstrap dial may still be backing off
        for _ in range(count):
            sent = time.time_ns()
            reply = await mesh.request(peer_id, PROBE_PROTOCOL, sent.to_bytes(8, "big"),
                                       max_response_bytes=8, timeout_s=10)
            latencies.append((int.from_bytes(reply, "big") - sent) / 1e6)
    return latencies




if __name__ == "__main__":
    sys.exit(main())
