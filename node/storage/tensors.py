"""Named tensors and flat vectors as safetensors bytes: no pickle, and one byte string per value.

A blob's id is the sha256 of its bytes, so equal tensors must give equal bytes.
safetensors already orders tensors deterministically (by dtype alignment, then name),
but it writes `__metadata__` from a hash map whose order changes between processes.
So we write exactly one metadata entry, `sealmesh`, holding canonical JSON (sorted keys,
no spaces) with our format version and the caller's metadata.

Bytes from a peer are untrusted: decoding checks the header length, the number of
tensors, the dtypes and our format entry before safetensors reads any data, and every
failure is a RemoteProtocolError with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from protocol.errors import LocalProtocolError, RemoteProtocolError

FORMAT_KEY = "sealmesh"
FORMAT_VERSION = 1
VECTOR_NAME = "vector"
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 16_384
# numpy dtypes with a safetensors code; complex, object and string arrays are refused.
_NUMPY_DTYPES = {np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32,
                                       np.int32, np.uint64, np.int64, np.float16, np.float32, np.float64)}
_NUMPY_WIRE_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}
_TORCH_WIRE_DTYPES = _NUMPY_WIRE_DTYPES | {"BF16"}


class TensorEncodeError(LocalProtocolError):
    """We asked to serialize something that has no canonical safetensors form."""

    def __init__(self, hint: str, *, reason: str = "bad_tensor") -> None:
        super().__init__(hint)
        self.reason = reason


class TensorDecodeError(RemoteProtocolError):
    reason = "bad_tensors"


@dataclass(frozen=True)
class DecodedTensors:
    tensors: dict[str, Any]  # numpy arrays (read-only views) or torch tensors
    metadata: dict[str, str]


def encode_tensors(tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """numpy arrays or torch tensors (CPU) -> canonical safetensors bytes."""
    if not tensors:
        raise TensorEncodeError("nothing to encode: give at least one named tensor", reason="empty")
    for name in tensors:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise TensorEncodeError(f"tensor name {name!r} must be a non-empty string, not __metadata__",
                                    reason="bad_name")
    header = {FORMAT_KEY: _format_entry(metadata or {})}
    if any(_is_torch(value) for value in tensors.values()):
        return _encode_torch(tensors, header)
    arrays = {name: _canonical_array(name, value) for name, value in tensors.items()}
    return safetensors.numpy.save(arrays, metadata=header)


def decode_tensors(data: bytes, *, max_tensors: int = MAX_TENSORS) -> DecodedTensors:
    """Untrusted bytes -> numpy arrays. bfloat16 needs decode_torch_tensors."""
    metadata = _check_header(data, max_tensors, _NUMPY_WIRE_DTYPES)
    try:
        arrays = safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise TensorDecodeError(f"not valid safetensors: {exc}", reason="bad_tensors") from exc
    return DecodedTensors(arrays, metadata)


def decode_torch_tensors(data: bytes, *, max_tensors: int = MAX_TENSORS) -> DecodedTensors:
    """Untrusted bytes -> CPU torch tensors (keeps bfloat16)."""
    import safetensors.torch  # torch is heavy: only callers that want tensors pay for it

    metadata = _check_header(data, max_tensors, _TORCH_WIRE_DTYPES)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise TensorDecodeError(f"not valid safetensors: {exc}", reason="bad_tensors") from exc
    return DecodedTensors(tensors, metadata)


def encode_vector(vector: Any, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """A flat (1-D) vector: packed updates, clipped deltas, scores."""
    shape = tuple(vector.shape)
    if len(shape) != 1:
        raise TensorEncodeError(f"a vector is 1-D; got shape {shape} (flatten it first)", reason="not_a_vector")
    return encode_tensors({VECTOR_NAME: vector}, metadata=metadata)


def decode_vector(data: bytes, *, dtype: Any = None, length: int | None = None) -> np.ndarray:
    decoded = decode_tensors(data, max_tensors=1)
    vector = decoded.tensors.get(VECTOR_NAME)
    if vector is None or len(decoded.tensors) != 1 or vector.ndim != 1:
        raise TensorDecodeError(f"expected one 1-D tensor named {VECTOR_NAME!r}, got "
                                f"{ {k: v.shape for k, v in decoded.tensors.items()} }", reason="not_a_vector")
    if dtype is not None and vector.dtype != np.dtype(dtype):
        raise TensorDecodeError(f"vector has dtype {vector.dtype}, expected {np.dtype(dtype)}",
                                reason="wrong_dtype")
    if length is not None and vector.shape[0] != length:
        raise TensorDecodeError(f"vector has {vector.shape[0]} entries, expected {length}", reason="wrong_length")
    return vector


def _format_entry(metadata: Mapping[str, str]) -> str:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TensorEncodeError(f"metadata is str -> str; got {key!r}: {type(value).__name__}",
                                    reason="bad_metadata")
    entry = {"version": FORMAT_VERSION, "metadata": dict(metadata)}
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _canonical_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TensorEncodeError(f"tensor {name!r} is a {type(value).__name__}, not a numpy array or torch "
                                "tensor", reason="bad_tensor")
    if value.dtype.newbyteorder("<") not in _NUMPY_DTYPES:
        raise TensorEncodeError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot hold",
                                reason="bad_dtype")
    # Little-endian, C order: the only layout whose bytes are the tensor's identity.
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _encode_torch(tensors: Mapping[str, Any], header: dict[str, str]) -> bytes:
    import torch
    import safetensors.torch

    canonical = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(_canonical_array(name, value))
        if not isinstance(value, torch.Tensor) or value.is_complex() or value.device.type != "cpu":
            raise TensorEncodeError(f"tensor {name!r} must be a real-valued CPU tensor", reason="bad_tensor")
        # clone: safetensors refuses tensors that share storage (views of one buffer)
        canonical[name] = value.detach().contiguous().clone()
    try:
        return safetensors.torch.save(canonical, metadata=header)
    except (ValueError, TypeError, safetensors.SafetensorError) as exc:
        raise TensorEncodeError(f"safetensors cannot encode these tensors: {exc}", reason="bad_tensor") from exc


def _check_header(data: bytes, max_tensors: int, dtypes: set[str]) -> dict[str, str]:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise TensorDecodeError("safetensors bytes start with an 8-byte header length", reason="truncated")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise TensorDecodeError(f"header length {header_len} exceeds the data or {MAX_HEADER_BYTES} bytes",
                                reason="bad_header")
    try:
        header = json.loads(bytes(data[8:8 + header_len]), object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise TensorDecodeError(f"header is not JSON: {exc}", reason="bad_header") from exc
    if not isinstance(header, dict):
        raise TensorDecodeError("header is not a JSON object", reason="bad_header")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > max_tensors:
        raise TensorDecodeError(f"{len(entries)} tensors, over the limit of {max_tensors}", reason="too_many")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in dtypes:
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            hint = " (bfloat16: use decode_torch_tensors)" if dtype == "BF16" else ""
            raise TensorDecodeError(f"tensor {name!r} has unsupported dtype {dtype!r}{hint}", reason="bad_dtype")
    return _read_format_entry(header.get("__metadata__"))


def _read_format_entry(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or set(raw) != {FORMAT_KEY}:
        raise TensorDecodeError(f"missing the {FORMAT_KEY!r} metadata entry (not written by sealmesh)",
                                reason="bad_format")
    try:
        entry = json.loads(raw[FORMAT_KEY])
        version, metadata = entry["version"], entry["metadata"]
    except (ValueError, TypeError, KeyError) as exc:
        raise TensorDecodeError(f"unreadable {FORMAT_KEY!r} metadata entry: {exc}", reason="bad_format") from exc
    if version != FORMAT_VERSION:
        raise TensorDecodeError(f"format version {version!r}, this node reads {FORMAT_VERSION}",
                                reason="bad_version")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorDecodeError("metadata must map strings to strings", reason="bad_format")
    return metadata


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys in header: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def put_tensors(store: Any, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None) -> str:
    """Encode and store; equal tensors and metadata give the same cid on every node."""
    return store.put(encode_tensors(tensors, metadata=metadata))


def get_tensors(store: Any, cid: str) -> DecodedTensors:
    return decode_tensors(store.get(cid))
