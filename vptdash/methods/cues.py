"""A generated image set on which prompts can make the features forget: `cues-30`.

Five families of six classes. Within a family the classes differ in one visual cue, and every other
property of the image (the cues of the other families, phase, contrast, noise) varies at random inside
each class. The families' cues conflict: a task on stripe angle (at any frequency) rewards features that
ignore frequency, which is what the frequency task needed, and the other way round. One family per task
makes a class-incremental benchmark where the frozen features separate some tasks poorly, so the prompts
must learn them, and later tasks can unlearn them; `benchmarks/continual_cues.py` measures how much.

The textures sets (`continual.make_textures`) differ in shape, which the frozen features already tell
apart almost perfectly, so prompts have nothing there for later tasks to take away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from vptdash.engine import data

NAME = "cues-30"
CLASSES_PER_FAMILY = 6
# family -> what tells its classes apart (its class k+1 takes the k-th value), as shown to users.
FAMILIES = {
    "angle": "stripes at 4-10 cycles per image; the class is their angle: 0, 12, 24, 36, 48 or 60 degrees (+-3)",
    "centre": "concentric rings at 5-9 cycles per image; the class is where their centre lies (the four "
    "quarters' centres, the middle, the top middle; +-0.05 of the image)",
    "density": "speckle of 4-pixel dots; the class is how many: 2, 4, 6, 9, 13 or 18% of the cells",
    "frequency": "stripes at any angle; the class is their frequency: 3, 4, 5, 6.5, 8 or 10 cycles per image (+-5%)",
    "plaid": "two gratings of one frequency at any angle; the class is the angle between them: 20, 35, 50, 65, "
    "80 or 95 degrees",
}
ANGLES = (0, 12, 24, 36, 48, 60)
CENTRES = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5), (0.5, 0.2))
DENSITIES = (0.02, 0.04, 0.06, 0.09, 0.13, 0.18)
FREQUENCIES = (3.0, 4.0, 5.0, 6.5, 8.0, 10.0)
PLAID_ANGLES = (20, 35, 50, 65, 80, 95)
PER_CLASS = 40
SIZE = 128


def class_names() -> list[str]:
    """The classes, in the loader's order (sorted folder names): family-major."""
    return sorted(f"{family}-{k + 1}" for family in FAMILIES for k in range(CLASSES_PER_FAMILY))


def family_groups() -> list[list[int]]:
    """The class indices (loader order) of each family: the tasks of the benchmark."""
    names = class_names()
    return [[i for i, name in enumerate(names) if name.rsplit("-", 1)[0] == family] for family in FAMILIES]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    return y, x


def _stripes(angle_deg: float, freq: float, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(size)
    angle = np.deg2rad(angle_deg)
    return np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))


def _angle(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return _stripes(ANGLES[k] + rng.uniform(-3, 3), rng.uniform(4, 10), size, rng)


def _centre(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(size)
    cx, cy = (c + rng.uniform(-0.05, 0.05) for c in CENTRES[k])
    return np.sin(2 * np.pi * rng.uniform(5, 9) * np.hypot(x - cx, y - cy) + rng.uniform(0, 2 * np.pi))


def _density(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    cells = -(-size // 4)
    dots = (rng.random((cells, cells)) < DENSITIES[k]).repeat(4, 0).repeat(4, 1)[:size, :size]
    return dots * 2.0 - 1.0


def _frequency(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return _stripes(rng.uniform(0, 180), FREQUENCIES[k] * rng.uniform(0.95, 1.05), size, rng)


def _plaid(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    first, freq = rng.uniform(0, 180), rng.uniform(4, 9)
    return 0.5 * (_stripes(first, freq, size, rng) + _stripes(first + PLAID_ANGLES[k], freq, size, rng))


DRAW: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "angle": _angle,
    "centre": _centre,
    "density": _density,
    "frequency": _frequency,
    "plaid": _plaid,
}


def draw(family: str, k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One grey image in [0, 1] of class k (0-based) of a family, with random contrast and pixel noise."""
    pattern = DRAW[family](k, size, rng)
    contrast = rng.uniform(0.3, 0.5)
    return np.clip(0.5 + contrast * pattern + rng.normal(0, 0.12, (size, size)), 0, 1)


def make_cues(folder: Path, *, per_class: int = PER_CLASS, size: int = SIZE, seed: int = 0) -> Path:
    """Draw the set as an ImageFolder (class folders of PNGs), once; returns the folder."""
    classes = [(family, k) for family in FAMILIES for k in range(CLASSES_PER_FAMILY)]
    rng = np.random.default_rng(seed)
    return data.draw_image_folder(
        folder, [f"{family}-{k + 1}" for family, k in classes], per_class, lambda c: draw(*classes[c], size, rng)
    )
