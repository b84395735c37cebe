"""The ADM centre crop: the one preprocessing step between a source image and a training sample.

DiP (section 3 of the paper's recipe) follows ADM (Dhariwal & Nichol 2021, `center_crop_arr` in
guided-diffusion): halve the image with a box filter while its short side is at least twice the target,
resize with bicubic so the short side equals the target, then cut the centre square. No flip. The
reference statistics used for FID were made with exactly this crop, so it must not be approximated
(e.g. by JPEG draft-mode decoding or a single antialiased resize).

    arr = adm_center_crop(Image.open(path), 256)   # (256, 256, 3) uint8
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Convert `image` to RGB and ADM-centre-crop it to a `(resolution, resolution, 3)` uint8 array."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    # ADM converts before resizing; palette, greyscale, CMYK and RGBA sources all end up as RGB.
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Box-filter halving first: cheap, and it keeps the final bicubic step's support small, as in ADM.
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)  # (H, W, 3), short side == resolution
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return np.ascontiguousarray(array[top:top + resolution, left:left + resolution])
