"""dip-eval: FID-50K (and sFID, Inception Score, precision/recall) of a DiP checkpoint, ADM protocol.

Examples:
  # 1 GPU: our checkpoint (EMA weights) against the ADM ImageNet 256 reference batch
  dip-eval runs/dip-xl/checkpoints/step-000400000 --reference VIRTUAL_imagenet256_labeled.npz

  # 8 GPUs on one node (torchrun or Composer's launcher), batch 128 per GPU, compiled, samples kept
  torchrun --nproc_per_node 8 -m dip_scale.eval.cli s3://bucket/runs/dip-xl/checkpoints/step-000400000 \\
      --reference VIRTUAL_imagenet256_labeled.npz --batch-size 128 --compile --save-npz samples.npz
  composer -n 8 -m dip_scale.eval.cli CHECKPOINT --reference VIRTUAL_imagenet256_labeled.npz

  # the authors' released weights, the paper's sampler (Euler, 100 steps, CFG 2.9 on [0.11, 0.97])
  dip-eval dip_xl_16.ckpt --official --reference VIRTUAL_imagenet256_labeled.npz \\
      --steps 100 --guidance-scale 2.9 --guidance-interval 0.11 0.97

  # a quick look: 1,000 samples against statistics of our validation shards (computed once, cached)
  dip-eval CHECKPOINT -n 1000 --reference /data/imagenet256/val

The ADM reference batch (mu/sigma of the Inception pool features, 10,000 images for precision/recall):
  https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
The Inception weights are never downloaded: see --inception-weights.

Results: a JSON next to the checkpoint (--out), a row in <run>/eval/results.csv and .md, the plot
<run>/eval/fid_vs_step.png, and with --wandb-project (or $WANDB_PROJECT) the metrics in wandb at the
checkpoint's training step (offline unless --wandb-mode online).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dip_scale.checkpoint import load_model
from dip_scale.eval.classifier import SyntheticClassifier
from dip_scale.eval.evaluate import EvalSettings, evaluate_model
from dip_scale.eval.flags import add_sampler_flags, sampler_from_flags
from dip_scale.eval.generate import check_num_samples, world
from dip_scale.eval.inception import InceptionFeatures
from dip_scale.eval.results import (
    append_to_run,
    default_json_path,
    log_wandb,
    make_record,
    save_samples_npz,
    write_json,
)
from dip_scale.eval.stats import check_local_reference, load_reference, read_npz_reference
from dip_scale.storage import StoreUnavailable

log = logging.getLogger("dip_scale.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dip-eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="our checkpoint (local path or s3:// URL; its EMA weights are used) or, "
                                      "with --official, the authors' released weights file")
    p.add_argument("--official", action="store_true", help="the checkpoint is the authors' released DiP weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that needs full unpickling (only for files you trust)")
    p.add_argument("--reference", required=True,
                   help="ADM reference .npz (local or s3://), MDS shards (folder with index.json or s3:// "
                        "prefix), or a folder of same-sized images")
    g = p.add_argument_group("samples")
    g.add_argument("-n", "--num-samples", type=int, default=50_000,
                   help="N, a multiple of the number of classes (default: 50000, 50 per ImageNet class)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per forward on each rank (default: 64)")
    g.add_argument("--seed", type=int, default=0, help="sample i uses the noise of (seed, i) (default: 0)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on CPU (default: auto)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for large N)")
    g.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when a GPU is visible, else cpu")
    add_sampler_flags(p.add_argument_group("sampler (default: the recipe's, from the checkpoint)"))
    g = p.add_argument_group("Inception and reference statistics")
    g.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                        "$DIP_INCEPTION_WEIGHTS, then the torch hub cache)")
    g.add_argument("--inception-batch-size", type=int, default=100,
                   help="images per Inception forward for reference statistics (default: 100)")
    g.add_argument("--num-workers", type=int, default=4, help="image decoding workers for reference statistics")
    g.add_argument("--cache-dir", default=None,
                   help="for s3:// references and checkpoints, and read-only data folders (default: "
                        "$DIP_CACHE_DIR/eval, else ~/.cache/dip_scale)")
    g.add_argument("--classifier", default=None,
                   help="a classifier of the synthetic classes (dip_scale.eval.classifier; the demo writes one): "
                        "also report the class accuracy of the samples")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, help="results JSON (default: <checkpoint>.eval-n<N>.json next to the "
                                               "checkpoint folder; s3:// checkpoints get it in the bucket)")
    g.add_argument("--run-dir", default=None,
                   help="run folder for eval/results.csv, .md and fid_vs_step.png (default: <run> for "
                        "<run>/checkpoints/step-N, else the checkpoint's folder; none for s3:// checkpoints)")
    g.add_argument("--save-npz", default=None,
                   help="also write the samples as an ADM-compatible .npz (arr_0 uint8 NHWC, arr_1 labels)")
    g.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT"),
                   help="log to wandb (default: $WANDB_PROJECT; unset = no wandb)")
    g.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"), help="wandb entity (default: "
                   "$WANDB_ENTITY, else the account's default)")
    g.add_argument("--wandb-group", default=os.environ.get("WANDB_RUN_GROUP"),
                   help="wandb group: the training run's name puts the evaluation next to it "
                        "(default: $WANDB_RUN_GROUP)")
    g.add_argument("--wandb-run-id", default=os.environ.get("WANDB_RUN_ID"),
                   help="id of this evaluation's wandb run; the same id again continues it (default: a new run)")
    g.add_argument("--wandb-mode", choices=("offline", "online", "disabled"),
                   default=os.environ.get("WANDB_MODE") or "offline", help="default: $WANDB_MODE, else offline")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------


def init_distributed() -> torch.device | None:
    """Join the job's process group when launched by torchrun or the composer launcher; the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_inputs(args) -> None:
    """Cheap checks before anything heavy is loaded."""
    ck = args.checkpoint
    if not ck.startswith("s3://") and not Path(ck).exists():
        raise FileNotFoundError(f"checkpoint {ck} does not exist; expected a checkpoint folder or file "
                                f"(e.g. runs/<run>/checkpoints/step-000400000) or an s3:// URL")
    ref = args.reference
    if ref.endswith(".npz") and not ref.startswith("s3://"):
        read_npz_reference(ref, load_images=False)  # missing, wrong keys or shapes: before the model is loaded
    elif not ref.startswith("s3://"):
        check_local_reference(ref)
    if args.num_samples <= 0 or args.batch_size <= 0:
        raise ValueError(f"--num-samples and --batch-size must be positive, got {args.num_samples} and "
                         f"{args.batch_size}")
    if args.save_npz and not args.save_npz.endswith(".npz"):
        raise ValueError(f"--save-npz must name a .npz file, got {args.save_npz}")


