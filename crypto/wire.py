"""Strict msgpack decoding shared by envelopes, messages and every blob a peer sends.

It lives in crypto/ because crypto/ decodes its own encodings (ciphertexts, proofs,
contributions) with it and sits below protocol/: protocol/ may import crypto/, never the
reverse. protocol/_wire.py re-exports it for the protocol's own modules.
"""

from __future__ import annotations

from typing import Any, Callable

import msgpack


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _refuse_timestamp(value: Any) -> None:
    # msgpack decodes its timestamp extension (type -1) itself and never calls ext_hook for
    # it, so "no extension types" has to be checked on the values it produced.
    if isinstance(value, msgpack.Timestamp):
        raise ValueError("msgpack extension type -1 (timestamp) is not allowed")


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """A map with str keys, each once: msgpack would keep the last of a repeated key, where
    another reader may keep the first, and so read other values from the same signed bytes;
    strict_map_key alone still lets bytes keys through."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if type(key) is not str:
            raise ValueError(f"map key of type {type(key).__name__} is not allowed (str keys only)")
        if key in out:
            raise ValueError(f"map key {key[:40]!r} appears twice")
        _refuse_timestamp(value)
        out[key] = value
    return out


def _strict_list(items: list[Any]) -> list[Any]:
    for item in items:
        _refuse_timestamp(item)
    return items


def unpack_strict(raw: bytes, *, ext_hook: Callable[[int, bytes], Any] = _no_ext) -> Any:
    """One msgpack value: str map keys, each once, no extension types (the timestamp
    included; `ext_hook` may admit a caller's own), no trailing bytes.

    Raises whatever msgpack raises (several unrelated types) or ValueError; callers wrap
    it in their own protocol error.
    """
    value = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=ext_hook,
                            object_pairs_hook=_strict_map, list_hook=_strict_list)
    _refuse_timestamp(value)
    return value
