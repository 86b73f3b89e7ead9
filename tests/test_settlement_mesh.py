"""Settlement in real multi-process meshes (node.testnet): the validators' embedded head
opens, records, closes and fans out; a validator that closes early is slashed; one that
is SIGKILLed while a snapshot waits for it restarts and catches up."""

from __future__ import annotations

import json
import signal
import time

import pytest

from node.roles.settlement import ESCROW, OPENING_BALANCE, POOL_SHARE
from node.testnet import TestnetPlan, _get_status, _spawn, _stop_all, build_report, prepare, run_testnet
from protocol.head import POOL


def _report(plan: TestnetPlan) -> dict:
    return json.loads((plan.directory / "report.json").read_text())


def test_three_validators_open_close_and_fan_out_their_head(tmp_path):
    plan = TestnetPlan(validators=3, trainers=0, miners=0, pings=2, directory=tmp_path / "tn", timeout_s=90)
    assert run_testnet(plan) == 0
    report = _report(plan)
    settle = report["settlement"]
    assert report["ok"] and settle["problems"] == [] and report["rejected"] == {}
    assert settle["backend"] == "embedded" and settle["state"] == "Final" and settle["conserved"]
    assert {v["state"] for v in settle["validators"].values()} == {"Final"}
    # Nothing was recorded: every party gets its balance and escrow back, the pool stays whole.
    assert settle["balances"] == {**{f"validator-{i}": OPENING_BALANCE + ESCROW for i in range(3)},
                                  POOL: 3 * POOL_SHARE}
    assert sum(settle["balances"].values()) == settle["deposits"]


@pytest.mark.slow
def test_demo_mesh_settles_its_training_round(tmp_path):
    plan = TestnetPlan(validators=2, trainers=2, miners=0, pings=2, rounds=1, key_bits=1024,
                       directory=tmp_path / "tn", timeout_s=300)
    assert run_testnet(plan) == 0
    settle = _report(plan)["settlement"]
    assert settle["state"] == "Final" and settle["conserved"] and settle["problems"] == []
    assert list(settle["rounds"]) == ["0"] and settle["snapshots_confirmed"] >= 1
    paid = settle["rounds"]["0"]["rewards"]
    assert sum(paid.values()) == 120 and settle["balances"][POOL] == 2 * POOL_SHARE - 120


@pytest.mark.slow
def test_a_validator_closing_early_is_contested_and_slashed(tmp_path):
    plan = TestnetPlan(validators=3, trainers=1, miners=0, pings=2, rounds=1, key_bits=1024,
                       faults=(("validator-2", "close-early"),), directory=tmp_path / "tn", timeout_s=300)
    run_testnet(plan)
    settle = _report(plan)["settlement"]
    assert settle["slashed"] == ["validator-2"] and settle["problems"] == []
    honest = [settle["validators"][f"validator-{i}"] for i in (0, 1)]
    assert all(v["state"] == "Final" and v["conserved"] for v in honest)
    assert settle["balances"]["validator-2"] == OPENING_BALANCE  # its escrow went to the others
    assert settle["balances"]["validator-0"] + settle["balances"]["validator-1"] == \
        2 * (OPENING_BALANCE + ESCROW) + ESCROW


def _settlement(node) -> dict:
    return ((node.last_status or {}).get("sections") or {}).get("settlement") or {}


def _poll(nodes, until, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.last_status = _get_status(node) or node.last_status
        if until():
            return
        time.sleep(0.5)
    raise TimeoutError(f"mesh did not get there in {timeout_s} s: "
                       f"{[(n.name, _settlement(n).get('state')) for n in nodes]}")


@pytest.mark.slow
def test_a_validator_killed_while_a_snapshot_waits_for_it_catches_up(tmp_path):
    plan = TestnetPlan(validators=3, trainers=1, miners=0, pings=0, rounds=1, key_bits=1024,
                       directory=tmp_path / "tn", timeout_s=300)
    nodes = prepare(plan)
    validators = [n for n in nodes if n.name.startswith("validator")]
    try:
        for node in nodes:
            node.process = _spawn(node)
        _poll(nodes, lambda: all(_settlement(v).get("state") == "Open" for v in validators), 120)
        # Kill a validator that does not author records, before the round is recorded.
        victim = next(v for v in validators if _settlement(v)["rank"] != 0)
        author = next(v for v in validators if _settlement(v)["rank"] == 0)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        _poll(nodes, lambda: _settlement(author).get("pending_txs", 0) > 0
              or _settlement(author).get("snapshots_confirmed", 0) > 0, 240)
        victim.process = _spawn(victim)  # same data dir: it reopens head.sqlite and resumes
        _poll(nodes, lambda: all(_settlement(v).get("state") == "Final" for v in validators), 240)
    finally:
        _stop_all(nodes)
    report = build_report(plan, nodes, complete=True, duration_s=0)
    settle = report["settlement"]
    assert settle["problems"] == [] and settle["slashed"] == [] and list(settle["rounds"]) == ["0"]
    assert len({json.dumps(v["snapshots_confirmed"]) for v in settle["validators"].values()}) == 1
