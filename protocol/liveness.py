"""Who is live: a member heard from within a window of now.

Every verified message of a member counts as hearing it (announces, pings, role
messages). A member announces every `announce_interval_s`, or 10x that once it has
heard everyone (node/daemon.py `_announce_loop`), so a quiet but healthy member is
heard at least once per slow period: the window must exceed it, with room for a lost
announce or two. /status shows liveness with this rule, and rounds use it to open a
round with the trainers that are live.
"""

from __future__ import annotations

from typing import Mapping

SLOW_ANNOUNCE_FACTOR = 10  # node/daemon.py: announces this much more rarely once all are heard
WINDOW_ANNOUNCES = 25  # 2.5 slow periods: one lost announce does not make a member gone
MIN_WINDOW_MS = 30_000


def liveness_window_ms(announce_interval_s: float) -> int:
    """How long a member stays live after it was last heard."""
    return max(MIN_WINDOW_MS, round(WINDOW_ANNOUNCES * announce_interval_s * 1000))


def is_live(last_seen_ms: int | None, now_ms: int, window_ms: int) -> bool:
    """Heard within `window_ms` of `now_ms`. Never heard is not live. A time a little
    ahead of ours (clocks, or a message stamped while we read the clock) is live."""
    return last_seen_ms is not None and now_ms - last_seen_ms <= window_ms


def live_members(last_seen: Mapping[str, int], now_ms: int, window_ms: int) -> set[str]:
    """The hotkeys of `last_seen` (hotkey -> when last heard, ms) heard within the window."""
    return {hotkey for hotkey, seen in last_seen.items() if is_live(seen, now_ms, window_ms)}


__all__ = ["MIN_WINDOW_MS", "live_members", "is_live", "liveness_window_ms"]
