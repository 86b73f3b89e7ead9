"""A trainer not in the genesis joins a running mesh with `--join --stake`, and leaves it
with `sealmesh leave` (issue 15): real node processes on loopback (node.testnet's files),
no node restarted, no genesis file edited after the mesh started.

It shows: the joiner is admitted by a snapshot the validator signed and is a contributor
of a final round within 3 rounds of starting; nobody disconnects an honest relay for
"invalid messages"; after `sealmesh leave` the next rounds end final without it and its
escrow (less the early-leave penalty) is released to it. The time from --join to first
inclusion is printed (pytest -s) for the issue's closing note.

Minutes on 2 shared cores: @slow (SEALMESH_SLOW=1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.registry.genesis import load_genesis, write_genesis
from node.roles.rounds import RoundConfig, write_round_config
from node.testnet import TestnetPlan, _spawn, _stop_all, prepare
from tests.nodes import http_get, wait_for, wait_ready

SEALMESH = [sys.executable, "-m", "node.cli"]


def status(node) -> dict:
    try:
        port = json.loads((node.data_dir / "ready.json").read_text())["api_port"]
        code, body = http_get(port, "/status")
        return json.loads(body) if code == 200 else {}
    except (OSError, ValueError, KeyError):
        return {}


def final_rounds(validator) -> list[dict]:
    rounds = status(validator).get("sections", {}).get("training", {}).get("rounds", [])
    return [r for r in rounds if r.get("phase") == "final"]


def mesh_with_a_stranger(root: Path):
    """1 validator, 2 trainers prepared by node.testnet; trainer-1 is then taken out of the
    genesis (it is the stranger) and the round minimum set to 1, so rounds run before it joins."""
    nodes = prepare(TestnetPlan(validators=1, trainers=2, miners=0, pings=0, rounds=12, key_bits=1024,
                                directory=root))
    validator, founder, stranger = nodes
    genesis = load_genesis(root / "genesis.json")
    write_genesis(root / "genesis.json", type(genesis)(
        genesis.mesh_id, tuple(m for m in genesis.members if m.hotkey != stranger.hotkey),
        genesis.bootstrap, tuple(n for n in genesis.names if n[0] != stranger.hotkey)))
    for node in nodes:
        info = node.data_dir / "committee" / "committee.json"
        doc = json.loads(info.read_text())
        doc["round_policy"]["min_contributors"] = 1
        info.write_text(json.dumps(doc))
        write_round_config(node.data_dir, RoundConfig(collect_s=20.0, first_round_extra_s=10.0, min_contributors=1,
                                                      round_period_s=0.0))
    with open(stranger.data_dir / "node.toml", "a") as f:
        f.write("join = true\nstake = 50\n")
    return validator, founder, stranger


@pytest.mark.slow
def test_a_trainer_joins_a_running_mesh_is_included_then_leaves(tmp_path):
    validator, founder, stranger = mesh_with_a_stranger(tmp_path / "tn")
    nodes = [validator, founder]
    try:
        for node in nodes:
            node.process = _spawn(node)
            wait_ready(node)
        wait_for("a first final round without the stranger", lambda: final_rounds(validator), 400)
        rounds_before = len(final_rounds(validator))
        stranger.process = _spawn(stranger)
        nodes.append(stranger)
        started = time.monotonic()
        wait_ready(stranger)
        member = wait_for("the stranger admitted", lambda: status(stranger).get("membership", {}).get(
            "state") == "member" and status(stranger)["membership"], 240)
        admitted_s = time.monotonic() - started
        included = wait_for("a final round with the stranger", lambda: [
            r for r in final_rounds(validator) if stranger.hotkey in r["contributors"]], 600)
        included_s = time.monotonic() - started
        first = included[0]["round"]
        assert first - rounds_before < 3, f"included in round {first}, {rounds_before} rounds were final before"
        assert member["stake_in_escrow"] == 50
        v_membership = status(validator)["membership"]
        assert stranger.hotkey in v_membership["admitted"]
        print(f"\njoin: admitted after {admitted_s:.1f} s (node: {member['join_to_admission_s']} s), first "
              f"included in round {first} after {included_s:.1f} s from starting the node with --join")

        done = subprocess.run([*SEALMESH, "leave", "--data-dir", str(stranger.data_dir)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        left = wait_for("the leave confirmed", lambda: status(stranger).get("membership", {}).get(
            "state") == "left" and status(stranger)["membership"], 240)
        assert 0 < left["escrow_released"] <= 50  # 50 less the early-leave penalty, if any
        wait_for("the validator's directory without it", lambda: stranger.hotkey not in status(
            validator).get("membership", {}).get("admitted", [stranger.hotkey]), 60)
        # The leave takes effect at the round boundary: a round open at the time may still
        # count its contribution; every round opened after it ends without it.
        opened = status(validator).get("sections", {}).get("training", {}).get("rounds", [])
        boundary = max((r["round"] for r in opened), default=-1)
        later = wait_for("a final round opened after the leave", lambda: [
            r for r in final_rounds(validator) if r["round"] > boundary], 600)
        assert stranger.hotkey not in later[0]["contributors"]  # not waited for, not included
        for node in nodes:
            assert node.process.poll() is None, f"{node.name} exited"  # no restarts
    finally:
        _stop_all(nodes)
    for node in nodes:
        log = (node.data_dir / "node.log").read_text()
        assert "invalid messages: disconnecting" not in log, node.name
