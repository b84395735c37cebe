"""One evaluation: generate N samples over all ranks, take their Inception features where they are made,
gather the features (and, on request, the images) to rank 0, and compute the metrics there.

Used by `dip-eval` and by the in-training ScheduledEval callback. With a classifier of the synthetic classes
(eval/classifier.py) the same samples also get their class accuracy.

    settings = EvalSettings(num_samples=50_000, batch_size=64, seed=0, sampler=SamplerConfig(...))
    out = evaluate_model(model, inception, reference, settings, device="cuda", image_size=(256, 256))
    out.metrics  # on rank 0: {"fid": ..., "sfid": ..., "inception_score": ..., "precision": ..., ...}
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.eval.classifier import SyntheticClassifier, scores
from dip_scale.eval.generate import Plan, broadcast_object, check_num_samples, gather_rows, generate, world
from dip_scale.eval.inception import FEATURE_DIMS, InceptionFeatures
from dip_scale.eval.metrics import compute_metrics
from dip_scale.eval.stats import ReferenceStats

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class EvalSettings:
    num_samples: int = 50_000
    """N; must be a multiple of the number of classes (N / num_classes samples per class)."""
    batch_size: int = 64
    """Samples per forward on each rank. Images are identical for any number of ranks at a fixed value."""
    seed: int = 0
    """Sample i uses the noise of (seed, i)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    precision: str = "auto"
    """auto (bf16 autocast on a GPU, fp32 on CPU), bf16 or fp32."""
    compile_model: bool = False
    """torch.compile the network (worth it for 50K samples on a GPU)."""
    keep_images: bool = False
    """Gather the uint8 images to rank 0 (for an ADM-compatible .npz)."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size <= 0:
            raise ValueError(f"the per-rank batch size must be positive, got {self.batch_size}")

    @property
    def autocast_dtype(self):
        return {"auto": "auto", "bf16": torch.bfloat16, "fp32": None}[self.precision]

    def describe(self) -> dict:
        d = asdict(self)
        d["sampler"]["guidance_interval"] = list(self.sampler.guidance_interval)
        d.pop("keep_images")
        return d


@dataclass
class EvalOutput:
    metrics: dict | None  # rank 0 only
    images: np.ndarray | None  # (N, H, W, 3) uint8, rank 0 and keep_images only
    labels: np.ndarray | None  # (N,) int64, rank 0 and keep_images only
    generation_s: float  # sampling + Inception features on all ranks, until rank 0 holds every feature
    total_s: float
    images_per_s: float  # N / generation_s: the job's throughput


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_model(model: nn.Module, inception: InceptionFeatures, reference: ReferenceStats | None,
                   settings: EvalSettings, *, device: str | torch.device, image_size: tuple[int, int],
                   progress: bool = True, classifier: SyntheticClassifier | None = None) -> EvalOutput:
    """Collective: call on every rank with the same settings. `reference` is needed on rank 0 only; with
    `classifier` (on every rank) the metrics add class_accuracy, texture_accuracy and colour_accuracy."""
    t0 = time.perf_counter()
    device = torch.device(device)
    rank, world_size = world()
    check_num_samples(settings.num_samples, model.config.num_classes)
    if not broadcast_object(reference is not None):  # all ranks stop, or none
        raise ValueError("rank 0 needs the reference statistics to compute the metrics")
    was_training = model.training
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_DIMS}
    images, labels = [], []
    judged: list[torch.Tensor] = []  # (b, 3): label, texture class, colour class
    try:
        for batch in generate(model, num_samples=settings.num_samples, seed=settings.seed, sampler=settings.sampler,
                              batch_size=settings.batch_size, device=device, image_size=image_size,
                              autocast_dtype=settings.autocast_dtype,
                              compile_model=settings.compile_model, progress=progress):
            f = inception(batch.images.permute(0, 3, 1, 2))  # (b, 3, H, W) uint8
            for k in FEATURE_DIMS:
                feats[k].append(f[k].to(device))
            if classifier is not None:
                texture, colour = classifier.predict(batch.images.permute(0, 3, 1, 2))
                judged.append(torch.stack([batch.labels.cpu(), texture.cpu(), colour.cpu()], dim=1))
            if settings.keep_images:
                images.append(batch.images.cpu())
                labels.append(batch.labels)
    finally:
        model.train(was_training)
    counts = Plan(settings.num_samples, settings.batch_size, world_size).counts()
    gathered = {}
    for k, dim in FEATURE_DIMS.items():
        local = torch.cat(feats[k]) if feats[k] else torch.zeros(0, dim, device=device)
        gathered[k] = gather_rows(local, counts)
    if classifier is not None:
        local = torch.cat(judged) if judged else torch.zeros(0, 3, dtype=torch.long)
        judged_all = gather_rows(local.to(device), counts)
    _sync(device)
    generation_s = time.perf_counter() - t0
    all_images = all_labels = None
    if settings.keep_images:
        h, w = image_size
        local = torch.cat(images) if images else torch.zeros(0, h, w, 3, dtype=torch.uint8)
        all_images = gather_rows(local, counts)
        all_labels = gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), counts)
        if rank == 0:
            all_images, all_labels = all_images.numpy(), all_labels.numpy()

    metrics = None
    if rank == 0:
        metrics = compute_metrics(gathered, reference, device=device)
        metrics["num_samples"] = int(gathered["pool"].shape[0])
        if classifier is not None:
            metrics.update(scores(judged_all[:, 1], judged_all[:, 2], judged_all[:, 0]))
    return EvalOutput(metrics, all_images, all_labels, generation_s, time.perf_counter() - t0,
                      settings.num_samples / max(generation_s, 1e-9))