def checkpoint_location(given: str, source: str | None) -> str:
    """Where the evaluated checkpoint lives, for its results: the folder load_model resolved (a run folder
    resolves to its newest checkpoint); for s3:// the URL of that checkpoint, not the local download."""
    if not source:
        return given
    if not given.startswith("s3://"):
        return str(Path(source))
    name = Path(source).name
    if name.startswith("step-") and not given.rstrip("/").endswith(name):
        return f"{given.rstrip('/')}/checkpoints/{name}"
    return given


def default_run_dir(checkpoint: str) -> Path | None:
    """<run> for <run>/checkpoints/step-N[/file]; otherwise the checkpoint's folder; None for s3://."""
    if checkpoint.startswith("s3://"):
        return None
    p = Path(checkpoint).resolve()
    folder = p if p.is_dir() else p.parent
    if folder.name.startswith("step-") and folder.parent.name == "checkpoints":
        return folder.parent.parent
    return folder


def summary(record: dict) -> str:
    m = record["metrics"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    s = record["sampler"]
    lines = [f"step {record['step']}  N={record['num_samples']}  {s['steps']} {s['method']} steps  "
             f"cfg {s['guidance_scale']} on {tuple(s['guidance_interval'])}  seed {record['seed']}",
             f"  FID {fmt(m.get('fid'))}  sFID {fmt(m.get('sfid'))}  IS {fmt(m.get('inception_score'))}  "
             f"precision {fmt(m.get('precision'))}  recall {fmt(m.get('recall'))}"
             + (f"\n  class accuracy {m['class_accuracy']:.0%} (texture {m['texture_accuracy']:.0%}, colours "
                f"{m['colour_accuracy']:.0%})" if m.get("class_accuracy") is not None else ""),
             f"  {record['images_per_s']:.2f} images/s on {record['world_size']} rank(s), "
             f"wall time {record['wall_time_s']:.1f} s"]
    return "\n".join(lines + [f"  note: {n}" for n in record.get("notes", [])])


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def run(args) -> dict | None:
    t0 = time.perf_counter()
    check_inputs(args)
    device = init_distributed() or (torch.device(args.device) if args.device else default_device())
    rank, world_size = world()
    progress = not args.no_progress

    inception = InceptionFeatures(args.inception_weights).to(device)  # fails early when the weights are missing
    classifier = SyntheticClassifier.load(args.classifier).to(device) if args.classifier else None

    model, info = load_model(args.checkpoint, official=args.official, trust=args.trust_checkpoint,
                             cache_dir=args.cache_dir)
    model.to(device)
    sampler = sampler_from_flags(info["sampler"], args)
    settings = EvalSettings(num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                            sampler=sampler, precision=args.precision, compile_model=args.compile,
                            keep_images=bool(args.save_npz))
    check_num_samples(args.num_samples, model.config.num_classes)
    if classifier is not None and [classifier.resolution] * 2 != list(info["image_size"]):
        raise ValueError(f"--classifier {args.classifier} was trained at {classifier.resolution} px, but the model "
                         f"makes {info['image_size'][0]}x{info['image_size'][1]} images")

    reference = load_reference(args.reference, inception, cache_dir=args.cache_dir,
                               batch_size=args.inception_batch_size, num_workers=args.num_workers,
                               progress=progress)
    out = evaluate_model(model, inception, reference, settings, device=device,
                         image_size=tuple(info["image_size"]), progress=progress, classifier=classifier)
    if rank != 0:
        return None

    location = args.checkpoint if args.official else checkpoint_location(args.checkpoint, info.get("source"))
    record = make_record(metrics=out.metrics, settings=settings.describe(), step=info.get("step"),
                         checkpoint=location, reference=args.reference,
                         wall_time_s=time.perf_counter() - t0, generation_s=out.generation_s,
                         images_per_s=out.images_per_s, world_size=world_size, inception=inception.fingerprint,
                         mode="dip-eval")
    if args.save_npz:
        record["samples_npz"] = str(save_samples_npz(args.save_npz, out.images, out.labels))
    record["json"] = write_json(args.out or default_json_path(location, args.num_samples), record)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(location)
    if run_dir is not None:
        record["run_table"] = str(append_to_run(run_dir, record) / "results.csv")
    if args.wandb_project:
        record["wandb_run"] = log_wandb(record, project=args.wandb_project, entity=args.wandb_entity,
                                        group=args.wandb_group, run_id=args.wandb_run_id, mode=args.wandb_mode,
                                        directory=run_dir or Path.cwd())
    print(summary(record))
    print(f"  results: {record['json']}" + (f", {record['run_table']}" if "run_table" in record else ""))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(args)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the ranks leave together: one rank's teardown while rank 0 still writes hung once
    except (FileNotFoundError, ValueError, PermissionError) as err:
        parser.exit(2, f"dip-eval: error: {err}\n")
    except StoreUnavailable as err:  # try again later (a Slurm job script requeues on 75)
        parser.exit(75, f"dip-eval: error: {err}\n")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
