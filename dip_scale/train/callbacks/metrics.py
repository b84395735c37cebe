"""Per-step numbers: learning rate, gradient norm, images/s (overall and per device) and model FLOPs
utilisation from counted FLOPs, every `log_every` steps. Rank 0 also appends them to <run>/metrics.jsonl and
prints one line for the job log (a Slurm log is a file: one line per report, no progress-bar redraws):

    step 1200/800800 | loss 0.3412 (flow 0.2981, repa 0.0431) | lr 1.0e-04 | grad 0.412 | 401.2 img/s |
        MFU 31.0% | ETA 1d 07:12:09 | GPU mem 54.8 GiB

MFU = 3 x (forward FLOPs per image, counted by torch's FlopCounterMode on the real network) x images/s
/ (devices x peak). The factor 3 is forward + backward (twice the forward); the frozen REPA encoder and
the EMA update are not counted, so MFU is a lower bound of the hardware's use.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.flop_counter import FlopCounterMode

from dip_scale.models.dip import build_model

# Dense bf16 peak per device (FLOP/s), by the exact name torch.cuda.get_device_name() reports: an H100 PCIe or
# NVL is not an H100 SXM. Other devices: set DIP_PEAK_FLOPS (FLOP/s) to get MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12,
}


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


def device_peak_flops(name: str | None = None) -> float | None:
    """The device's dense bf16 peak: $DIP_PEAK_FLOPS, else PEAK_FLOPS by exact name; None on CPU or unknown."""
    if os.environ.get("DIP_PEAK_FLOPS"):
        return float(os.environ["DIP_PEAK_FLOPS"])
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return PEAK_FLOPS.get(name.strip())


def eta(seconds: float) -> str:
    """1d 07:12:09 / 07:12:09."""
    days, rest = divmod(int(max(seconds, 0)), 86400)
    text = str(timedelta(seconds=rest)).rjust(8, "0")
    return f"{days}d {text}" if days else text


def console_line(step: int, max_steps: int, metrics: dict, losses: dict, seconds_per_step: float) -> str:
    loss = losses.get("loss/train/total")
    parts = [f"step {step}/{max_steps}"]
    if loss is not None:
        terms = [f"{k.rsplit('/', 1)[-1]} {v:.4f}" for k, v in losses.items() if k != "loss/train/total"]
        parts.append(f"loss {loss:.4f}" + (f" ({', '.join(terms)})" if len(terms) > 1 else ""))
    parts += [f"lr {metrics['train/lr']:.1e}", f"grad {metrics['train/grad_norm']:.3f}",
              f"{metrics['throughput/images_per_sec']:.1f} img/s"]
    if "throughput/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['throughput/mfu']:.1f}%")
    parts.append(f"ETA {eta((max_steps - step) * seconds_per_step)}")
    if torch.cuda.is_available():
        parts.append(f"GPU mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return " | ".join(parts)


class TrainMetrics(Callback):
    def __init__(self, net_config, image_size: tuple[int, int], global_batch: int, log_every: int,
                 run_dir: str | Path, max_steps: int):
        self.flops_per_image = 3 * forward_flops(net_config, image_size)
        self.global_batch = global_batch
        self.log_every = log_every
        self.max_steps = max_steps
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
        # At the logging step of this update's loss: Composer logs loss/train/* while the update runs, at the
        # number of updates before it; the console line and metrics.jsonl count the update itself (1-based).
        logger.log_metrics(metrics, step=step - 1)
        seconds_per_step = (now - self._t0) / max(self._steps, 1)
        self._t0, self._steps = now, 0
        if dist.get_global_rank() == 0:
            losses = {k: float(v) for k, v in (state.total_loss_dict or {}).items()}
            record = {"step": step, "samples": int(state.timestamp.sample), **metrics, **losses}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(console_line(step, self.max_steps, metrics, losses, seconds_per_step), flush=True)
