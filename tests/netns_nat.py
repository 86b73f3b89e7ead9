"""A home network behind a NAT, for tests: public hosts on the 10.88.0.0/24 LAN of
tests/netns.py, plus one "home" namespace on 192.168.77.0/24 whose only way out is a
"router" namespace doing iptables MASQUERADE onto the LAN.

Nothing on the LAN has a route to 192.168.77.0/24, and MASQUERADE keeps no inbound
mappings for connections the home host did not open: the home host can dial out, nobody
can dial in, as behind a home router without port forwarding. Needs root, `ip` and
`iptables` (with the nat table); `available()` says why not, for a skip.
"""

from __future__ import annotations

import shutil
import subprocess

from tests import netns
from tests.netns import Lan, _ip

HOME_SUBNET = "192.168.77"
ROUTER_LAN_IP = f"{netns.SUBNET}.254"  # the router's public address: what peers see the home host as
HOME_IP = f"{HOME_SUBNET}.2"


def available() -> str | None:
    """None if a NATed home namespace can be made here, else why not."""
    why = netns.available()
    if why:
        return why
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install -y iptables)"
    probe = "smnatprobe"
    try:
        _ip("netns", "add", probe)
        done = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"iptables' nat table is not usable here: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NatLan(Lan):
    """`public` hosts on the LAN (as in Lan), and `home` behind a MASQUERADE router.

    ns(name) and ip(name) work for every host; ip(home) is its private address, which
    nobody outside can reach, and `ROUTER_LAN_IP` is the address its connections come from."""

    def __init__(self, public: list[str], home: str = "home", tag: str | None = None) -> None:
        super().__init__(public, tag)
        self.home = home
        self.router = "router"

    def ip(self, name: str) -> str:
        if name == self.home:
            return HOME_IP
        if name == self.router:
            return ROUTER_LAN_IP
        return super().ip(name)

    def __enter__(self) -> "NatLan":
        super().__enter__()
        try:
            self._make_router_and_home()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _make_router_and_home(self) -> None:
        router, home = self.ns(self.router), self.ns(self.home)
        _ip("netns", "add", router)
        _ip("netns", "add", home)
        for ns in (router, home):
            _ip("link", "set", "lo", "up", ns=ns)
        # router's public side: a port on the LAN bridge
        _ip("link", "add", "vr", "type", "veth", "peer", "name", "eth0", "netns", router, ns=self.hub)
        _ip("link", "set", "vr", "master", "br0", ns=self.hub)
        _ip("link", "set", "vr", "up", ns=self.hub)
        _ip("addr", "add", f"{ROUTER_LAN_IP}/24", "dev", "eth0", ns=router)
        _ip("link", "set", "eth0", "up", ns=router)
        # router's home side: a veth straight to the home host
        _ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", home, ns=router)
        _ip("addr", "add", f"{HOME_SUBNET}.1/24", "dev", "eth1", ns=router)
        _ip("link", "set", "eth1", "up", ns=router)
        _ip("addr", "add", f"{HOME_IP}/24", "dev", "eth0", ns=home)
        _ip("link", "set", "eth0", "up", ns=home)
        _ip("route", "add", "default", "via", f"{HOME_SUBNET}.1", ns=home)
        run = lambda *argv: subprocess.run(["ip", "netns", "exec", router, *argv],  # noqa: E731
                                           check=True, capture_output=True, text=True)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{HOME_SUBNET}.0/24", "-o", "eth0",
            "-j", "MASQUERADE")
        # Only replies come back in: a home router without port forwarding.
        run("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-m", "conntrack",
            "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        run("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-j", "DROP")

    def refuse_outbound(self, ip: str) -> None:
        """The router refuses new connections from home to `ip` (a reset, so dials fail at
        once): a home network whose firewall lets it reach only some hosts. A public peer at
        `ip` can then reach home only through a relay, and DCUtR's direct dial from home fails."""
        subprocess.run(["ip", "netns", "exec", self.ns(self.router), "iptables", "-I", "FORWARD", "-i", "eth1",
                        "-o", "eth0", "-d", ip, "-p", "tcp", "-m", "conntrack", "--ctstate", "NEW",
                        "-j", "REJECT", "--reject-with", "tcp-reset"], check=True, capture_output=True, text=True)

    def shape_home_link(self, rate: str) -> None:
        """The home uplink shaped to `rate` (tc's words: "8mbit") both ways, with a token
        bucket filter (netem is not in these kernels): router->home on the router's home
        port, home->router on home's."""
        for ns, dev in ((self.ns(self.router), "eth1"), (self.ns(self.home), "eth0")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True, text=True)

    def __exit__(self, *exc) -> None:
        for name in list(self.processes):
            self.stop(name, sig=9)
        for ns in (self.ns(self.home), self.ns(self.router)):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        super().__exit__(*exc)


# ---- a small mesh node for these tests:
#   python -m tests.netns_nat NAME HOST PORT [--relay] [--no-hole-punch] [BOOTSTRAP...]
# A full `sealmesh node` loads torch and takes too long to start in a test; this is the
# mesh alone (node/mesh.py) and the reachability loop (node/reachability.py), driven by
# one command a line on stdin, answering one line each on stdout.

ECHO_PROTOCOL = "/sealmesh-test/echo/1"


def _node_main(argv: list[str]) -> None:
    import hashlib
    import json
    import sys

    import trio

    from node.mesh import Mesh, MeshConfig, ValidationResult
    from node.reachability import Reachability, keep_reachability

    name, host, port, *rest = argv
    relay, hole_punch = "--relay" in rest, "--no-hole-punch" not in rest
    boot = tuple(a for a in rest if not a.startswith("--"))

    def say(*words: object) -> None:
        print(*words, flush=True)

    async def echo(peer: str, data: bytes) -> bytes:
        return hashlib.sha256(data).hexdigest().encode()

    async def main() -> None:
        config = MeshConfig(mesh_id="nat-test", listen_host=host, listen_port=int(port), bootstrap=boot,
                            relay_service=relay, hole_punch=hole_punch, bootstrap_timeout_s=10.0)
        async with Mesh.open(config, name.encode().ljust(32, b"_")) as mesh:
            received = await mesh.subscribe("train", lambda f, d: (ValidationResult.ACCEPT, ""))
            mesh.set_stream_handler(ECHO_PROTOCOL, echo, 64 << 20)
            state = Reachability()
            addrs = [f"{a}" for a in mesh.listen_addrs]
            say("READY", mesh.peer_id, json.dumps(addrs, separators=(",", ":")))

            async def commands() -> None:
                async for line in trio.wrap_file(sys.stdin):
                    cmd, *args = line.split() or [""]
                    try:
                        if cmd == "reach":
                            say("REACH", json.dumps(state.snapshot(), separators=(",", ":")))
                        elif cmd == "connect":
                            await mesh.connect(args[0])
                            say("CONNECTED", json.dumps(mesh.connection_kinds(), separators=(",", ":")))
                        elif cmd == "kinds":
                            say("KINDS", json.dumps(mesh.connection_kinds(), separators=(",", ":")))
                        elif cmd == "publish":
                            await mesh.publish("train", args[0].encode())
                            say("PUBLISHED")
                        elif cmd == "request":  # request PEER NBYTES [TIMEOUT_S]: the peer answers the sha256
                            data = bytes(range(256)) * (int(args[1]) // 256)
                            started = trio.current_time()
                            timeout_s = float(args[2]) if len(args) > 2 else 60.0
                            answer = await mesh.request(args[0], ECHO_PROTOCOL, data, 128, timeout_s=timeout_s)
                            ok = answer.decode() == hashlib.sha256(data).hexdigest()
                            say("ANSWER", "match" if ok else "mismatch", len(data),
                                f"{trio.current_time() - started:.3f}")
                        else:
                            say("ERR", cmd, "unknown command")
                    except Exception as exc:
                        say("ERR", cmd, repr(exc).replace("\n", " ")[:300])

            async def deliveries() -> None:
                async for gossip in received:
                    say("GOT", gossip.data.decode(errors="replace"), gossip.from_peer)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(commands)
                nursery.start_soon(deliveries)
                nursery.start_soon(lambda: keep_reachability(mesh, state, addrs, list(boot), interval_s=5.0,
                                                             undecided_interval_s=1.0))

    trio.run(main)


if __name__ == "__main__":
    import sys

    _node_main(sys.argv[1:])
