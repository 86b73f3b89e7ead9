"""Strict msgpack decoding shared by envelopes and messages."""

from __future__ import annotations

from typing import Any

import msgpack


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_strict(raw: bytes) -> Any:
    """One msgpack value: str map keys, no extension types, no trailing bytes.

    Raises whatever msgpack raises (several unrelated types); callers wrap it in their
    own protocol error.
    """
    return msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
