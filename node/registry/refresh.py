"""Re-read a registry (the Bittensor metagraph) while the node runs (issue 15 item 4):
registrations and deregistrations take effect without a restart.

Each read runs in a worker thread under a timeout; a failed or timed-out read keeps the
last good member list and is retried with exponential backoff (from `retry_s`, doubling,
at most `period_s`), so a chain that is down never empties the directory.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import trio

log = logging.getLogger("sealmesh.registry")


async def keep_registry(directory: Any, load: Callable[[], Any], *, period_s: float = 300.0,
                        timeout_s: float = 30.0, retry_s: float = 5.0,
                        on_change: Callable[[list[str], list[str]], None] = lambda added, removed: None,
                        reads: int | None = None) -> None:
    """Every `period_s`, directory.set_founding(load().members). `reads` bounds the loop (tests)."""
    failures = 0
    while reads is None or reads > 0:
        if reads is not None:
            reads -= 1
        members = None
        with trio.move_on_after(timeout_s) as scope:
            try:
                members = (await trio.to_thread.run_sync(load, abandon_on_cancel=True)).members
            except Exception as exc:  # the chain client raises many kinds; keep the last good list
                log.warning("registry: re-read failed, keeping the last good member list: %s", exc)
        if scope.cancelled_caught:
            log.warning("registry: re-read timed out after %.0f s, keeping the last good member list", timeout_s)
        if members is None:
            failures += 1
            await trio.sleep(min(period_s, retry_s * 2 ** (failures - 1)))
            continue
        failures = 0
        added, removed = directory.set_founding(tuple(members))
        if added or removed:
            log.info("registry: re-read: %d added, %d removed", len(added), len(removed))
            on_change(added, removed)
        await trio.sleep(period_s)
