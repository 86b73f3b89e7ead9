"""bench/peers.py (issue 18) computes the same mean through every method it compares.

Tiny workload (3 trainers x 2,000 values); each method's mean must match the plaintext
mean of the same contributors within the error its settings allow. Speed is never
asserted here: the figures are bench/peers.py's output (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
_spec = importlib.util.spec_from_file_location("bench_peers", _PATH)
peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peers  # its dataclasses look their module up
_spec.loader.exec_module(peers)

TRAINERS, PARAMS = 3, 2_000


@pytest.fixture(scope="module")
def updates():
    return peers.workload(TRAINERS, PARAMS, seed=7)


def test_plaintext_floor_is_exact(updates):
    r = peers.run_plaintext(updates)
    assert r.max_err < 1e-12 and r.contributors == TRAINERS
    assert r.bytes_per_trainer == PARAMS * 4


def test_sealmesh_mean_matches_plaintext_within_its_quantization_bound(updates):
    r = peers.run_sealmesh(updates, threshold=2, parties=3, workers=1)
    bound = r.detail["error_bound"]  # B / 2^(b-1), the packing's stated rounding error
    assert r.contributors == TRAINERS
    assert 0 < r.max_err <= bound
    assert r.bytes_per_trainer > r.detail["ciphertexts_per_trainer"] * 512  # 2048-bit key: 4096-bit ciphertexts
    assert r.member_s is not None and r.members == 3


def test_secaggplus_mean_matches_plaintext_of_the_survivors(updates):
    pytest.importorskip("flwr", reason="flwr lives in .venv-peers (make bench-peers), not in the locked .venv")
    r = peers.run_secaggplus(updates)
    s = r.detail["settings"]
    step = 2 * s["clipping_range"] / s["quantization_range"]  # stochastic rounding moves a value < 1 step
    assert r.contributors == TRAINERS - s["dropouts"]
    assert r.max_err <= step


def test_tenseal_mean_matches_plaintext(updates):
    pytest.importorskip("tenseal", reason="tenseal lives in .venv-peers (make bench-peers), not in the locked .venv")
    r = peers.run_tenseal(updates)
    assert r.contributors == TRAINERS
    assert r.max_err <= 1e-5  # CKKS at scale 2^40: noise far below float32 rounding of [-1, 1]
    assert r.detail["ciphertexts"] == -(-PARAMS // r.detail["settings"]["slots"])


def test_last_line_names_every_figure(updates):
    results = {"plaintext": peers.run_plaintext(updates)}
    line = peers.last_line(results, PARAMS, TRAINERS)
    assert line.startswith(f"peers params={PARAMS} trainers={TRAINERS} ")
    for key in ("sealmesh_trainer_s", "secaggplus_client_s", "tenseal_client_s", "sealmesh_validator_s",
                "secaggplus_server_s", "tenseal_server_s", "sealmesh_bytes", "secaggplus_bytes", "tenseal_bytes"):
        assert f" {key}=" in line
