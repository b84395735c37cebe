"""Where evaluation results go.

- A JSON record per evaluation: metric values, sampler settings, N, seed, reference, timings. `dip-eval`
  writes it next to the checkpoint (`<checkpoint>.eval-n<N>.json`, also for s3:// checkpoints).
- The run folder's history, `<run_dir>/eval/`: results.csv (one row per evaluation; re-evaluating the
  same step with the same settings replaces its row), results.md (the same table) and fid_vs_step.png.
  Concurrent evaluation jobs append under a file lock.
- Optionally the samples as an ADM-compatible .npz (arr_0: uint8 NHWC images, arr_1: labels), and the
  record logged to wandb at the checkpoint's training step.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import io
import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dip_scale.storage import atomic_write, open_parent

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
COLUMNS = ("step", "num_samples", *METRICS, "steps", "method", "guidance_scale", "guidance_interval", "seed",
           "reference", "checkpoint", "mode", "images_per_s", "wall_time_s", "time")
# An evaluation's identity: evaluating it again replaces its row.
KEY = ("step", "num_samples", "steps", "method", "guidance_scale", "guidance_interval", "seed", "reference")
EVAL_DIR = "eval"


def make_record(*, metrics: dict, settings: dict, step: int | None, checkpoint: str | None, reference: str,
                wall_time_s: float, generation_s: float, images_per_s: float, world_size: int,
                inception: str, mode: str) -> dict:
    """The JSON record of one evaluation. `settings` is EvalSettings.describe()."""
    return {
        "step": step,
        "checkpoint": checkpoint,
        "metrics": {k: v for k, v in metrics.items() if k != "notes"},
        "notes": metrics.get("notes", []),
        "num_samples": settings["num_samples"],
        "seed": settings["seed"],
        "sampler": settings["sampler"],
        "batch_size_per_rank": settings["batch_size"],
        "precision": settings["precision"],
        "compile": settings["compile_model"],
        "world_size": world_size,
        "reference": reference,
        "inception_weights": inception,
        "mode": mode,
        "wall_time_s": round(wall_time_s, 3),
        "generation_s": round(generation_s, 3),
        "images_per_s": round(images_per_s, 4),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------
# JSON and .npz
# ----------------------------------------------------------------------------------------------------


def default_json_path(checkpoint: str, num_samples: int) -> str:
    return f"{str(checkpoint).rstrip('/')}.eval-n{num_samples}.json"


def write_json(target: str, record: dict) -> str:
    """Write the record to a local path or an s3:// URL (S3_ENDPOINT_URL for S3-compatible stores)."""
    store, name = open_parent(str(target))
    store.write_bytes(name, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())
    return str(target)


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM-compatible sample batch: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"samples must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"the samples file must end in .npz, got {path}")
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=labels.astype(np.int64))
    atomic_write(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------
# The run's table and plot
# ----------------------------------------------------------------------------------------------------


def record_row(record: dict) -> dict:
    s = record["sampler"]
    row = {"step": record["step"], "num_samples": record["num_samples"], "steps": s["steps"],
           "method": s["method"], "guidance_scale": s["guidance_scale"],
           "guidance_interval": f"{s['guidance_interval'][0]:g}-{s['guidance_interval'][1]:g}",
           "seed": record["seed"], "reference": record["reference"], "checkpoint": record.get("checkpoint") or "",
           "mode": record.get("mode", ""), "images_per_s": record.get("images_per_s", ""),
           "wall_time_s": record.get("wall_time_s", ""), "time": record.get("time", "")}
    for m in METRICS:
        v = record["metrics"].get(m)
        row[m] = "" if v is None else f"{v:.6g}"
    return {k: ("" if row[k] is None else str(row[k])) for k in COLUMNS}


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_table(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVAL_DIR / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(COLUMNS):
        raise ValueError(f"{path} has columns {sorted(rows[0])}, expected {list(COLUMNS)}; move it away to start anew")
    return rows


def _step_key(row: dict) -> tuple:
    return (int(row["step"]) if row["step"] not in ("", "None") else -1, row["time"])


def append_to_run(run_dir: str | Path, record: dict) -> Path:
    """Add (or replace) the record's row in <run_dir>/eval/results.csv and redraw results.md and the plot."""
    folder = Path(run_dir) / EVAL_DIR
    new = record_row(record)
    with _locked(folder):
        rows = [r for r in read_table(run_dir) if tuple(r[k] for k in KEY) != tuple(new[k] for k in KEY)]
        rows.append(new)
        rows.sort(key=_step_key)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(folder / "results.csv", buf.getvalue().encode())
        atomic_write(folder / "results.md", markdown_table(rows).encode())
        plot_fid(rows, folder / "fid_vs_step.png")
    return folder


def markdown_table(rows: list[dict]) -> str:
    cols = ("step", "num_samples", *METRICS, "steps", "method", "guidance_scale", "guidance_interval", "seed",
            "reference", "images_per_s", "time")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[c] if r[c] != "" else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _series_label(row: dict) -> str:
    g = row["guidance_scale"]
    cfg = f"cfg {g} on {row['guidance_interval']}" if float(g) != 1.0 else "no cfg"
    return f"N={row['num_samples']}, {row['steps']} {row['method']} steps, {cfg}"


def plot_fid(rows: list[dict], path: Path) -> None:
    """FID against training step, one line per evaluation setting (Agg backend, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["fid"] and r["step"] not in ("", "None"):
            series.setdefault(_series_label(r), []).append((int(r["step"]), float(r["fid"])))
    values = [v for pts in series.values() for _, v in pts]
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    ax.set_title("FID vs training step")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no FID values yet", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# wandb
# ----------------------------------------------------------------------------------------------------


def log_wandb(record: dict, *, project: str, entity: str | None = None, group: str | None = None,
              run_id: str | None = None, mode: str = "offline", directory: str | Path | None = None) -> str:
    """Log the metrics at the checkpoint's training step into a wandb run of job type "eval"; returns its id.

    With `group` (the training run's name) the run sits next to the training run in wandb's group view; with
    `run_id` a rerun of the same evaluation (a requeued job) continues the same wandb run. The values go
    against their own step axis, eval/step, so that plots put them at the checkpoint's step."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=group, id=run_id, resume="allow" if run_id else None,
                     mode=mode, dir=str(directory) if directory else None, job_type="eval",
                     name=f"{group}-eval-step{record['step']}" if group else None)
    try:
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        row = {"eval/step": record["step"] if record["step"] is not None else 0,
               "eval/num_samples": record["num_samples"]}
        for m in METRICS:
            v = record["metrics"].get(m)
            if v is not None and math.isfinite(v):
                row[f"eval/{m}"] = v
        run.log(row)
        return run.id
    finally:
        run.finish()
