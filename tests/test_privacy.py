"""Finding 8 (issue 11), the DP part: colluders isolate one victim's update; per-trainer
clip + Gaussian noise (training/privacy.py) bounds what they learn, and its accountant.

The attack runs through the real sealed pipeline (crypto/contribution.py: quantize, pack,
encrypt, prove, verify, aggregate, threshold decrypt, decode), 1024-bit keys.
"""

import functools
import math

import numpy as np
import pytest

from crypto import contribution as C
from crypto import paillier
from training import privacy as P
from training.errors import TrainingUsageError

BITS, T, N_PARTIES = 1024, 2, 3
MESH, ROUND = "test-mesh", 3
VALUES = 256  # adapter values in the test round
COLLUDERS = 3  # k - 1 of k = 4 contributors


@functools.cache
def key():
    return paillier.deal(BITS, T, N_PARTIES, allow_weak=True)


@functools.cache
def layout():
    return C.derive_layout(1.0, 16, COLLUDERS + 1, BITS)


def published_mean(updates: dict[str, np.ndarray]) -> np.ndarray:
    """What the committee publishes for a round with these contributors: sealed, verified,
    summed under encryption, t-of-n decrypted, decoded."""
    public, shares, vks = key()
    items = []
    for sender, update in updates.items():
        context = C.context_for(public, MESH, ROUND, sender)
        item = C.seal(public, layout(), update, context)
        C.verify(public, layout(), item, context, value_count=VALUES)
        items.append(item)
    summed = C.aggregate(public, items)
    batches = [paillier.partial_decrypt_many(s, summed, b"agg", workers=1) for s in shares[:T]]
    plaintexts = paillier.combine_many(public, vks, T, summed, batches, b"agg", workers=1)
    return C.decode_sum(plaintexts, VALUES, len(items), layout())


def colluders_recover(mean: np.ndarray, colluder_updates: list[np.ndarray]) -> np.ndarray:
    """The attack: the victim's update is count x mean minus the colluders' own updates."""
    count = len(colluder_updates) + 1
    return count * mean.astype(np.float64) - np.sum(colluder_updates, axis=0, dtype=np.float64)


def run_attack(victim_sealed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colluders = [rng.uniform(-0.05, 0.05, VALUES).astype(np.float32) for _ in range(COLLUDERS)]
    updates = {f"sybil-{i}": u for i, u in enumerate(colluders)}  # they contribute first
    updates["victim"] = victim_sealed  # the honest trainer fills the last place
    return colluders_recover(published_mean(updates), colluders)


def victim_update(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 0.02, VALUES).astype(np.float32)  # L2 norm ~0.32


def test_finding8_colluders_recover_the_victims_update_without_dp():
    rng = np.random.default_rng(8)
    update = victim_update(rng)
    sealed = P.privatize(update, P.PrivacyConfig())  # the default: off, the update as it is
    recovered = run_attack(sealed, rng)
    error = np.max(np.abs(recovered - update))
    assert error < 1e-4, error  # measured 4.4e-5: the victim's update, to quantization
    print(f"no DP: max recovery error {error:.2e}, update norm {np.linalg.norm(update):.3f}")


def test_finding8_with_dp_the_colluders_recovery_error_is_the_noise():
    config = P.PrivacyConfig(noise_multiplier=1.0, clip_norm=0.05, delta=1e-5)  # sigma 0.05 << clip_bound 1
    rng = np.random.default_rng()  # fresh: the bounds below are statistical (about 6 standard errors)
    update = victim_update(rng)
    clipped = P.clip_l2(update, config.clip_norm)
    recovered = run_attack(P.privatize(update, config), rng)  # the node's own noise: OS entropy
    error = recovered - clipped  # the colluders' view of the clipped update is exactly u' + noise
    rms = float(np.sqrt(np.mean(error ** 2)))
    # RMS of VALUES draws of N(0, sigma^2): relative standard error 1/sqrt(2 VALUES) = 0.044
    assert abs(rms / config.sigma - 1) < 6 / math.sqrt(2 * VALUES), rms
    assert abs(float(np.mean(error))) < 6 * config.sigma / math.sqrt(VALUES)
    # what is left to learn about the update is buried: the noise is sqrt(d) z = 16x its norm
    assert np.linalg.norm(error) > 8 * np.linalg.norm(clipped)
    eps = P.epsilon_spent([config.noise_multiplier], config.delta)
    print(f"DP z=1: rms error {rms:.4f} (sigma {config.sigma}), eps {eps:.2f} at delta 1e-5 for this round")


# --- the mechanism --------------------------------------------------------------------------


def test_clip_l2_respects_the_norm_and_keeps_direction():
    rng = np.random.default_rng(1)
    big = rng.normal(0, 1, 1000)
    clipped = P.clip_l2(big, 2.5)
    assert np.linalg.norm(clipped) == pytest.approx(2.5, rel=1e-12)
    assert np.allclose(clipped / np.linalg.norm(clipped), big / np.linalg.norm(big))
    small = big * 1e-3  # norm ~0.03: left as it is
    assert np.array_equal(P.clip_l2(small, 2.5), small)
    assert np.array_equal(P.clip_l2(np.zeros(5), 1.0), np.zeros(5))


def test_privatize_clips_then_adds_noise_of_sigma():
    config = P.PrivacyConfig(noise_multiplier=0.5, clip_norm=0.1)
    update = np.full(20_000, 1.0, dtype=np.float32)  # norm 141: clipped to 0.1
    seeded = P.privatize(update, config, np.random.default_rng(5))
    assert seeded.dtype == np.float32 and seeded.shape == update.shape
    noise = seeded - P.clip_l2(update, 0.1)
    assert np.std(noise) == pytest.approx(config.sigma, rel=0.03)  # 0.05; 1/sqrt(2n) = 0.5% std error
    assert np.array_equal(P.privatize(update, config, np.random.default_rng(5)), seeded)  # seeded: reproducible
    assert not np.array_equal(P.privatize(update, config), P.privatize(update, config))  # node: fresh
    assert np.array_equal(P.privatize(update, P.PrivacyConfig()), update)  # off


@pytest.mark.parametrize("bad", [dict(noise_multiplier=-1), dict(noise_multiplier=math.nan),
                                 dict(clip_norm=0), dict(delta=0), dict(delta=1.0), dict(noise_multiplier=True)])
def test_privacy_config_refuses_bad_settings(bad):
    with pytest.raises(TrainingUsageError) as info:
        P.PrivacyConfig(**bad)
    assert info.value.reason == "bad_privacy_config"


# --- the accountant -------------------------------------------------------------------------


def analytic_gaussian_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism with D/sigma = mu (Balle and Wang 2018,
    Thm. 8); T rounds at z compose to exactly mu = sqrt(T) / z (Dong, Roth, Su 2019)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)


