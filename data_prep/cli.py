"""The `dip-prep` command line (also `python -m data_prep`): write, merge and verify MDS datasets.

    dip-prep write imagenet /data/imagenet/train s3://bucket/imagenet256 --resolution 256 --workers 16
    dip-prep write folder /data/flowers ./flowers64 --resolution 64 --encoding png
    dip-prep write synthetic ./synthetic32 --num-images 10000 --resolution 32
    dip-prep merge s3://bucket/imagenet256
    dip-prep verify s3://bucket/imagenet256 --workers 16

Exit status: 0 on success, 1 on a reported problem (bad arguments or input, verify failures), 2 on usage
errors, 130 when interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep.errors import PrepError
from data_prep.plan import chunks_of_task, resolve_task
from data_prep.sources import FolderSource, ImageNetSource, Source, SyntheticSource
from dip_scale.data.layout import IMAGE_ENCODINGS
from dip_scale.storage import StoreUnavailable

_FORMATTER = argparse.RawDescriptionHelpFormatter

_WRITE_EPILOG = """\
examples:
  # ImageNet at 256 px, JPEG q95, 16 processes, straight to S3 (S3_ENDPOINT_URL for other stores):
  dip-prep write imagenet /data/imagenet/train s3://bucket/imagenet256 --resolution 256 --workers 16
  # the same as a 32-task Slurm array job (each task reads SLURM_ARRAY_TASK_ID), then merge once:
  sbatch --array=0-31 --wrap "dip-prep write imagenet /data/imagenet/train s3://bucket/in256 --workers 16"
  dip-prep merge s3://bucket/in256
  # lossless PNG at 512 px from any class-per-folder tree, failing on the first bad image:
  dip-prep write folder /data/flowers ./flowers512 --resolution 512 --encoding png --strict
  # a small synthetic set for a demo or a test:
  dip-prep write synthetic ./synthetic32 --num-images 2000 --resolution 32 --encoding raw

