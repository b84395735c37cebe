"""FID, sFID, Inception Score and precision/recall, computed as the ADM evaluator does, via torch-fidelity.

- FID: Frechet distance of the pool_3 Gaussians, torch-fidelity's `fid_statistics_to_metric` on float64
  statistics (mean and np.cov-style unbiased covariance of the generated features).
- sFID: the same distance on the spatial mixed_6/conv features (first 7 channels, 2023-d), against the
  reference's mu_s/sigma_s.
- Inception Score: torch-fidelity's `isc_features_to_metric` on the bias-free logits, in consecutive,
  unshuffled splits of 5,000 samples (ADM: 10 splits for 50,000).
- Precision/recall: the k-NN manifold estimate (Kynkaanniemi et al. 2019) with k = 3 on pool features,
  precision = share of samples inside the reference manifold, recall = share of reference images inside
  the sample manifold; torch-fidelity's `prc_features_to_metric`, batched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from dip_scale.eval.stats import ReferenceStats

IS_SPLIT_SIZE = 5000
PR_NEIGHBORHOOD = 3


def mean_cov(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, by torch-fidelity."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                           ("sigma2", sigma2, (d, d))):
        if a.shape != shape:
            raise ValueError(f"Frechet distance: {name} has shape {a.shape}, expected {shape}")
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                          verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over consecutive splits of `split_size` samples of the bias-free Inception logits."""
    splits = max(1, math.ceil(logits.shape[0] / split_size))
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = PR_NEIGHBORHOOD,
                     batch_size: int = 10_000) -> tuple[float, float]:
    """(precision, recall) of sample pool features against reference pool features."""
    for name, f in (("samples", samples), ("reference", reference)):
        if f.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name}, got {f.shape[0]}")
    if samples.shape[1] != reference.shape[1]:
        raise ValueError(f"feature sizes differ: samples {samples.shape[1]}, reference {reference.shape[1]}")
    # torch-fidelity's convention: features_1 are generated, features_2 are real.
    out = prc_features_to_metric(samples.float(), reference.float(), prc_neighborhood=k,
                                 prc_batch_size=batch_size, save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def compute_metrics(features: dict[str, torch.Tensor], reference: ReferenceStats,
                    device: str | torch.device = "cpu") -> dict:
    """All metrics of generated features ({"pool", "logits", "spatial"}, N rows each) against `reference`.

    Metrics the reference cannot support (no mu_s/sigma_s, no pool features) are None, with the reason
    under "notes"."""
    notes = []
    mu, sigma = mean_cov(features["pool"])
    out: dict = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if reference.mu_s is not None:
        mu_s, sigma_s = mean_cov(features["spatial"])
        out["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    else:
        out["sfid"] = None
        notes.append("sFID: the reference has no mu_s/sigma_s")
    out["inception_score"], out["inception_score_std"] = inception_score(features["logits"])
    n_ref = 0 if reference.pool is None else len(reference.pool)
    if n_ref > PR_NEIGHBORHOOD and features["pool"].shape[0] > PR_NEIGHBORHOOD:
        ref_pool = torch.from_numpy(np.asarray(reference.pool, np.float32)).to(device)
        out["precision"], out["recall"] = precision_recall(features["pool"].to(device), ref_pool)
    else:
        out["precision"] = out["recall"] = None
        notes.append(f"precision/recall: needs more than {PR_NEIGHBORHOOD} reference and sample features "
                     f"(reference has {n_ref}, samples {features['pool'].shape[0]})")
    if notes:
        out["notes"] = notes
    return out
