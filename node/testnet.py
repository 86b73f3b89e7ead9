"""`sealmesh testnet up`: a local mesh of node processes on 127.0.0.1, driven to the end.

Makes wallets, a genesis file and (through the role modules' prepare_testnet hooks) the
committee key, compiled FHE bundles and head settings; starts every node as its own OS
process, shows progress, waits until every scenario has what it expects (or the
timeout), stops all nodes with SIGTERM, and writes DIR/report.json. Scenarios: every
node announces itself and pings; the validators run the training rounds, the FHE
challenge epochs and the settlement head that the plan asks for; each role module's
summarize() adds its section to the report.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from libp2p.peer.id import ID

from node.files import write_atomic
from node.mesh import derive_key_pair
from node.presence import percentile
from node.progress import TerminalLine
from node.report_html import write_report_html
from node.registry.genesis import Genesis, write_genesis
from node.roles import testnet_modules
from node.wallet import create_hotkey
from protocol.committee_rules import committee_size_problem
from protocol.membership import Member, Role

BOOTSTRAP_PEERS = 3  # genesis lists this many nodes; each node also dials 2 random others
STAKE = {Role.VALIDATOR: 100.0, Role.TRAINER: 10.0, Role.MINER: 10.0}


@dataclass(frozen=True)
class TestnetPlan:
    __test__ = False  # not a pytest test class, despite the name
    trainers: int = 2
    validators: int = 2
    miners: int = 1
    rounds: int = 1
    pings: int = 10
    directory: Path = Path("testnet")
    timeout_s: float = 120.0
    mesh_id: str = "testnet"
    ping_interval_s: float = 0.1
    epochs: int = 0  # FHE challenge epochs (validators challenge the miners)
    # Fault injection, node name -> behaviour ("garbage"/"slow" miner, "cheat" trainer).
    faults: tuple[tuple[str, str], ...] = ()
    key_bits: int = 2048  # the committee's threshold Paillier key

    @property
    def roles(self) -> list[Role]:
        return ([Role.VALIDATOR] * self.validators + [Role.TRAINER] * self.trainers
                + [Role.MINER] * self.miners)


@dataclass
class NodeProcess:
    name: str
    role: Role
    hotkey: str
    data_dir: Path
    api_port: int
    process: subprocess.Popen | None = None
    last_status: dict | None = None


def run_testnet(plan: TestnetPlan) -> int:
    started = time.monotonic()
    nodes = prepare(plan)
    print(f"testnet: {len(nodes)} nodes ({plan.validators} validators, {plan.trainers} trainers, "
          f"{plan.miners} miners) in {plan.directory}", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # run the cleanup below on SIGTERM
    try:
        for node in nodes:
            node.process = _spawn(node)
        complete = _watch(plan, nodes, deadline=time.monotonic() + plan.timeout_s)
    finally:
        _stop_all(nodes)
        signal.signal(signal.SIGTERM, previous)
    report = build_report(plan, nodes, complete, time.monotonic() - started)
    (plan.directory / "report.json").write_text(json.dumps(report, indent=2))
    write_report_html(plan.directory / "report.json")  # report.html beside it, with plots
    g = report["gossip"]
    print(f"testnet: {'OK' if report['ok'] else 'INCOMPLETE'}: gossip delivered {g['delivered']}/"
          f"{g['expected']} p50={g['p50_ms']} ms p99={g['p99_ms']} ms; rejected {report['rejected']}; "
          f"report {plan.directory / 'report.json'}", flush=True)
    for problem in report["problems"]:
        print(f"testnet: missing: {problem}", flush=True)
    return 0 if report["ok"] else 1


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def prepare(plan: TestnetPlan) -> list[NodeProcess]:
    """Wallets, node keys, genesis and one node.toml per node; nothing started yet."""
    root = plan.directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[Role, int] = {}
    nodes, members, names, addrs = [], [], [], []
    ports = _free_ports(2 * len(plan.roles))
    for i, role in enumerate(plan.roles):
        name = f"{role.value}-{counts.setdefault(role, 0)}"
        counts[role] += 1
        hotkey = create_hotkey("testnet", name, root / "wallets", overwrite=True).ss58_address
        data_dir = root / "nodes" / name
        _fresh_node_dir(data_dir)
        seed = os.urandom(32)
        # Created 0600 (write_bytes then chmod left it 0644 meanwhile, for anyone to open
        # and keep: issue 11, sound today: 0600 key files).
        write_atomic(data_dir / "node_key", seed, mode=0o600)
        mesh_port, api_port = ports[2 * i], ports[2 * i + 1]
        addrs.append(f"/ip4/127.0.0.1/tcp/{mesh_port}/p2p/{peer_id_from_seed(seed)}")
        members.append(Member(hotkey, frozenset({role}), STAKE[role]))
        names.append((hotkey, name))
        nodes.append(NodeProcess(name, role, hotkey, data_dir, api_port))
        _write_node_config(plan, root, data_dir, name, role, mesh_port, api_port)
    write_genesis(root / "genesis.json",
                  Genesis(plan.mesh_id, tuple(members), tuple(addrs[:BOOTSTRAP_PEERS]), tuple(names)))
    rng = random.Random(plan.mesh_id)
    faults = dict(plan.faults)
    unknown = set(faults) - {n.name for n in nodes}
    if unknown:
        raise ValueError(f"--fault names unknown node(s) {sorted(unknown)}")
    for i, node in enumerate(nodes):
        others = [a for j, a in enumerate(addrs) if j != i]
        extra = rng.sample(others, min(2, len(others)))
        with open(node.data_dir / "node.toml", "a") as f:
            f.write(f"bootstrap = {json.dumps(extra)}\n")
            f.write(f'behaviour = "{faults.get(node.name, "honest")}"\n')
            f.write("demo_corpus = true\n")  # the testnet trains and evaluates on the shipped corpus
            if committee_size_problem(plan.validators, plan.validators // 2 + 1):  # the committee dealt below
                f.write("insecure_small_committee = true\n")  # a local test mesh: its nodes may load it
            if node.role is Role.VALIDATOR:
                f.write(f"rounds = {plan.rounds if plan.trainers else 0}\nepochs = {plan.epochs}\n")
                if not (plan.rounds and plan.trainers):  # rounds = 0 would mean "until stopped"
                    f.write("training = false\n")
    for module in testnet_modules():
        if hasattr(module, "prepare_testnet"):
            module.prepare_testnet(plan, nodes, root)
    return nodes


# Kept from an earlier run in the same directory: a validator's own FHE key pair (tens of
# MB, long to make on a busy machine), valid under any hotkey. Everything else belongs to
# the earlier mesh: its epochs in history.sqlite, its head, its rounds and blobs. Kept,
# they made the new validators start at different epochs and challenge different miners.
_KEPT_ACROSS_RUNS = (Path("roles") / "fhe-keys",)


def _fresh_node_dir(data_dir: Path) -> None:
    """Every run of `sealmesh testnet up` is a new mesh (new hotkeys, a new genesis)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    kept = {data_dir / k for k in _KEPT_ACROSS_RUNS}
    for path in sorted(data_dir.rglob("*"), reverse=True):  # children before their folders
        if path in kept or any(k in path.parents for k in kept):
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path in k.parents for k in kept):  # not a folder on the way to a kept one
                shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_node_config(plan, root, data_dir, name, role, mesh_port, api_port) -> None:
    (data_dir / "node.toml").write_text(
        f'role = "{role.value}"\n'
        f'data_dir = "{data_dir}"\n'
        f'wallet_name = "testnet"\nhotkey = "{name}"\nwallet_path = "{root / "wallets"}"\n'
        f'genesis = "{root / "genesis.json"}"\n'
        f"listen_port = {mesh_port}\napi_port = {api_port}\n"
        f"pings = {plan.pings}\nping_interval_s = {plan.ping_interval_s}\n"
        f'ping_start = "signal"\n')


