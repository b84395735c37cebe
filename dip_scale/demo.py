"""The embedded default (`make demo`): DiP learning a synthetic dataset on a CPU, end to end.

    python -m dip_scale.demo                  # everything under runs/demo
    python -m dip_scale.demo --steps 8000     # train longer (a rerun continues the same run)

1. `dip-prep`'s synthetic source writes a train split and a reference split as MDS shards (a local folder
   stands in for S3);
2. a classifier of the ten synthetic classes is trained once on other synthetic images and kept next to the
   data (dip_scale.eval.classifier): does a sample of class c look like c, by texture and by colours?
3. `composer -n 1 -m dip_scale.train recipes/demo_cpu.yaml` (or -n 2: --ranks) trains through Composer with
   the streaming loader, checkpoints and auto-resume; every `eval.every` steps the scheduled evaluation starts
   dip-eval on the newest checkpoint beside training (eval.mode=process, standing in for the Slurm job), which
   measures FID and class accuracy against the reference split; meanwhile the demo scores real images the
   same way (the floor of both numbers);
4. the whole table, the sample grids and the exact dip-sample / dip-eval commands for the run are printed.

Running it again continues the run, or says first that it is complete and trains nothing. Ctrl-C while it
trains checkpoints the step in progress and stops (a second Ctrl-C stops at once); the same command continues.

Ranks and threads: the demo trains on --ranks processes (default 1) of --threads torch threads each (default
2); the evaluations that run beside training use as many. The demo model's operations are small: a second
thread speeds a training step up by a few percent only, and a second data-parallel rank halves each rank's
batch, to other numbers (README, "Two commands", has the measurements). The classifier is trained with two
threads before training starts, and the real images are scored with one thread while it trains, whatever the
flags. Threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE): spinning threads multiply the run time on a
machine busy with other work. The demo also pins torch's, oneDNN's and MKL's CPU code paths to AVX2. Rank
count, thread count and code path each change the float rounding; with all three fixed, the numbers are the
same on any x86-64 machine with AVX2 for the same torch build. A variable you set yourself is left as it is.

FID needs torch-fidelity's Inception weights. When they are in the torch hub cache (or
$DIP_INCEPTION_WEIGHTS) the demo uses them. Otherwise, since nothing is downloaded, it uses an Inception of
the same architecture with fixed random (He-initialised) weights: a Frechet distance in those features
still falls as samples approach the data, but the numbers are not comparable to published FIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo_cpu.yaml"
RESOLUTION = 32
TRAIN_IMAGES, REFERENCE_IMAGES = 4096, 200  # seeds 0 and 1; the classifier's images use other seeds
REAL_CHECK_SEED = 2  # real images scored like samples: the floor of both numbers
CLASSIFIER_THREADS = 2


# ----------------------------------------------------------------------------------------------------
# CPU settings: before torch is imported
# ----------------------------------------------------------------------------------------------------


def cpu_settings(threads: int) -> dict[str, str]:
    """The environment that makes the demo's numbers reproducible and its threads polite (module docstring)."""
    return {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",  # libgomp: sleep at a barrier instead of spinning
        "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # convolutions
        "MKL_CBWR": "AVX2",  # matrix products: one code path on Intel and AMD
    }


def pin_cpu(threads: int) -> None:
    """The demo process's own settings (its classifier uses `threads` threads); the training ranks get theirs
    from train_environment."""
    if "torch" in sys.modules:  # an in-process caller imported it already: only the thread count still applies
        print("note: torch was imported before the demo set its CPU environment; only the thread count applies")
    for key, value in cpu_settings(threads).items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def train_environment(threads: int, users: dict[str, str]) -> dict[str, str]:
    """The training ranks' environment: the demo's CPU settings at `threads` threads per rank, except for the
    variables in `users` (what was set before the demo started)."""
    return {**os.environ, **cpu_settings(threads), **users}


# ----------------------------------------------------------------------------------------------------
# Inputs: data, Inception, classifier
# ----------------------------------------------------------------------------------------------------


def ensure_split(folder: Path, num_images: int, seed: int) -> None:
    from data_prep.synthetic import write_synthetic_shards
    from dip_scale.data.layout import read_dataset_info

    try:
        if read_dataset_info(str(folder))["num_samples"] == num_images:
            return
    except (FileNotFoundError, KeyError, ValueError):
        pass
    print(f"writing {num_images} synthetic images to {folder}", flush=True)
    write_synthetic_shards(str(folder), num_images=num_images, resolution=RESOLUTION, seed=seed,
                           progress=sys.stderr.isatty())


