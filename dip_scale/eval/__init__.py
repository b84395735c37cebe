"""Evaluation with the ADM protocol: distributed class-balanced sampling, torch-fidelity's Inception,
reference statistics, FID / sFID / Inception Score / precision-recall, and the run's results table.

    inception = InceptionFeatures()                                   # offline weights, see inception.py
    reference = load_reference("VIRTUAL_imagenet256_labeled.npz", inception)
    out = evaluate_model(model, inception, reference, EvalSettings(num_samples=50_000), device="cuda",
                         image_size=(256, 256))
    out.metrics["fid"]

Files: generate.py (who samples what), inception.py (the network, offline), stats.py (references),
metrics.py (the numbers), evaluate.py (one evaluation), results.py (JSON, table, plot, wandb), cli.py
(`dip-eval`). The in-training schedule is dip_scale.train.callbacks.fid_eval.

Names are imported on first use: `import dip_scale.eval.generate` does not pay for torch-fidelity.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalOutput": "evaluate", "EvalSettings": "evaluate", "evaluate_model": "evaluate",
    "Plan": "generate", "class_labels": "generate", "gather_rows": "generate", "generate": "generate",
    "InceptionFeatures": "inception", "find_weights": "inception",
    "compute_metrics": "metrics", "frechet_distance": "metrics", "inception_score": "metrics",
    "mean_cov": "metrics", "precision_recall": "metrics",
    "append_to_run": "results", "make_record": "results", "save_samples_npz": "results", "write_json": "results",
    "ReferenceStats": "stats", "image_stats": "stats", "load_reference": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dip_scale.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dip_scale.eval.{_EXPORTS[name]}"), name)
