"""The embedded default (`make demo`): DiP learning a synthetic dataset on a CPU, end to end.

    python -m dip_scale.demo                  # everything under runs/demo
    python -m dip_scale.demo --steps 3000     # train longer (rerun continues the same run)

1. `dip-prep`'s synthetic source writes a train split and a reference split as MDS shards (a local folder
   stands in for S3);
2. `python -m dip_scale.train recipes/demo_cpu.yaml` trains through Composer with the streaming loader,
   checkpoints and auto-resume; the scheduled evaluation (in-process, standing in for the Slurm job)
   measures FID against the reference split every `eval.every` steps;
3. the sample grid, the FID table and the FID plot are printed, with the first and the last FID.

Running it again resumes the run, or reports that it is complete.

FID needs torch-fidelity's Inception weights. When they are in the torch hub cache (or
$DIP_INCEPTION_WEIGHTS) the demo uses them. Otherwise, since nothing is downloaded, it uses an Inception of
the same architecture with fixed random (He-initialised) weights: a Frechet distance in those features
still falls as samples approach the data, but the numbers are not comparable to published FIDs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from data_prep.synthetic import write_synthetic_shards
from dip_scale.data.layout import read_dataset_info

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_cpu.yaml"


def ensure_split(folder: Path, num_images: int, seed: int) -> None:
    try:
        if read_dataset_info(str(folder))["num_samples"] == num_images:
            return
    except (FileNotFoundError, KeyError, ValueError):
        pass
    print(f"writing {num_images} synthetic images to {folder}")
    write_synthetic_shards(str(folder), num_images=num_images, resolution=32, seed=seed, progress=True)


def inception_weights(out: Path) -> tuple[str, bool]:
    from dip_scale.eval.inception import find_weights, write_random_weights

    try:
        return str(find_weights()), True
    except FileNotFoundError:
        path = out / "inception-random-he.pth"
        return str(path if path.is_file() else write_random_weights(path)), False


def write_real_grid(path: Path, classes: list[int], per_class: int, resolution: int) -> Path:
    """Real training images of `classes` laid out like the sample grid (one column per class)."""
    import numpy as np
    import torch

    from dip_scale.data.synthetic import synthetic_image
    from dip_scale.eval.grid import image_grid

    found: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    index = 0
    while any(len(v) < per_class for v in found.values()):
        image, label = synthetic_image(index, resolution, seed=0)  # the train split's images, in order
        if label in found and len(found[label]) < per_class:
            found[label].append(image)
        index += 1
    rows = [found[c][i] for i in range(per_class) for c in classes]  # row-major, like the sample grid
    image_grid(torch.from_numpy(np.stack(rows)), columns=len(classes)).save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dip_scale.demo", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for data, runs and results (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, key=value")
    args = parser.parse_args(argv)

    out = Path(args.out)
    ensure_split(out / "data" / "train", 2048, seed=0)
    ensure_split(out / "data" / "reference", 200, seed=1)
    weights, real = inception_weights(out)
    if not real:
        print("note: torch-fidelity's Inception weights are not in the torch hub cache, and nothing is downloaded: "
              "FID below uses an Inception with fixed random weights (it falls as samples improve, but is not "
              "comparable to published FIDs). `dip-eval --help` says where to put the real file.")

    from dip_scale.train.__main__ import main as train

    overrides = [f"data.remote={out / 'data' / 'train'}", f"eval.reference={out / 'data' / 'reference'}",
                 f"eval.inception_path={weights}", f"checkpoint.save_folder={out / 'runs'}", *args.overrides]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    code = train([str(RECIPE), *overrides])
    if code != 0:
        return code

    run = out / "runs" / "demo"
    table = run / "eval" / "results.csv"
    rows = sorted(csv.DictReader(table.open()), key=lambda r: int(r["step"])) if table.is_file() else []
    grids = sorted((run / "samples").glob("step-*.png"))
    classes = [round(i * 9 / 7) for i in range(8)]  # the sample grid's default classes for 10 classes
    real_grid = write_real_grid(out / "real_classes.png", classes, per_class=2, resolution=32)  # as SampleGrid
    print("\nDiP demo results")
    print(f"  sample grid (EMA, one column per class): {grids[-1] if grids else 'none'}")
    print(f"  real images of the same classes:         {real_grid}")
    print(f"  FID table: {table}")
    print(f"  FID plot:  {run / 'eval' / 'fid_vs_step.png'}")
    if rows:
        kind = "FID" if real else "FID (random-feature Inception)"
        print(f"  {kind}: step {rows[0]['step']}: {float(rows[0]['fid']):.3f} -> step {rows[-1]['step']}: "
              f"{float(rows[-1]['fid']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
