"""A trainer behind a home router, as a full `sealmesh node`, is included in a real round
(issue 16, test item 4).

Namespaces from tests/netns_nat.py: validators `v1` (the bootstrap peer, started with
`--relay`) and `v2` on the public LAN, the trainer `home` on 192.168.77.0/24 behind a
MASQUERADE router that lets no connection in. Every node is set up and started with the
documented commands (README "Run a mesh on several machines", as tests/test_multihost.py
does), kept small so it fits a few minutes on 2 shared cores: a 2-of-2 committee
(`--insecure-small-committee`), `--min-contributors 1` so that every final round needs
the NATed trainer, short rounds.

It shows: the trainer's /status says "relayed" (with its relayed address through v1);
a final round has its hotkey among the contributors; the bytes of its sealed
contribution are in both validators' blob stores. It prints the time from the trainer's
start to its first inclusion, and how each validator is connected to it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest

from tests import netns_nat
from tests.test_multihost import SEALMESH, node_status, rounds_of, sentences, sh, wait_for

VALIDATORS = ["v1", "v2"]
HOME = "home"
ROUNDS_JSON = {"collect_s": 10.0, "first_round_extra_s": 20.0, "decrypt_s": 60.0, "steps": 5}

WHY_NOT = netns_nat.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no NAT namespaces here: {WHY_NOT}")


@pytest.mark.parametrize("egress", ["open", "v2_refused"])
def test_natted_trainer_full_node_is_relayed_and_included_in_a_final_round(tmp_path, egress):
    """egress "open": home can dial every public host out through the NAT, so it connects
    to both validators directly itself (no relayed connection forms, DCUtR has nothing to
    upgrade). "v2_refused": home's router refuses new connections to v2, so v2 can reach
    home only at its relayed address; the contribution then crosses the circuit to v2, and
    DCUtR's direct dial from home fails, so the connection stays relayed."""
    root, wallets = tmp_path, tmp_path / "wallets"
    rng = random.Random(16)
    names = VALIDATORS + [HOME]
    hotkeys = {}
    for name in names:
        sh("wallet", "create", "--name", name, "--hotkey", "default", "--path", str(wallets))
        hotkeys[name] = sh("wallet", "show", "--name", name, "--hotkey", "default", "--path", str(wallets)).strip()
    genesis = root / "genesis.json"
    sh("mesh", "init", "--mesh-id", "natlab", "--out", str(genesis))
    for name in names:
        sh("mesh", "add-member", str(genesis), "--hotkey", hotkeys[name], "--roles",
           "validator" if name in VALIDATORS else "trainer", "--stake", "10", "--name", name)
    sh("committee", "deal", "--genesis", str(genesis), "--out", str(root / "committee"), "--threshold", "2",
       "--bits", "1024", "--min-contributors", "1", "--insecure-small-committee")

    data_dirs = {name: root / name for name in names}
    for name, d in data_dirs.items():
        d.mkdir()
        shutil.copytree(root / "committee" / (name if name in VALIDATORS else "public"), d / "committee")
    for name in VALIDATORS:
        (root / f"{name}-eval.txt").write_text(sentences(rng, 60))
        (data_dirs[name] / "rounds.json").write_text(json.dumps(ROUNDS_JSON))
    (root / "home-data").mkdir()
    (root / "home-data" / "part0.txt").write_text(sentences(rng, 150))

    def command(name: str) -> list[str]:
        argv = [SEALMESH, "node", "--role", "validator" if name in VALIDATORS else "trainer",
                "--genesis", str(genesis), "--wallet-name", name, "--wallet-path", str(wallets),
                "--data-dir", str(data_dirs[name]), "--listen-host", "0.0.0.0", "--listen-port", "9000",
                # home announces its own (private) address, as a member who does not know it is NATed
                "--announce-addr", f"/ip4/{lan.ip(name)}/tcp/9000", "--keep-rounds", "4",
                "--insecure-small-committee"]
        if name == "v1":
            argv.append("--relay")
        if name in VALIDATORS:
            return argv + ["--eval-data", str(root / f"{name}-eval.txt")]
        return argv + ["--data", str(root / "home-data")]

    with netns_nat.NatLan(VALIDATORS, home=HOME) as lan:
        logs = {name: root / f"{name}.log" for name in names}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            lan.start("v1", command("v1"), logs["v1"], env)
            wait_for("v1's ready.json", lambda: (data_dirs["v1"] / "ready.json").exists(), 180, 1)
            sh("mesh", "add-bootstrap", str(genesis), str(data_dirs["v1"] / "ready.json"))
            lan.start("v2", command("v2"), logs["v2"], env)
            if egress == "v2_refused":
                lan.refuse_outbound(lan.ip("v2"))
            home_started = time.monotonic()
            lan.start(HOME, command(HOME), logs[HOME], env)

            def home_status() -> dict:
                return node_status(lan, HOME, data_dirs[HOME])

            reach = wait_for("home reported relayed", lambda: (
                r if (r := home_status().get("reachability", {})).get("status") == "relayed" else None), 180, 2)
            relayed_s = time.monotonic() - home_started
            v1_peer = json.loads((data_dirs["v1"] / "ready.json").read_text())["peer_id"]
            assert reach["relayed_addrs"] and f"/p2p/{v1_peer}/p2p-circuit/p2p/" in reach["relayed_addrs"][0], reach

            opener = min(VALIDATORS, key=lambda n: hotkeys[n])

            def home_included() -> list[dict]:
                rounds = rounds_of(node_status(lan, opener, data_dirs[opener]))
                return [r for r in rounds if r["phase"] == "final" and hotkeys[HOME] in r["contributors"]]
            included = wait_for("a final round with the NATed trainer among its contributors", home_included, 300)
            inclusion_s = time.monotonic() - home_started
            home_peer = home_status()["peer_id"]
            kinds = {v: node_status(lan, v, data_dirs[v]).get("reachability", {}).get("connections", {})
                     .get(home_peer) for v in VALIDATORS}
            still = home_status().get("reachability", {})
        finally:
            for name in list(lan.processes):
                lan.stop(name, sig=signal.SIGINT)

    # The contribution's bytes reached both validators: the blob the trainer sealed for the
    # included round is in each validator's store, byte for byte the trainer's.
    round_id = included[0]["round"]
    sealed = [line for line in logs[HOME].read_text().splitlines() if f"phase=sealed round={round_id} " in line]
    assert sealed, f"home never sealed round {round_id}"
    prefix = sealed[-1].split("blob=")[1].split()[0]
    own = list((data_dirs[HOME] / "blobs").rglob(f"{prefix}*"))
    assert len(own) == 1, own
    for v in VALIDATORS:
        copies = list((data_dirs[v] / "blobs").rglob(own[0].name))
        assert copies and copies[0].read_bytes() == own[0].read_bytes(), (v, copies)
    assert still.get("status") == "relayed", still
    if egress == "v2_refused":
        assert kinds["v2"] == "relayed", kinds
        # v2 asked home first (the trainer heads its holder list) over its only connection: the circuit
        served_lines = [line for line in logs[HOME].read_text().splitlines()
                        if f"serving blob {prefix} " in line and line.endswith(f"to {hotkeys['v2']}")]
        assert served_lines, "v2 did not fetch the contribution from home"
    print("nat_round:", json.dumps({"egress": egress,"relayed_after_s": round(relayed_s, 1),
                                    "first_inclusion_s": round(inclusion_s, 1), "round": round_id,
                                    "validator_connections_to_home": kinds}))
