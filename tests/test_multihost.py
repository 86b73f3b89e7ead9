"""A real mesh on five machines (issue 12): each node in its own network namespace with
its own IP, every node set up and started only with the documented commands (README,
"Run a mesh on several machines", which this test runs word for word): wallets, the
genesis file by `sealmesh mesh`, a 2-of-3 committee by `sealmesh committee deal`, three
validators with their own eval text, two trainers with their own data folders, rounds
until stopped.

It shows: rounds keep going and at least 3 end final; the validators' eval loss on their
own eval text falls; a trainer killed with SIGKILL mid-round and restarted is in a final
round again within 2 rounds of being back; marker strings planted in the trainers' data
appear in nothing any node stored or served; state files and blobs stay bounded.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.nodes import wait_for

SEALMESH = str(Path(sys.executable).with_name("sealmesh"))
VALIDATORS, TRAINERS = ["v1", "v2", "v3"], ["t1", "t2"]
KEEP_ROUNDS = int(os.environ.get("SEALMESH_MULTIHOST_KEEP", "4"))  # a large value measures growth without retention
ROUNDS_JSON = {"collect_s": 12.0, "first_round_extra_s": 25.0, "decrypt_s": 90.0, "steps": 10}

WORDS = ("the cat dog bird fish sees eats likes finds a small big red blue green quick slow "
         "tree house river stone walks runs near under over").split()

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=f"no namespaces: {netns.available()}")


def sentences(rng: random.Random, n: int, marker: str = "") -> str:
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
        lines.append(f"{words} {marker}." if marker and i % 3 == 0 else f"{words}.")
    return "\n".join(lines) + "\n"


def sh(*argv: str, **kwargs) -> str:
    done = subprocess.run([SEALMESH, *argv], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"sealmesh {' '.join(argv)}: {done.stderr}"
    return done.stdout


def node_status(lan: netns.Lan, name: str, data_dir: Path) -> dict:
    """GET /status inside the node's machine (the API listens on its loopback)."""
    try:
        port = json.loads((data_dir / "ready.json").read_text())["api_port"]
    except (FileNotFoundError, ValueError):  # not up yet (ready.json is written atomically)
        return {}
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/status', timeout=5).read().decode())")
    done = lan.run(name, [sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def rounds_of(status: dict) -> list[dict]:
    return status.get("sections", {}).get("training", {}).get("rounds", [])


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_wallet(wallets: Path, name: str) -> str:
    """`sealmesh wallet create` then `wallet show`: the member's hotkey address."""
    sh("wallet", "create", "--name", name, "--hotkey", "default", "--path", str(wallets))
    return sh("wallet", "show", "--name", name, "--hotkey", "default", "--path", str(wallets)).strip()


def trainer_data(root: Path, name: str, rng: random.Random, marker: str = "") -> Path:
    folder = root / f"{name}-data"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(sentences(rng, 150, marker))
    return folder


@dataclass
class Machines:
    """What the README's steps 1-2 leave on each machine: wallets, the genesis file, the
    dealt committee, each member's data dir (its committee files, rounds.json) and data."""

    root: Path
    wallets: Path
    genesis: Path
    hotkeys: dict[str, str]
    data_dirs: dict[str, Path]

    def command(self, lan: netns.Lan, name: str, role: str) -> list[str]:
        """README steps 3-4: the node's command line on its machine."""
        argv = [SEALMESH, "node", "--role", role, "--genesis", str(self.genesis), "--wallet-name", name,
                "--wallet-path", str(self.wallets), "--data-dir", str(self.data_dirs[name]),
                "--listen-host", "0.0.0.0", "--listen-port", "9000",
                "--announce-addr", f"/ip4/{lan.ip(name)}/tcp/9000", "--keep-rounds", str(KEEP_ROUNDS)]
        if role == "validator":
            return argv + ["--eval-data", str(self.root / f"{name}-eval.txt")]
        return argv + ["--data", str(self.root / f"{name}-data")]


def prepare_machines(root: Path, rng: random.Random, markers: dict[str, str]) -> Machines:
    """Steps 1-2 of the README for VALIDATORS and TRAINERS (1024-bit 2-of-3 committee)."""
    wallets = root / "wallets"
    # -- each member makes its wallet; one of them writes the genesis file --
    hotkeys = {name: make_wallet(wallets, name) for name in VALIDATORS + TRAINERS}
    genesis = root / "genesis.json"
    sh("mesh", "init", "--mesh-id", "lab", "--out", str(genesis))
    for name in VALIDATORS + TRAINERS:
        role = "validator" if name in VALIDATORS else "trainer"
        sh("mesh", "add-member", str(genesis), "--hotkey", hotkeys[name], "--roles", role, "--stake", "10",
           "--name", name)
    sh("committee", "deal", "--genesis", str(genesis), "--out", str(root / "committee"), "--threshold", "2",
       "--bits", "1024")

    # -- each machine's own files: its committee directory, its data --
    data_dirs = {name: root / name for name in VALIDATORS + TRAINERS}
    for name, d in data_dirs.items():
        d.mkdir()
        source = root / "committee" / (name if name in VALIDATORS else "public")
        shutil.copytree(source, d / "committee")
    for name in VALIDATORS:
        (root / f"{name}-eval.txt").write_text(sentences(rng, 120))
        (data_dirs[name] / "rounds.json").write_text(json.dumps(ROUNDS_JSON))
    for name in TRAINERS:
        trainer_data(root, name, rng, markers[name])
    return Machines(root, wallets, genesis, hotkeys, data_dirs)


def start_mesh(lan: netns.Lan, machines: Machines, env: dict) -> None:
    """README steps 3-4: v1 first, its ready.json the genesis' bootstrap, then the others."""
    data_dirs = machines.data_dirs
    lan.start("v1", machines.command(lan, "v1", "validator"), machines.root / "v1.log", env)
    wait_for("v1's ready.json", lambda: (data_dirs["v1"] / "ready.json").exists(), 180, 1)
    sh("mesh", "add-bootstrap", str(machines.genesis), str(data_dirs["v1"] / "ready.json"))
    for name in VALIDATORS[1:] + TRAINERS:
        role = "validator" if name in VALIDATORS else "trainer"
        lan.start(name, machines.command(lan, name, role), machines.root / f"{name}.log", env)


def test_a_mesh_of_five_machines_trains_on_its_members_data_until_stopped(tmp_path):
    root = tmp_path
    rng = random.Random(12)
    markers = {t: f"MARKER-{t}-{secrets.token_hex(8)}" for t in TRAINERS}
    started = time.monotonic()
    timings: dict[str, float] = {}
    machines = prepare_machines(root, rng, markers)
    hotkeys, data_dirs = machines.hotkeys, machines.data_dirs

    def command(name: str) -> list[str]:
        return machines.command(lan, name, "validator" if name in VALIDATORS else "trainer")

    with netns.Lan(VALIDATORS + TRAINERS) as lan:
        logs = {name: root / f"{name}.log" for name in data_dirs}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        start_mesh(lan, machines, env)

        opener_name = min(VALIDATORS, key=lambda n: hotkeys[n])

        def finals(status: dict) -> list[dict]:
            return [r for r in rounds_of(status) if r["phase"] == "final"]

        def opener() -> dict:
            return node_status(lan, opener_name, data_dirs[opener_name])

        try:
            wait_for("the first final round", lambda: finals(opener()), 420)
            timings["first_final_s"] = time.monotonic() - started
            # t1 killed mid-round: once round r is collecting and t1 has contributed to it
            def t1_in_collect():
                rounds = rounds_of(opener())
                live = [r for r in rounds if r["phase"] == "collect" and hotkeys["t1"] in r["received"]]
                return live[-1]["round"] if live else None
            killed_in = wait_for("t1 contributing to a collecting round", t1_in_collect, 240, 1)
            lan.stop("t1", sig=signal.SIGKILL)
            lan.start("t1", command("t1"), logs["t1"], env)
            wait_for("t1 back, its model loaded", lambda: node_status(lan, "t1", data_dirs["t1"]).get(
                "sections", {}).get("training", {}).get("model_ready"), 240)
            back_at = max([r["round"] for r in rounds_of(opener())], default=killed_in)

            def t1_included_again():
                return [r for r in finals(opener()) if r["round"] > back_at
                        and hotkeys["t1"] in r["contributors"]]
            again = wait_for("t1 in a final round again", t1_included_again, 300)
            assert again[0]["round"] <= back_at + 2, (again[0]["round"], back_at)

            # bounded growth: state files and blobs at round 5+K vs round 10+K
            def ended_round(at_least: int):
                return max([r["round"] for r in rounds_of(opener()) if r["phase"] in ("final", "aborted")],
                           default=-1) >= at_least
            growth = {}
            for mark in (5, 10):
                wait_for(f"round {mark} ended", lambda m=mark: ended_round(m), 400)
                growth[mark] = {name: (len(list((d / "roles" / "rounds").glob("*.msgpack"))),
                                       tree_bytes(d / "blobs")) for name, d in data_dirs.items()}
            timings["rounds_done"] = max(r["round"] for r in rounds_of(opener())) + 1
            timings["wall_s"] = time.monotonic() - started

            def all_evaluated():  # a round's eval loss comes a moment after it is final
                status = opener()
                return status if finals(status) and all(
                    r.get("loss_after") is not None for r in finals(status)) else None
            final_status = wait_for("the final rounds' eval losses", all_evaluated, 120, 1)
            served = json.dumps([node_status(lan, t, data_dirs[t]) for t in TRAINERS])  # what /status tells anyone
            assert not any(m in served for m in markers.values())
        finally:
            for name in list(lan.processes):
                lan.stop(name)

    # -- what it showed --
    done = finals(final_status)
    assert len(done) >= 3, rounds_of(final_status)
    losses = [(r["loss_before"], r["loss_after"]) for r in sorted(done, key=lambda r: r["round"])]
    assert losses[-1][1] < losses[0][0], losses  # eval loss on the validator's own eval text fell
    print("multihost:", json.dumps({"timings": timings, "growth": growth, "losses": losses}))
    if KEEP_ROUNDS < 10:
        for name, (files, _) in growth[10].items():
            assert files <= KEEP_ROUNDS + 2, (name, files)  # the newest rounds, the newest final, one running
        for name in data_dirs:
            assert growth[10][name][1] <= growth[5][name][1] * 1.5 + (4 << 20), (name, growth)
    for name, d in data_dirs.items():  # nothing any node stored, served or wrote holds a marker
        for path in d.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for marker in markers.values():
                    assert marker.encode() not in data, (name, path)
