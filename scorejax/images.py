"""PNG pictures written with numpy and PIL only: image grids and 2-D plots.

`image_grid` tiles `[B, H, W, C]` images; `scatter_plot` draws 2-D samples over a
density heat map; `vector_field_plot` draws a score field as arrows. No plotting
library is needed.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1) -> np.ndarray:
  """Tiles images `[B, H, W, C]` with values in [0, 1] into a `uint8 [H', W', C]` grid.

  Args:
    images: the images, NHWC (C is 1 or 3), data in [0, 1] (clipped).
    nrow: images per row (default: about sqrt(B)).
    padding: pixels between images.
  """
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  count, height, width, channels = images.shape
  nrow = nrow or max(1, int(math.ceil(math.sqrt(count))))
  ncol = int(math.ceil(count / nrow))
  grid = np.ones(
      (ncol * (height + padding) + padding, nrow * (width + padding) + padding, channels),
      np.float32,
  )
  for index in range(count):
    row, col = divmod(index, nrow)
    top, left = padding + row * (height + padding), padding + col * (width + padding)
    grid[top:top + height, left:left + width] = images[index]
  return np.round(grid * 255).astype(np.uint8)


def save_image_grid(
    path: str | pathlib.Path, images: np.ndarray, nrow: int | None = None, scale: int = 1
) -> None:
  """Writes `image_grid(images)` as a PNG, each pixel enlarged `scale` times."""
  grid = image_grid(images, nrow)
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  mode = 'L' if grid.shape[-1] == 1 else 'RGB'
  Image.fromarray(grid[..., 0] if mode == 'L' else grid, mode).save(path)


def _to_pixels(points: np.ndarray, bounds: tuple[float, float, float, float], size: int):
  xmin, xmax, ymin, ymax = bounds
  u = (points[:, 0] - xmin) / (xmax - xmin) * (size - 1)
  v = (ymax - points[:, 1]) / (ymax - ymin) * (size - 1)
  return np.stack([u, v], axis=-1)


def density_image(log_density: np.ndarray) -> Image.Image:
  """A white-to-blue heat map of `log_density [H, W]` (row 0 at the top)."""
  density = np.exp(log_density - np.max(log_density))
  density = density / max(float(density.max()), 1e-12)
  white, blue = np.array([255, 255, 255.0]), np.array([70, 110, 200.0])
  rgb = white + density[..., None] ** 0.5 * (blue - white)
  return Image.fromarray(rgb.astype(np.uint8), 'RGB')


def scatter_plot(
    path: str | pathlib.Path,
    points: np.ndarray,
    bounds: tuple[float, float, float, float],
    log_density: np.ndarray | None = None,
    size: int = 400,
) -> None:
  """Draws 2-D `points [N, 2]` as dots, over a heat map of `log_density` if given.

  Args:
    path: PNG path.
    points: samples `[N, 2]`.
    bounds: `(xmin, xmax, ymin, ymax)` of the picture.
    log_density: `[G, G]` log-density on the grid of `grid_points(bounds, G)`.
    size: picture side in pixels.
  """
  if log_density is not None:
    picture = density_image(log_density).resize((size, size), Image.BILINEAR)
  else:
    picture = Image.new('RGB', (size, size), 'white')
  draw = ImageDraw.Draw(picture)
  for u, v in _to_pixels(np.asarray(points, np.float64), bounds, size):
    if 0 <= u < size and 0 <= v < size:
      draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=(200, 40, 30))
  picture.save(path)


def grid_points(bounds: tuple[float, float, float, float], resolution: int) -> np.ndarray:
  """`[resolution**2, 2]` points of a grid over `bounds`, row-major from the top-left."""
  xmin, xmax, ymin, ymax = bounds
  xs = np.linspace(xmin, xmax, resolution)
  ys = np.linspace(ymax, ymin, resolution)
  gx, gy = np.meshgrid(xs, ys)
  return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def vector_field_plot(
    path: str | pathlib.Path,
    points: np.ndarray,
    vectors: np.ndarray,
    bounds: tuple[float, float, float, float],
    log_density: np.ndarray | None = None,
    size: int = 400,
) -> None:
  """Draws `vectors [N, 2]` as arrows at `points [N, 2]` (e.g. a learned score field).

  Arrow lengths are scaled so the longest is about one grid cell, keeping directions.
  """
  if log_density is not None:
    picture = density_image(log_density).resize((size, size), Image.BILINEAR)
  else:
    picture = Image.new('RGB', (size, size), 'white')
  draw = ImageDraw.Draw(picture)
  points = np.asarray(points, np.float64)
  vectors = np.asarray(vectors, np.float64)
  start = _to_pixels(points, bounds, size)
  cell = size / max(2.0, math.sqrt(len(points)))
  norms = np.linalg.norm(vectors, axis=-1)
  scale = 0.9 * cell / max(float(np.percentile(norms, 95)), 1e-12)
  # Pixel rows grow downwards, hence the minus sign on the y component.
  delta = np.stack([vectors[:, 0], -vectors[:, 1]], axis=-1) * scale
  length = np.linalg.norm(delta, axis=-1, keepdims=True)
  delta = np.where(length > cell, delta * cell / np.maximum(length, 1e-12), delta)
  for (u, v), (du, dv) in zip(start, delta, strict=True):
    end = (u + du, v + dv)
    draw.line([(u, v), end], fill=(20, 20, 20), width=1)
    norm = math.hypot(du, dv)
    if norm > 2:
      ux, uy = du / norm, dv / norm
      head = min(4.0, norm / 2)
      left = (end[0] - head * (ux - 0.5 * uy), end[1] - head * (uy + 0.5 * ux))
      right = (end[0] - head * (ux + 0.5 * uy), end[1] - head * (uy - 0.5 * ux))
      draw.polygon([end, left, right], fill=(20, 20, 20))
  picture.save(path)


def line_plot(
    path: str | pathlib.Path,
    xs: np.ndarray,
    ys: np.ndarray,
    size: tuple[int, int] = (480, 240),
    log_y: bool = False,
) -> None:
  """Draws the curve `ys(xs)` (e.g. a loss curve) with its min / max labelled."""
  width, height = size
  xs = np.asarray(xs, np.float64)
  ys = np.asarray(ys, np.float64)
  keep = np.isfinite(ys) & (ys > 0 if log_y else True)
  xs, ys = xs[keep], ys[keep]
  picture = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(picture)
  margin = 40
  if len(xs) >= 2:
    values = np.log10(ys) if log_y else ys
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    u = margin + (xs - xs.min()) / max(float(np.ptp(xs)), 1e-12) * (width - 2 * margin)
    v = height - margin - (values - lo) / (hi - lo) * (height - 2 * margin)
    draw.line(list(zip(u, v, strict=True)), fill=(40, 80, 180), width=2)
    draw.text((4, margin - 12), f'{ys.max():.4g}', fill='black')
    draw.text((4, height - margin - 4), f'{ys.min():.4g}', fill='black')
    draw.text((margin, height - margin + 8), f'{xs.min():.0f}', fill='black')
    draw.text((width - margin - 30, height - margin + 8), f'{xs.max():.0f}', fill='black')
  draw.rectangle([margin, margin, width - margin, height - margin], outline=(120, 120, 120))
  picture.save(path)