def inception_weights(out: Path) -> tuple[str, bool]:
    """(weights file, whether it is torch-fidelity's real one)."""
    from dip_scale.eval.inception import find_weights, write_random_weights

    try:
        return str(find_weights()), True
    except FileNotFoundError:
        path = out / "inception-random-he.pth"
        return str(path if path.is_file() else write_random_weights(path)), False


def ensure_classifier(path: Path) -> dict:
    """Train the classifier of the synthetic classes once; its accuracy on held-out real images."""
    from dip_scale.eval.classifier import SyntheticClassifier, train_classifier

    if not path.is_file():
        print(f"training a classifier of the ten synthetic classes (once; kept at {path})", flush=True)
        train_classifier(RESOLUTION, log=lambda line: print(line, flush=True)).save(path)
    return SyntheticClassifier.load(path).held_out


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


def real_check(out: Path, weights: str, reference: Path, classifier: Path, num_images: int) -> dict:
    """FID and class accuracy of `num_images` real images (not the reference's), scored like the samples:
    what a perfect model would reach at this N. Computed once, kept in <out>/data/real_check.json."""
    path = out / "data" / "real_check.json"
    if path.is_file() and json.loads(path.read_text()).get("num_images") == num_images:
        return json.loads(path.read_text())
    import torch

    from dip_scale.eval.classifier import SyntheticClassifier, class_accuracy, real_images
    from dip_scale.eval.inception import InceptionFeatures
    from dip_scale.eval.metrics import frechet_distance, mean_cov
    from dip_scale.eval.stats import load_reference

    images, labels = real_images(num_images, RESOLUTION, REAL_CHECK_SEED)
    with torch.random.fork_rng(devices=[]):
        inception = InceptionFeatures(weights)
    ref = load_reference(str(reference), inception, progress=False)
    pool = torch.cat([inception(images[i:i + 100])["pool"] for i in range(0, num_images, 100)])
    result = {"num_images": num_images, "fid": frechet_distance(*mean_cov(pool), ref.mu, ref.sigma),
              **class_accuracy(SyntheticClassifier.load(classifier), images, labels)}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def evaluations(run: Path) -> list[dict]:
    """The run's evaluations in step order: its table's rows, with texture and colour accuracy from each
    evaluation's JSON where there is one."""
    from dip_scale.eval.results import EVAL_DIR, read_table

    rows = read_table(run)
    for row in rows:
        record = run / EVAL_DIR / f"step-{int(row['step']):09d}.n{row['num_samples']}.json"
        metrics = json.loads(record.read_text())["metrics"] if record.is_file() else {}
        row.update({k: metrics[k] for k in ("texture_accuracy", "colour_accuracy") if k in metrics})
    return rows


def percent(value) -> str:
    return f"{float(value):.0%}" if value not in (None, "") else "-"


def print_table(rows: list[dict], real: dict, real_weights: bool) -> None:
    fid = "FID" if real_weights else "FID*"
    print(f"  {'step':>6}  {fid:>7}  {'class accuracy':>14}  {'(texture, colours)':>18}  {'precision':>9}  "
          f"{'recall':>6}")
    for r in rows:
        detail = f"({percent(r.get('texture_accuracy'))}, {percent(r.get('colour_accuracy'))})"
        print(f"  {r['step']:>6}  {float(r['fid']):7.3f}  {percent(r['class_accuracy']):>14}  {detail:>18}  "
              f"{r['precision'] or '-':>9}  {r['recall'] or '-':>6}")
    detail = f"({percent(real['texture_accuracy'])}, {percent(real['colour_accuracy'])})"
    print(f"  {'real':>6}  {real['fid']:7.3f}  {percent(real['class_accuracy']):>14}  {detail:>18}  "
          f"(real images, {real['num_images']} of them, scored like the samples)")
    fids = [float(r["fid"]) for r in rows]
    if len(fids) > 1:
        trend = ("falls at every evaluation" if all(b < a for a, b in zip(fids, fids[1:])) else
                 "does not fall at every evaluation: with this few samples a step can be noise")
        print(f"  {fid} {trend} ({fids[0]:.3f} -> {fids[-1]:.3f}).")


