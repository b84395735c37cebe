"""A picture of samples: images laid out in a grid, one class a column (dip-sample, the training run's sample
grids, the demo)."""

from __future__ import annotations

import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 NHWC -> one PIL image, `columns` images a row."""
    n, h, w, c = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(rows * h, columns * w, c, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return Image.fromarray(canvas.numpy())


def class_columns(images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images ordered class by class (per_class of each, in turn) -> ordered row by row with one class a column."""
    per_class = images.shape[0] // num_classes
    return images.reshape(num_classes, per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)


def default_classes(num_classes: int) -> list[int]:
    """The classes of a sample grid when none are given: 8 spread evenly over the labels."""
    return [round(i * (num_classes - 1) / 7) for i in range(8)]
