"""A procedural class-conditional image set: ten textures of distinct colours with pixel-scale detail.

Used by the demo, the tests and the CPU reproduction. What it must offer, and how:
- Classes a conditional model can tell apart: each class has its own texture family (stripes at three
  orientations, checkers, rings, dots, cross-hatch, zig-zag, spokes, waves) and its own colour pair.
- Fine detail: periods of 2.5 to 10 *pixels* at every resolution, so most of the signal sits inside a
  DiP patch, which is what the Patch Detailer Head has to recover; a DiT-only model blurs it.
- Variety within a class: random period, orientation jitter, phase, centre, colour jitter, a lighting
  ramp, and a disc at a random place and size in which the two colours swap.
- Determinism: each image is a pure function of (seed, index), at any resolution, so datasets of any
  size can be rebuilt anywhere and tests can compare pixels. Labels are `index % 10` (balanced).

    image, label = synthetic_image(index=7, resolution=64, seed=0)   # (64, 64, 3) uint8, 7
    SYNTHETIC_CLASSES[label]                                         # 'zigzag'

Written as MDS shards by `dip-prep write synthetic` (data_prep.synthetic.write_synthetic_shards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Textures. Each maps rotated, centred pixel coordinates (u, v), the period and a random generator to a
# foreground mask in [0, 1].
# ---------------------------------------------------------------------------------------------------

def _square_wave(t: np.ndarray) -> np.ndarray:
    """Soft square wave of period 1: sharp enough to carry detail, soft enough not to alias badly."""
    return 0.5 + 0.5 * np.tanh(2.5 * np.sin(2.0 * np.pi * t))


def _stripes(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _square_wave(u / period + rng.random())


def _checkers(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    a = np.sin(2.0 * np.pi * (u / period + rng.random()))
    b = np.sin(2.0 * np.pi * (v / period + rng.random()))
    return 0.5 + 0.5 * np.tanh(4.0 * a * b)


def _rings(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    radius = np.hypot(u, v)
    return _square_wave(radius / period + rng.random())


def _dots(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # Distance to the nearest point of a square lattice, in periods; a dot covers 0.3 periods of radius.
    du = (u / period + rng.random()) % 1.0 - 0.5
    dv = (v / period + rng.random()) % 1.0 - 0.5
    distance = np.hypot(du, dv)
    return 0.5 - 0.5 * np.tanh(12.0 * (distance - 0.3))


def _crosshatch(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    du = np.abs((u / period + rng.random()) % 1.0 - 0.5)
    dv = np.abs((v / period + rng.random()) % 1.0 - 0.5)
    # Lines one fifth of a period wide along both axes.
    return 0.5 + 0.5 * np.tanh(12.0 * (np.maximum(du, dv) - 0.4))


def _zigzag(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    wavelength = period * rng.uniform(2.0, 4.0)
    triangle = np.abs((u / wavelength + rng.random()) % 1.0 - 0.5) * 2.0  # in [0, 1]
    return _square_wave((v + triangle * wavelength * 0.5) / period + rng.random())


def _spokes(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    # Spokes `period` apart on a circle of radius 40 px: finer than that towards the centre, coarser out.
    count = round(2.0 * np.pi * 40.0 / period)
    angle = np.arctan2(v, u) / (2.0 * np.pi)
    return _square_wave(angle * count + rng.random())


def _waves(u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    wavelength = period * rng.uniform(3.0, 6.0)
    amplitude = period * rng.uniform(0.5, 1.5)
    offset = amplitude * np.sin(2.0 * np.pi * (v / wavelength + rng.random()))
    return _square_wave((u + offset) / period + rng.random())


@dataclass(frozen=True)
class _SyntheticClass:
    name: str
    texture: Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
    angle_deg: float          # base orientation of the texture
    period_px: tuple[float, float]  # range of the texture period, in pixels
    centred_at_random: bool   # rings and spokes are centred on a random point, others on the image centre
    foreground: tuple[int, int, int]
    background: tuple[int, int, int]


_CLASSES: tuple[_SyntheticClass, ...] = (
    _SyntheticClass("vertical_stripes", _stripes, 0.0, (2.5, 6.0), False, (200, 30, 40), (245, 235, 200)),
    _SyntheticClass("horizontal_stripes", _stripes, 90.0, (2.5, 6.0), False, (30, 60, 200), (250, 220, 40)),
    _SyntheticClass("diagonal_stripes", _stripes, 45.0, (3.5, 7.0), False, (20, 150, 60), (220, 60, 200)),
    _SyntheticClass("checkerboard", _checkers, 0.0, (3.0, 8.0), False, (20, 20, 20), (240, 240, 240)),
    _SyntheticClass("concentric_rings", _rings, 0.0, (3.0, 7.0), True, (250, 140, 0), (20, 30, 90)),
    _SyntheticClass("polka_dots", _dots, 0.0, (5.0, 10.0), False, (250, 250, 250), (110, 40, 160)),
    _SyntheticClass("crosshatch", _crosshatch, 0.0, (5.0, 10.0), False, (0, 200, 220), (50, 50, 55)),
    _SyntheticClass("zigzag", _zigzag, 0.0, (3.0, 6.0), False, (240, 200, 0), (100, 60, 20)),
    _SyntheticClass("radial_spokes", _spokes, 0.0, (3.0, 6.0), True, (250, 120, 170), (0, 120, 120)),
    _SyntheticClass("wavy_stripes", _waves, 0.0, (3.0, 6.0), False, (170, 230, 40), (110, 20, 30)),
)

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(c.name for c in _CLASSES)
"""Class names; the label of a synthetic image indexes this tuple."""


# ---------------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------------

def synthetic_label(index: int) -> int:
    """The label of image `index` (independent of seed and resolution)."""
    return index % len(_CLASSES)


def synthetic_image(index: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Image `index` of the synthetic set: a `(resolution, resolution, 3)` uint8 array and its label."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    label = synthetic_label(index)
    spec = _CLASSES[label]
    rng = np.random.default_rng((seed, index))

    # Pixel-centre coordinates relative to the texture centre, rotated by the class angle plus jitter.
    half = resolution / 2.0
    centre = rng.uniform(-half, half, size=2) if spec.centred_at_random else np.zeros(2)
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5 - half  # (R, R) each
    x, y = x - centre[0], y - centre[1]
    angle = np.deg2rad(spec.angle_deg + rng.uniform(-10.0, 10.0))
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    period = rng.uniform(*spec.period_px)
    mask = spec.texture(u, v, period, rng)  # (R, R) in [0, 1]

    # A disc at a random place and size in which foreground and background swap.
    disc_centre = rng.uniform(-half, half, size=2)
    disc_radius = rng.uniform(0.15, 0.35) * resolution
    xs, ys = x + centre[0], y + centre[1]
    inside = np.hypot(xs - disc_centre[0], ys - disc_centre[1]) < disc_radius
    mask = np.where(inside, 1.0 - mask, mask)

    jitter = rng.uniform(-15.0, 15.0, size=(2, 3))
    foreground = np.clip(np.array(spec.foreground) + jitter[0], 0, 255).astype(np.float32)
    background = np.clip(np.array(spec.background) + jitter[1], 0, 255).astype(np.float32)
    image = background + mask[..., None] * (foreground - background)  # (R, R, 3)

    # Low-frequency lighting ramp in a random direction, +-12 %.
    ramp_angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(ramp_angle) * xs + np.sin(ramp_angle) * ys) / resolution  # in [-0.71, 0.71]
    image = image * (1.0 + 0.17 * ramp[..., None])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