def peer_id_from_seed(seed: bytes) -> str:
    """The libp2p peer id a node will have with this node_key seed."""
    return ID.from_pubkey(derive_key_pair(seed).public_key).to_base58()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _spawn(node: NodeProcess) -> subprocess.Popen:
    # Appended: a node restarted in the same run (a test that kills one) keeps the log of
    # its first life, which is where the reason for anything after the restart usually is.
    # A new run starts from an empty directory (_fresh_node_dir).
    log = open(node.data_dir / "node.log", "ab")
    # Own session: a Ctrl-C in the terminal reaches only this controller, which then
    # stops the nodes in order. Death signal: if the controller is killed outright,
    # the kernel sends each node SIGTERM, so no node outlives its test mesh.
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "node", "--config", str(node.data_dir / "node.toml")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _watch(plan: TestnetPlan, nodes: list[NodeProcess], deadline: float) -> bool:
    # On a terminal the counts are one line redrawn in place (with the time so far) and the
    # events stay above it; in a log or a pipe each changed count is its own line.
    line = TerminalLine(sys.stdout)
    try:
        return _watch_until_done(plan, nodes, deadline, line)
    finally:
        line.end()


def _watch_until_done(plan: TestnetPlan, nodes: list[NodeProcess], deadline: float, line: TerminalLine) -> bool:
    started = time.monotonic()
    expected_pings = plan.pings * (len(nodes) - 1)
    last_line, pings_started, complete_at, last_pending = "", False, None, None
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                line.say(f"testnet: node {node.name} exited with {node.process.returncode}; "
                         f"see {node.data_dir / 'node.log'}")
                return False
            node.last_status = _get_status(node) or node.last_status
        heard = sum(len(n.last_status["presence"]["heard"]) for n in nodes if n.last_status)
        pings = sum(sum(n.last_status["presence"]["pings_received"].values())
                    for n in nodes if n.last_status)
        counts = (f"testnet: up {sum(1 for n in nodes if n.last_status)}/{len(nodes)}, "
                  f"announcements heard {heard}/{len(nodes) * (len(nodes) - 1)}, "
                  f"pings delivered {pings}/{expected_pings * len(nodes)}")
        if line.enabled:
            line.show(f"{counts}, {time.monotonic() - started:.0f} s")
        elif counts != last_line:
            print(counts, flush=True)
            last_line = counts
        everyone_heard = heard >= len(nodes) * (len(nodes) - 1)
        if everyone_heard and complete_at is None:
            complete_at = time.monotonic()
            line.say(f"testnet: mesh complete; pings start in {_settle_s(nodes):.0f} s at the "
                     "earliest, once the role scenarios are done")
        pending = _pending_sections(nodes)
        if pending != last_pending:
            line.say(f"testnet: waiting for {', '.join(pending) or 'nothing more'}")
            last_pending = pending
        if complete_at and not pings_started and expected_pings and not pending \
                and time.monotonic() - complete_at >= _settle_s(nodes):
            # Start every node's pings together (see Node._ping_scenario), once the
            # start-up work (imports, announcements, mesh grafting) has drained and the
            # CPU-heavy role work (training, FHE, proofs) is over: the pings measure the
            # mesh, not how long a starved event loop takes to validate a message.
            line.say("testnet: starting pings")
            for node in nodes:
                node.process.send_signal(signal.SIGUSR1)
            pings_started = True
        if pings >= expected_pings * len(nodes) and everyone_heard and not pending:
            return True
        time.sleep(0.5 if len(nodes) <= 8 else 1.0)  # polling 20 nodes costs CPU too
    line.say("testnet: timed out waiting for the scenarios")
    return False


