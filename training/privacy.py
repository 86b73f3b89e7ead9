"""Optional differential privacy for one trainer's update: L2 clip + Gaussian noise, and its accounting.

Why: secure aggregation hides one update only among honest ones. k-1 colluding (or Sybil)
trainers that know their own updates recover the last honest one from the mean
(count * mean - theirs; finding 8 of issue 11). Noise that the trainer adds itself, before
quantize/pack/encrypt, is the one protection that does not depend on who else is in the round.

The mechanism (DP-FedAvg, McMahan et al. 2018, applied by each trainer, not by a server):

    u' = u * min(1, C / ||u||_2)          clip the whole adapter delta vector to L2 norm C
    u~ = u' + N(0, sigma^2 I),  sigma = z * C   (z = noise_multiplier)

Accounting: Renyi DP of the Gaussian mechanism (Mironov 2017, "Renyi Differential Privacy",
Prop. 7 and Cor. 3): with L2 sensitivity D and noise sigma, order alpha costs
alpha * D^2 / (2 sigma^2); rounds add up; (eps, delta) = min over alpha of
rdp(alpha) + log(1/delta) / (alpha - 1) (Prop. 3). The same bound in closed form is the
zCDP conversion (Bun and Steinke 2016): rho = T D^2 / (2 sigma^2), eps = rho + 2 sqrt(rho log 1/delta).

Which guarantee, exactly: the neighbouring relation is one trainer's whole update present
or absent (add/remove; D = C, the "user-level" DP of DP-FedAvg), per round this trainer
contributed, against an adversary who knows every OTHER update in the sum exactly
(colluders, Sybils, a trainer alone in its round): what it sees of the victim is then
exactly u' + N(0, sigma^2 I), the single-trainer Gaussian mechanism with multiplier z.
Replacing the trainer's data by any other (replace-one) doubles D: the same numbers at
z / 2 (`epsilon_replace_one`). Against an observer who knows none of the other updates,
the noise of h honest trainers adds up (sqrt(h) sigma in the sum), i.e. multiplier
z * sqrt(h) (`aggregate_noise_multiplier`); that is not relied on here.

Not covered: the float Gaussian sampler is numpy's (PCG64 seeded from the OS), not a
discrete or constant-time sampler (Mironov 2012's floating-point attack on Laplace applies
in principle); the per-coordinate clip and quantization in crypto/packing.py come after
the noise and are post-processing, so they cost no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from training.errors import TrainingUsageError

# Renyi orders: Opacus' and TF-Privacy's default grid, which brackets the optimum for
# every eps between ~0.01 and ~100 at the deltas that matter.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                          + [128.0, 256.0, 512.0, 1024.0])


@dataclass(frozen=True)
class PrivacyConfig:
    """One trainer's DP settings; noise_multiplier 0 means off (the default)."""

    noise_multiplier: float = 0.0  # z: sigma = z * clip_norm
    clip_norm: float = 1.0  # C: L2 bound of the whole adapter delta vector
    delta: float = 1e-5  # the delta at which epsilon is reported

    def __post_init__(self) -> None:
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in (self.noise_multiplier, self.clip_norm, self.delta))
        if not finite or self.noise_multiplier < 0:
            raise TrainingUsageError(f"dp_noise_multiplier must be a finite number >= 0 (0: off), "
                                     f"got {self.noise_multiplier!r}", reason="bad_privacy_config")
        if not self.clip_norm > 0:
            raise TrainingUsageError(f"dp_clip_norm must be > 0, got {self.clip_norm!r}",
                                     reason="bad_privacy_config")
        if not 0 < self.delta < 1:
            raise TrainingUsageError(f"dp_delta must lie in (0, 1), got {self.delta!r}; take it well "
                                     "below 1 / (number of trainers)", reason="bad_privacy_config")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def sigma(self) -> float:
        """Standard deviation of the noise on each coordinate."""
        return self.noise_multiplier * self.clip_norm


# --- the mechanism --------------------------------------------------------------------------


def clip_l2(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """The update scaled down (never up) to L2 norm at most clip_norm; float64 for the norm."""
    vector = np.asarray(update, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(vector))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return vector * scale


def privatize(update: np.ndarray, config: PrivacyConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """What a trainer seals instead of its raw update: clipped, plus N(0, sigma^2) per coordinate.

    rng: tests pass a seeded one; a node passes none and gets fresh OS entropy each call.
    """
    if not config.enabled:
        return np.asarray(update, dtype=np.float32)
    rng = rng if rng is not None else np.random.default_rng()
    clipped = clip_l2(update, config.clip_norm)
    noised = clipped + rng.normal(0.0, config.sigma, size=clipped.shape)
    return noised.astype(np.float32)


# --- the accountant -------------------------------------------------------------------------


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS,
                 sensitivity: float = 1.0) -> np.ndarray:
    """RDP epsilon at each order of one Gaussian mechanism: alpha * (D / z)^2 / 2, D in units of C."""
    if noise_multiplier <= 0:
        return np.full(len(orders), math.inf)
    return np.asarray(orders, dtype=np.float64) * (sensitivity / noise_multiplier) ** 2 / 2


def composed_rdp(noise_multipliers: Iterable[float], orders: Sequence[float] = DEFAULT_ORDERS,
                 sensitivity: float = 1.0) -> np.ndarray:
    """RDP of the rounds one trainer released, one noise multiplier per round: they add up."""
    total = np.zeros(len(orders))
    for z in noise_multipliers:
        total = total + gaussian_rdp(z, orders, sensitivity)
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """(eps, delta)-DP from RDP (Mironov 2017, Prop. 3), the best order of the grid."""
    orders = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) + math.log(1 / delta) / (orders - 1)
    return float(np.min(eps))


def epsilon_spent(noise_multipliers: Sequence[float], delta: float, *, sensitivity: float = 1.0) -> float:
    """Epsilon at `delta` after the listed rounds (0.0 for none; inf if any round had no noise)."""
    if not noise_multipliers:
        return 0.0
    return epsilon_from_rdp(composed_rdp(noise_multipliers, sensitivity=sensitivity), delta)


def gaussian_epsilon_closed_form(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The same RDP bound optimized over continuous alpha: rho + 2 sqrt(rho log(1/delta)), rho = T / (2 z^2)."""
    rho = rounds / (2 * noise_multiplier ** 2)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def aggregate_noise_multiplier(noise_multiplier: float, honest_contributors: int) -> float:
    """The multiplier covering one trainer against an observer who knows none of the h honest
    updates' noise: the sum carries sqrt(h) * sigma. Colluders who know the others get z only."""
    return noise_multiplier * math.sqrt(honest_contributors)


def privacy_report(noise_multipliers: Sequence[float], config: PrivacyConfig) -> dict:
    """What a trainer logs and shows in its status: rounds released and epsilon so far."""
    return {"noise_multiplier": config.noise_multiplier, "clip_norm": config.clip_norm, "delta": config.delta,
            "sigma": config.sigma, "rounds": len(noise_multipliers),
            "adjacency": "add_remove_one_trainer_update",
            "epsilon": epsilon_spent(noise_multipliers, config.delta),
            "epsilon_replace_one": epsilon_spent(noise_multipliers, config.delta, sensitivity=2.0)}


__all__ = ["DEFAULT_ORDERS", "PrivacyConfig", "aggregate_noise_multiplier", "clip_l2", "composed_rdp",
           "epsilon_from_rdp", "epsilon_spent", "gaussian_epsilon_closed_form", "gaussian_rdp",
           "privacy_report", "privatize"]
