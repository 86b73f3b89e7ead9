"""What an operator sees: liveness, /status, `sealmesh status`, and reminders of a role
that cannot work (issue 12 item 6)."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import trio
import trio.testing

from crypto.identity import Hotkey
from node import committee as cm
from node.api import ApiServer
from node.daemon import Node, now_ms
from node.presence import Presence
from node.registry.genesis import Genesis
from node.roles.base import RoleContext, remind
from node.roles.rounds import RoundsService
from node.roles.trainer import TrainerService
from node.settings import NodeSettings
from node.status_cli import render, run_status
from protocol.inbound import seal_message
from protocol.liveness import MIN_WINDOW_MS, is_live, live_members, liveness_window_ms
from protocol.membership import Member, Role
from protocol.messages import Ping

MESH = "status-mesh"
HOTKEYS = [Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie")]  # A, X (this node), B
A, X, B = (k.ss58_address for k in HOTKEYS)
GENESIS = Genesis(MESH, (Member(A, frozenset({Role.TRAINER}), 1.0), Member(X, frozenset({Role.VALIDATOR}), 10.0),
                         Member(B, frozenset({Role.MINER}), 1.0)),
                  names=((A, "trainer-0"), (X, "validator-0"), (B, "miner-0")))


# --- the rule ---------------------------------------------------------------------

def test_liveness_alive_within_the_window_gone_after_it_never_heard_never():
    window = 30_000
    seen = {"a": 1_000_000, "b": 1_000_000 - window, "c": 1_000_000 - window - 1}
    assert live_members(seen, 1_000_000, window) == {"a", "b"}  # b: exactly at the edge, still live
    assert live_members(seen, 1_000_000 + window + 1, window) == set()  # everyone gone once quiet
    assert not is_live(None, 1_000_000, window)  # never heard
    assert is_live(1_000_500, 1_000_000, window)  # stamped a little ahead of our clock: live


def test_the_window_outlasts_the_slow_announce_period():
    # node/daemon.py announces every interval, or 10x that once it heard everyone.
    for interval_s in (0.2, 1.0, 5.0, 60.0):
        assert liveness_window_ms(interval_s) > 10 * interval_s * 1000
        assert liveness_window_ms(interval_s) >= MIN_WINDOW_MS


def test_presence_marks_a_member_gone_once_it_stops_sending():
    p = Presence(X, frozenset({A, X, B}), window_ms=30_000, names={A: "trainer-0"}, roles={A: ["trainer"]})
    t = 5_000_000
    p.on_heard(A, t)
    p.on_heard(A, t - 10)  # an older message arriving late does not move last-seen back
    assert p.last_seen[A] == t
    now = p.snapshot(t + 1_000)
    assert now["heard"] == [A] and now["missing"] == [B] and now["gone"] == []
    (a,) = [m for m in now["members"] if m["hotkey"] == A]
    assert a == {"name": "trainer-0", "hotkey": A, "roles": ["trainer"], "alive": True, "last_seen_s": 1.0,
                 "peer_id": None}
    later = p.snapshot(t + 31_000)  # A said nothing more for longer than the window
    assert later["heard"] == [] and later["missing"] == sorted([A, B]) and later["gone"] == [A]
    assert [m["alive"] for m in later["members"]] == [False, False]


# --- /status of a real Node ---------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A real Node (validator X) fed through its own dispatch: no process, no mesh."""
    settings = NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path_factory.mktemp("status-node"))
    return Node(settings, HOTKEYS[1], GENESIS)


def test_status_shows_each_member_alive_or_gone(node):
    t = now_ms()
    ping = seal_message(HOTKEYS[0], Ping(1, t), now_ms=t, signed_for=X)  # A, over the verified HTTP path
    assert trio.run(node._on_http_message, ping.to_headers(), ping.body) == (200, {"ok": True, "type": "ping"})
    window = node.presence.window_ms
    node._dispatch(B, Ping(1, t - window - 5_000), t - window - 5_000)  # B's last word, long ago
    node._refresh_status()
    presence = node.status()["presence"]
    members = {m["name"]: m for m in presence["members"]}
    assert members["trainer-0"]["alive"] and members["trainer-0"]["last_seen_s"] < 5
    assert members["trainer-0"]["roles"] == ["trainer"]
    assert not members["miner-0"]["alive"] and members["miner-0"]["last_seen_s"] >= window / 1000
    assert presence["missing"] == [B] and presence["gone"] == [B] and presence["heard"] == [A]
    assert node.status()["problems"] == []  # roles not started: nothing reported yet


# --- `sealmesh status` against a real API --------------------------------------------

RECORDED_SECTIONS = {
    "training": {"role": "validator", "done": False, "committee": {"member": True, "index": 1, "threshold": 2,
                                                                   "size": 3},
                 "rounds": [{"round": 0, "phase": "final", "contributors": [A], "rejected": [],
                             "loss_before": 2.5, "loss_after": 2.25, "committee_phase": "released"},
                            {"round": 1, "phase": "collect", "contributors": [], "committee_phase": "watch"}],
                 "errors": []},
    "fhe": {"role": "validator", "model": "digits-mlp", "epochs": 0, "epochs_done": [0],
            "miners": {B: {"challenges": 4, "ok": 3, "score": 0.75, "weight": 1.0, "median_latency_s": 0.5}},
            "problems": []},
    "settlement": {"backend": "embedded", "state": "open", "snapshots_confirmed": 3, "conserved": True,
                   "balances": {X: 1234, A: 10}, "rounds": [0], "epochs": [], "slashed": []},
}


