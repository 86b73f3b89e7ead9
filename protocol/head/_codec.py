"""Canonical msgpack (equal values give equal bytes) and the type tests that decoding
of peers' transactions, ledgers and snapshots applies."""

from __future__ import annotations

import functools
import hashlib
import math
import typing
from typing import Any, Callable

import msgpack


def canonical(value: Any) -> bytes:
    """msgpack with map keys sorted at every level: equal values give equal bytes."""
    return msgpack.packb(_sorted_maps(value), use_bin_type=True)


def _sorted_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_maps(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v) for v in value]
    return value


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def conforms(value: Any, hint: Any) -> bool:
    return _checker(hint)(value)


@functools.cache
def _checker(hint: Any) -> Callable[[Any], bool]:
    """A type test for a field hint, built once per hint (state reloads check a lot)."""
    origin = typing.get_origin(hint)
    if origin is list:
        item = _checker(typing.get_args(hint)[0])
        return lambda v: isinstance(v, list) and all(map(item, v))
    if origin is dict:
        key_hint, item_hint = typing.get_args(hint)
        key, item = _checker(key_hint), _checker(item_hint)
        return lambda v: isinstance(v, dict) and all(key(k) and item(x) for k, x in v.items())
    if hint is int:
        return lambda v: type(v) is int and 0 <= v < 2**63
    if hint is float:
        return lambda v: type(v) is float and math.isfinite(v)
    if hint is str or hint is bytes:
        return lambda v: type(v) is hint
    return lambda v: isinstance(v, hint)
