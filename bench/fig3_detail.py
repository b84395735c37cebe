"""CPU-sized reproduction of the paper's central claim (its Figure 3): on 16 x 16 pixel patches a DiT alone
blurs the high-frequency detail inside a patch, and the Patch Detailer Head recovers it.

    python bench/fig3_detail.py                          # defaults: a few minutes on 2 CPU cores
    python bench/fig3_detail.py --png fig3.png --json fig3.json
    python bench/fig3_detail.py --steps 1500 --hidden-size 192      # longer / wider trunk

Set-up: detail-rich synthetic images (dip_scale.data.synthetic: ten textures with periods of 2.5-10 px) at
64 x 64, patch 16 (a 4 x 4 token grid). The models share one trunk (depth, width, heads) and differ only
in what reads it: `DiT-only` is the standard DiT final layer (detailer_head="none"), `DiP` adds the conv
U-Net Patch Detailer Head (detailer_head="unet"). A third model, `DiT-only deeper`, gives DiT-only at
least DiP's parameter count by adding blocks, so a difference is not a matter of size. Every model trains
for the same steps with the same batches, the same flow-matching draws (per-sample seeds), AdamW, float32.

Measured on held-out images of the same set, with fixed noise, at a few t (t = 1 is clean data):
  PSNR   of the one-step clean-image prediction x_hat = x_t + (1 - t) v_hat against x (range [-1, 1]);
  HF     high-frequency energy ratio: FFT energy above --hf-radius cycles/pixel of x_hat over that of x
         (1 = as much fine detail as the data; below 1 = blurred);
  HF err FFT energy of the error x_hat - x above the radius, over that of x (0 = detail recovered exactly;
         1 = the detail is missing or wrong as a whole);
and for generated samples (Euler, --sample-steps, no guidance) their HF energy over the data's.

The defaults run in about 3 minutes of one CPU core with a trunk 128 wide, narrower than the 768 values of
a patch: DiT-only is then capacity-starved per patch and loses by construction. With a trunk as wide as a
patch the head needs training to pay off (DiT-only leads after 400 steps, DiP is sharper after 1500);
docs/benchmarks.md has both and the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from dip_scale.data.synthetic import synthetic_image
from dip_scale.diffusion.flow import FlowMatching, velocity_loss
from dip_scale.diffusion.sampler import SamplerConfig, sample, sample_noise
from dip_scale.models.dip import DiPConfig, build_model

NUM_CLASSES = 10
EVAL_OFFSET = 1_000_000  # held-out images: indices no training set reaches


# ----------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------


def load_images(first: int, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images first..first+count-1 as float (N, 3, size, size) in [-1, 1], and their labels."""
    images, labels = zip(*(synthetic_image(i, size, seed) for i in range(first, first + count)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor(labels)


def high_pass(size: int, radius: float) -> torch.Tensor:
    """Mask (size, size) of the 2-D FFT bins with radial frequency above `radius` cycles/pixel."""
    f = torch.fft.fftfreq(size)
    return (f[:, None] ** 2 + f[None, :] ** 2).sqrt() > radius


def hf_energy(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image energy (N,) of the FFT bins under `mask`, summed over channels."""
    spectrum = torch.fft.fft2(x.double()).abs() ** 2  # (N, 3, H, W)
    return (spectrum * mask).sum(dim=(1, 2, 3))


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of the PSNR for pixels in [-1, 1] (peak-to-peak 2)."""
    mse = (x_hat.clamp(-1, 1) - x).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / mse)).mean())


# ----------------------------------------------------------------------------------------------------
# Models and training
# ----------------------------------------------------------------------------------------------------


def model_configs(a: argparse.Namespace) -> dict[str, DiPConfig]:
    trunk = dict(depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, patch_size=16,
                 num_classes=NUM_CLASSES)
    configs = {"DiT-only": DiPConfig(**trunk, detailer_head="none"),
               "DiP": DiPConfig(**trunk, detailer_head="unet", detailer_width=a.head_width)}
    if a.deeper:
        dip_params = count_params(configs["DiP"])
        deeper = configs["DiT-only"]
        while count_params(deeper) < dip_params:
            deeper = dataclasses.replace(deeper, depth=deeper.depth + 1)
        configs["DiT-only deeper"] = deeper
    return {k: v for k, v in configs.items() if k in a.models}


