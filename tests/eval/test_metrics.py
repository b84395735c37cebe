"""The numbers: FID against an independent float64 numpy reference, FID of a set with itself, two
distributions apart, the Inception Score as ADM computes it, and precision/recall against a brute-force
k-NN manifold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dip_scale.eval.metrics import compute_metrics, frechet_distance, inception_score, mean_cov, precision_recall
from dip_scale.eval.stats import ReferenceStats
from tests.eval.images import blobs


@pytest.fixture(scope="module")
def two_sets(inception):
    """Inception features of two synthetic distributions: the same blobs, and brighter ones."""
    def feats(seed, bright):
        return inception(torch.from_numpy(blobs(12, 32, seed, bright)).permute(0, 3, 1, 2).contiguous())

    return feats(0, 0.0), feats(1, 0.15)


def reference_fid(mu1, sigma1, mu2, sigma2) -> float:
    """float64 FID by another route than torch-fidelity's eigenvalues of S1 S2: tr (S1 S2)^(1/2) equals
    tr (A S2 A)^(1/2) with A = S1^(1/2), whose eigenvalues come from symmetric solvers (robust for the
    rank-deficient covariances of a few images, where ADM's scipy sqrtm warns and is slow)."""
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(a @ sigma2 @ a)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def test_fid_matches_a_float64_reference_is_zero_on_itself_and_separates_distributions(two_sets):
    a, b = two_sets
    mu_a, sigma_a = mean_cov(a["pool"])
    mu_b, sigma_b = mean_cov(b["pool"])
    np.testing.assert_allclose(sigma_a, np.cov(a["pool"].double().numpy(), rowvar=False), rtol=1e-12)

    # the whole metrics path on generated features `a` against reference statistics of `b`
    m = compute_metrics(a, ReferenceStats(mu_b, sigma_b))
    fid = m["fid"]
    assert fid == pytest.approx(reference_fid(mu_a, sigma_a, mu_b, sigma_b), rel=1e-6)

    itself = frechet_distance(mu_a, sigma_a, mu_a, sigma_a)
    scale = np.trace(sigma_a)
    assert abs(itself) < 1e-5 * scale  # rank-deficient covariances leave ~1e-6 of eigenvalue noise
    assert fid > 0.5 * scale and fid > 1e4 * abs(itself), (fid, itself, scale)

    # what the reference cannot support is None, with the reason
    assert m["inception_score"] >= 1.0
    assert m["sfid"] is None and m["precision"] is None and m["recall"] is None
    assert any("sFID" in n for n in m["notes"]) and any("precision/recall" in n for n in m["notes"])


def test_fid_shape_errors():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"sigma2 has shape \(3, 3\), expected \(4, 4\)"):
        frechet_distance(mu, sigma, mu, np.eye(3))


def test_inception_score_as_adm():
    logits = torch.randn(15, 1008, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, split_size=5)
    p = torch.softmax(logits.double(), 1).numpy()
    scores = []
    for i in range(0, 15, 5):  # ADM: consecutive splits of split_size, no shuffling
        part = p[i:i + 5]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


def brute_force_pr(samples: np.ndarray, reference: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(f):
        d = np.linalg.norm(f[:, None] - f[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    d = np.linalg.norm(samples[:, None] - reference[None], axis=-1)  # (S, R)
    precision = np.mean((d <= radii(reference)[None]).any(1))
    recall = np.mean((d.T <= radii(samples)[None]).any(1))
    return precision, recall


def test_precision_recall_is_the_k3_manifold_estimate():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(60, 16, generator=g)
    samples = torch.randn(40, 16, generator=g) * 1.4 + 0.5
    p, r = precision_recall(samples, reference, batch_size=7)  # small batches: the batched path
    bp, br = brute_force_pr(samples.double().numpy(), reference.double().numpy())
    assert (p, r) == pytest.approx((bp, br), abs=1e-6)  # fractions of 40 and 60; torch-fidelity averages in float32
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(reference, reference) == (1.0, 1.0)
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        precision_recall(samples[:3], reference)
