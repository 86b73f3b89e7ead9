"""The FHE inference market end to end: real node processes, real circuit, real FHE.

A validator process challenges three miner processes (honest, garbage, slow) on the
digits model over the mesh; every challenge ends in exactly one outcome in the
validator's history, and the faulty miners score below the honest one in report.json.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from node.history import History
from node.roles.challenger import summarize
from node.testnet import TestnetPlan, run_testnet
from protocol.challenge import DEFAULT_MIN_COSINE
from test_miner import shared_digits_bundle


def _run_market(tmp_path, tmp_path_factory, **plan) -> tuple[dict, float]:
    root = tmp_path / "tn"
    (root / "fhe").mkdir(parents=True)
    shutil.copytree(shared_digits_bundle(tmp_path_factory), root / "fhe" / "bundle-digits-cnn")
    started = time.monotonic()
    # report["ok"] also needs every ping; the FHE section is what these tests are about.
    run_testnet(TestnetPlan(trainers=0, pings=1, epochs=1, directory=root, timeout_s=300, **plan))
    return json.loads((root / "report.json").read_text()), time.monotonic() - started


def test_validator_challenges_a_real_miner_process(tmp_path, tmp_path_factory):
    report, elapsed = _run_market(tmp_path, tmp_path_factory, validators=1, miners=1)
    fhe = report["fhe"]
    assert fhe["problems"] == [], fhe
    miner = fhe["miners"]["miner-0"]
    assert miner["ok"] == miner["challenges"] == 1 and 0 < miner["median_latency_s"] < 50 and miner["score"] > 0
    root = tmp_path / "tn"
    with History(data_dir=root / "nodes" / "validator-0") as history:  # the validator's own SQL history
        rows = history.records()
        # Honest approximate-rounding FHE measured cosine 0.896-0.998 against the clear
        # reference (docs/fhe.md); "ok" means at least the challenger's threshold.
        assert [(r.outcome, r.agreement) for r in rows] == [("ok", True)] and rows[0].cosine >= DEFAULT_MIN_COSINE
        assert [s.miner for s in history.gossiped_scores(epoch=0)] == [rows[0].miner]
    status = json.loads((root / "nodes" / "miner-0" / "status.json").read_text())
    assert status["sections"]["fhe"]["served"] == {"fhe_add_key": 1, "fhe_challenge": 1}
    print(f"fhe mesh (1 miner): {elapsed:.1f} s, latency {miner['median_latency_s']:.2f} s")


@pytest.mark.slow  # five node processes: 51 s on an idle machine, over 110 s under a load of 8
def test_garbage_and_slow_miners_score_below_the_honest_one(tmp_path, tmp_path_factory):
    # Two validators split the miners; each hands settlement every miner's score.
    report, elapsed = _run_market(tmp_path, tmp_path_factory, validators=2, miners=3,
                                  faults=(("miner-1", "garbage"), ("miner-2", "slow")))
    fhe = report["fhe"]
    assert fhe["problems"] == [], fhe
    honest, garbage, slow = (fhe["miners"][f"miner-{i}"] for i in range(3))
    assert honest["ok"] == honest["challenges"] == 1 and 0 < honest["median_latency_s"] < 50
    # noise of a result's size: refused by the capnp guard before Concrete reads it (issue 11 finding 3,
    # which names the broken part: capnp_segment_count and the like), or by Concrete itself
    (why,) = garbage["errors"]
    assert garbage["error"] == 1 and (why == "malformed_result" or why.startswith("capnp_")), garbage
    assert garbage["score"] == 0.0
    assert slow["ok"] == 1 and slow["median_latency_s"] > honest["median_latency_s"]
    assert slow["score"] < honest["score"] and honest["score"] > 0
    assert set(fhe["weights"]) == {"miner-0", "miner-1", "miner-2"} and sum(fhe["weights"].values()) == \
        pytest.approx(1.0, abs=1e-5)
    # Exactly one outcome per challenge, across the validators' own SQL histories.
    rows = []
    for v in ("validator-0", "validator-1"):
        with History(data_dir=tmp_path / "tn" / "nodes" / v) as history:
            rows += history.records()
    assert sorted(r.outcome for r in rows) == ["error", "ok", "ok"] and len({r.id for r in rows}) == 3
    settled = json.loads((tmp_path / "tn" / "nodes" / "validator-0" / "status.json").read_text())
    epochs = [r for r in settled["sections"]["settlement"]["records"] if r["kind"] == "score_report"]
    assert len(epochs) == 1 and len(epochs[0]["scores"]) == 3
    print(f"fhe mesh (3 miners): {elapsed:.1f} s, honest {honest['median_latency_s']:.2f} s, "
          f"slow {slow['median_latency_s']:.2f} s")


def _section(role: str, **doc) -> dict:
    return {"hotkey": doc.pop("hotkey"), "sections": {"fhe": {"role": role, **doc}}}


def _outcome(miner: str, outcome: str, latency: float | None, at: float, reason: str | None = None) -> dict:
    return {"miner": miner, "outcome": outcome, "latency_s": latency, "issued_at": at, "error_reason": reason,
            "challenge_id": f"{at:032.0f}", "epoch": 0, "cosine": None}


def test_summary_flags_faulty_miners_that_do_not_score_below_honest_ones():
    plan = TestnetPlan(validators=2, trainers=0, miners=3, epochs=1)
    statuses = {
        "validator-0": _section("validator", hotkey="V0", done=True, epochs=1, model="digits-cnn", problems=[],
                                outcomes=[_outcome("M0", "ok", 6.0, 1), _outcome("M2", "ok", 5.0, 2)]),
        "validator-1": _section("validator", hotkey="V1", done=False, epochs=1, model="digits-cnn", problems=[],
                                outcomes=[_outcome("M1", "timeout", None, 3, "deadline")]),
        "miner-0": _section("miner", hotkey="M0", behaviour="honest"),
        "miner-1": _section("miner", hotkey="M1", behaviour="garbage"),
        "miner-2": _section("miner", hotkey="M2", behaviour="slow"),  # faster than honest: flagged
    }
    summary = summarize(plan, statuses)
    assert summary["miners"]["miner-0"]["ok"] == 1 and summary["miners"]["miner-1"]["timeout"] == 1
    assert summary["miners"]["miner-1"]["score"] == 0.0
    assert any("slow miner-2 scored" in p for p in summary["problems"])
    assert any("validator-1 did not finish" in p for p in summary["problems"])
    assert not any("garbage" in p for p in summary["problems"])
    # A miner no validator challenged is a problem; no validator section at all, too.
    statuses["validator-1"]["sections"]["fhe"]["outcomes"] = []
    assert "fhe: miner-1 was never challenged" in summarize(plan, statuses)["problems"]
    assert summarize(plan, {"miner-0": statuses["miner-0"]})["problems"] == [
        "fhe: no validator reported an fhe section"]
    assert summarize(TestnetPlan(epochs=0), statuses) == {"miners": {}, "problems": []}


def test_summary_scores_come_from_protocol_scoring():
    from protocol.scoring import response_score

    plan = TestnetPlan(validators=1, trainers=0, miners=1, epochs=1)
    statuses = {"validator-0": _section("validator", hotkey="V0", done=True, epochs=1, model="m", problems=[],
                                        outcomes=[_outcome("M0", "ok", 4.0, 1), _outcome("M0", "ok", 8.0, 2)]),
                "miner-0": _section("miner", hotkey="M0", behaviour="honest")}
    miner = summarize(plan, statuses)["miners"]["miner-0"]
    assert miner["challenges"] == miner["ok"] == 2 and miner["median_latency_s"] == 6.0
    assert miner["score"] == pytest.approx((response_score(4.0) + response_score(8.0)) / 2)


def test_sealmesh_fhe_compile_is_wired(tmp_path, capsys):
    from node.cli import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["fhe", "compile", "--model", "digits-cnn", "--out", str(tmp_path / "taken")]) == 2
    assert "sealmesh fhe compile:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fhe", "compile", "--model", "no-such-model", "--out", str(tmp_path / "x")])
