"""A member behind a home router (MASQUERADE, no port forwarding) joins through a relay.

Three meshes, each in its own network namespace (tests/netns_nat.py): `relay` offers
circuit relay v2 on the public LAN, `pub` is another public member, `home` sits behind the
NAT. Each runs node/mesh.py and the reachability loop (node/reachability.py) in a small
process (`python -m tests.netns_nat`), not a full `sealmesh node`, which loads torch.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import netns_nat

ROOT = Path(__file__).resolve().parents[1]
WHY_NOT = netns_nat.available()
needs_nat = pytest.mark.skipif(WHY_NOT is not None, reason=f"no NAT namespaces here: {WHY_NOT}")


class Proc:
    """One test mesh in a namespace, spoken to one line at a time.

    Its stdout is read by a thread into a queue. (It used to be select() on the pipe and
    then readline(): when two lines arrived together, say GOT of its own publish and
    PUBLISHED, readline buffered both, select() saw an empty pipe, and the second line was
    "not there within 30 s": the flake of this file under load.)"""

    def __init__(self, lan: netns_nat.NatLan, name: str, port: int, *extra: str, log: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns(name), sys.executable, "-m", "tests.netns_nat", name,
             lan.ip(name), str(port), *extra],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
            bufsize=1)
        self.peer_id, self.addrs = "", []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, name=f"{name}-stdout", daemon=True).start()

    def _read_lines(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output: the process exited

    def wait_ready(self, timeout_s: float = 90) -> "Proc":
        # Start-up imports py-libp2p and its crypto: seconds on a quiet machine, far more
        # on a loaded 2-core CI runner.
        self.peer_id, addrs = self.expect("READY", timeout_s)[1].split(" ", 1)
        self.addrs = json.loads(addrs)
        return self

    def expect(self, prefix: str, timeout_s: float = 30) -> list[str]:
        """[prefix, the rest of the line] of the next line starting with `prefix` (or ERR)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)  # keep saying so to later calls
                raise AssertionError(f"{self.name} exited (rc {self.process.wait()})")
            words = line.rstrip("\n").split(" ", 1) + [""]
            if words[0] == prefix or (words[0] == "ERR" and prefix != "GOT"):
                return words[:2]
        raise AssertionError(f"{self.name}: no {prefix} within {timeout_s}s")

    def ask(self, command: str, prefix: str, timeout_s: float = 30) -> list[str]:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.expect(prefix, timeout_s)

    def reachability(self, want: str, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            state = json.loads(self.ask("reach", "REACH")[1])
            if state["status"] == want or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def nat_mesh(tmp_path: Path, *home_flags: str):
    """relay, pub and home running (pub and home bootstrapped from the relay)."""
    with netns_nat.NatLan(["relay", "pub"]) as lan:
        procs: list[Proc] = []
        try:
            relay = Proc(lan, "relay", 4001, "--relay", log=tmp_path / "relay.log")
            procs.append(relay.wait_ready())
            relay_addr = relay.addrs[0]
            procs.append(Proc(lan, "pub", 4002, relay_addr, log=tmp_path / "pub.log"))
            procs.append(Proc(lan, "home", 4003, *home_flags, relay_addr, log=tmp_path / "home.log"))
            for proc in procs[1:]:
                proc.wait_ready()
            yield lan, *procs
        finally:
            for proc in procs:
                proc.kill()


@needs_nat
def test_natted_member_is_relayed_and_reached_through_the_relay(tmp_path):
    # Hole punching off at home: DCUtR would soon replace the relayed connection with a
    # direct one (the next test), and this one is about the bytes that cross the relay.
    with nat_mesh(tmp_path, "--no-hole-punch") as (lan, relay, pub, home):
        _relayed_member_is_reached(relay, pub, home)


def _relayed_member_is_reached(relay: Proc, pub: Proc, home: Proc) -> None:

    # The public member is told so by a dial-back; the NATed one is not, and reserves on the relay.
    assert pub.reachability("public")["status"] == "public"
    state = home.reachability("relayed")
    assert state["status"] == "relayed", state
    relayed = state["relayed_addrs"][0]
    assert relayed == f"{relay.addrs[0]}/p2p-circuit/p2p/{home.peer_id}"

    # Nobody outside can dial the home host's own address ...
    direct = pub.ask(f"connect {home.addrs[0]}", "CONNECTED", timeout_s=45)
    assert direct[0] == "ERR", direct
    # ... but its relayed address works, and that connection is the relayed one.
    connected = pub.ask(f"connect {relayed}", "CONNECTED", timeout_s=45)
    assert connected[0] == "CONNECTED", connected
    assert json.loads(connected[1])[home.peer_id] == "relayed"

    # A 4 MB request/response: pub's only connection to home is the circuit, so these bytes
    # went through the relay (the relay's gossip forwarding plays no part in a stream).
    answer = pub.ask(f"request {home.peer_id} {4 << 20}", "ANSWER", timeout_s=60)
    verdict, size, seconds = answer[1].split()
    assert (verdict, int(size)) == ("match", 4 << 20), answer
    print(f"4 MiB through the relay in {seconds}s")
    # And gossip published by pub is delivered at home.
    pub.ask("publish hello-from-pub", "PUBLISHED")
    got = home.expect("GOT", timeout_s=45)
    assert got[1].split()[0] == "hello-from-pub"
    assert json.loads(home.ask("kinds", "KINDS")[1])[pub.peer_id] == "relayed"


@needs_nat
@pytest.mark.slow
def test_dcutr_replaces_the_relayed_connection_with_a_direct_one(tmp_path):
    """With one side public, DCUtR at home dials the public peer straight out through the NAT
    (the relayed connection told it where); MASQUERADE lets that out, and the relayed
    connection is closed. Two members both behind NAT are not covered here."""
    with nat_mesh(tmp_path) as (lan, relay, pub, home):
        relayed = home.reachability("relayed")["relayed_addrs"][0]
        connected = pub.ask(f"connect {relayed}", "CONNECTED", timeout_s=45)
        assert connected[0] == "CONNECTED", connected
        deadline = time.monotonic() + 20
        while json.loads(pub.ask("kinds", "KINDS")[1]).get(home.peer_id) != "direct":
            assert time.monotonic() < deadline, "no direct connection within 20 s"
            time.sleep(0.5)
        sockets = lan.run("home", ["ss", "-tn"], capture_output=True, text=True).stdout
        assert f"{lan.ip('pub')}:4002" in sockets, sockets  # a TCP connection home -> pub, no relay
        answer = pub.ask(f"request {home.peer_id} {1 << 20}", "ANSWER", timeout_s=30)
        assert answer[1].split()[0] == "match", answer


def test_daemon_dials_members_at_their_announced_addresses(monkeypatch):
    """Discovery beyond the bootstrap list: b and c each know only the hub a; once c has
    b's Announce (here handed to its Presence as the daemon's dispatcher would), the
    daemon's dialling loop connects c to b at b's announced address. Loopback, no namespaces."""
    import trio
    from types import SimpleNamespace

    from node import daemon
    from node.mesh import Mesh, MeshConfig
    from node.presence import Presence
    from protocol.messages import Announce

    monkeypatch.setattr(daemon, "DIAL_ANNOUNCED_INTERVAL_S", 0.2)

    async def main() -> None:
        async with Mesh.open(MeshConfig(mesh_id="d", hole_punch=False), b"a" * 32) as a:
            hub = (a.listen_addrs[0],)
            async with Mesh.open(MeshConfig(mesh_id="d", bootstrap=hub, hole_punch=False), b"b" * 32) as b, \
                    Mesh.open(MeshConfig(mesh_id="d", bootstrap=hub, hole_punch=False), b"c" * 32) as c:
                assert b.peer_id not in c.connected_peers()
                presence = Presence("hk-c", frozenset({"hk-b", "hk-c"}))
                presence.on_announce("hk-b", Announce("d", b.peer_id, b.listen_addrs, ["miner"], 0))
                node = SimpleNamespace(mesh=c, presence=presence, genesis=SimpleNamespace(name_of=str))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(daemon.Node._dial_announced_loop, node)
                    with trio.fail_after(8):
                        while b.peer_id not in c.connected_peers():
                            await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()

    trio.run(main)


@needs_nat
def test_a_reservation_lost_when_the_relay_restarts_is_renewed(tmp_path):
    """The relay is killed and started again (same key, same port): home notices within
    seconds that its reservation is gone, says "unknown" with the reason and withdraws the
    dead address (never "public", never "relayed" on a relay that is down), reserves again
    once the relay is back, and is reached through it again."""
    with nat_mesh(tmp_path, "--no-hole-punch") as (lan, relay, pub, home):
        relayed = home.reachability("relayed")["relayed_addrs"][0]
        relay.kill()
        seen, deadline = [], time.monotonic() + 15
        while time.monotonic() < deadline:
            state = json.loads(home.ask("reach", "REACH")[1])
            seen.append(state["status"])
            if state["status"] == "unknown":
                break
            time.sleep(0.3)
        assert state["status"] == "unknown", seen
        assert state["relayed_addrs"] == [] and state["reservations_lost"] == 1, state
        assert state["last_loss"].endswith("the connection to the relay closed"), state
        again = Proc(lan, "relay", 4001, "--relay", log=tmp_path / "relay-again.log").wait_ready()
        try:
            deadline = time.monotonic() + 45
            while (state := json.loads(home.ask("reach", "REACH")[1]))["status"] != "relayed":
                seen.append(state["status"])
                assert time.monotonic() < deadline, f"not relayed again within 45 s: {state}"
                time.sleep(0.5)
            assert "public" not in seen, seen
            assert state["relayed_addrs"] == [relayed], state  # same relay key and port: the same address
            connected = pub.ask(f"connect {relayed}", "CONNECTED", timeout_s=45)
            assert connected[0] == "CONNECTED" and json.loads(connected[1])[home.peer_id] == "relayed", connected
            answer = pub.ask(f"request {home.peer_id} {1 << 20}", "ANSWER", timeout_s=30)
            assert answer[1].split()[0] == "match", answer
            print(f"relay restart: statuses seen at home {sorted(set(seen))}")
        finally:
            again.kill()


def test_daemon_announces_at_once_when_its_relayed_address_changes():
    """A relayed address gained (or withdrawn after a lost reservation) is announced at
    once, not at the next slow announce (10 x announce_interval_s once every member is
    heard): peers would otherwise dial a dead address, or not know the new one, for that long."""
    import trio
    from types import SimpleNamespace

    from node import daemon
    from node.reachability import Reachability

    sent = []

    async def publish(message) -> None:
        sent.append(message)

    node = SimpleNamespace(mesh=SimpleNamespace(peer_id="P"), genesis=SimpleNamespace(mesh_id="m"),
                           reachability=Reachability(), addrs=["/ip4/10.0.0.1/tcp/1/p2p/P"], started_ms=0,
                           settings=SimpleNamespace(announce_interval_s=100.0, role=SimpleNamespace(value="trainer")),
                           presence=SimpleNamespace(heard_everyone=lambda: True), publish=publish,
                           membership=SimpleNamespace(left=trio.Event()))  # a member that has not left
    node._announce = lambda: daemon.Node._announce(node)  # the loop calls it as a method
    relayed = "/ip4/10.0.0.9/tcp/2/p2p/R/p2p-circuit/p2p/P"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.Node._announce_loop, node)
            with trio.fail_after(2):
                while len(sent) < 1:
                    await trio.sleep(0.01)
                node.reachability.set_relayed_addrs([relayed])
                while len(sent) < 2:
                    await trio.sleep(0.01)
                node.reachability.set_relayed_addrs([])
                while len(sent) < 3:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert [list(m.addrs) for m in sent] == [node.addrs, node.addrs + [relayed], node.addrs]

    trio.run(main)