def explain(real_weights: bool, held_out: dict, real: dict) -> None:
    if not real_weights:
        print(f"""
  FID* is a Frechet distance in the features of an Inception with fixed random weights (torch-fidelity's
  weights are not on this machine, and nothing is downloaded). It can tell that the samples' statistics move
  towards the reference's, and how far they still are from those of real images ({real['fid']:.3f} at this N).
  It cannot tell what is wrong (texture, colours, class), and its numbers are on their own scale: not
  comparable with published FIDs.""")
    print(f"""  Class accuracy: the share of samples that a classifier of the ten synthetic classes assigns to the
  class they were drawn for, both by texture (a CNN that cannot see colour) and by colours (the two dominant
  colours). On {held_out.get('num_images', '?')} held-out real images it scores \
{percent(held_out.get('class_accuracy'))} (texture {percent(held_out.get('texture_accuracy'))}, colours \
{percent(held_out.get('colour_accuracy'))}).""")


def tool(name: str) -> str:
    """How to call a console script of this environment as typed from the current folder."""
    script = Path(sys.executable).parent / name
    if not script.is_file():
        module = {"dip-sample": "dip_scale.sample", "dip-eval": "dip_scale.eval.cli"}[name]
        return f"{shlex.quote(sys.executable)} -m {module}"
    if shutil.which(name) and Path(shutil.which(name)).resolve() == script.resolve():
        return name
    try:
        return shlex.quote(os.path.relpath(script))
    except ValueError:
        return shlex.quote(str(script))