Rerunning the same command resumes: complete chunks are kept, interrupted ones are redone.
Bad inputs are skipped and listed in <out>/skipped.jsonl (per task: <out>/reports/), unless --strict.
"""


def _add_write_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output format")
    group.add_argument("--resolution", type=int, default=256, help="side of the ADM centre crop (default 256)")
    group.add_argument("--encoding", choices=IMAGE_ENCODINGS, default="jpeg",
                       help="image column: jpeg (smallest), png (lossless) or raw uint8 (fastest to read); "
                            "default jpeg")
    group.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1-100, 4:4:4 chroma (default 95)")
    group.add_argument("--compression", default=None,
                       help="shard compression, e.g. zstd or zstd:7 (useful with raw; default none)")
    group.add_argument("--shard-size", default="64mb", help="bytes per shard before a new one starts (default 64mb)")
    group = parser.add_argument_group("work")
    group.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    group.add_argument("--chunk-size", type=int, default=1024,
                       help="images per chunk, the unit of work, of resuming and of task splitting (default 1024)")
    group.add_argument("--task-index", type=int, default=None,
                       help="this task's index when the write is split over machines (default: "
                            "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN if set, else 0)")
    group.add_argument("--num-tasks", type=int, default=None,
                       help="number of tasks (default: SLURM_ARRAY_TASK_COUNT if set, else 1)")
    group.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    group.add_argument("--report", default=None,
                       help="file or s3:// URL for this task's list of skipped inputs (default: in the output)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--dry-run", action="store_true", help="list the source, print the plan, write nothing")


def _parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="dip-prep", description=description, epilog="examples:\n" + examples,
                                     formatter_class=_FORMATTER)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{write,merge,verify}")

    write = commands.add_parser("write", help="shard a source into MDS parts (then merge, with one task)",
                                description="Shard a source into MDS parts: ADM centre crop, encode, write to a "
                                            "folder or s3://bucket/prefix.", epilog=_WRITE_EPILOG,
                                formatter_class=_FORMATTER)
    sources = write.add_subparsers(dest="source", required=True, metavar="{imagenet,folder,synthetic}")
    imagenet = sources.add_parser(
        "imagenet", help="an ImageNet train folder (synset-named class folders)", formatter_class=_FORMATTER,
        description="ImageNet train folder: SRC/n01440764/*.JPEG, ... Labels are the standard class indices "
                    "(sorted synsets); names come from LOC_synset_mapping.txt found next to SRC, or --synset-mapping.",
        epilog="example:\n  dip-prep write imagenet /data/imagenet/train s3://bucket/imagenet256 --workers 16")
    imagenet.add_argument("src", help="the train folder")
    imagenet.add_argument("out", help="output folder or s3://bucket/prefix")
    imagenet.add_argument("--synset-mapping", default=None, help="file of 'n01440764 tench, Tinca tinca' lines")
    _add_write_options(imagenet)
    folder = sources.add_parser(
        "folder", help="any class-per-folder image tree", formatter_class=_FORMATTER,
        description="Any tree SRC/<class>/**/<image>: classes are the sorted sub-folder names.",
        epilog="example:\n  dip-prep write folder /data/flowers ./flowers256 --encoding png")
    folder.add_argument("src", help="the root folder")
    folder.add_argument("out", help="output folder or s3://bucket/prefix")
    _add_write_options(folder)
    synthetic = sources.add_parser(
        "synthetic", help="the built-in procedural class-conditional set", formatter_class=_FORMATTER,
        description="Ten textured classes with pixel-scale detail (dip_scale.data.synthetic), rendered at the "
                    "target resolution; image i is a pure function of (seed, i).",
        epilog="example:\n  dip-prep write synthetic ./synthetic64 --num-images 5000 --resolution 64 --encoding png")
    synthetic.add_argument("out", help="output folder or s3://bucket/prefix")
    synthetic.add_argument("--num-images", type=int, required=True, help="number of images")
    synthetic.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    _add_write_options(synthetic)

    merge = commands.add_parser(
        "merge", help="join the parts of a split write into one dataset", formatter_class=_FORMATTER,
        description="Write index.json, dataset.json and skipped.jsonl for a write whose chunks are all complete.",
        epilog="example:\n  dip-prep merge s3://bucket/imagenet256")
    merge.add_argument("out", help="the write's output folder or s3://bucket/prefix")

    verify = commands.add_parser(
        "verify", help="check every shard and sample; non-zero exit on any problem", formatter_class=_FORMATTER,
        description="Check hashes, decodability, counts and label range of a dataset.",
        epilog="examples:\n  dip-prep verify ./synthetic32\n  dip-prep verify s3://bucket/imagenet256 --workers 16")
    verify.add_argument("path", help="dataset folder or s3://bucket/prefix")
    verify.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _source(args: argparse.Namespace) -> Source:
    progress = not args.no_progress
    if args.source == "imagenet":
        return ImageNetSource(args.src, synset_mapping=args.synset_mapping, progress=progress)
    if args.source == "folder":
        return FolderSource(args.src, progress=progress)
    return SyntheticSource(num_images=args.num_images, seed=args.seed)


def _write(args: argparse.Namespace) -> int:
    from data_prep.write import WriteOptions, make_plan, write_dataset

    task_index, num_tasks = resolve_task(args.task_index, args.num_tasks)
    options = WriteOptions(resolution=args.resolution, encoding=args.encoding, jpeg_quality=args.jpeg_quality,
                           compression=args.compression, chunk_size=args.chunk_size, shard_size_limit=args.shard_size,
                           num_workers=args.workers, strict=args.strict, task_index=task_index, num_tasks=num_tasks,
                           report=args.report, progress=not args.no_progress)
    options.validate()
    source = _source(args)
    for note in source.notes:
        print(f"dip-prep: note: {note}", file=sys.stderr)
    for problem in source.problems:
        print(f"dip-prep: source problem: {problem.key}: {problem.reason}", file=sys.stderr)
    if args.dry_run:
        plan = make_plan(source, options)
        mine = chunks_of_task(plan.num_chunks, task_index, num_tasks)
        print(f"dip-prep write (dry run) -> {args.out}\n"
              f"  source      {plan.source}\n"
              f"  classes     {len(plan.class_names)}: {', '.join(plan.class_names[:5])}"
              f"{', ...' if len(plan.class_names) > 5 else ''}\n"
              f"  images      {plan.num_items:,} in {plan.num_chunks:,} chunks of {plan.chunk_size:,}\n"
              f"  format      {plan.resolution}x{plan.resolution} {plan.encoding}"
              f"{f' q{plan.jpeg_quality}' if plan.jpeg_quality else ''}, compression {plan.compression}\n"
              f"  this task   {task_index} of {num_tasks}: {len(mine):,} chunks, {options.num_workers} workers")
        return 0
    summary = write_dataset(source, args.out, options)
    print(summary.format())
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_prep.merge import merge_dataset

    print(merge_dataset(args.out).format())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify_dataset

    if args.workers <= 0:
        raise PrepError(f"--workers must be positive, got {args.workers}")
    report = verify_dataset(args.path, num_workers=args.workers, progress=not args.no_progress)
    print(report.format())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"write": _write, "merge": _merge, "verify": _verify}[args.command](args)
    except (PrepError, FileNotFoundError) as error:
        print(f"dip-prep: error: {error}", file=sys.stderr)
        return 1
    except (PermissionError, StoreUnavailable) as error:  # they name the URL, never the credentials
        print(f"dip-prep: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dip-prep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
