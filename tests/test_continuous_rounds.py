"""The opener's loop (node/roles/rounds.py _open_rounds): rounds until stopped or N, each
once enough trainers are live (protocol.aggregation.open_wait_reason over
protocol.liveness), at most one per round_period_s."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from node.roles import rounds
from protocol import aggregation as agg

TRAINERS = ["5T-a", "5T-b", "5T-c"]


def test_the_opener_waits_for_the_minimum_of_live_trainers():
    policy = agg.RoundPolicy(min_contributors=2)
    assert agg.open_wait_reason(1, policy) == "1 trainer(s) live, a round needs 2: waiting for more to be heard"
    assert agg.open_wait_reason(2, policy) is None and agg.open_wait_reason(3, policy) is None


def opener(rounds_wanted: int, seen: dict[str, int], period_s: float = 0.0):
    """A RoundsService whose _open only records the round and ends it at once."""
    service = rounds.RoundsService.__new__(rounds.RoundsService)
    service.settings = SimpleNamespace(rounds=rounds_wanted, announce_interval_s=1.0, keep_rounds=20)
    service.config = rounds.RoundConfig(round_period_s=period_s)
    service.trainers = TRAINERS
    service.mesh = SimpleNamespace(policy=agg.RoundPolicy(min_contributors=2))
    service.slots, service.opened, service.reports = {}, [], []
    service.model_ready = trio.Event()
    service.model_ready.set()
    service.ctx = SimpleNamespace(last_seen=lambda hotkey: seen.get(hotkey))
    service.report = lambda **kw: service.reports.append(kw)

    async def fake_open(round_id: int) -> None:
        service.opened.append((round_id, trio.current_time()))
        slot = SimpleNamespace(round_id=round_id, ended=trio.Event())
        slot.ended.set()
        service.slots[round_id] = slot

    service._open = fake_open
    return service


def test_rounds_n_opens_n_and_stops(monkeypatch):
    now = 1_000_000
    monkeypatch.setattr(rounds, "now_ms", lambda: now)
    service = opener(3, {t: now for t in TRAINERS})
    trio.run(service._open_rounds, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [r for r, _ in service.opened] == [0, 1, 2]


def test_rounds_zero_keeps_opening_and_respects_the_period(monkeypatch):
    now = 1_000_000
    monkeypatch.setattr(rounds, "now_ms", lambda: now)
    service = opener(0, {t: now for t in TRAINERS}, period_s=30.0)

    async def run_a_while():
        with trio.move_on_after(95):
            await service._open_rounds()

    trio.run(run_a_while, clock=trio.testing.MockClock(autojump_threshold=0))
    rounds_opened = [r for r, _ in service.opened]
    assert rounds_opened == [0, 1, 2, 3]  # until stopped, at t = 0, 30, 60, 90
    times = [t for _, t in service.opened]
    assert all(b - a >= 30.0 - 1e-6 for a, b in zip(times, times[1:]))


def test_fewer_live_trainers_than_the_minimum_opens_nothing_and_says_why(monkeypatch):
    now = 1_000_000
    monkeypatch.setattr(rounds, "now_ms", lambda: now)
    seen = {"5T-a": now, "5T-b": now - 10 * 60_000}  # b was heard ten minutes ago: gone
    service = opener(0, seen, period_s=10.0)

    async def scenario():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service._open_rounds)
            await trio.sleep(60)
            assert service.opened == []  # no round that could only abort below_min_contributors
            seen["5T-c"] = now  # a second trainer is heard
            await trio.sleep(2)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert service.opened and service.opened[0][0] == 0
    assert any("1 trainer(s) live" in (r.get("waiting") or "") for r in service.reports)


def test_a_resumed_mesh_opens_after_its_newest_round(monkeypatch):
    now = 1_000_000
    monkeypatch.setattr(rounds, "now_ms", lambda: now)
    service = opener(0, {t: now for t in TRAINERS}, period_s=10.0)
    for r in (7, 8):  # kept by retention, ended before the restart
        slot = SimpleNamespace(round_id=r, ended=trio.Event())
        slot.ended.set()
        service.slots[r] = slot

    async def run_a_while():
        with trio.move_on_after(1):
            await service._open_rounds()

    trio.run(run_a_while, clock=trio.testing.MockClock(autojump_threshold=0))
    assert service.opened[0][0] == 9