def commands(out: Path, run: Path, weights: str | None, classifier: Path, num_samples: int,
             batch_size: int) -> tuple[str, str]:
    """The dip-sample and dip-eval command lines for the run (weights: None when found without a flag)."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    sample = (f"{tool('dip-sample')} {q(run)} --classes {' '.join(map(str, range(10)))} --per-class 4 "
              f"--out {q(out / 'samples.png')}")
    evaluate = (f"{tool('dip-eval')} {q(run)} --reference {q(out / 'data' / 'reference')}"
                + (f" --inception-weights {q(weights)}" if weights else "")
                + f" --classifier {q(classifier)} --num-samples {num_samples} --batch-size {batch_size}")
    return sample, evaluate


def write_real_grid(path: Path, classes: list[int], per_class: int) -> Path:
    """Real training images of `classes` laid out like the sample grid (one column per class)."""
    import numpy as np
    import torch

    from dip_scale.data.synthetic import synthetic_image
    from dip_scale.eval.grid import image_grid

    found: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    index = 0
    while any(len(v) < per_class for v in found.values()):
        image, label = synthetic_image(index, RESOLUTION, seed=0)  # the train split's images, in order
        if label in found and len(found[label]) < per_class:
            found[label].append(image)
        index += 1
    rows = [found[c][i] for i in range(per_class) for c in classes]  # row-major, like the sample grid
    image_grid(torch.from_numpy(np.stack(rows)), columns=len(classes)).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


# The composer launcher, with Ctrl-C as Python's KeyboardInterrupt again: importing composer makes SIGINT exit
# the launcher with a traceback; as a KeyboardInterrupt, the launcher says "Ctrl-C received" and passes it on
# to its ranks as SIGTERM, and they checkpoint the step in progress (train/callbacks/preemption.py).
LAUNCHER = ("import signal, sys\nfrom composer.cli.launcher import main\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\nsys.exit(main())")


def train(ranks: int, threads: int, users: dict[str, str], overrides: list[str], log_dir: Path,
          beside=None) -> int:
    """`composer -n RANKS -m dip_scale.train recipes/demo_cpu.yaml OVERRIDES`, as a user types it; the first
    rank writes to this terminal, the others to LOG_DIR/rank<R>.{out,err}. `beside()` runs in this process while
    the ranks train. Returns the launcher's exit status (75: stopped by a signal after a checkpoint; the same
    command continues)."""
    import subprocess

    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", LAUNCHER, "-n", str(ranks),
           "--stdout", str(log_dir / "rank{rank}.out"), "--stderr", str(log_dir / "rank{rank}.err"),
           "-m", "dip_scale.train", str(RECIPE), *overrides]
    print(f"training on {ranks} rank(s) of {threads} thread(s) (composer -n {ranks} -m dip_scale.train "
          f"{os.path.relpath(RECIPE)} ...)", flush=True)
    proc = subprocess.Popen(cmd, env=train_environment(threads, users))
    try:
        if beside is not None:
            try:
                beside()
            except Exception as err:  # noqa: BLE001  (done again after training; training goes on)
                print(f"note: {err!r} beside training; tried again at the end", file=sys.stderr, flush=True)
        code = proc.wait()
    except KeyboardInterrupt:  # the launcher and the ranks got the same Ctrl-C: they checkpoint and stop
        print("\nCtrl-C: the ranks checkpoint the step in progress and stop (Ctrl-C again: stop at once, losing "
              "the steps since the last checkpoint)", file=sys.stderr, flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise  # main's caller says where the run stands (interrupted)
    if code != 0:
        print(f"training exited with {code}" + (f"; the other ranks' logs: {log_dir}" if ranks > 1 else ""),
              file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dip_scale.demo", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for data, runs and results (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--ranks", type=int, default=1,
                        help="data-parallel training processes (default 1); the numbers depend on it")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per rank (default 2); the numbers depend on it")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, key=value (e.g. eval.every=500)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before and after options
    for name in ("ranks", "threads"):
        if getattr(args, name) <= 0:
            build_parser().error(f"--{name} must be positive, got {getattr(args, name)}")
    users = {key: os.environ[key] for key in cpu_settings(1) if key in os.environ}
    pin_cpu(CLASSIFIER_THREADS)  # before training, alone on the machine: the same classifier for any flags

    from dip_scale.checkpoint import newest_complete
    from dip_scale.eval.grid import default_classes
    from dip_scale.recipe import ConfigError, load_recipe, model_config

    out = Path(args.out)
    data, run_root = out / "data", out / "runs"
    classifier = data / f"classifier-{RESOLUTION}px.safetensors"
    overrides = [f"data.remote={data / 'train'}", f"eval.reference={data / 'reference'}",
                 f"eval.classifier={classifier}", f"checkpoint.save_folder={run_root}", *args.overrides]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    try:
        recipe = load_recipe(str(RECIPE), overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = run_root / recipe.run_name
    done = newest_complete(run)
    if done is not None and done[0] >= recipe.train.max_steps:
        print(f"run {recipe.run_name} is already complete at step {done[0]} ({run}): nothing to train; "
              f"its results follow (--steps N trains on to step N)", flush=True)
    else:
        ensure_split(data / "train", TRAIN_IMAGES, seed=0)
        ensure_split(data / "reference", REFERENCE_IMAGES, seed=1)
    weights, real_weights = inception_weights(out)
    held_out = ensure_classifier(classifier)
    if done is None or done[0] < recipe.train.max_steps:
        if not real_weights:
            print("note: torch-fidelity's Inception weights are not in the torch hub cache, and nothing is "
                  "downloaded: FID below uses an Inception with fixed random weights (see the end).", flush=True)
        def beside():  # the real images' scores while the ranks train, on the core the evaluations use
            import torch

            torch.set_num_threads(int(users.get("OMP_NUM_THREADS", 1)))
            real_check(out, weights, data / "reference", classifier, recipe.eval.num_samples)

        code = train(args.ranks, args.threads, users, [*overrides, f"eval.inception_path={weights}"], out / "logs",
                     beside=beside)
        if code != 0:
            return code

    rows = evaluations(run)
    real = real_check(out, weights, data / "reference", classifier, recipe.eval.num_samples)
    grids = sorted((run / "samples").glob("step-*.png"))
    classes = recipe.logging.sample_classes or default_classes(model_config(recipe).num_classes)  # as SampleGrid
    real_grid = write_real_grid(out / "real_classes.png", sorted(set(classes)), per_class=2)
    sample, evaluate = commands(out, run, None if real_weights else weights, classifier, recipe.eval.num_samples,
                                recipe.eval.batch_size)
    print(f"\nDiP demo: {run} ({recipe.train.max_steps} steps)")
    print(f"  sample grid (EMA, one column per class): {grids[-1] if grids else 'none'}")
    print(f"  real images of the same classes:         {real_grid}")
    print(f"  evaluations: {run / 'eval' / 'results.csv'}, plot {run / 'eval' / 'fid_vs_step.png'}\n")
    if rows:
        print_table(rows, real, real_weights)
    explain(real_weights, held_out, real)
    print(f"\nSample from the run, and evaluate its last checkpoint again (the last row above):\n  {sample}\n"
          f"  {evaluate}")
    return 0


def interrupted(out: Path) -> int:
    """After Ctrl-C: where the run stands and how to go on (130, the shell's status for it)."""
    from dip_scale.checkpoint import newest_complete

    done = None
    for run in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        done = newest_complete(run) or done
    where = f"the newest checkpoint is step {done[0]}" if done else "no checkpoint yet"
    print(f"\ndemo stopped (Ctrl-C): {where}; the same command continues from there", file=sys.stderr)
    return 130


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(interrupted(Path(build_parser().parse_known_args()[0].out)))
