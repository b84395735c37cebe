"""The built-in procedural dataset (`dip_scale.data.synthetic`) as a source: any count, any resolution.

Images are rendered at the target resolution directly (no crop): the textures are defined in pixels,
so resizing would only blur the detail they exist to provide.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.sources.base import Item, ItemLoader, Problem, Source
from dip_scale.data.synthetic import SYNTHETIC_CLASSES, synthetic_image, synthetic_label


class SyntheticLoader(ItemLoader):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def load(self, item: Item, resolution: int) -> np.ndarray:
        image, _ = synthetic_image(int(item.key), resolution, self.seed)
        return image


class SyntheticSource(Source):
    """Images 0 .. num_images - 1 of the synthetic set for `seed`."""

    kind = "synthetic"

    def __init__(self, num_images: int, seed: int = 0) -> None:
        if num_images <= 0:
            raise PrepError(f"--num-images must be positive, got {num_images}")
        if seed < 0:
            raise PrepError(f"--seed must be non-negative, got {seed}")
        self._num_images = num_images
        self.seed = seed
        self.class_names = list(SYNTHETIC_CLASSES)
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    @property
    def num_items(self) -> int:
        return self._num_images

    def items(self, start: int, stop: int) -> list[Item]:
        return [Item(str(i), synthetic_label(i)) for i in range(start, min(stop, self._num_images))]

    def loader(self) -> SyntheticLoader:
        return SyntheticLoader(self.seed)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_items": self._num_images, "num_classes": len(self.class_names),
                "seed": self.seed}
