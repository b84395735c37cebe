"""Every N steps, a grid of samples from the EMA weights: <run>/samples/step-<N>.png, and to wandb.

Every rank samples (a sharded EMA gathers its weights collectively); rank 0 writes the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.eval.generate import default_autocast, sample_images
from dip_scale.eval.grid import class_columns, image_grid


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
        labels = torch.tensor([c for c in self.classes for _ in range(self.per_class)])
        with self.model.ema_network() as net:
            images = sample_images(net, range(len(labels)), labels, seed=self.seed, sampler=self.sampler,
                                   image_size=self.image_size, device=device, autocast_dtype=default_autocast(device),
                                   null_class=net.config.num_classes).cpu()
        grid = class_columns(images, len(self.classes))
        path = self.out / f"step-{step:09d}.png"
        if dist.get_global_rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            picture = image_grid(grid, columns=len(self.classes))
            picture.save(path)
            # One picture, as on disk (one class a column), rather than a table of separate images.
            logger.log_images(np.asarray(picture), name="samples/ema", channels_last=True, step=step, use_table=False)
        return path
