"""The embedded settlement backend: the head machine (protocol/head/) kept in SQLite.

Every event is applied inside one SQLite transaction that stores the machine's new
state, the messages it wants sent (an outbox), its records and its timers. Only after
COMMIT does the caller get the outbound messages back, so anything acknowledged to the
node survives a SIGKILL; an event whose transaction did not commit never happened. On
open, the state, the unsent outbox and the timers are reloaded; `resume` then tells the
machine it restarted, which asks the other parties for what it missed.

Transport-agnostic: the node passes in (sender hotkey, decoded head message) from the
settle channel and publishes what comes back, then marks it delivered.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from crypto.identity import verify_signature
from protocol import head as h
from protocol.epistula import Signer
from protocol.head_messages import HeadMessage
from protocol.messages import decode as decode_message
from protocol.messages import encode as encode_message

SCHEMA = """
CREATE TABLE IF NOT EXISTS machine (id INTEGER PRIMARY KEY CHECK (id = 1), state BLOB NOT NULL,
                                    events INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                                    data BLOB NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS timers (at_ms INTEGER NOT NULL, purpose TEXT NOT NULL);
"""
REPORTED_RECORDS = ("round_result", "score_report")


@dataclass(frozen=True)
class Outbound:
    """A message to publish on the settle channel; call `delivered(seq)` once it is out."""

    seq: int
    message: HeadMessage


class EmbeddedHead:
    def __init__(self, path: str | Path, signer: Signer, *,
                 verify: h.Verify = verify_signature, membership: Any = None) -> None:
        self.path = Path(path)
        self._membership = membership  # the admission rules (protocol/member_book.MembershipRules)
        self._signer = signer
        self._verify = verify
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a COMMIT we acknowledged is on disk
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT state, events FROM machine WHERE id = 1").fetchone()
        self.reloaded = row is not None
        self.machine = self._load(row[0]) if row else self._fresh()
        self.events_applied = row[1] if row else 0

    def _fresh(self) -> h.HeadMachine:
        machine = h.HeadMachine(self._signer, verify=self._verify)
        machine.membership = self._membership
        return machine

    def _load(self, state: bytes) -> h.HeadMachine:
        machine = h.HeadMachine.from_wire(msgpack.unpackb(state, raw=False), self._signer,
                                          verify=self._verify)
        machine.membership = self._membership  # configuration, not state: set at every load
        return machine

    def close(self) -> None:
        self._db.close()

    # -- events in, outbound messages out ------------------------------------------------

    def handle(self, event: h.Event) -> list[Outbound]:
        """Apply one event durably. Raises the machine's error (and changes nothing) when
        the event is refused."""
        now_ms = getattr(event, "now_ms", 0)
        with self._lock:
            try:
                effects = self.machine.handle(event)
            except Exception:
                self._reload()  # a refused event leaves no half-applied state behind
                raise
            return self._commit(effects, now_ms)

    def receive(self, sender: str, message: HeadMessage, now_ms: int) -> list[Outbound]:
        return self.handle(h.Receive(sender, message, now_ms))

    def tick(self, now_ms: int) -> list[Outbound]:
        with self._lock:
            self._db.execute("DELETE FROM timers WHERE at_ms <= ?", (now_ms,))
        return self.handle(h.Tick(now_ms))

    def resume(self, now_ms: int) -> list[Outbound]:
        """After a restart: the unsent outbox, then what the machine asks for on Restart."""
        unsent = self.pending_outbound()
        return unsent + self.handle(h.Restart(now_ms))

    def _commit(self, effects: list[h.Effect], now_ms: int) -> list[Outbound]:
        db = self._db
        outbound: list[Outbound] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            self.events_applied += 1
            db.execute("INSERT INTO machine (id, state, events) VALUES (1, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET state = excluded.state, events = excluded.events",
                       (h.canonical(self.machine.to_wire()), self.events_applied))
            for effect in effects:
                if isinstance(effect, h.Send):
                    cursor = db.execute("INSERT INTO outbox (message) VALUES (?)",
                                        (encode_message(effect.message),))
                    outbound.append(Outbound(int(cursor.lastrowid or 0), effect.message))
                elif isinstance(effect, h.Record):
                    db.execute("INSERT INTO records (kind, data, at_ms) VALUES (?, ?, ?)",
                               (effect.kind, msgpack.packb(effect.data, use_bin_type=True), now_ms))
                elif isinstance(effect, h.SetTimer):
                    db.execute("INSERT INTO timers (at_ms, purpose) VALUES (?, ?)",
                               (effect.at_ms, effect.purpose))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self.events_applied -= 1
            self._reload()
            raise
        return outbound

    def _reload(self) -> None:
        row = self._db.execute("SELECT state, events FROM machine WHERE id = 1").fetchone()
        self.machine = self._load(row[0]) if row else self._fresh()
        self.events_applied = row[1] if row else 0

    # -- the outbox and timers -----------------------------------------------------------

    def pending_outbound(self) -> list[Outbound]:
        with self._lock:
            rows = self._db.execute("SELECT seq, message FROM outbox ORDER BY seq").fetchall()
        return [Outbound(seq, decode_message(raw)) for seq, raw in rows]  # type: ignore[arg-type]

    def delivered(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def next_timer_ms(self) -> int | None:
        with self._lock:
            (at,) = self._db.execute("SELECT MIN(at_ms) FROM timers").fetchone()
        return at

    # -- what the node records -----------------------------------------------------------

    def record_round_result(self, round_number: int, adapter_id: str, contributors: list[str],
                            rewards: dict[str, int], now_ms: int) -> list[Outbound]:
        tx = h.RoundResult(self.machine.me, round_number, adapter_id, list(contributors),
                           dict(rewards))
        return self.handle(h.NewTx(tx, now_ms))

    def record_score_report(self, epoch: int, scores: dict[str, float], rewards: dict[str, int],
                            now_ms: int) -> list[Outbound]:
        tx = h.ScoreReport(self.machine.me, epoch, {k: float(v) for k, v in scores.items()},
                           dict(rewards))
        return self.handle(h.NewTx(tx, now_ms))

    def records(self, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT kind, data, at_ms FROM records ORDER BY seq").fetchall()
        return [{"kind": kind, "at_ms": at, **msgpack.unpackb(data, raw=False)}
                for kind, data, at in rows if kinds is None or kind in kinds]

    def status(self) -> dict[str, Any]:
        """For report.json: the head's phase, its confirmed snapshots, balances, records."""
        m = self.machine
        if m.payouts is not None:
            balances = dict(m.payouts)
        elif m.confirmed is not None:
            balances = {k: v for k, v in m.confirmed.ledger.balances.items() if v}
        else:
            balances = {}
        return {
            "backend": "embedded",
            "state": m.phase.value,
            "snapshots_confirmed": m.confirmed.number if m.confirmed else 0,
            "balances": balances,
            "conserved": h.ValueConserved(m) and h.NoDoubleSpend(m),
            "records": self.records(REPORTED_RECORDS),
        }


__all__ = ["EmbeddedHead", "Outbound"]
