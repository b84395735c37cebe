"""The ADM centre crop equals guided-diffusion's `center_crop_arr` exactly, for every shape and mode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dip_scale.data.adm_crop import adm_center_crop


def guided_diffusion_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Verbatim from openai/guided-diffusion, guided_diffusion/image_datasets.py (after .convert("RGB"))."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,resolution", [
    (500, 375, 256),    # a typical ImageNet landscape image: one halving, then bicubic down
    (375, 500, 256),    # portrait
    (1024, 1024, 256),  # two halvings, exact
    (2000, 997, 64),    # odd sizes through several halvings
    (300, 200, 256),    # smaller than the target: bicubic up
    (256, 256, 256),    # already the target
    (513, 1031, 512),
])
def test_matches_guided_diffusion(width: int, height: int, resolution: int) -> None:
    image = _noise_image(width, height)
    ours = adm_center_crop(image, resolution)
    assert ours.shape == (resolution, resolution, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, guided_diffusion_center_crop_arr(image, resolution))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_modes_are_converted_to_rgb_first(mode: str) -> None:
    image = _noise_image(320, 240).convert(mode)
    ours = adm_center_crop(image, 64)
    assert ours.shape == (64, 64, 3)
    np.testing.assert_array_equal(ours, guided_diffusion_center_crop_arr(image.convert("RGB"), 64))


def test_crop_is_centred() -> None:
    # A wide image whose columns encode their x: the kept window must be the middle one.
    width, height = 64, 32
    columns = np.tile(np.arange(width, dtype=np.uint8)[None, :, None] * 4, (height, 1, 3))
    out = adm_center_crop(Image.fromarray(columns), 32)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(16, 48, dtype=np.uint8) * 4)


def test_rejects_bad_resolution() -> None:
    with pytest.raises(ValueError, match="resolution must be positive"):
        adm_center_crop(_noise_image(8, 8), 0)
