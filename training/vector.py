"""Named tensors <-> one flat float32 vector, and their deterministic safetensors bytes.

Every party that handles an update (trainer, validator, the packing in crypto/) sees a
flat float32 vector; only the trainer needs the names and shapes behind it. The order
is the tensor names sorted, so any two nodes with the same model agree on it without
talking. Bytes are safetensors (never pickle), and the same tensors always give the
same bytes, so sha256 of the bytes is a content id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from training.errors import AdapterRejected


def warm_numpy_bridge() -> None:
    """Make torch set up its numpy bridge now, on this thread. torch does it on first use
    (a C++ function-local static whose initialiser imports numpy modules); two threads
    reaching it at once deadlock: the one inside waits for the GIL during the import, the
    other holds the GIL and waits for the initialiser. A trainer that got a RoundOpen while
    its model loaded (a node just started or just joined) hung that way, its event loop
    stopped for good. Called first by the model loader, before any other thread uses torch."""
    torch.from_numpy(np.zeros(1, dtype=np.float32)).to("cpu", torch.float32).numpy()


@dataclass(frozen=True)
class VectorLayout:
    """Names (sorted) and shapes of the tensors that a flat vector concatenates."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> VectorLayout:
        names = tuple(sorted(tensors))
        return cls(names, tuple(tuple(tensors[n].shape) for n in names))

    @property
    def size(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    def to_vector(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        if set(tensors) != set(self.names):
            missing = sorted(set(self.names) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.names))[:3]
            raise AdapterRejected(f"tensor names differ from the layout: missing {missing},"
                                  f" unexpected {extra}", reason="layout_mismatch")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise AdapterRejected(f"{name}: shape {tuple(tensor.shape)}, layout says {shape}",
                                      reason="layout_mismatch")
            parts.append(tensor.detach().to("cpu", torch.float32).reshape(-1).numpy())
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def to_tensors(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        vector = check_vector(vector, self.size)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes):
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = torch.from_numpy(vector[start:start + count].copy()).reshape(shape)
            start += count
        return out


def check_vector(vector: np.ndarray, size: int, *, what: str = "vector") -> np.ndarray:
    """A 1-D finite float32 array of `size` values, or AdapterRejected saying why not."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.shape[0] != size:
        raise AdapterRejected(f"{what} has shape {array.shape}, expected ({size},)",
                              reason="size_mismatch")
    if array.dtype != np.float32:
        if not np.issubdtype(array.dtype, np.floating):
            raise AdapterRejected(f"{what} has dtype {array.dtype}, expected float32",
                                  reason="bad_dtype")
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise AdapterRejected(f"{what} holds NaN or infinite values", reason="non_finite")
    return array


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes: contiguous float32 CPU tensors, fixed metadata."""
    clean = {name: tensors[name].detach().to("cpu", torch.float32).contiguous()
             for name in sorted(tensors)}
    return st_save(clean, metadata=dict(metadata) if metadata else None)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes that must hold float32 tensors only."""
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise AdapterRejected(f"not a safetensors blob: {exc}", reason="not_safetensors") from exc
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise AdapterRejected(f"{name} is {tensor.dtype}, expected float32",
                                  reason="bad_dtype")
    return tensors


def content_id(data: bytes) -> str:
    """The id of a blob: hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def metadata_from_bytes(data: bytes) -> dict[str, str]:
    """The `__metadata__` map of safetensors bytes (safetensors.torch.load drops it)."""
    import json
    import struct

    try:
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        header = json.loads(bytes(data[8:8 + header_len]))
        metadata = header.get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as exc:
        raise AdapterRejected(f"unreadable safetensors header: {exc}",
                              reason="not_safetensors") from exc
    if not isinstance(metadata, dict):
        raise AdapterRejected("safetensors metadata is not a map", reason="not_safetensors")
    return {str(k): str(v) for k, v in metadata.items()}
