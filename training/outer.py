"""Applying a round's mean delta to the shared adapter: the outer optimizer.

One small interface with two implementations, after Flower's Strategy:
- FedAvg (McMahan et al. 2017): base + lr * mean_delta (lr = 1: the average model).
- DiLoCo (Douillard et al. 2023): the negated mean delta is an outer gradient, fed to
  SGD with Nesterov momentum, exactly as torch.optim.SGD(dampening=0) would:
      g = -mean_delta;  m = mu * m + g;  update = g + mu * m (Nesterov) or m
      new = base - lr * update
  The momentum buffer lives across rounds and is saved as safetensors.

All arithmetic is element-wise float32 so every validator computes identical bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from training.errors import AdapterRejected, TrainingUsageError
from training.vector import (check_vector, metadata_from_bytes, tensors_from_bytes,
                             tensors_to_bytes)


class OuterOptimizer(ABC):
    name: str

    @abstractmethod
    def step(self, base_vector: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """The next round's adapter vector."""

    def state_bytes(self) -> bytes:
        """Persistent state as safetensors bytes (FedAvg has none but its name)."""
        return tensors_to_bytes({}, {"optimizer": self.name})

    def load_state_bytes(self, data: bytes) -> None:
        _check_kind(data, self.name)

    def save_state(self, path: str | Path) -> None:
        Path(path).write_bytes(self.state_bytes())

    def load_state(self, path: str | Path) -> None:
        self.load_state_bytes(Path(path).read_bytes())


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise TrainingUsageError(f"{name} must be positive and finite, got {value!r}",
                                 reason="bad_hyperparameter")
    return float(value)


def _check_pair(base_vector: np.ndarray, mean_delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    base = check_vector(base_vector, np.asarray(base_vector).shape[0], what="base vector")
    return base, check_vector(mean_delta, base.shape[0], what="mean delta")


def _check_kind(data: bytes, name: str) -> None:
    kind = metadata_from_bytes(data).get("optimizer")
    if kind != name:
        raise AdapterRejected(f"optimizer state is for {kind!r}, not {name!r}",
                              reason="optimizer_state_mismatch")


def fedavg(base_vector: np.ndarray, mean_delta: np.ndarray, lr: float = 1.0) -> np.ndarray:
    base, delta = _check_pair(base_vector, mean_delta)
    return base + np.float32(_check_positive("lr", lr)) * delta


class FedAvg(OuterOptimizer):
    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = _check_positive("lr", lr)

    def step(self, base_vector: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return fedavg(base_vector, mean_delta, self.lr)


class DiLoCoOuter(OuterOptimizer):
    """Nesterov-momentum SGD on outer gradients; the paper uses lr 0.7, momentum 0.9."""

    name = "diloco"

    def __init__(self, lr: float, momentum: float = 0.9, nesterov: bool = True) -> None:
        self.lr = _check_positive("lr", lr)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise TrainingUsageError(f"momentum must be in [0, 1), got {momentum!r}",
                                     reason="bad_hyperparameter")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.buffer: np.ndarray | None = None
        self.steps = 0

    def step(self, base_vector: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        base, delta = _check_pair(base_vector, mean_delta)
        if self.buffer is not None and self.buffer.shape != base.shape:
            raise AdapterRejected(f"momentum holds {self.buffer.shape[0]} values, the adapter "
                                  f"{base.shape[0]}", reason="size_mismatch")
        mu, lr = np.float32(self.momentum), np.float32(self.lr)
        outer_grad = -delta
        buffer = outer_grad.copy() if self.buffer is None else mu * self.buffer + outer_grad
        update = outer_grad + mu * buffer if self.nesterov else buffer
        self.buffer = buffer
        self.steps += 1
        return base - lr * update

    def state_bytes(self) -> bytes:
        buffer = self.buffer if self.buffer is not None else np.zeros(0, np.float32)
        return tensors_to_bytes({"momentum": torch.from_numpy(buffer)},
                                {"optimizer": self.name, "steps": str(self.steps),
                                 "lr": repr(self.lr), "momentum": repr(self.momentum),
                                 "nesterov": str(self.nesterov)})

    def load_state_bytes(self, data: bytes) -> None:
        _check_kind(data, self.name)
        tensors = tensors_from_bytes(data)
        if set(tensors) != {"momentum"} or tensors["momentum"].ndim != 1:
            raise AdapterRejected("DiLoCo state must hold one 1-D tensor 'momentum'",
                                  reason="optimizer_state_mismatch")
        buffer = tensors["momentum"].numpy()
        self.buffer = check_vector(buffer, buffer.shape[0], what="momentum") if buffer.size else None
        try:
            self.steps = int(metadata_from_bytes(data).get("steps", "0"))
        except ValueError as exc:
            raise AdapterRejected("DiLoCo state has a non-integer step count",
                                  reason="optimizer_state_mismatch") from exc
