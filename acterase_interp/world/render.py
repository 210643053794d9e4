"""Procedural 32x32 renders of a ConceptWorld scene.

Each image is drawn on a 4x supersampled grid and box-filtered down, so edges are anti-aliased.
Background patterns are at least 1.5 latent cells coarse (stripes, dots and grid lines 8 px apart,
checker squares 6 px, zigzag teeth 12 px wide): finer textures fall below what an 8x8 latent can carry.
"""

from __future__ import annotations

import numpy as np

from .factors import RGB, Scene

SIZE = 32
_SS = 4  # supersampling factor
_GRID = (np.arange(SIZE * _SS) + 0.5) / _SS  # pixel-centre coordinates in output pixels


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    x = _GRID[None, :] - cx
    y = _GRID[:, None] - cy
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        h = 0.8 * r
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "triangle":  # apex up, equilateral, inscribed in radius r
        base_y = 0.5 * r
        return (y <= base_y) & (np.sqrt(3) * x - y <= r) & (-np.sqrt(3) * x - y <= r)
    if shape == "star":  # five points, apex up; radius interpolated between outer and inner vertices
        theta = np.mod(np.arctan2(x, -y), 2 * np.pi / 5) / (2 * np.pi / 5)  # 0..1 within one point
        tri = np.abs(theta - 0.5) * 2  # 1 at a point, 0 between points
        radius = 0.42 * r + (r - 0.42 * r) * tri
        return x**2 + y**2 <= radius**2
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    if shape == "heart":  # (X^2 + Y^2 - 1)^3 <= X^2 Y^3, point down
        X, Y = 1.15 * x / r, -1.15 * y / r + 0.15
        return (X**2 + Y**2 - 1) ** 3 <= X**2 * Y**3
    if shape == "moon":  # a crescent opening to the upper right
        return (x**2 + y**2 <= r**2) & ((x - 0.5 * r) ** 2 + (y + 0.3 * r) ** 2 > (0.72 * r) ** 2)
    if shape == "diamond":  # a rhombus, taller than wide: unlike the square, no edge is axis-aligned
        return np.abs(x) / (0.75 * r) + np.abs(y) / r <= 1
    if shape == "arrow":  # pointing right: a shaft and a triangular head
        shaft = (x >= -r) & (x < 0) & (np.abs(y) <= 0.28 * r)
        head = (x >= 0) & (x <= r) & (np.abs(y) <= 0.9 * (r - x))
        return shaft | head
    if shape == "ring":  # an annulus: a circle with a hole of half its radius
        d2 = x**2 + y**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(pattern: str, rng: np.random.Generator) -> np.ndarray:
    light = rng.uniform(0.75, 0.9)
    dark = rng.uniform(0.3, 0.45)
    x = _GRID[None, :] + rng.uniform(0, 8)
    y = _GRID[:, None] + rng.uniform(0, 8)
    if pattern == "plain":
        on = np.zeros((SIZE * _SS, SIZE * _SS), bool)
    elif pattern == "stripes":
        coord = x if rng.random() < 0.5 else y
        on = np.broadcast_to(np.mod(coord, 8.0) < 4.0, (SIZE * _SS, SIZE * _SS))
    elif pattern == "dots":
        on = (np.mod(x, 8.0) - 4.0) ** 2 + (np.mod(y, 8.0) - 4.0) ** 2 <= 2.0**2
    elif pattern == "checkerboard":
        on = (np.floor(x / 6.0) + np.floor(y / 6.0)) % 2 == 0
    elif pattern == "zigzag":  # stripes 8 px apart bent into teeth 12 px wide, horizontal or vertical
        along, across = (x, y) if rng.random() < 0.5 else (y, x)
        on = np.mod(across + 0.75 * np.abs(np.mod(along, 12.0) - 6.0), 8.0) < 4.0
    elif pattern == "grid":  # lines 2 px wide, 8 px apart, both ways
        on = (np.mod(x, 8.0) < 2.0) | (np.mod(y, 8.0) < 2.0)
    else:
        raise ValueError(f"unknown background {pattern!r}")
    return np.where(on, dark, light)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """An RGB image of `scene` as float32 in [0, 1], shape (32, 32, 3); position, size and
    pattern phase come from `rng`."""
    r = rng.uniform(7.0, 10.0)
    cx, cy = rng.uniform(r + 1.0, SIZE - r - 1.0, size=2)
    gray = _background(scene.background, rng)
    img = np.repeat(gray[..., None], 3, axis=-1)
    mask = _shape_mask(scene.shape, cx, cy, r)
    img[mask] = np.asarray(RGB[scene.color]) + rng.uniform(-0.05, 0.05, size=3)
    img = img.reshape(SIZE, _SS, SIZE, _SS, 3).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_batch(scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    """Renders of `scenes` as float32 (N, 3, 32, 32) in [-1, 1], the VAE's input convention."""
    imgs = np.stack([render(s, rng) for s in scenes])
    return (imgs.transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)