def _recorded_status(node) -> dict:
    node._refresh_status()
    doc = node.status()
    doc["sections"] = RECORDED_SECTIONS
    doc["problems"] = [{"problem": "trainer: training disabled: no committee", "fix": "deal the key"}]
    return doc


def _run_cli_against(doc: dict, tmp_path, argv_of) -> tuple[int, str, str]:
    """Serve `doc` from the node's real HTTP API in-process and run `sealmesh status`."""
    from node.metrics import NodeMetrics
    import contextlib
    import io

    async def main():
        api = ApiServer("127.0.0.1", 0, status=lambda: doc, metrics=NodeMetrics(),
                        on_message=lambda h, b: None)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(api.serve)
            (tmp_path / "ready.json").write_text(json.dumps({"api_port": port}))
            out, err = io.StringIO(), io.StringIO()

            def call():
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    return run_status(argv_of(port))
            rc = await trio.to_thread.run_sync(call)
            nursery.cancel_scope.cancel()
        return rc, out.getvalue(), err.getvalue()

    return trio.run(main)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"api": None, "data_dir": None, "json": False, **kw})


def test_status_command_draws_one_screen_from_a_running_api(node, tmp_path):
    doc = _recorded_status(node)
    rc, out, err = _run_cli_against(doc, tmp_path, lambda port: _args(data_dir=tmp_path))
    assert rc == 0, err
    assert f"mesh {MESH}: validator validator-0, hotkey {X}" in out
    lines = out.splitlines()
    assert any("miner-0" in line and "GONE" in line for line in lines)  # B stopped sending
    assert any("trainer-0" in line and "alive" in line for line in lines)
    assert "current round 1: phase collect, committee watch" in out
    assert f"round 0 final: 1 contributors (trainer-0), loss 2.5000 -> 2.2500" in out
    assert any("miner-0" in line and "score 0.750" in line for line in lines)  # FHE score, by name
    assert "this node's balance: 1234" in out
    assert "! trainer: training disabled: no committee" in out and "fix: deal the key" in out


def test_status_command_json_is_the_whole_document(node, tmp_path):
    doc = _recorded_status(node)
    rc, out, _ = _run_cli_against(doc, tmp_path, lambda port: _args(api=f"127.0.0.1:{port}", json=True))
    assert rc == 0 and json.loads(out) == json.loads(json.dumps(doc))


def test_status_screen_tolerates_missing_sections():
    screen = render({"mesh_id": "m", "role": "miner", "hotkey": X})
    assert screen.startswith(f"mesh m: miner, hotkey {X}") and "problems: none" in screen


def test_status_of_a_node_that_is_not_running_says_so_and_how_to_start_it(tmp_path, capsys):
    assert run_status(_args(data_dir=tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sealmesh: error: no node has started in") and "sealmesh node --data-dir" in err
    assert len(err.splitlines()) == 1
    # A node that ran and stopped: its ready.json names a port nothing answers on.
    (tmp_path / "ready.json").write_text(json.dumps({"api_port": _closed_port()}))
    (tmp_path / "status.json").write_text("{}")
    assert run_status(_args(data_dir=tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "is not running" in err and "status.json" in err and "sealmesh node --data-dir" in err
    assert len(err.splitlines()) == 1


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- reminders of a role that cannot work ----------------------------------------------

def _context(tmp_path) -> RoleContext:
    settings = NodeSettings(role=Role.VALIDATOR, data_dir=tmp_path)
    return RoleContext(settings=settings, hotkey=HOTKEYS[1], genesis=GENESIS, mesh=None, store=None,
                       verifier=None, metrics=None, data_dir=tmp_path / "roles", publish=None,
                       peer_of=lambda hotkey: None)


def test_remind_warns_every_period_until_fixed_then_clears(tmp_path, caplog):
    ctx = _context(tmp_path)
    tries = []

    def retry():
        tries.append(trio.current_time())
        if len(tries) < 3:
            raise FileNotFoundError("still missing")
        return "key"

    async def main():
        return await remind(ctx, "trainer: no key", "deal it", every_s=60, retry=retry, still=FileNotFoundError)

    with caplog.at_level(logging.WARNING, logger="sealmesh.roles"):
        assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == "key"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["problem: trainer: no key; fix: deal it"] * 3  # at 0, 60 and 120 s
    assert [round(t) for t in tries] == [60, 120, 180]
    assert ctx.problems() == []  # fixed: gone from /status


@pytest.mark.parametrize("service", [RoundsService, TrainerService])
def test_a_role_without_committee_files_keeps_saying_so(service, tmp_path, caplog):
    ctx = _context(tmp_path)
    svc = service(ctx.settings)
    seen = {}

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run, ctx)  # started although it cannot work: the node goes on
            seen["at_start"] = ctx.problems()
            await trio.sleep(150)  # two more minutes, on the mock clock
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="sealmesh.roles"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    (problem,) = seen["at_start"]
    assert "disabled" in problem["problem"] and str(tmp_path / cm.COMMITTEE_DIR) in problem["fix"]
    reminders = [r for r in caplog.records if r.levelno == logging.WARNING and "committee" in r.getMessage()]
    assert len(reminders) == 3  # at 0, 60 and 120 s
    assert ctx.problems() == seen["at_start"]  # still unfixed when the node stopped: kept for the final status
