"""Re-read a registry (the Bittensor metagraph) while the node runs (issue 15 item 4):
registrations and deregistrations take effect without a restart.

A read happens every `period_s`, and early when a hotkey that is not in the directory
speaks (`nudge()`: the node calls it for each message IGNOREd as `unknown_signer`): a
hotkey registered on the chain a moment ago is then a member within `min_gap_s`, not
up to `period_s` later. Each read runs in a worker thread under a timeout; a failed or
timed-out read keeps the last good member list and is retried with exponential backoff
(from `retry_s`, doubling, at most `period_s`), so a chain that is down never empties
the directory.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

log = logging.getLogger("sealmesh.registry")

MIN_GAP_S = 30.0  # at most one read per 30 s however many strangers speak


# When to read the chain next is this node's own scheduling of its own chain client: no
# peer sees it and no verdict depends on it (a message from a hotkey the directory does
# not list yet is IGNOREd either way, never charged to its relay: protocol/inbound.py),
# so it is not a protocol rule and has no spec. It is still a pure function of times, so
# the flood bound is tested without a clock.
def next_read_at(*, last_started: float, last_finished: float, failures: int, nudged_at: float | None,
                 period_s: float, retry_s: float, min_gap_s: float) -> float:
    """The time the next read should start.

    last_started/last_finished: the latest read's start and end; failures: reads failed
    in a row since the last good one; nudged_at: the first time an unknown hotkey spoke
    since the latest read started (None: none did). A nudge brings the read forward, but
    never to less than `min_gap_s` after the latest read started: a flood of strangers
    costs the chain one read per `min_gap_s`. A read in flight absorbs every nudge that
    comes before it ends into one follow-up read (there is one reader, so never two at once)."""
    wait = period_s if failures == 0 else min(period_s, retry_s * 2 ** (failures - 1))
    scheduled = last_finished + wait
    if nudged_at is None:
        return scheduled
    return min(scheduled, max(last_started + min_gap_s, nudged_at))


class RegistryRefresher:
    """Keeps `directory`'s founding set equal to the registry's latest good read."""

    def __init__(self, directory: Any, load: Callable[[], Any], *, period_s: float = 300.0,
                 timeout_s: float = 30.0, retry_s: float = 5.0, min_gap_s: float = MIN_GAP_S,
                 on_change: Callable[[list[str], list[str]], None] = lambda added, removed: None) -> None:
        self.directory, self.load, self.on_change = directory, load, on_change
        self.period_s, self.timeout_s, self.retry_s, self.min_gap_s = period_s, timeout_s, retry_s, min_gap_s
        self.reads = 0  # started, good or not
        self.nudges = 0  # unknown hotkeys heard, ever
        self.nudged_reads = 0  # reads brought forward by a nudge
        self._nudged_at: float | None = None
        self._wake = trio.Event()

    def nudge(self) -> None:
        """An unknown hotkey spoke (call on the trio thread; it only records the time)."""
        self.nudges += 1
        if self._nudged_at is None:
            self._nudged_at = trio.current_time()
            self._wake.set()

    async def run(self, reads: int | None = None) -> None:
        """Read now, then whenever next_read_at says. `reads` bounds the loop (tests)."""
        failures, started, finished = 0, trio.current_time(), trio.current_time()
        first = True
        while reads is None or self.reads < reads:
            if not first:
                await self._until(lambda: next_read_at(
                    last_started=started, last_finished=finished, failures=failures, nudged_at=self._nudged_at,
                    period_s=self.period_s, retry_s=self.retry_s, min_gap_s=self.min_gap_s))
            if not first and self._nudged_at is not None:
                self.nudged_reads += 1
            first = False
            started, self._nudged_at = trio.current_time(), None
            self.reads += 1
            ok = await self._read_once()
            finished = trio.current_time()
            failures = 0 if ok else failures + 1

    async def _until(self, due: Callable[[], float]) -> None:
        while trio.current_time() < due():
            self._wake = trio.Event()
            with trio.move_on_at(due()):
                await self._wake.wait()

    async def _read_once(self) -> bool:
        members = None
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                members = (await trio.to_thread.run_sync(self.load, abandon_on_cancel=True)).members
            except Exception as exc:  # the chain client raises many kinds; keep the last good list
                log.warning("registry: re-read failed, keeping the last good member list: %s", exc)
        if scope.cancelled_caught:
            log.warning("registry: re-read timed out after %.0f s, keeping the last good member list",
                        self.timeout_s)
        if members is None:
            return False
        added, removed = self.directory.set_founding(tuple(members))
        if added or removed:
            log.info("registry: re-read: %d added, %d removed", len(added), len(removed))
            self.on_change(added, removed)
        return True


async def keep_registry(directory: Any, load: Callable[[], Any], *, period_s: float = 300.0,
                        timeout_s: float = 30.0, retry_s: float = 5.0,
                        on_change: Callable[[list[str], list[str]], None] = lambda added, removed: None,
                        reads: int | None = None) -> None:
    """Every `period_s`, directory.set_founding(load().members). `reads` bounds the loop (tests)."""
    await RegistryRefresher(directory, load, period_s=period_s, timeout_s=timeout_s, retry_s=retry_s,
                            on_change=on_change).run(reads)
