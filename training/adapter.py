"""The shared LoRA adapter of a peft model as a flat vector, safetensors bytes and an id.

Tensor names are peft's own (`get_peft_model_state_dict`: the adapter name left out),
so a saved adapter file also loads with `PeftModel.from_pretrained` beside an
adapter_config.json. The vector order is those names sorted (training/vector.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.errors import AdapterRejected
from training.vector import (VectorLayout, content_id, tensors_from_bytes,
                             tensors_to_bytes)

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def adapter_layout(model: torch.nn.Module) -> VectorLayout:
    return VectorLayout.of(adapter_state(model))


def adapter_vector(model: torch.nn.Module) -> np.ndarray:
    """The adapter's float32 values, tensors in sorted-name order, flattened."""
    state = adapter_state(model)
    return VectorLayout.of(state).to_vector(state)


def load_adapter_vector(model: torch.nn.Module, vector: np.ndarray) -> None:
    """Overwrite the adapter with `vector` (as made by `adapter_vector` on this model)."""
    load_adapter_state(model, adapter_layout(model).to_tensors(vector))


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    # check names and shapes first: peft's strict=False load would skip strangers silently
    current = adapter_layout(model)
    if VectorLayout.of(state) != current:
        raise AdapterRejected("adapter tensors do not match this model's LoRA layout "
                              "(other rank, target modules or base model?)",
                              reason="layout_mismatch")
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise AdapterRejected(f"unexpected adapter keys {result.unexpected_keys[:3]}",
                              reason="layout_mismatch")


def adapter_bytes(model: torch.nn.Module) -> bytes:
    return tensors_to_bytes(adapter_state(model))


def vector_to_adapter_bytes(layout: VectorLayout, vector: np.ndarray) -> bytes:
    """Bytes of an adapter known only as a vector (an aggregate applied by a validator)."""
    return tensors_to_bytes(layout.to_tensors(vector))


def adapter_id(data: bytes) -> str:
    """An adapter's id: sha256 of its deterministic safetensors bytes."""
    return content_id(data)


def load_adapter_bytes(model: torch.nn.Module, data: bytes) -> None:
    load_adapter_state(model, tensors_from_bytes(data))


def save_adapter(model: torch.nn.Module, path: str | Path) -> str:
    """Write the adapter to `path` (a file, or a directory gets adapter_model.safetensors
    plus peft's adapter_config.json); returns the adapter id."""
    path = Path(path)
    data = adapter_bytes(model)
    if path.is_dir():
        model.peft_config[model.active_adapter].save_pretrained(str(path))
        path = path / ADAPTER_FILE
    path.write_bytes(data)
    return adapter_id(data)


def load_adapter(model: torch.nn.Module, path: str | Path) -> str:
    """Load an adapter file (or directory holding one); returns its id."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    data = path.read_bytes()
    load_adapter_bytes(model, data)
    return adapter_id(data)
