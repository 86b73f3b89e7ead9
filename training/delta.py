"""A round's update as a vector: delta = trained - base, their mean, and the local result.

Deltas are what trainers clip, quantize, pack and encrypt (crypto/packing.py); the
committee only ever learns their mean. Nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.errors import TrainingUsageError
from training.vector import check_vector


@dataclass(frozen=True)
class LocalUpdate:
    """What one trainer's local round produced."""

    delta: np.ndarray  # float32, trained adapter minus the round's base adapter
    train_loss: float  # mean training loss over the local steps
    first_loss: float
    last_loss: float
    steps: int
    seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps


def compute_delta(base_vector: np.ndarray, trained_vector: np.ndarray) -> np.ndarray:
    base = check_vector(base_vector, np.asarray(base_vector).shape[0], what="base vector")
    trained = check_vector(trained_vector, base.shape[0], what="trained vector")
    return trained - base


def mean_delta(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """The plain mean of equally weighted deltas (what secure aggregation reveals)."""
    if not deltas:
        raise TrainingUsageError("mean of no deltas: a round needs at least one contribution",
                                 reason="no_contributions")
    size = np.asarray(deltas[0]).shape[0]
    stacked = np.stack([check_vector(d, size, what=f"delta {i}") for i, d in enumerate(deltas)])
    return stacked.mean(axis=0, dtype=np.float64).astype(np.float32)


def check_hyperparameters(*, steps: int, lr: float, batch_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise TrainingUsageError(f"steps must be a positive integer, got {steps!r}",
                                 reason="bad_hyperparameter")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TrainingUsageError(f"batch_size must be a positive integer, got {batch_size!r}",
                                 reason="bad_hyperparameter")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrainingUsageError(f"lr must be a positive finite number, got {lr!r}",
                                 reason="bad_hyperparameter")


def check_loss(loss: float, step: int) -> float:
    if not math.isfinite(loss):
        raise TrainingUsageError(f"training loss became {loss} at step {step}; lower the "
                                 "learning rate", reason="diverged")
    return loss

