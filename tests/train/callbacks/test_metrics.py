"""The metric line of a job log, and the peak FLOP/s that MFU divides by (by the exact device name)."""

from __future__ import annotations

import pytest

from dip_scale.train.callbacks.metrics import console_line, device_peak_flops, eta


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_by_exact_device_name(name, peak, monkeypatch):
    monkeypatch.delenv("DIP_PEAK_FLOPS", raising=False)
    assert device_peak_flops(name) == peak


def test_peak_from_the_environment_for_other_devices(monkeypatch):
    monkeypatch.setenv("DIP_PEAK_FLOPS", "1.5e14")
    assert device_peak_flops("NVIDIA GeForce RTX 4090") == 1.5e14


def test_eta():
    assert eta(59) == "00:00:59" and eta(3 * 86400 + 3725) == "3d 01:02:05" and eta(-5) == "00:00:00"


def test_one_readable_line_per_report():
    metrics = {"train/lr": 1e-4, "train/grad_norm": 0.4123, "throughput/images_per_sec": 401.24,
               "throughput/mfu": 0.31}
    losses = {"loss/train/total": 0.34121, "loss/train/flow": 0.29812, "loss/train/repa": 0.04309}
    line = console_line(1200, 800800, metrics, losses, seconds_per_step=0.16)
    assert line.startswith("step 1200/800800 | loss 0.3412 (flow 0.2981, repa 0.0431) | lr 1.0e-04 | grad 0.412 | "
                           "401.2 img/s | MFU 31.0% | ETA 1d 11:32:16")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
