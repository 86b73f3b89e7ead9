"""Synthetic natural-looking images, made from a generator (no data set is downloaded).

Two users need the same pictures: fhe/zoo.py calibrates the CNV's input quantizer on
them, and fhe/inputs.py draws challenge inputs from them for the models that have no
bundled data. They live here, below both, so that neither imports the other.
"""

from __future__ import annotations

import numpy as np


def cifar_like_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A 3 x size x size image in [-1, 1) with natural-image structure: a smooth colour
    gradient, a few soft blobs and fine noise (CIFAR itself is not downloaded)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
    base = rng.uniform(-0.6, 0.6, size=(3, 1, 1))
    slope = rng.uniform(-0.5, 0.5, size=(3, 2, 1, 1))
    image = base + slope[:, 0] * yy + slope[:, 1] * xx
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        radius = rng.uniform(0.08, 0.3)
        colour = rng.uniform(-1.0, 1.0, size=(3, 1, 1))
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        image = image + colour * blob
    image = image + rng.normal(0.0, 0.03, size=image.shape)
    return np.clip(image, -1.0, 1.0 - 2.0**-7).astype(np.float32)
