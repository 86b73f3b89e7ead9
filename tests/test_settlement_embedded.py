"""The embedded settlement backend: the head machine persisted in SQLite.

Three validators' EmbeddedHeads, each in its own database file, exchange what they
return; one is closed and reopened mid-snapshot; a child process is SIGKILLed while it
records rounds, and everything it acknowledged must be there when the file is reopened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crypto.identity import Hotkey
from node.settlement import EmbeddedHead, Outbound
from protocol import head as h
from protocol.errors import RemoteProtocolError
from protocol.head_messages import HeadAckSn, HeadNewTx

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000_000
KEYS = sorted((Hotkey.from_uri(u) for u in ("//Alice", "//Bob", "//Charlie")),
              key=lambda k: k.ss58_address)
A, B, C = (k.ss58_address for k in KEYS)
PARAMS = h.HeadParameters("head-e", (A, B, C), 60_000, 30_000, 10_000, agreed_rounds=1, escrow=50,
                          round_limit=10, epoch_limit=10, round_reward=40, epoch_reward=20)


class Mesh:
    """Routes each head's outbound messages to the other heads, as the settle topic would."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.heads = {k.ss58_address: EmbeddedHead(tmp_path / f"{i}.sqlite", k)
                      for i, k in enumerate(KEYS)}
        self.queue: list[tuple[str, str, Outbound]] = []
        self.down: set[str] = set()
        self.now = T0

    def publish(self, sender: str, outbound: list[Outbound]) -> None:
        for out in outbound:
            self.heads[sender].delivered(out.seq)
            self.queue += [(sender, r, out) for r in self.heads if r != sender]

    def do(self, party: str, method: str, *args) -> None:
        self.publish(party, getattr(self.heads[party], method)(*args))

    def flush(self, hold=lambda s, r, m: False) -> None:
        held = []
        while self.queue:
            sender, receiver, out = self.queue.pop(0)
            if hold(sender, receiver, out.message):
                held.append((sender, receiver, out))
            elif receiver not in self.down:
                self.publish(receiver, self.heads[receiver].receive(sender, out.message, self.now))
        self.queue = held

    def observe(self, event: h.Event) -> None:
        """Every party's own rounds (or challenger) service reports the same result."""
        for party in self.heads:
            self.do(party, "handle", event)

    def reopen(self, party: str) -> EmbeddedHead:
        index = [k.ss58_address for k in KEYS].index(party)
        self.heads[party].close()
        self.heads[party] = EmbeddedHead(self.tmp_path / f"{index}.sqlite", KEYS[index])
        return self.heads[party]


def open_mesh(tmp_path: Path) -> Mesh:
    mesh = Mesh(tmp_path)
    mesh.do(A, "handle", h.Init(PARAMS, mesh.now))
    mesh.flush()
    for party in (A, B, C):
        mesh.do(party, "handle", h.Commit(50, 1000, 300, mesh.now))
    mesh.flush()
    return mesh


def test_status_follows_the_head_to_final(tmp_path):
    mesh = open_mesh(tmp_path)
    assert mesh.heads[B].status()["state"] == "Open"
    mesh.observe(h.ObserveRound(1, "adapter-1", [A, C], mesh.now))
    mesh.observe(h.ObserveEpoch(7, {"miner-1": 0.9}, mesh.now))
    mesh.do(A, "record_round_result", 1, "adapter-1", [A, C], {A: 20, C: 20}, mesh.now)
    mesh.flush()
    mesh.do(A, "record_score_report", 7, {"miner-1": 0.9}, {"miner-1": 20}, mesh.now)
    mesh.flush()
    status = mesh.heads[A].status()
    assert status["snapshots_confirmed"] == 2 and status["conserved"] is True
    assert status["balances"][A] == 1020 and status["balances"]["miner-1"] == 20
    assert [(r["kind"], r.get("round"), r.get("epoch")) for r in status["records"]] == [
        ("round_result", 1, None), ("score_report", None, 7)]

    mesh.do(A, "handle", h.Close(mesh.now))
    mesh.flush()
    mesh.now += 60_000
    for party in (A, B, C):
        assert mesh.heads[party].next_timer_ms() is not None
        mesh.do(party, "tick", mesh.now)
        mesh.do(party, "handle", h.Fanout(mesh.now))
    finals = [mesh.heads[p].status() for p in (A, B, C)]
    assert {s["state"] for s in finals} == {"Final"}
    assert finals[0]["balances"] == finals[1]["balances"] == finals[2]["balances"]
    assert sum(finals[0]["balances"].values()) == 3 * (1000 + 300 + 50)
    assert all(s["conserved"] for s in finals)
    reopened = mesh.reopen(B).status()  # and it is all on disk
    assert reopened == finals[1]


