"""Private training rounds across real node processes (node.testnet), with faults.

One short round runs by default (2 validators, 2 trainers, 1024-bit committee key, the
tiny model); the fault scenarios take minutes on 2 shared cores and run with
SEALMESH_SLOW=1. Each asserts on the validators' "training" sections and report.json.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from node import testnet
from node.roles.rounds import RoundConfig, write_round_config
from node.testnet import TestnetPlan


def _plan(tmp_path: Path, **overrides) -> TestnetPlan:
    base = dict(validators=2, trainers=2, miners=0, pings=0, rounds=1, key_bits=1024,
                directory=tmp_path / "tn", timeout_s=240)
    base.update(overrides)
    return TestnetPlan(**base)


def test_one_private_round_completes_and_lowers_the_held_out_loss(tmp_path):
    plan = _plan(tmp_path, timeout_s=150)
    assert testnet.run_testnet(plan) == 0, (plan.directory / "report.json").read_text()
    report = json.loads((plan.directory / "report.json").read_text())
    (round0,) = report["training"]["rounds"]
    assert round0["complete"] and round0["validators_agree"]
    assert sorted(round0["contributors"]) == ["trainer-0", "trainer-1"] and round0["rejected"] == []
    assert round0["loss_after"] < round0["loss_before"]
    assert round0["adapter_id"] != round0["base_adapter_id"]
    # each block was combined from t = 2 members' partial decryptions
    assert all(len(members) == 2 for members in round0["partials_used"].values())
    assert set(round0["seconds"]) >= {"collect", "decrypt", "partial_decrypt", "combine", "evaluate"}


@pytest.mark.slow
def test_two_rounds_chain_adapters_and_the_loss_keeps_falling(tmp_path):
    plan = _plan(tmp_path, rounds=2, timeout_s=300)
    assert testnet.run_testnet(plan) == 0, (plan.directory / "report.json").read_text()
    rounds = json.loads((plan.directory / "report.json").read_text())["training"]["rounds"]
    assert rounds[1]["base_adapter_id"] == rounds[0]["adapter_id"]
    assert rounds[0]["loss_before"] > rounds[0]["loss_after"] > rounds[1]["loss_after"]


@pytest.mark.slow
def test_a_cheating_trainer_is_excluded_with_evidence(tmp_path):
    plan = _plan(tmp_path, trainers=3, faults=(("trainer-1", "cheat"),), timeout_s=240)
    assert testnet.run_testnet(plan) == 0, (plan.directory / "report.json").read_text()
    (round0,) = json.loads((plan.directory / "report.json").read_text())["training"]["rounds"]
    assert round0["contributors"] == ["trainer-0", "trainer-2"]  # two honest: at least min_contributors
    (rejected,) = round0["rejected"]
    assert rejected["trainer"] == "trainer-1" and rejected["reason"] == "bad_proof"
    # the evidence is a stored blob naming the tampered contribution, which is stored too
    from node.storage import LocalBlobStore

    store = LocalBlobStore(plan.directory / "nodes" / "validator-0" / "blobs")
    doc = json.loads(store.get(rejected["evidence_id"]))
    assert doc["reason"] == "bad_proof" and doc["round"] == 0 and store.has(doc["blob_id"])


class Mesh:
    """node.testnet's processes, driven by hand so a test can kill and restart nodes."""

    def __init__(self, plan: TestnetPlan, config: RoundConfig | None = None) -> None:
        self.plan = plan
        self.nodes = {n.name: n for n in testnet.prepare(plan)}
        if config is not None:
            for node in self.nodes.values():
                write_round_config(node.data_dir, config)
        self.started = time.monotonic()

    def opener(self) -> str:
        validators = sorted((n.hotkey, n.name) for n in self.nodes.values() if n.role.value == "validator")
        return validators[0][1]

    def non_opener_validator(self) -> str:
        return next(n for n in sorted(self.nodes) if n.startswith("validator") and n != self.opener())

    def start(self, skip: tuple[str, ...] = ()) -> None:
        for name, node in self.nodes.items():
            if name not in skip:
                node.process = testnet._spawn(node)

    def training(self, name: str) -> dict:
        status = testnet._get_status(self.nodes[name])
        if status:
            self.nodes[name].last_status = status
        return ((status or {}).get("sections") or {}).get("training") or {}

    def round_phase(self, name: str, round_id: int = 0) -> str | None:
        entry = next((r for r in self.training(name).get("rounds", []) if r["round"] == round_id), None)
        return entry["phase"] if entry else None

    def wait(self, what: str, predicate, timeout_s: float, poll_s: float = 0.3) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(poll_s)
        raise AssertionError(f"timed out waiting for {what}; logs in {self.plan.directory / 'nodes'}")

    def kill(self, name: str) -> None:
        process = self.nodes[name].process
        process.send_signal(signal.SIGKILL)
        process.wait()

    def restart(self, name: str) -> None:
        self.nodes[name].process = testnet._spawn(self.nodes[name])

    def stop(self) -> dict:
        live = [n for n in self.nodes.values() if n.process and n.process.poll() is None]
        testnet._stop_all(live)
        report = testnet.build_report(self.plan, list(self.nodes.values()), True, time.monotonic() - self.started)
        (self.plan.directory / "report.json").write_text(json.dumps(report, indent=2))
        return report


