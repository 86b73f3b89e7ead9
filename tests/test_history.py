"""The validator's challenge history on SQLite, and on a real PostgreSQL server when one
can be started here (a throwaway cluster from the Debian postgresql package)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from node.history import DuplicateOutcome, History, HistoryError, default_url
from protocol.challenge import ChallengeConfig, ChallengeMachine, GossipScore, RecordOutcome
from protocol.scoring import WINDOW, Outcome, WindowEntry, response_score, score_window

V = "validator-a"
M1, M2, M3 = "miner-1", "miner-2", "miner-3"


# --- a throwaway PostgreSQL cluster ---------------------------------------------------------


def _pg_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): "
                    "apt-get install postgresql to run this test")
    # initdb refuses to run as root: run the cluster as the postgres user when we are root.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Directly under /tmp: pytest's tmp dirs are private to root, and the socket path is short.
    root = Path(tempfile.mkdtemp(prefix="sealmesh-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*cmd: object) -> None:
        done = subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr or done.stdout}")

    started = False
    try:
        run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "sealmesh")
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-o",
            f"-k {root} -p {port} -c listen_addresses=''", "start")
        started = True
        yield f"postgresql://sealmesh@/postgres?host={root}&port={port}"
    finally:
        if started:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def history(request, tmp_path):
    if request.param == "sqlite":
        store = History(data_dir=tmp_path / "node")
    else:
        store = History(request.getfixturevalue("postgres_url"))
        with store.engine.begin() as conn:  # the cluster is shared by the module's tests
            conn.execute(text("TRUNCATE challenges, scores"))
    yield store
    store.close()


# --- helpers -------------------------------------------------------------------------------


def run_epoch(machine: ChallengeMachine, history: History, epoch: int, plan: dict[str, list]) -> None:
    """Drive the machine through one epoch; plan: miner -> outcomes ("ok", latency) / "wrong" /
    "timeout" / ("error", reason); every effect goes to the store like the shell would."""
    miners = list(plan)
    machine.start_epoch(epoch, offers={m: "digits-cnn" for m in miners}, key_ids={"digits-cnn": "k"},
                        validators=[V], now=0.0)
    clock = 1000.0 * epoch
    for miner, outcomes in plan.items():
        for outcome in outcomes:
            clock += 100.0
            effects = machine.issue(miner, input_seed=1, now=clock)
            cid = effects[0].challenge_id
            if type(effects[0]).__name__ == "UploadKey":
                machine.key_uploaded(cid, now=clock)
            machine.sent(cid, at=clock)
            if outcome == "timeout":
                effects = machine.timeout(cid, now=clock + machine.config.response_timeout_s)
            elif outcome == "wrong":
                effects = machine.response_received(cid, at=clock + 5, argmax_agrees=False, cosine=0.1)
            elif outcome[0] == "error":
                effects = machine.error(cid, reason=outcome[1], now=clock)
            else:
                effects = machine.response_received(cid, at=clock + outcome[1], argmax_agrees=True, cosine=0.99)
            for effect in effects:
                assert isinstance(effect, RecordOutcome)
                history.record_outcome(effect.record)
    for effect in machine.close_epoch(now=clock + 1):
        assert isinstance(effect, GossipScore)
        history.record_scores(effect)


# --- tests ---------------------------------------------------------------------------------


def test_outcomes_round_trip_and_recorded_at_is_the_servers(history):
    machine = ChallengeMachine(ChallengeConfig("mesh", challenges_per_miner=3), V)
    run_epoch(machine, history, 1, {M1: [("ok", 20.0), "wrong", ("error", "foreign_key")]})
    rows = history.records(M1)
    assert [r.outcome for r in rows] == ["ok", "wrong", "error"]
    assert rows[0].latency_s == 20.0 and rows[0].agreement is True and rows[0].cosine == 0.99
    assert rows[1].agreement is False and rows[1].latency_s == 5.0
    assert rows[2].error_reason == "foreign_key" and rows[2].latency_s is None
    assert [r.id for r in rows] == [rec.challenge_id for rec in machine.records]
    now = datetime.now(timezone.utc)
    for row in rows:
        stamped = row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=timezone.utc)
        assert abs(stamped - now) < timedelta(minutes=5)


def test_a_challenge_has_one_outcome_in_the_store_too(history):
    machine = ChallengeMachine(ChallengeConfig("mesh", challenges_per_miner=1), V)
    run_epoch(machine, history, 1, {M1: [("ok", 10.0)]})
    with pytest.raises(DuplicateOutcome):
        history.record_outcome(machine.records[0])
    assert len(history.records()) == 1


def test_window_is_the_last_forty_in_order_and_seeds_a_new_machine(history):
    machine = ChallengeMachine(ChallengeConfig("mesh", challenges_per_miner=WINDOW + 5), V)
    plan = [("error", "stream_reset")] * 5 + [("ok", float(10 + i)) for i in range(WINDOW)]
    run_epoch(machine, history, 1, {M1: plan})
    window = history.window(M1)
    assert len(window) == WINDOW and all(e.outcome is Outcome.OK for e in window)
    assert [e.latency_s for e in window] == [float(10 + i) for i in range(WINDOW)]  # oldest first
    assert history.window(M1, n=3) == [WindowEntry(Outcome.OK, float(10 + i)) for i in range(WINDOW - 3, WINDOW)]
    assert list(machine.windows[M1]) == window  # the store and the machine agree

    restarted = ChallengeMachine(ChallengeConfig("mesh"), V, windows=history.windows())
    assert list(restarted.windows[M1]) == window


def test_scores_and_summary(history):
    machine = ChallengeMachine(ChallengeConfig("mesh", challenges_per_miner=4), V)
    run_epoch(machine, history, 1, {
        M1: [("ok", 20.0), ("ok", 40.0), ("ok", 40.0), "timeout"],  # rate 1/4 = 0.25
        M2: [("ok", 40.0), ("ok", 80.0)],                            # rate 0
        M3: ["timeout", ("error", "unknown_key")],                   # nothing ok
    })
    scores = history.scores_by_miner()
    # M1: ok scores 8, 1, 1 -> median 1; 25 % failed -> 1 / (1 + 2.5^5) = 1 / 98.65625
    assert scores[M1].score == pytest.approx(1 / 98.65625)
    # M2: ok scores 1 and 0.125 -> median 0.5625, no penalty
    assert scores[M2].score == pytest.approx((1 + 0.125) / 2)
    assert scores[M3].score == 0.0

    summary = history.summary()
    assert summary["challenges"] == 8
    m1 = summary["miners"][M1]
    assert (m1["challenges"], m1["ok"], m1["wrong"], m1["timeout"], m1["error"]) == (4, 3, 0, 1, 0)
    assert m1["median_latency_s"] == 40.0  # median of 20, 40, 40
    m3 = summary["miners"][M3]
    assert (m3["timeout"], m3["error"], m3["median_latency_s"], m3["weight"]) == (1, 1, None, 0.0)
    total = scores[M1].score + scores[M2].score
    assert summary["miners"][M2]["weight"] == pytest.approx(scores[M2].score / total)
    assert sum(m["weight"] for m in summary["miners"].values()) == pytest.approx(1.0)

    gossiped = history.gossiped_scores(epoch=1)
    assert {row.miner: row.score for row in gossiped} == pytest.approx({m: s.score for m, s in scores.items()})
    assert gossiped[0].recorded_at is not None


def test_summary_of_an_empty_history(history):
    assert history.summary() == {"challenges": 0, "miners": {}}
    assert history.window(M1) == [] and history.scores_by_miner() == {}
    assert score_window(M1, history.window(M1)).score == 0.0
    assert response_score(40.0) == 1.0


def test_default_location_and_bad_urls(tmp_path):
    assert default_url(tmp_path) == f"sqlite:///{tmp_path / 'history.sqlite'}"
    with History(data_dir=tmp_path / "deep" / "node"):
        pass
    assert (tmp_path / "deep" / "node" / "history.sqlite").exists()
    with pytest.raises(HistoryError, match="sqlite:///PATH"):
        History("nosuchdialect://x")
    with pytest.raises(HistoryError, match="server running"):
        History(f"postgresql://nobody@/db?host={tmp_path}&port=1&connect_timeout=2")
