"""Federated digits: sklearn's bundled 8x8 digits, a small torch MLP, one shard per
trainer, and the same delta -> mean -> outer-step path as the language adapter.

It runs in seconds on a CPU, so it is the scenario that end-to-end tests of secure
aggregation carry through packing, encryption and decryption: the vector here is the
whole MLP, where for the LM it is the LoRA adapter.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.delta import LocalUpdate, check_hyperparameters, check_loss, compute_delta, mean_delta
from training.errors import TrainingUsageError
from training.outer import FedAvg, OuterOptimizer
from training.vector import VectorLayout

FEATURES, CLASSES = 64, 10


@dataclass(frozen=True)
class DigitsShard:
    features: torch.Tensor  # [n, 64] float32 in [0, 1]
    labels: torch.Tensor  # [n] int64


@dataclass(frozen=True)
class DigitsSplit:
    shards: tuple[DigitsShard, ...]
    test: DigitsShard


def load_digits_split(num_shards: int, *, test_fraction: float = 0.25,
                      seed: int = 0) -> DigitsSplit:
    """A seeded shuffle of sklearn's digits: a test set, and the rest dealt round-robin."""
    from sklearn.datasets import load_digits

    if not isinstance(num_shards, int) or num_shards < 1:
        raise TrainingUsageError(f"num_shards must be >= 1, got {num_shards!r}",
                                 reason="bad_hyperparameter")
    if not 0.0 < test_fraction < 1.0:
        raise TrainingUsageError(f"test_fraction must be in (0, 1), got {test_fraction}",
                                 reason="bad_hyperparameter")
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    features = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target[order], dtype=torch.long)
    n_test = int(len(labels) * test_fraction)
    train_x, train_y = features[n_test:], labels[n_test:]
    shards = tuple(DigitsShard(train_x[i::num_shards], train_y[i::num_shards])
                   for i in range(num_shards))
    return DigitsSplit(shards, DigitsShard(features[:n_test], labels[:n_test]))


def digits_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


@dataclass(frozen=True)
class DigitsModel:
    """The MLP's shape; its values travel as a flat vector (names sorted)."""

    hidden: int = 32

    def build(self) -> nn.Module:
        return digits_mlp(self.hidden)

    @property
    def layout(self) -> VectorLayout:
        return VectorLayout.of(self.build().state_dict())

    def initial_vector(self, seed: int = 0) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = self.build().state_dict()
        return VectorLayout.of(state).to_vector(state)

    def with_vector(self, vector: np.ndarray) -> nn.Module:
        module = self.build()
        module.load_state_dict(self.layout.to_tensors(vector))
        return module


def digits_local_train(spec: DigitsModel, base_vector: np.ndarray, shard: DigitsShard, *,
                       steps: int, lr: float, batch_size: int, seed: int) -> LocalUpdate:
    """K SGD-momentum steps from `base_vector` on one shard; returns the delta."""
    check_hyperparameters(steps=steps, lr=lr, batch_size=batch_size)
    module = spec.with_vector(base_vector)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    sampler = torch.Generator().manual_seed(seed)
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(len(shard.labels), (batch_size,), generator=sampler)
        loss = nn.functional.cross_entropy(module(shard.features[rows]), shard.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(check_loss(loss.item(), step))
    seconds = time.perf_counter() - started
    state = module.state_dict()
    delta = compute_delta(base_vector, spec.layout.to_vector(state))
    return LocalUpdate(delta, float(np.mean(losses)), losses[0], losses[-1], steps, seconds)


@torch.no_grad()
def digits_accuracy(spec: DigitsModel, vector: np.ndarray, test: DigitsShard) -> float:
    predictions = spec.with_vector(vector)(test.features).argmax(dim=1)
    return float((predictions == test.labels).float().mean())


@dataclass(frozen=True)
class DigitsRun:
    accuracies: tuple[float, ...]  # before round 1, then after each round
    final_vector: np.ndarray


def run_federated_digits(*, num_trainers: int = 3, rounds: int = 5, steps: int = 20,
                         lr: float = 0.1, batch_size: int = 32,
                         outer: OuterOptimizer | None = None, spec: DigitsModel = DigitsModel(),
                         seed: int = 0) -> DigitsRun:
    """Every trainer trains locally from the shared vector; the mean delta is applied."""
    outer = outer if outer is not None else FedAvg()
    split = load_digits_split(num_trainers, seed=seed)
    vector = spec.initial_vector(seed)
    accuracies = [digits_accuracy(spec, vector, split.test)]
    for round_index in range(rounds):
        updates: Sequence[LocalUpdate] = [
            digits_local_train(spec, vector, shard, steps=steps, lr=lr, batch_size=batch_size,
                               seed=seed + 1000 * round_index + trainer)
            for trainer, shard in enumerate(split.shards)]
        vector = outer.step(vector, mean_delta([u.delta for u in updates]))
        accuracies.append(digits_accuracy(spec, vector, split.test))
    return DigitsRun(tuple(accuracies), vector)