def count_params(config: DiPConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def train(config: DiPConfig, x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    """`a.steps` AdamW steps on minibatches drawn from (x, y); batches and noise depend only on the seed,
    so every model sees exactly the same data and the same (t, eps, label drop) draws."""
    torch.manual_seed(a.seed)
    net = build_model(config)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.0)
    flow = FlowMatching(num_classes=NUM_CLASSES)
    order = torch.Generator().manual_seed(a.seed)
    losses = []
    for step in range(a.steps):
        idx = torch.randint(0, x.shape[0], (a.batch,), generator=order)
        seeds = [a.seed * 1_000_003 + step * a.batch + i for i in range(a.batch)]
        inputs = flow.training_inputs(x[idx], y[idx], seeds)
        loss = velocity_loss(net(inputs.x_t, inputs.t, inputs.y), inputs.v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return net.eval(), losses


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def one_step_predictions(net, x: torch.Tensor, y: torch.Tensor, times: list[float], seed: int) -> dict:
    """x_hat = x_t + (1 - t) v_hat for each t, with noise fixed by the seed (the same for every model)."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    for t in times:
        tt = torch.full((x.shape[0],), t)
        x_t = t * x + (1 - t) * eps
        out[t] = (x_t, x_t + (1 - t) * net(x_t, tt, y))
    return out


@torch.no_grad()
def evaluate(net, x: torch.Tensor, y: torch.Tensor, a: argparse.Namespace, mask: torch.Tensor) -> dict:
    true_hf = hf_energy(x, mask)
    metrics = {}
    for t, (_, x_hat) in one_step_predictions(net, x, y, a.times, a.seed).items():
        metrics[t] = {"psnr": psnr(x_hat, x),
                      "hf_ratio": float(hf_energy(x_hat, mask).sum() / true_hf.sum()),
                      "hf_error": float(hf_energy(x_hat - x, mask).sum() / true_hf.sum())}
    result = {"per_t": metrics}
    if a.num_samples:
        cfg = SamplerConfig(steps=a.sample_steps, guidance_scale=1.0)
        noise = sample_noise(range(a.num_samples), tuple(x.shape[1:]), seed=a.seed)
        labels = torch.arange(a.num_samples) % NUM_CLASSES
        samples = sample(net, noise, labels, cfg, null_class=NUM_CLASSES).clamp(-1, 1)
        result["sample_hf_ratio"] = float(hf_energy(samples, mask).mean() / true_hf.mean())
        result["samples"] = samples
    return result


def save_png(path: str, x: torch.Tensor, y: torch.Tensor, nets: dict, a: argparse.Namespace, results: dict):
    """Rows: data, x_t, then each model's one-step prediction at the smallest t (the most to recover), then
    each model's samples."""
    from PIL import Image

    n, t = min(6, x.shape[0], a.num_samples or 6), min(a.times)
    rows = [x[:n]]
    preds = {name: one_step_predictions(net, x[:n], y[:n], [t], a.seed)[t] for name, net in nets.items()}
    rows.append(next(iter(preds.values()))[0])
    rows += [p[1] for p in preds.values()]
    rows += [r["samples"][:n] for r in results.values() if "samples" in r]
    grid = torch.cat([torch.cat(list(r.clamp(-1, 1)), dim=2) for r in rows], dim=1)  # (3, rows*H, n*W)
    pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST).save(path)
    return ["data", f"x_t (t={t})"] + [f"{k} x_hat" for k in preds] + [f"{k} samples" for k in results]


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    times = report["settings"]["times"]
    head = (f"{'model':<17} {'params':>8} {'train s':>8} {'loss':>7} "
            + " ".join(f"{'PSNR@' + str(t):>9}" for t in times) + " "
            + " ".join(f"{'HF@' + str(t):>7}" for t in times) + " "
            + " ".join(f"{'HFerr@' + str(t):>9}" for t in times) + f" {'sampleHF':>8}")
    lines = [head]
    for name, r in report["models"].items():
        per_t = r["per_t"]
        lines.append(f"{name:<17} {r['params'] / 1e6:>7.2f}M {r['train_s']:>8.0f} {r['final_loss']:>7.4f} "
                     + " ".join(f"{per_t[str(t)]['psnr']:>9.2f}" for t in times) + " "
                     + " ".join(f"{per_t[str(t)]['hf_ratio']:>7.3f}" for t in times) + " "
                     + " ".join(f"{per_t[str(t)]['hf_error']:>9.3f}" for t in times)
                     + f" {r.get('sample_hf_ratio', float('nan')):>8.3f}")
    s = report["settings"]
    lines.append(f"{s['steps']} steps x batch {s['batch']} on {s['train_images']} images, {s['image_size']} px, "
                 f"patch 16, trunk depth {s['depth']} width {s['hidden_size']}; eval on {s['eval_images']} held-out "
                 f"images; HF above {s['hf_radius']} cycles/px; loss = mean flow loss of the last 10% of steps")
    if s["hidden_size"] < 3 * 16 * 16:
        lines.append(f"note: width {s['hidden_size']} < 768 values of a 16x16 patch, so DiT-only's linear output is "
                     "rank-limited per patch (the paper's XL has 1152). The fair comparison: --hidden-size 768 "
                     "--num-heads 12 --head-width 32 --steps 1500 (about an hour of one CPU core per model)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:6]))
    p.add_argument("--steps", type=int, default=500, help="training steps per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-images", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-width", type=int, default=16, help="base width of the conv head (64 in the paper)")
    p.add_argument("--models", default="DiT-only,DiP,DiT-only deeper",
                   help="comma list of DiT-only, DiP, 'DiT-only deeper'")
    p.add_argument("--times", default="0.5,0.75,0.9", help="t values of the one-step predictions")
    p.add_argument("--hf-radius", type=float, default=0.25, help="cycles/pixel (Nyquist is 0.5)")
    p.add_argument("--num-samples", type=int, default=20, help="generated samples per model (0: none)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--png", default=None, help="save a comparison image here")
    p.add_argument("--json", default=None, help="save the numbers here")
    a = p.parse_args(argv)
    a.times = [float(t) for t in a.times.split(",")]
    a.models = [m.strip() for m in a.models.split(",")]
    a.deeper = "DiT-only deeper" in a.models
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    x, y = load_images(0, a.train_images, a.image_size, a.seed)
    x_eval, y_eval = load_images(EVAL_OFFSET, a.eval_images, a.image_size, a.seed)
    mask = high_pass(a.image_size, a.hf_radius)
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("png", "json")}, "models": {}}
    report["data_hf_fraction"] = float(hf_energy(x_eval, mask).sum() / hf_energy(x_eval, torch.ones_like(mask)).sum())
    nets, results = {}, {}
    for name, config in model_configs(a).items():
        t0 = time.perf_counter()
        net, losses = train(config, x, y, a)
        train_s = time.perf_counter() - t0
        r = evaluate(net, x_eval, y_eval, a, mask)
        nets[name], results[name] = net, r
        tail = losses[-max(1, len(losses) // 10):]
        report["models"][name] = {"config": dataclasses.asdict(config), "params": count_params(config),
                                  "train_s": train_s, "final_loss": sum(tail) / len(tail),
                                  "per_t": {str(t): m for t, m in r["per_t"].items()},
                                  **({"sample_hf_ratio": r["sample_hf_ratio"]} if "sample_hf_ratio" in r else {})}
        print(f"trained {name} in {train_s:.0f} s", flush=True)
    print(format_table(report))
    if a.png:
        report["png_rows"] = save_png(a.png, x_eval, y_eval, nets, a, results)
        print(f"wrote {a.png} (rows: {', '.join(report['png_rows'])})")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