def _finished(mesh: Mesh, names: list[str]) -> bool:
    return all(mesh.training(n).get("done") for n in names)


@pytest.mark.slow
def test_one_committee_member_down_the_others_cover_its_blocks(tmp_path):
    mesh = Mesh(_plan(tmp_path, validators=3), RoundConfig(collect_s=16, first_round_extra_s=6, cover_wait_s=4))
    down = mesh.non_opener_validator()
    live = [n for n in mesh.nodes if n.startswith("validator") and n != down]
    try:
        mesh.start(skip=(down,))
        mesh.wait("the round at the live validators", lambda: _finished(mesh, live), 200)
    finally:
        report = mesh.stop()
    (round0,) = report["training"]["rounds"]
    assert round0["complete"] and round0["validators_agree"]
    assert sorted(round0["validators_final"]) == sorted(live)
    used = {m for members in round0["partials_used"].values() for m in members}
    assert used == set(live)  # 2-of-3: the two live members covered the third one's blocks


@pytest.mark.slow
def test_a_trainer_killed_mid_round_is_left_out(tmp_path):
    mesh = Mesh(_plan(tmp_path, trainers=3), RoundConfig(collect_s=16, first_round_extra_s=6))
    try:
        mesh.start()
        opener = mesh.opener()
        mesh.wait("round 0 to open", lambda: mesh.round_phase(opener) is not None, 150, poll_s=0.1)
        mesh.kill("trainer-2")  # it trains for seconds after the RoundOpen: killed while training
        mesh.wait("the round", lambda: _finished(mesh, ["validator-0", "validator-1"]), 150)
    finally:
        report = mesh.stop()
    (round0,) = report["training"]["rounds"]
    assert round0["complete"] and round0["validators_agree"]
    assert sorted(round0["contributors"]) == ["trainer-0", "trainer-1"]


@pytest.mark.slow
def test_a_validator_killed_mid_round_resumes_and_agrees_on_the_adapter(tmp_path):
    mesh = Mesh(_plan(tmp_path, validators=3), RoundConfig(collect_s=20, first_round_extra_s=6))
    victim = mesh.non_opener_validator()
    validators = [n for n in mesh.nodes if n.startswith("validator")]
    try:
        mesh.start()
        mesh.wait(f"{victim} to collect", lambda: mesh.round_phase(victim) == "collect", 150, poll_s=0.1)
        time.sleep(3)  # let it receive and persist some of the round
        mesh.kill(victim)
        mesh.restart(victim)
        mesh.wait("every validator to finish", lambda: _finished(mesh, validators), 240)
    finally:
        report = mesh.stop()
    log = (mesh.nodes[victim].data_dir / "node.log").read_text()
    assert "phase=resume round=0" in log
    (round0,) = report["training"]["rounds"]
    assert round0["complete"] and round0["validators_agree"], round0
    assert sorted(round0["validators_final"]) == sorted(validators)
