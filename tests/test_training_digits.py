"""training/digits.py: the federated digits scenario through the shared delta/apply API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.delta import mean_delta
from training.digits import (DigitsModel, digits_accuracy, digits_local_train,
                             load_digits_split, run_federated_digits)
from training.errors import AdapterRejected, TrainingUsageError
from training.outer import DiLoCoOuter, fedavg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_split_is_seeded_and_disjoint():
    split = load_digits_split(3)
    again = load_digits_split(3)
    assert all(torch.equal(a.features, b.features) for a, b in zip(split.shards, again.shards))
    sizes = [len(s.labels) for s in split.shards] + [len(split.test.labels)]
    assert sum(sizes) == 1797 and min(sizes[:3]) >= 440
    assert float(split.test.features.max()) <= 1.0
    with pytest.raises(TrainingUsageError) as bad:
        load_digits_split(0)
    assert bad.value.reason == "bad_hyperparameter"


def test_vector_round_trip_and_initial_vector_is_seeded():
    spec = DigitsModel(hidden=16)
    vector = spec.initial_vector(seed=3)
    assert vector.dtype == np.float32 and vector.size == spec.layout.size == 64 * 16 + 16 + 16 * 10 + 10
    assert np.array_equal(vector, spec.initial_vector(seed=3))
    assert not np.array_equal(vector, spec.initial_vector(seed=4))
    module = spec.with_vector(vector)
    assert np.array_equal(spec.layout.to_vector(module.state_dict()), vector)
    with pytest.raises(AdapterRejected) as short:
        spec.with_vector(vector[:-1])
    assert short.value.reason == "size_mismatch"


def test_one_round_by_hand_equals_fedavg_of_trained_models():
    spec = DigitsModel()
    split = load_digits_split(2)
    base = spec.initial_vector()
    updates = [digits_local_train(spec, base, shard, steps=10, lr=0.1, batch_size=32, seed=i)
               for i, shard in enumerate(split.shards)]
    trained = [base + u.delta for u in updates]
    applied = fedavg(base, mean_delta([u.delta for u in updates]))
    assert np.allclose(applied, np.mean(trained, axis=0), atol=1e-6)
    assert all(u.last_loss < u.first_loss for u in updates)
    assert digits_accuracy(spec, applied, split.test) > digits_accuracy(spec, base, split.test)


@pytest.mark.parametrize("outer", [None, DiLoCoOuter(0.7)], ids=["fedavg", "diloco"])
def test_accuracy_rises_over_rounds(outer):
    run = run_federated_digits(num_trainers=3, rounds=4, steps=15, outer=outer)
    accuracies = run.accuracies
    assert accuracies[0] < 0.2  # an untrained MLP guesses
    assert accuracies[-1] > 0.8, accuracies
    assert accuracies[-1] > accuracies[1] > accuracies[0]
