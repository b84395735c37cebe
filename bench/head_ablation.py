"""The paper's ablation of head designs and head placements (FID at 160 epochs with CFG: DiT-only 5.28, + MLP
head 6.92, + intra-patch attention 2.98, + coordinate MLP 2.20, + conv U-Net 2.16; U-Net after the last block
2.16, mid-network 2.24, both 3.53), rerun at CPU scale on the Figure-3 protocol of bench/fig3_detail.py.

    python bench/head_ablation.py                     # defaults: about 10 minutes on two CPU cores
    python bench/head_ablation.py --jobs 1 --threads 2      # one model at a time, two threads
    python bench/head_ablation.py --hidden-size 768 --num-heads 12 --head-width 32 --steps 1500   # fair: 2 h 13 min
    python bench/head_ablation.py --models DiT-only,unet --json out.json
    python bench/head_ablation.py ... --keep runs/ablation   # a stopped run continues where it was

Every model is trained by fig3_detail.train: the same synthetic images (64 x 64, patch 16), the same
batches, flow-matching draws and seed, AdamW, float32; they share the trunk (depth, width, heads) and
differ in the head and where it sits (docs/dip.md describes each):
  DiT-only         the standard DiT final layer (detailer_head none)
  DiT-only deeper  DiT-only with blocks added until it has at least DiP's parameters: the paper's own
                   equal-size check (its DiT-only models of 772M and 776M against DiP's 631M)
  mlp, attention, coord_mlp, unet
                   a head after the last block; unet is DiP. Heads are sized by --head-width as make_head
                   scales them (the paper gives no sizes for its ablation heads), so they are not of equal
                   size: the table prints each model's parameters
  unet mid, unet both
                   the U-Net head after block depth // 2 with its output fed back into the trunk (and the
                   DiT final layer at the end), or a head at both places

Columns: parameters; loss (mean flow loss of the last 10% of steps); PSNR and HF error of the one-step
prediction at each --times t (fig3_detail.evaluate: x_hat = x_t + (1 - t) v_hat on held-out images with
fixed noise; HF error = FFT energy of x_hat - x above --hf-radius over that of x); FID of --fid-samples
samples (Euler, --sample-steps, --guidance-scale on the paper's interval) against as many held-out images;
the paper's FID for the row. FID uses dip_scale.eval's Inception: torch-fidelity's real weights when present
(torch hub cache or $DIP_INCEPTION_WEIGHTS), otherwise the fixed random-feature Inception of the demo, whose
distances rank distributions but are not comparable with published FIDs. With fewer samples than feature
dimensions the Frechet distance is computed from the samples' Gram matrices (frechet_distance: exact, and
fast where a 2048 x 2048 matrix square root is not).

Models start in the order of --models (put the costliest first: with two jobs the last one then runs
alone for the shortest time); the table keeps the paper's order. With --keep DIR each model's result is
saved in DIR as it finishes, and a rerun with the same DIR and the same settings reuses the saved ones and
trains only the rest, so a long run that is stopped loses at most the models in flight.

Costs are CPU seconds (user + system, all threads), which a loaded machine changes less than wall time.
docs/benchmarks.md has measured tables, the fair setting's among them, side by side with the paper.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fig3_detail as f3  # noqa: E402  (sibling script: data, training, one-step metrics)

from dip_scale.diffusion.sampler import SamplerConfig, sample, sample_noise  # noqa: E402
from dip_scale.models.dip import DiPConfig  # noqa: E402

# The paper's rows (FID at 160 epochs, CFG) and ours, in the paper's order.
PAPER_FID = {"DiT-only": 5.28, "DiT-only deeper": None, "mlp": 6.92, "attention": 2.98, "coord_mlp": 2.20,
             "unet": 2.16, "unet mid": 2.24, "unet both": 3.53}
MODELS = tuple(PAPER_FID)
PAPER_GUIDANCE_INTERVAL = (0.11, 0.97)


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def model_configs(a: argparse.Namespace) -> dict[str, DiPConfig]:
    """The trunk of fig3_detail with each head and placement, in the paper's order."""
    trunk = dict(depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, patch_size=16,
                 num_classes=f3.NUM_CLASSES, detailer_width=a.head_width)
    configs = {"DiT-only": DiPConfig(**trunk, detailer_head="none")}
    for kind in ("mlp", "attention", "coord_mlp", "unet"):
        configs[kind] = DiPConfig(**trunk, detailer_head=kind)
    configs["unet mid"] = DiPConfig(**trunk, detailer_head="unet", head_placement="mid")
    configs["unet both"] = DiPConfig(**trunk, detailer_head="unet", head_placement="both")
    deeper = configs["DiT-only"]
    while f3.count_params(deeper) < f3.count_params(configs["unet"]):
        deeper = dataclasses.replace(deeper, depth=deeper.depth + 1)
    configs["DiT-only deeper"] = deeper
    return {name: configs[name] for name in a.models}