def test_accountant_one_round_matches_the_closed_form():
    # z = 1, one round, delta 1e-5: rho = 1/2, eps = 1/2 + 2 sqrt(log(1e5) / 2) = 5.2985
    assert P.gaussian_epsilon_closed_form(1.0, 1, 1e-5) == pytest.approx(5.29853, abs=1e-4)
    assert P.gaussian_rdp(2.0, [2.0, 10.0]).tolist() == [2 / 8, 10 / 8]  # alpha / (2 z^2)
    for z, rounds, delta in [(1.0, 1, 1e-5), (0.8, 10, 1e-6), (2.0, 100, 1e-5), (5.0, 1000, 1e-7)]:
        grid = P.epsilon_spent([z] * rounds, delta)
        exact_optimum = P.gaussian_epsilon_closed_form(z, rounds, delta)
        assert exact_optimum <= grid <= exact_optimum * 1.01, (z, rounds, grid, exact_optimum)


def test_accountant_is_sound_against_the_exact_gaussian_mechanism():
    for z, rounds, delta in [(1.0, 1, 1e-5), (0.7, 5, 1e-5), (1.1, 50, 1e-6), (3.0, 400, 1e-5)]:
        eps = P.epsilon_spent([z] * rounds, delta)
        exact_delta = analytic_gaussian_delta(eps, math.sqrt(rounds) / z)
        assert exact_delta <= delta, (z, rounds, eps, exact_delta)
        # and not vacuous: the exact mechanism at half that eps already fails delta
        assert analytic_gaussian_delta(eps / 2, math.sqrt(rounds) / z) > delta


def test_accountant_is_monotone_in_rounds_and_decreasing_in_sigma():
    by_rounds = [P.epsilon_spent([1.0] * t, 1e-5) for t in range(1, 30)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_sigma = [P.epsilon_spent([z] * 10, 1e-5) for z in (0.5, 0.8, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert P.epsilon_spent([], 1e-5) == 0.0
    # mixed multipliers compose as their RDP sum; replace-one (sensitivity 2C) equals z / 2
    assert P.epsilon_spent([1.0, 2.0], 1e-5) < P.epsilon_spent([1.0, 1.0], 1e-5)
    assert P.epsilon_spent([1.0] * 3, 1e-5, sensitivity=2.0) == pytest.approx(P.epsilon_spent([0.5] * 3, 1e-5))
    assert P.aggregate_noise_multiplier(1.0, 4) == 2.0


# --- the node's hook ------------------------------------------------------------------------


def test_trainer_settings_turn_dp_on_and_report_epsilon(tmp_path):
    from node.roles.trainer import TrainerService
    from node.settings import load_settings

    config = tmp_path / "node.toml"
    config.write_text('role = "trainer"\n[privacy]\ndp_noise_multiplier = 1.2\ndp_clip_norm = 0.5\ndp_delta = 1e-6\n')
    service = TrainerService(load_settings(config, {}))
    assert service.privacy == P.PrivacyConfig(1.2, 0.5, 1e-6)
    assert service.privacy_status()["rounds"] == 0 and service.privacy_status()["epsilon"] == 0.0
    service.shell = {0: {"dp_noise_multiplier": 1.2}, 1: {}, 2: {"dp_noise_multiplier": 1.2}}  # 2 released
    status = service.privacy_status()
    assert status["rounds"] == 2
    assert status["epsilon"] == pytest.approx(P.epsilon_spent([1.2, 1.2], 1e-6))
    assert status["epsilon_replace_one"] > status["epsilon"]
    off = TrainerService(load_settings(None, {"role": "trainer"}))
    assert not off.privacy.enabled and off.privacy_status() is None
    with pytest.raises(TrainingUsageError):
        TrainerService(load_settings(None, {"role": "trainer", "dp_delta": 2.0}))
