"""Every N steps, a grid of samples from the EMA weights: <run>/samples/step-<N>.png, and to wandb.

Every rank samples (a sharded EMA gathers its weights collectively); rank 0 writes the file."""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from PIL import Image

from dip_scale.diffusion.sampler import SamplerConfig, sample, sample_noise, to_uint8


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 NHWC -> one PIL image, `columns` images a row."""
    n, h, w, c = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.zeros(rows * h, columns * w, c, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return Image.fromarray(canvas.numpy())


class SampleGrid(Callback):
    def __init__(self, model, every: int, classes: list[int], image_size: tuple[int, int], sampler: SamplerConfig,
                 run_dir: str | Path, per_class: int = 2, seed: int = 0):
        self.model = model
        self.every = every
        self.classes = classes
        self.image_size = tuple(image_size)
        self.sampler = sampler
        self.out = Path(run_dir) / "samples"
        self.per_class = per_class
        self.seed = seed

    def batch_end(self, state: State, logger: Logger):
        step = int(state.timestamp.batch)
        if self.every and step % self.every == 0:
            self.write(state, logger, step)

    def write(self, state: State, logger: Logger, step: int) -> Path:
        device = next(self.model.net.parameters()).device
        labels = torch.tensor([c for c in self.classes for _ in range(self.per_class)], device=device)
        noise = sample_noise(range(len(labels)), (3, *self.image_size), self.seed, device=device)
        amp = torch.bfloat16 if device.type == "cuda" else None
        with self.model.ema_network() as net:
            images = to_uint8(sample(net, noise, labels, self.sampler, net.config.num_classes, amp)).cpu()
        # Column-major by class: each column one class.
        grid = images.reshape(len(self.classes), self.per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
        path = self.out / f"step-{step:09d}.png"
        if dist.get_global_rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            image_grid(grid, columns=len(self.classes)).save(path)
            logger.log_images(grid.permute(0, 3, 1, 2).float() / 255, name="samples/ema", step=step)
        return path
