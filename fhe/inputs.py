"""Challenge inputs, drawn deterministically from a seed the validator keeps secret.

The same seed always gives the same input, so a validator can re-derive a challenge
for an audit; a miner that never learns the seed cannot predict it. Real inputs (digits
test images) are augmented so a miner cannot look them up in the public data set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fhe.images import cifar_like_image
from fhe.zoo import ZooError, digits_split, get_model

Source = Literal["real", "synthetic"]

MAX_SHIFT_PIXELS = 1
SHIFT_PROBABILITY = 0.25
MIN_BRIGHTNESS = 0.85
NOISE_STD = 0.04


@dataclass(frozen=True)
class ChallengeInput:
    model: str
    image: np.ndarray  # float32, exactly the model's input shape (no batch axis)
    label: int | None  # the true class of a real image; None for synthetic ones
    source: str  # e.g. "digits-test[123]+shift(1,-1)+noise", for logs


def rng_from_seed(seed: int | bytes | str) -> np.random.Generator:
    """A generator keyed by any seed; bytes and text are hashed first."""
    if isinstance(seed, int):
        if seed < 0:
            raise ZooError(f"seed must be >= 0, got {seed}", reason="bad_seed")
        return np.random.default_rng(seed)
    if isinstance(seed, str):
        seed = seed.encode()
    if not isinstance(seed, bytes):
        raise ZooError(f"seed must be int, bytes or str, got {type(seed).__name__}",
                       reason="bad_seed")
    return np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest(), "big"))


def augment_digit(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Dim slightly, sometimes shift one pixel along one axis (zero fill), add Gaussian
    noise; stays in [0, 1]. On 8x8 digits a pixel is 12 % of the width, so shifts are
    rare: enough to make the image unique, not enough to make it unreadable."""
    dy = dx = 0
    if rng.random() < SHIFT_PROBABILITY:
        step = int(rng.choice((-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS)))
        dy, dx = (step, 0) if rng.random() < 0.5 else (0, step)
    shifted = np.zeros_like(image)
    h, w = image.shape[-2:]
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    shifted[..., dst_y, dst_x] = image[..., src_y, src_x]
    scale = rng.uniform(MIN_BRIGHTNESS, 1.0)
    noisy = shifted * scale + rng.normal(0.0, NOISE_STD, size=image.shape)
    how = f"shift({dy},{dx})+scale({scale:.2f})+noise"
    return np.clip(noisy, 0.0, 1.0).astype(np.float32), how


def synthetic_image(shape: tuple[int, ...], low: float, high: float,
                    rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(low, high, size=shape).astype(np.float32)


def draw_challenge_input(model: str, seed: int | bytes | str,
                         source: Source = "real") -> ChallengeInput:
    """The challenge input for `model` keyed by `seed`.

    source "real": an augmented digits test image (digits-cnn) or a CIFAR-like image
    (cnv-cifar10 and the synthetic CNVs, which have no bundled data); "synthetic":
    uniform noise in the model's input range.
    """
    spec = get_model(model)
    rng = rng_from_seed(seed)
    if source not in ("real", "synthetic"):
        raise ZooError(f"source must be 'real' or 'synthetic', got {source!r}",
                       reason="bad_source")
    if model == "digits-cnn":
        if source == "synthetic":
            return ChallengeInput(model, synthetic_image(spec.input_shape, 0.0, 1.0, rng),
                                  None, "uniform[0,1]")
        split = digits_split()
        index = int(rng.integers(len(split.test_images)))
        image, how = augment_digit(split.test_images[index], rng)
        return ChallengeInput(model, image, int(split.test_labels[index]),
                              f"digits-test[{index}]+{how}")
    if source == "synthetic":
        return ChallengeInput(model, synthetic_image(spec.input_shape, -1.0, 1.0 - 2.0**-7, rng),
                              None, "uniform[-1,1)")
    # cnv-cifar10 and the synthetic CNVs: 3 x size x size inputs in [-1, 1).
    return ChallengeInput(model, cifar_like_image(rng, spec.input_shape[-1]), None, "cifar-like")
