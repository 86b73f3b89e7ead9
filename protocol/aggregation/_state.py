"""Saved state of a round machine: its version, the announced RoundOpen in wire form, and
the guards every reload and message share."""

from __future__ import annotations

import functools
from typing import Any

from protocol.aggregation._round_open import round_open_problem
from protocol.aggregation_messages import RoundOpen
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import decode, encode

STATE_VERSION = 1


def round_open_state(machine: Any) -> bytes | None:
    """Persist the announced RoundOpen in its wire form: compact, and decoded strictly.
    Encoded once per machine: a node snapshots after every event."""
    if machine.round_open is None:
        return None
    wire = machine.__dict__.get("_round_open_wire")
    if wire is None:
        wire = machine._round_open_wire = encode(machine.round_open)
    return wire


@functools.lru_cache(maxsize=256)
def round_open_from_state(raw: bytes) -> RoundOpen:
    # Cached: a node reloads the same round's state after every event (and the explorer
    # millions of times); RoundOpen is frozen and machines never change its lists.
    try:
        ro = decode(raw)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"saved RoundOpen does not decode: {exc}") from exc
    if not isinstance(ro, RoundOpen) or round_open_problem(ro):
        raise LocalProtocolError("saved state holds no valid RoundOpen")
    return ro


def check_state(raw: Any, kind: str) -> dict:
    if not isinstance(raw, dict) or raw.get("v") != STATE_VERSION or raw.get("kind") != kind:
        raise LocalProtocolError(f"not a version-{STATE_VERSION} {kind} state: "
                                 f"v={raw.get('v') if isinstance(raw, dict) else None!r}")
    return raw


def same_round(ro: RoundOpen, round_id: int, what: str) -> None:
    if round_id != ro.round_id:
        raise RemoteProtocolError(f"{what} for round {round_id}, this is round {ro.round_id}",
                                  reason="wrong_round")