def test_a_refused_event_changes_nothing_on_disk(tmp_path):
    mesh = open_mesh(tmp_path)
    head = mesh.heads[B]
    before = (head.events_applied, head.machine.state_hash())
    with pytest.raises(RemoteProtocolError) as info:
        head.receive(A, HeadAckSn("head-e", 1, b"\x00" * 64), mesh.now)  # ack with no request
        head.receive(A, HeadNewTx("head-e", b"\xc1", b""), mesh.now)
    assert info.value.reason == "malformed_tx"
    with pytest.raises(h.HeadMisuse):
        head.handle(h.Close(mesh.now))  # early: 0 of 1 agreed rounds
    reopened = mesh.reopen(B)
    assert reopened.events_applied == before[0] + 1  # only the early ack was kept
    assert reopened.machine.early_acks and reopened.machine.phase == h.Phase.OPEN


def test_restart_mid_snapshot_catches_up_from_disk(tmp_path):
    mesh = open_mesh(tmp_path)
    mesh.observe(h.ObserveRound(1, "adapter-1", [B], mesh.now))
    mesh.do(A, "record_round_result", 1, "adapter-1", [B], {B: 40}, mesh.now)
    # C signs, then goes down before it hears anyone else's AckSn.
    mesh.flush(hold=lambda s, r, m: r == C and isinstance(m, HeadAckSn))
    assert mesh.heads[C].machine.proposal is not None
    mesh.down.add(C)
    mesh.flush()
    mesh.down.clear()
    mesh.queue = []
    head = mesh.reopen(C)
    assert head.reloaded and head.status()["snapshots_confirmed"] == 0
    mesh.now += 2_000
    mesh.publish(C, head.resume(mesh.now))
    mesh.flush()
    assert {mesh.heads[p].status()["snapshots_confirmed"] for p in (A, B, C)} == {1}
    assert mesh.heads[C].status()["records"][0]["round"] == 1


CHILD = """
import sys, time
from crypto.identity import Hotkey
from node.settlement import EmbeddedHead
from protocol import head as h
key = Hotkey.from_uri("//Alice")
head = EmbeddedHead(sys.argv[1], key)
params = h.HeadParameters("solo", (key.ss58_address,), 60_000, 30_000, 10_000, 0, 10,
                          round_limit=20_000, round_reward=1)
head.handle(h.Init(params, 0))
head.handle(h.Commit(10, 0, 1_000_000, 0))
for n in range(1, 10_000):
    head.handle(h.ObserveRound(n, f"adapter-{n}", ["c"], n))
    head.record_round_result(n, f"adapter-{n}", ["c"], {"c": 1}, n)
    print(n, flush=True)  # acknowledged: the transaction committed
"""


def test_sigkill_loses_nothing_that_was_acknowledged(tmp_path):
    path = tmp_path / "solo.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    acknowledged = 0
    deadline = time.monotonic() + 60
    while acknowledged < 40 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    child.send_signal(signal.SIGKILL)  # mid-run: it is writing the next round right now
    child.wait()
    assert acknowledged >= 40, "the child did not get going"

    head = EmbeddedHead(path, Hotkey.from_uri("//Alice"))
    assert head.reloaded
    ledger = head.machine.confirmed.ledger  # a count and a window of ids, not every id (issue 12)
    rounds = tuple(range(1, ledger.rounds_settled + 1))
    assert ledger.rounds_settled >= acknowledged  # every acknowledged round is there
    assert ledger.rounds_recent == () or ledger.rounds_recent[-1] == rounds[-1]  # nothing half-written
    records = [r["round"] for r in head.status()["records"]]
    assert records == list(rounds)
    assert h.violated_invariants(head.machine) == []
    assert head.status()["conserved"] and head.pending_outbound()  # the unsent outbox survived
    next_round = len(rounds) + 1
    head.handle(h.ObserveRound(next_round, "after-restart", ["c"], 0))
    head.record_round_result(next_round, "after-restart", ["c"], {"c": 1}, 0)
    assert head.machine.confirmed.ledger.rounds_settled == next_round
