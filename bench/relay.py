"""Relay vs direct throughput on a shaped home link (issue 16), both in one run.

Network namespaces from tests/netns_nat.py: `relay` (circuit relay v2) and two public
members `pa`, `pb` on the LAN; `home` behind a MASQUERADE router whose home link is shaped
with `tc ... tbf` to --rate both ways. home runs with hole punching off. `pa` reaches home
through the relay (home's relayed address); home dials `pb` itself (a direct connection
out through the NAT). Then `pa` and `pb` each send home a --mb MB request (home answers
its sha256), one after the other, and the times are compared. Both paths cross the same
shaped link once; the relayed one also crosses the relay (two more LAN hops, and the
relay copies every byte through its own process). Needs root, iproute2, iptables and tc.

    sudo .venv/bin/python bench/relay.py --mb 20 --rate 8mbit

Last line: relay mb=M rate=R relayed_s=x direct_s=y relayed_mbit_s=a direct_mbit_s=b ratio=r
(ratio = relayed time / direct time; 1.0 means the relay costs nothing on this link.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import netns_nat  # noqa: E402
from tests.test_nat import Proc  # noqa: E402


def timed_request(sender: Proc, home: Proc, n_bytes: int, timeout_s: float) -> float:
    answer = sender.ask(f"request {home.peer_id} {n_bytes} {timeout_s}", "ANSWER", timeout_s=timeout_s + 10)
    verdict, size, seconds = answer[1].split()
    if answer[0] != "ANSWER" or verdict != "match" or int(size) != n_bytes:
        raise SystemExit(f"{sender.name}: request failed: {answer}")
    return float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="request size in MB (default %(default)s)")
    parser.add_argument("--rate", default="8mbit",
                        help="home link rate, tc's syntax, or none for an unshaped link (default %(default)s)")
    args = parser.parse_args()
    why = netns_nat.available()
    if why:
        raise SystemExit(f"bench/relay.py: {why}")
    n_bytes = int(args.mb * 1e6) // 256 * 256
    rate_mbit = float(args.rate.lower().removesuffix("mbit")) if args.rate.lower().endswith("mbit") else None
    timeout_s = max(60.0, 3 * n_bytes * 8 / ((rate_mbit or 1) * 1e6))
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    with netns_nat.NatLan(["relay", "pa", "pb"]) as lan:
        procs: list[Proc] = []
        try:
            relay = Proc(lan, "relay", 4001, "--relay", log=tmp / "relay.log").wait_ready()
            procs.append(relay)
            for name, port in (("pa", 4002), ("pb", 4003)):
                procs.append(Proc(lan, name, port, relay.addrs[0], log=tmp / f"{name}.log").wait_ready())
            pa, pb = procs[1], procs[2]
            home = Proc(lan, "home", 4004, "--no-hole-punch", relay.addrs[0], log=tmp / "home.log").wait_ready()
            procs.append(home)
            state = home.reachability("relayed", timeout_s=30)
            if state["status"] != "relayed":
                raise SystemExit(f"home never relayed: {state}")
            if args.rate != "none":
                lan.shape_home_link(args.rate)
            connected = pa.ask(f"connect {state['relayed_addrs'][0]}", "CONNECTED", timeout_s=30)
            direct = home.ask(f"connect {pb.addrs[0]}", "CONNECTED", timeout_s=30)
            kinds = {"pa": json.loads(pa.ask("kinds", "KINDS")[1]).get(home.peer_id),
                     "pb": json.loads(pb.ask("kinds", "KINDS")[1]).get(home.peer_id)}
            if connected[0] != "CONNECTED" or direct[0] != "CONNECTED" or kinds != {"pa": "relayed", "pb": "direct"}:
                raise SystemExit(f"connections not as planned: {connected} {direct} {kinds}")
            timed_request(pa, home, 1 << 16, 30)  # warm both paths (streams, windows) before timing
            timed_request(pb, home, 1 << 16, 30)
            relayed_s = timed_request(pa, home, n_bytes, timeout_s)
            direct_s = timed_request(pb, home, n_bytes, timeout_s)
        finally:
            for proc in procs:
                proc.kill()
    mbit = lambda s: n_bytes * 8 / 1e6 / s  # noqa: E731
    print(f"relay mb={args.mb:g} rate={args.rate} relayed_s={relayed_s:.2f} direct_s={direct_s:.2f} "
          f"relayed_mbit_s={mbit(relayed_s):.2f} direct_mbit_s={mbit(direct_s):.2f} "
          f"ratio={relayed_s / direct_s:.2f}")


if __name__ == "__main__":
    main()
