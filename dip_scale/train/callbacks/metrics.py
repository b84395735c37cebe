"""Per-step numbers: learning rate, gradient norm, images/s (overall and per device) and model FLOPs
utilisation from counted FLOPs. Rank 0 also appends every logged step to <run>/metrics.jsonl.

MFU = 3 x (forward FLOPs per image, counted by torch's FlopCounterMode on the real network) x images/s
/ (devices x peak). The factor 3 is forward + backward (twice the forward); the frozen REPA encoder and
the EMA update are not counted, so MFU is a lower bound of the hardware's use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.flop_counter import FlopCounterMode

from dip_scale.models.dip import build_model

# Dense bf16 peak per device (FLOP/s), by a substring of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def forward_flops(config, image_size: tuple[int, int]) -> int:
    """Forward FLOPs of one image, counted on a meta-device copy (no memory, no compute)."""
    with torch.device("meta"):
        net = build_model(config)
        x = torch.zeros(1, 3, *image_size)
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x, t, y)
    return counter.get_total_flops()


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class TrainMetrics(Callback):
    def __init__(self, net_config, image_size: tuple[int, int], global_batch: int, log_every: int,
                 run_dir: str | Path):
        self.flops_per_image = 3 * forward_flops(net_config, image_size)
        self.global_batch = global_batch
        self.log_every = log_every
        self.path = Path(run_dir) / "metrics.jsonl"
        self._t0: float | None = None
        self._steps = 0

    def fit_start(self, state: State, logger: Logger):
        self.peak = device_peak_flops()
        logger.log_hyperparameters({"train_flops_per_image": self.flops_per_image})
        self._t0 = time.perf_counter()
        self._steps = 0

    def batch_end(self, state: State, logger: Logger):
        self._steps += 1
        step = int(state.timestamp.batch)
        if step % self.log_every:
            return
        now = time.perf_counter()
        world = dist.get_world_size()
        img_s = self.global_batch * self._steps / max(now - self._t0, 1e-9)
        optimizer = state.optimizers[0]
        metrics = {
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/grad_norm": getattr(optimizer, "last_grad_norm", float("nan")),
            "throughput/images_per_sec": img_s,
            "throughput/device/images_per_sec": img_s / world,
            "throughput/train_flops_per_image": self.flops_per_image,
        }
        if self.peak:
            metrics["throughput/mfu"] = self.flops_per_image * img_s / (world * self.peak)
        logger.log_metrics(metrics)
        self._t0, self._steps = now, 0
        if dist.get_global_rank() == 0:
            record = {"step": step, "samples": int(state.timestamp.sample), **metrics,
                      **{k: float(v) for k, v in (state.total_loss_dict or {}).items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
