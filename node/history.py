"""The validator's FHE challenge history: every outcome and every gossiped score, in SQL.

SQLAlchemy 2 ORM over SQLite by default (DATA_DIR/history.sqlite) or PostgreSQL by URL
(`--db postgresql://user@host/db`; plain postgresql:// URLs use psycopg 3). The
challenge machine (protocol/challenge.py) is the source of every row: RecordOutcome
effects go to record_outcome, GossipScore effects to record_scores. At start-up the
shell seeds a new machine with windows(), so scores survive restarts.

recorded_at is set by the database (server_default=now()) when the row is inserted:
it is the store's own clock, not the shell's.
"""

from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, DateTime, Float, Integer, String, UniqueConstraint, create_engine,
    event, func, select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from protocol.challenge import ChallengeRecord, GossipScore
from protocol.errors import LocalProtocolError
from protocol.scoring import WINDOW, MinerScore, Outcome, WindowEntry, score_window, weights

DEFAULT_DATA_DIR = Path("~/.sealmesh/node")
DB_FILE = "history.sqlite"

_OUTCOMES = ", ".join(f"'{o.value}'" for o in Outcome)


class HistoryError(ValueError):
    """The history store cannot be opened or used as configured."""


class DuplicateOutcome(LocalProtocolError):
    """A challenge already has its outcome: ExactlyOneOutcome, enforced by the store too."""


class Base(DeclarativeBase):
    pass


class ChallengeRow(Base):
    __tablename__ = "challenges"
    __table_args__ = (CheckConstraint(f"outcome IN ({_OUTCOMES})", name="known_outcome"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # insertion order
    id: Mapped[str] = mapped_column(String(64), unique=True)  # the challenge id
    epoch: Mapped[int] = mapped_column(BigInteger, index=True)
    validator: Mapped[str] = mapped_column(String(64))
    miner: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[float] = mapped_column(Float)  # seconds since the epoch, the shell's clock
    outcome: Mapped[str] = mapped_column(String(16))
    latency_s: Mapped[float | None] = mapped_column(Float)
    agreement: Mapped[bool | None] = mapped_column(Boolean)
    cosine: Mapped[float | None] = mapped_column(Float)
    error_reason: Mapped[str | None] = mapped_column(String(256))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ScoreRow(Base):
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("epoch", "validator", "miner", name="one_score_per_epoch"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    epoch: Mapped[int] = mapped_column(BigInteger, index=True)
    validator: Mapped[str] = mapped_column(String(64))
    miner: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(Float)
    challenges: Mapped[int] = mapped_column(Integer)
    ok: Mapped[int] = mapped_column(Integer)
    failure_rate: Mapped[float] = mapped_column(Float)
    median_latency_s: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def default_url(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    return f"sqlite:///{Path(data_dir).expanduser() / DB_FILE}"


def _normalized(url: str) -> str:
    # `--db postgresql://...` is what operators type; psycopg 3 is the driver we ship.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (the API, report.json) never block the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class History:
    """One validator's challenge history. Each method is one short transaction."""

    def __init__(self, url: str | None = None, *, data_dir: Path = DEFAULT_DATA_DIR) -> None:
        url = _normalized(url or default_url(data_dir))
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise HistoryError(f"cannot use history database {url!r}: {exc}. Give sqlite:///PATH or "
                               "postgresql://USER@HOST/DB") from exc
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise HistoryError(f"cannot open history database {self.engine.url!r}: {exc.orig}. Is the "
                               "server running and the database created?") from exc

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes: the machine's effects --

    def record_outcome(self, record: ChallengeRecord) -> None:
        row = ChallengeRow(id=record.challenge_id, epoch=record.epoch, validator=record.validator,
                           miner=record.miner, model=record.model, issued_at=record.issued_at,
                           outcome=record.outcome.value, latency_s=record.latency_s,
                           agreement=record.agreement, cosine=record.cosine, error_reason=record.error_reason)
        try:
            with Session(self.engine) as session, session.begin():
                session.add(row)
        except IntegrityError as exc:
            raise DuplicateOutcome(f"challenge {record.challenge_id} already has an outcome") from exc

    def record_scores(self, gossip: GossipScore) -> None:
        with Session(self.engine) as session, session.begin():
            for s in gossip.scores:
                session.add(ScoreRow(epoch=gossip.epoch, validator=gossip.validator, miner=s.miner, score=s.score,
                                     challenges=s.challenges, ok=s.ok, failure_rate=s.failure_rate,
                                     median_latency_s=s.median_latency_s))

    # -- reads --

    def window(self, miner: str, n: int = WINDOW) -> list[WindowEntry]:
        """The miner's last n outcomes, oldest first (what scoring reads)."""
        query = (select(ChallengeRow.outcome, ChallengeRow.latency_s).where(ChallengeRow.miner == miner)
                 .order_by(ChallengeRow.seq.desc()).limit(n))
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        return [_entry(outcome, latency) for outcome, latency in reversed(rows)]

    def windows(self, miners: Iterable[str] | None = None, n: int = WINDOW) -> dict[str, list[WindowEntry]]:
        """Every miner's window (or the named miners'): to seed a ChallengeMachine."""
        return {miner: self.window(miner, n) for miner in (self.miners() if miners is None else miners)}

    def miners(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(ChallengeRow.miner).distinct().order_by(ChallengeRow.miner)))

    def records(self, miner: str | None = None) -> list[ChallengeRow]:
        query = select(ChallengeRow).order_by(ChallengeRow.seq)
        if miner is not None:
            query = query.where(ChallengeRow.miner == miner)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def scores_by_miner(self) -> dict[str, MinerScore]:
        """Each miner's score now, over its window (protocol/scoring.py)."""
        return {miner: score_window(miner, window) for miner, window in self.windows().items()}

    def gossiped_scores(self, epoch: int | None = None) -> list[ScoreRow]:
        query = select(ScoreRow).order_by(ScoreRow.seq)
        if epoch is not None:
            query = query.where(ScoreRow.epoch == epoch)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query))

    def summary(self) -> dict[str, Any]:
        """report.json's "fhe": per miner, counts and median ok latency over all its history,
        score over its window, and its weight among the miners here."""
        counts: dict[str, dict[str, int]] = {}
        latencies: dict[str, list[float]] = {}
        with Session(self.engine) as session:
            grouped = select(ChallengeRow.miner, ChallengeRow.outcome, func.count()).group_by(
                ChallengeRow.miner, ChallengeRow.outcome)
            for miner, outcome, n in session.execute(grouped):
                counts.setdefault(miner, {o.value: 0 for o in Outcome})[outcome] = n
            ok_latency = select(ChallengeRow.miner, ChallengeRow.latency_s).where(
                ChallengeRow.outcome == Outcome.OK.value)
            for miner, latency in session.execute(ok_latency):
                latencies.setdefault(miner, []).append(latency)
        scores = self.scores_by_miner()
        weight = weights({m: s.score for m, s in scores.items()})
        miners = {
            miner: {
                "challenges": sum(counts[miner].values()),
                **counts[miner],
                "median_latency_s": statistics.median(latencies[miner]) if miner in latencies else None,
                "score": scores[miner].score,
                "weight": weight[miner],
            }
            for miner in sorted(counts)
        }
        return {"challenges": sum(m["challenges"] for m in miners.values()), "miners": miners}


def _entry(outcome: str, latency_s: float | None) -> WindowEntry:
    kind = Outcome(outcome)
    return WindowEntry(kind, latency_s if kind is Outcome.OK else None)


__all__ = ["ChallengeRow", "DuplicateOutcome", "History", "HistoryError", "ScoreRow", "default_url"]