# ----------------------------------------------------------------------------------------------------
# FID of a small sample set
# ----------------------------------------------------------------------------------------------------


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between the Gaussians of two feature sets (n1, D) and (n2, D), n >= 2.

    With centred, scaled features A = (f1 - mu1) / sqrt(n1 - 1) and B likewise, the sample covariances are
    S1 = A^T A and S2 = B^T B, and tr((S1 S2)^(1/2)) is the sum of the singular values of A B^T (the non-zero
    eigenvalues of S1 S2 are those of (A B^T)(A B^T)^T). So
        d = |mu1 - mu2|^2 + |A|_F^2 + |B|_F^2 - 2 |A B^T|_*
    exactly, from an n1 x n2 matrix instead of the square root of a D x D one."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    A = (f1 - mu1) / (f1.shape[0] - 1) ** 0.5  # (n1, D)
    B = (f2 - mu2) / (f2.shape[0] - 1) ** 0.5  # (n2, D)
    cross = torch.linalg.svdvals(A @ B.T).sum()
    return float((mu1 - mu2).square().sum() + A.square().sum() + B.square().sum() - 2 * cross)


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), as the Inception reads them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def inception_weights(a: argparse.Namespace) -> tuple[str, bool]:
    """(weights file, whether it is the real Inception). The random one is written once into a.work_dir."""
    from dip_scale.eval.inception import find_weights, write_random_weights

    try:
        return str(find_weights(a.inception)), True
    except FileNotFoundError:
        if a.inception is not None:
            raise
        path = Path(a.work_dir) / "inception-random-he.pth"
        return str(path if path.is_file() else write_random_weights(path)), False


def pool_features(images: torch.Tensor, weights: str, batch: int = 50) -> torch.Tensor:
    """Inception pool features (N, 2048) of float images in [-1, 1]."""
    from dip_scale.eval.inception import InceptionFeatures

    inception = InceptionFeatures(weights).eval()
    return torch.cat([inception(to_uint8_nchw(images[i:i + batch]))["pool"] for i in range(0, len(images), batch)])