def _pending_sections(nodes: list[NodeProcess]) -> list[str]:
    """'node/section' for every role section that has not said done yet."""
    pending = []
    for node in nodes:
        sections = (node.last_status or {}).get("sections", {})
        pending.extend(f"{node.name}/{name}" for name, doc in sorted(sections.items())
                       if isinstance(doc, dict) and doc.get("done") is False)
    return pending


def _settle_s(nodes: list[NodeProcess]) -> float:
    # Seen here: right after the last announcement is heard, the bootstrap nodes of a
    # 20-process mesh on 2 cores are still seconds behind on start-up traffic.
    return 2.0 + 0.4 * len(nodes)


def _get_status(node: NodeProcess) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/status", timeout=2) as r:
            doc = json.load(r)
        return doc if doc.get("presence") else None
    except (OSError, ValueError):
        return None


def _stop_all(nodes: list[NodeProcess], grace_s: float = 15.0) -> None:
    for node in nodes:
        if node.process and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for node in nodes:
        if node.process is None:
            continue
        try:
            node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"testnet: {node.name} did not stop in {grace_s:.0f} s; killing it", flush=True)
            node.process.kill()
            node.process.wait()


def build_report(plan: TestnetPlan, nodes: list[NodeProcess], complete: bool, duration_s: float) -> dict:
    finals = {n.name: _final_status(n) for n in nodes}
    hotkeys = {n.hotkey: n.name for n in nodes}
    per_sender = plan.pings
    expected = per_sender * len(nodes) * (len(nodes) - 1)
    delivered, latencies, rejected, drops, problems = 0, [], {}, {}, []
    for node in nodes:
        status = finals[node.name]
        if status is None:
            problems.append(f"{node.name}: no status (see {node.data_dir / 'node.log'})")
            continue
        presence = status["presence"]
        for hotkey in presence["missing"]:  # never heard, or gone (not heard within the liveness window)
            problems.append(f"{node.name} did not hear {hotkeys.get(hotkey, hotkey)} at the end (never, or gone)")
        for other in nodes:
            if other is node:
                continue
            got = presence["pings_received"].get(other.hotkey, 0)
            delivered += min(got, per_sender)
            if got < per_sender:
                problems.append(f"{node.name} got {got}/{per_sender} pings from {other.name}")
        latencies.extend(presence.get("latencies_ms", []))  # in the final status file only
        for reason, count in status["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
        for key, value in status.get("mesh_stats", {}).items():
            if key.startswith("dropped") and value:
                drops[key] = drops.get(key, 0) + value
    sections = {}
    for module in testnet_modules():
        if hasattr(module, "summarize"):
            section = module.summarize(plan, finals)
            sections[module.REPORT_SECTION] = section
            problems.extend(section.get("problems", []))
    return {
        "ok": complete and not problems and delivered == expected,
        "nodes": len(nodes),
        "roles": {r.value: plan.roles.count(r) for r in Role},
        "rounds": plan.rounds,
        "duration_s": round(duration_s, 2),
        "gossip": {"expected": expected, "delivered": delivered,
                   "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                   "max_ms": max(latencies, default=None)},
        "rejected": rejected,
        "mesh_drops": drops,
        "problems": problems,
        **sections,
    }


def _final_status(node: NodeProcess) -> dict | None:
    path = node.data_dir / "status.json"
    if path.exists():
        return json.loads(path.read_text())
    return node.last_status  # killed before writing its final status


