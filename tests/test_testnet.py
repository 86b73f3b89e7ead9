"""A real multi-process mesh on loopback: every node hears every other node."""

import json
import subprocess
import sys

from node.testnet import NodeProcess, TestnetPlan, _spawn, build_report, run_testnet
from protocol.membership import Role


def test_five_node_mesh_delivers_every_announcement_and_ping(tmp_path):
    # rounds=0: this is the mesh itself; training rounds have their own tests.
    plan = TestnetPlan(validators=2, trainers=2, miners=1, pings=5, rounds=0,
                       directory=tmp_path / "tn", timeout_s=120)
    assert run_testnet(plan) == 0
    report = json.loads((tmp_path / "tn" / "report.json").read_text())
    assert report["ok"] and report["nodes"] == 5 and report["problems"] == []
    assert report["gossip"]["expected"] == 5 * 4 * 5 == report["gossip"]["delivered"]
    assert 0 <= report["gossip"]["p50_ms"] <= report["gossip"]["p99_ms"]
    assert report["rejected"] == {}  # honest nodes trip no check
    for name in ("validator-0", "trainer-1", "miner-0"):
        status = json.loads((tmp_path / "tn" / "nodes" / name / "status.json").read_text())
        assert status["presence"]["missing"] == []  # final status written at SIGTERM


def test_cli_exits_nonzero_when_the_mesh_cannot_complete(tmp_path):
    # A 1-second timeout cannot be met: the CLI must say so and exit 1, with a report.
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "testnet", "up", "--validators", "1", "--trainers", "1",
         "--miners", "0", "--pings", "1", "--timeout", "1", "--dir", str(tmp_path / "tn")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "INCOMPLETE" in result.stdout
    report = json.loads((tmp_path / "tn" / "report.json").read_text())
    assert not report["ok"] and report["problems"]


def _status(heard_missing, pings):
    return {"presence": {"missing": heard_missing, "pings_received": pings, "latencies_ms": [1.0, 9.0]},
            "rejected": {"bad_signature": 2}, "mesh_stats": {"dropped_rate_limited": 0}}


def test_report_names_each_missing_delivery(tmp_path):
    plan = TestnetPlan(validators=1, trainers=1, miners=0, pings=3, directory=tmp_path)
    a = NodeProcess("validator-0", Role.VALIDATOR, "A", tmp_path / "a", 0)
    b = NodeProcess("trainer-0", Role.TRAINER, "B", tmp_path / "b", 0)
    a.last_status = _status([], {"B": 3})
    b.last_status = _status(["A"], {"A": 1})
    report = build_report(plan, [a, b], complete=True, duration_s=1.0)
    assert not report["ok"]
    assert report["gossip"] == {"expected": 6, "delivered": 4, "p50_ms": 1.0, "p99_ms": 9.0, "max_ms": 9.0}
    assert report["rejected"] == {"bad_signature": 4}
    assert "trainer-0 did not hear validator-0 at the end (never, or gone)" in report["problems"]
    assert "trainer-0 got 1/3 pings from validator-0" in report["problems"]


def test_a_second_run_in_the_same_directory_is_a_new_mesh_and_keeps_only_fhe_keys(tmp_path):
    """A rerun kept the earlier mesh's history.sqlite: its validators started at different
    epochs, assigned miners differently, and one miner was never challenged."""
    from node.testnet import TestnetPlan, prepare

    plan = TestnetPlan(trainers=1, validators=3, miners=1, rounds=1, pings=1, directory=tmp_path, timeout_s=60)
    first = {n.name: n for n in prepare(plan)}
    validator = first["validator-0"].data_dir
    (validator / "history.sqlite").write_bytes(b"epoch 0 of the earlier mesh")
    (validator / "roles" / "rounds").mkdir(parents=True)
    (validator / "roles" / "rounds" / "round-3.json").write_text("{}")
    (validator / "roles" / "head.sqlite").write_bytes(b"the earlier head")
    (validator / "roles" / "fhe-keys").mkdir()
    (validator / "roles" / "fhe-keys" / "evaluation.key").write_bytes(b"kept")
    seed_before = (validator / "node_key").read_bytes()

    second = {n.name: n for n in prepare(plan)}
    assert second["validator-0"].hotkey != first["validator-0"].hotkey
    assert not (validator / "history.sqlite").exists()
    assert not (validator / "roles" / "rounds").exists() and not (validator / "roles" / "head.sqlite").exists()
    assert (validator / "roles" / "fhe-keys" / "evaluation.key").read_bytes() == b"kept"
    assert (validator / "node_key").read_bytes() != seed_before and (validator / "node.toml").exists()


def test_a_node_restarted_in_the_same_run_keeps_the_log_of_its_first_life(tmp_path):
    node = NodeProcess("v", Role.VALIDATOR, "hotkey", tmp_path, 0)  # no node.toml: each life fails at once
    lengths = []
    for _ in range(2):
        assert _spawn(node).wait(timeout=120) != 0
        lengths.append(len((tmp_path / "node.log").read_text().splitlines()))
    assert lengths[0] > 0 and lengths[1] == 2 * lengths[0], lengths