# ----------------------------------------------------------------------------------------------------
# One model: train, measure (runs in a worker process with --jobs > 1)
# ----------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process and its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_model(name: str, config: DiPConfig, a: argparse.Namespace, weights: str | None) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), cpu_seconds()
    x, y = f3.load_images(0, a.train_images, a.image_size, a.seed)
    x_eval, y_eval = f3.load_images(f3.EVAL_OFFSET, a.eval_images, a.image_size, a.seed)
    net, losses = f3.train(config, x, y, a)
    train_cpu = cpu_seconds() - c0
    mask = f3.high_pass(a.image_size, a.hf_radius)
    one_step = f3.evaluate(net, x_eval, y_eval, a, mask)["per_t"]  # a.num_samples = 0: no fig3 samples
    tail = losses[-max(1, len(losses) // 10):]
    result = {"config": dataclasses.asdict(config), "params": f3.count_params(config),
              "final_loss": sum(tail) / len(tail), "per_t": {str(t): m for t, m in one_step.items()},
              "train_cpu_s": train_cpu}
    if a.fid_samples:
        cfg = SamplerConfig(steps=a.sample_steps, guidance_scale=a.guidance_scale,
                            guidance_interval=PAPER_GUIDANCE_INTERVAL)
        noise = sample_noise(range(a.fid_samples), (3, a.image_size, a.image_size), seed=a.seed)
        labels = torch.arange(a.fid_samples) % f3.NUM_CLASSES
        samples = sample(net, noise, labels, cfg, null_class=f3.NUM_CLASSES).clamp(-1, 1)
        result["sample_features"] = pool_features(samples, weights)
    result["cpu_s"] = cpu_seconds() - c0
    result["wall_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def report_progress(name: str, result: dict) -> dict:
    print(f"{name}: loss {result['final_loss']:.4f}, {result['cpu_s']:.0f} CPU s ({result['train_cpu_s']:.0f} "
          f"training)", flush=True)
    return result


def fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_table(report: dict) -> str:
    s = report["settings"]
    times = s["times"]
    head = (f"{'model':<16} {'params':>8} {'CPU s':>7} {'loss':>7} "
            + " ".join(f"{'PSNR@' + str(t):>9}" for t in times) + " "
            + " ".join(f"{'HFerr@' + str(t):>10}" for t in times) + f" {'FID':>8} {'paper FID':>9}")
    lines = [head]
    for name, r in report["models"].items():
        per_t = r["per_t"]
        lines.append(f"{name:<16} {r['params'] / 1e6:>7.2f}M {r['cpu_s']:>7.0f} {r['final_loss']:>7.4f} "
                     + " ".join(f"{per_t[str(t)]['psnr']:>9.2f}" for t in times) + " "
                     + " ".join(f"{per_t[str(t)]['hf_error']:>10.3f}" for t in times)
                     + f" {fmt(r.get('fid'), '.2f', 8)} {fmt(PAPER_FID[name], '.2f', 9)}")
    inception = {True: "real Inception", False: "random-feature Inception", None: "no FID"}[report["real_inception"]]
    lines.append(f"{s['steps']} steps x batch {s['batch']} on {s['train_images']} images, {s['image_size']} px, "
                 f"patch 16, trunk depth {s['depth']} width {s['hidden_size']}, head width {s['head_width']}; "
                 f"one-step metrics on {s['eval_images']} held-out images, HF above {s['hf_radius']} cycles/px; "
                 f"FID: {s['fid_samples']} samples ({s['sample_steps']} Euler steps, guidance {s['guidance_scale']}) "
                 f"vs as many held-out images, {inception}; paper: XL/16, ImageNet 256, 160 epochs, CFG")
    lines.append(f"total {report['cpu_s']:.0f} CPU s ({report['wall_s']:.0f} s wall, {s['jobs']} job(s))")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[4:9]))
    p.add_argument("--steps", type=int, default=500, help="training steps per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-images", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-width", type=int, default=16, help="detailer_width of every head (64 in the paper)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--times", default="0.5,0.75,0.9", help="t values of the one-step predictions")
    p.add_argument("--hf-radius", type=float, default=0.25, help="cycles/pixel (Nyquist is 0.5)")
    p.add_argument("--fid-samples", type=int, default=100, help="samples per model for FID (0: no FID)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help=f"CFG scale on the paper's interval {PAPER_GUIDANCE_INTERVAL} (1: none)")
    p.add_argument("--inception", default=None, help="Inception weights file (default: the real one if found, "
                                                     "else a random-feature one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="models trained at once, one process each")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    p.add_argument("--work-dir", default=None, help="where the random Inception weights go (default: a temp dir)")
    p.add_argument("--json", default=None, help="save the numbers here")
    p.add_argument("--keep", default=None, help="folder for each model's result as it finishes; a rerun with "
                                                "the same folder and settings reuses them")
    a = p.parse_args(argv)
    a.times = [float(t) for t in a.times.split(",")]
    a.models = [m.strip() for m in a.models.split(",")]
    unknown = sorted(set(a.models) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    a.threads = a.threads or max(1, len(os.sched_getaffinity(0)) // a.jobs)
    a.num_samples = 0  # fig3_detail.evaluate's own sampling is not used here
    if a.keep:
        a.work_dir = a.work_dir or a.keep  # the random Inception of the saved features stays with them
    return a


# Settings that do not change a model's numbers: the rest must match for a kept result to be reused.
NOT_RESULT_SETTINGS = ("json", "work_dir", "num_samples", "keep", "models", "jobs", "threads")


def kept_path(a: argparse.Namespace, name: str) -> Path:
    return Path(a.keep) / (name.replace(" ", "_") + ".pt")


def load_kept(a: argparse.Namespace, name: str, settings: dict) -> dict | None:
    """The saved result of model `name`, or None. A result made with other settings stops the run (exit 2)."""
    path = kept_path(a, name) if a.keep else None
    if path is None or not path.is_file():
        return None
    kept = torch.load(path, weights_only=True)
    same = {k: v for k, v in settings.items() if k not in NOT_RESULT_SETTINGS}
    theirs = {k: v for k, v in kept["settings"].items() if k not in NOT_RESULT_SETTINGS}
    if theirs != same:
        diff = ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)} (now {same.get(k)})"
                         for k in sorted(set(same) | set(theirs)) if theirs.get(k) != same.get(k))
        print(f"error: {path} was made with other settings: {diff}; use another --keep folder", file=sys.stderr)
        sys.exit(2)
    print(f"{name}: reusing {path}", flush=True)
    return kept["result"]


def save_kept(a: argparse.Namespace, name: str, result: dict, settings: dict) -> None:
    if a.keep:
        path = kept_path(a, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": settings, "result": result}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        a.work_dir = a.work_dir or tmp
        configs = model_configs(a)
        weights, real = inception_weights(a) if a.fid_samples else (None, None)
        settings = {k: v for k, v in vars(a).items() if k not in ("json", "work_dir", "num_samples", "keep")}
        settings["real_inception"] = real
        report = {"settings": settings, "real_inception": real, "models": {}}
        done = {name: r for name in configs if (r := load_kept(a, name, settings)) is not None}
        reused_cpu = sum(r["cpu_s"] for r in done.values())
        todo = {name: config for name, config in configs.items() if name not in done}

        def finished(name: str, result: dict) -> dict:
            save_kept(a, name, result, settings)
            return report_progress(name, result)

        if a.jobs > 1 and len(todo) > 1:
            with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_model, name, config, a, weights): name for name, config in todo.items()}
                done |= {futures[f]: finished(futures[f], f.result()) for f in as_completed(futures)}
        else:
            done |= {name: finished(name, run_model(name, config, a, weights)) for name, config in todo.items()}
        results = {name: done[name] for name in MODELS if name in done}  # the paper's order
        if a.fid_samples:
            torch.set_num_threads(a.threads * a.jobs)
            x_ref, _ = f3.load_images(f3.EVAL_OFFSET, a.fid_samples, a.image_size, a.seed)
            reference = pool_features(x_ref, weights)
            for r in results.values():
                r["fid"] = frechet_distance(r.pop("sample_features"), reference)
    report["models"] = results
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_s"] = cpu_seconds() + children.ru_utime + children.ru_stime + reused_cpu
    report["wall_s"] = time.perf_counter() - t0
    print(format_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
