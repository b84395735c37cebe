"""`dip-prep write`: shard a source into MDS parts with N worker processes, resumably, then merge.

Work is cut into the plan's fixed chunks (see plan.py). This task takes its share of chunks, skips those
already complete, and hands the rest to worker processes, each writing whole chunks (chunk.py). A crash
or kill loses at most the chunks in flight: running the same command again deletes their remains and
writes them anew. With one task the parts are merged at the end; with several (a Slurm array), run
`dip-prep merge` once all have finished.

    summary = write_dataset(ImageNetSource("/data/imagenet/train"), "s3://bucket/imagenet256",
                            WriteOptions(resolution=256, encoding="jpeg", num_workers=16))
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from streaming.base.compression import is_compression
from streaming.base.util import bytes_to_int
from tqdm import tqdm

from data_prep.chunk import ChunkJob, ChunkResult, write_chunk
from data_prep.errors import PrepError
from data_prep.merge import MergeSummary, merge_dataset
from data_prep.parts import done_chunks, read_plan, read_results
from data_prep.plan import Plan, chunks_of_task
from data_prep.sources.base import Problem, Source
from data_prep.workers import worker_context
from dip_scale.data.layout import IMAGE_ENCODINGS, PLAN_FILE, SKIPPED_FILE
from dip_scale.storage import Store, open_store


@dataclass(frozen=True)
class WriteOptions:
    resolution: int = 256
    """Side of the square ADM centre crop (256 or 512 in the paper)."""
    encoding: str = "jpeg"
    """Image column: jpeg, png or raw (uint8 pixels)."""
    jpeg_quality: int = 95
    """JPEG quality 1-100 (used with encoding jpeg only)."""
    compression: str | None = None
    """Shard compression by Streaming's name (zstd, zstd:7, gz, br, ...); pointless for jpeg/png."""
    chunk_size: int = 1024
    """Images per chunk: the unit of work, of crash recovery and of task splitting."""
    shard_size_limit: int | str = "64mb"
    """Bytes per shard before Streaming starts a new one."""
    num_workers: int = 1
    """Worker processes; each writes whole chunks."""
    strict: bool = False
    """Fail on the first bad input instead of skipping and reporting it."""
    task_index: int = 0
    num_tasks: int = 1
    report: str | None = None
    """Where this task's report of skipped inputs goes (file path or s3:// URL); default in the output."""
    progress: bool = True
    """Show progress bars (images/s, ETA) on stderr."""

    def validate(self) -> None:
        if self.resolution <= 0:
            raise PrepError(f"--resolution must be positive, got {self.resolution}")
        if self.encoding not in IMAGE_ENCODINGS:
            raise PrepError(f"--encoding must be one of {', '.join(IMAGE_ENCODINGS)}, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if self.compression and not is_compression(self.compression):
            raise PrepError(f"--compression {self.compression!r} is not one Streaming knows "
                            "(e.g. zstd, zstd:7, gz, br)")
        if self.chunk_size <= 0:
            raise PrepError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.num_workers <= 0:
            raise PrepError(f"--workers must be positive, got {self.num_workers}")
        if not 0 <= self.task_index < self.num_tasks:
            raise PrepError(f"task index {self.task_index} is not in [0, {self.num_tasks})")
        try:
            limit = bytes_to_int(self.shard_size_limit)
        except ValueError:
            raise PrepError(f"--shard-size {self.shard_size_limit!r} is not a size like 64mb") from None
        if not 0 < limit < 2**32:
            raise PrepError(f"--shard-size must be between 1 byte and 4 GiB, got {self.shard_size_limit!r}")


@dataclass
class WriteSummary:
    out: str
    task_index: int
    num_tasks: int
    chunks: int = 0
    """Chunks owned by this task."""
    chunks_written: int = 0
    """Of those, written by this run (the rest were complete already)."""
    images_written: int = 0
    """Images in this task's complete chunks (all runs)."""
    images_this_run: int = 0
    """Inputs processed (written or skipped) by this run."""
    skipped: list[Problem] = field(default_factory=list)
    source_problems: list[Problem] = field(default_factory=list)
    bytes: int = 0
    shards: int = 0
    seconds: float = 0.0
    num_workers: int = 1
    report: str = ""
    merge: MergeSummary | None = None

    @property
    def images_per_second(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        rate = self.images_per_second
        lines = [
            f"dip-prep write: task {self.task_index} of {self.num_tasks} done in {self.seconds:,.1f} s -> {self.out}",
            f"  chunks      {self.chunks_written:,} written now, {self.chunks - self.chunks_written:,} already complete"
            f" ({self.chunks:,} for this task)",
            f"  images      {self.images_written:,} written, {len(self.skipped):,} skipped "
            f"({self.images_this_run:,} processed by this run)",
            f"  shards      {self.shards:,}, {self.bytes / 1e6:,.1f} MB",
            f"  throughput  {rate:,.1f} images/s ({rate / self.num_workers:,.1f} per worker, "
            f"{self.num_workers} workers)",
        ]
        if self.source_problems:
            lines.append(f"  source      {len(self.source_problems):,} problems (e.g. empty class folders)")
        if self.skipped or self.source_problems:
            lines.append(f"  report      {self.report}")
        if self.merge is not None:
            lines.append("  " + self.merge.format())
        elif self.num_tasks > 1:
            lines.append(f"  when all {self.num_tasks} tasks are done: dip-prep merge {self.out}")
        return "\n".join(lines)


def make_plan(source: Source, options: WriteOptions) -> Plan:
    return Plan(source=source.describe(), class_names=list(source.class_names), synsets=source.synsets,
                problems=[p.to_json() for p in source.problems], resolution=options.resolution,
                encoding=options.encoding,
                jpeg_quality=options.jpeg_quality if options.encoding == "jpeg" else None,
                compression=options.compression or None, chunk_size=options.chunk_size,
                shard_size_limit=bytes_to_int(options.shard_size_limit), source_root=source.root)


def _agree_on_plan(out: Store, plan: Plan) -> None:
    """Store the plan, or check that the one already stored (by another task or run) is the same."""
    stored = read_plan(out)
    if stored is None:
        if not out.is_empty():
            raise PrepError(f"output {out.url} is not empty and has no {PLAN_FILE}: it is not an unfinished "
                            "`dip-prep write`; choose an empty or new output")
        out.write_json(PLAN_FILE, plan.to_json())
        return
    differences = plan.differences(stored)
    if differences:
        raise PrepError(f"output {out.url} holds a different write ({out.url_of(PLAN_FILE)}):\n  "
                        + "\n  ".join(differences)
                        + "\nrerun with the same arguments and source to resume, or write to a new output")


# -- worker processes -------------------------------------------------------------------------------

_progress_queue: multiprocessing.Queue | None = None


def _init_worker(progress_queue: multiprocessing.Queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _report_progress(count: int) -> None:
    if _progress_queue is not None and count:
        _progress_queue.put(count)


def _write_chunk_in_worker(job: ChunkJob) -> ChunkResult:
    return write_chunk(job, _report_progress)


def _drain(progress_queue: multiprocessing.Queue, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _run_in_pool(jobs: Iterator[ChunkJob], num_workers: int, bar: tqdm) -> list[ChunkResult]:
    context = worker_context()
    progress_queue = context.Queue()
    results: list[ChunkResult] = []
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        running: set[Future] = set()
        try:
            while True:
                # Keep a bounded number of chunks queued: jobs carry their item lists.
                while len(running) < 2 * num_workers and (job := next(jobs, None)) is not None:
                    running.add(pool.submit(_write_chunk_in_worker, job))
                if not running:
                    break
                finished, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for future in finished:
                    result = future.result()  # a worker's error stops the write here
                    results.append(result)
                    bar.set_postfix(skipped=sum(len(r.skipped) for r in results), refresh=False)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    _drain(progress_queue, bar)  # the workers' last counts, flushed as they exited
    return results


def _write_report(url: str, problems: list[Problem], source_problems: list[Problem]) -> None:
    lines = [json.dumps({**p.to_json(), "kind": "source"}) for p in source_problems]
    lines += [json.dumps({**p.to_json(), "kind": "input"}) for p in problems]
    parent, _, name = url.rstrip("/").rpartition("/")
    open_store(parent or ".").write_bytes(name, "".join(line + "\n" for line in lines).encode())


# -- the command ------------------------------------------------------------------------------------

def write_dataset(source: Source, out_url: str, options: WriteOptions) -> WriteSummary:
    """Write this task's share of `source` into `out_url`; merge too when there is a single task."""
    options.validate()
    if source.problems and options.strict:
        first = source.problems[0]
        raise PrepError(f"source problem {first.key!r}: {first.reason} (--strict; {len(source.problems)} in all)")
    started = time.perf_counter()
    out = open_store(out_url)
    plan = make_plan(source, options)
    if plan.num_items == 0:
        raise PrepError(f"the source has no images (source problems: {len(source.problems)})")
    _agree_on_plan(out, plan)

    mine = chunks_of_task(plan.num_chunks, options.task_index, options.num_tasks)
    complete = done_chunks(out)
    pending = [c for c in mine if c not in complete]
    summary = WriteSummary(out=out.url, task_index=options.task_index, num_tasks=options.num_tasks,
                           chunks=len(mine), chunks_written=len(pending), num_workers=options.num_workers,
                           source_problems=list(source.problems) if options.task_index == 0 else [])

    def jobs() -> Iterator[ChunkJob]:
        loader = source.loader()
        for chunk in pending:
            start, stop = plan.chunk_range(chunk)
            yield ChunkJob(chunk=chunk, items=source.items(start, stop), loader=loader, out_url=out.url,
                           resolution=plan.resolution, encoding=plan.encoding, jpeg_quality=plan.jpeg_quality,
                           compression=plan.compression, shard_size_limit=plan.shard_size_limit,
                           strict=options.strict)

    total = sum(plan.chunk_range(c)[1] - plan.chunk_range(c)[0] for c in pending)
    # Slurm logs are not terminals: refresh rarely there instead of flooding the log.
    interval = 0.5 if os.isatty(2) else 30.0
    with tqdm(total=total, desc=f"task {options.task_index}/{options.num_tasks}", unit="img",
              disable=not options.progress or not pending, mininterval=interval, smoothing=0.05) as bar:
        if options.num_workers == 1:
            fresh = []
            for job in jobs():
                fresh.append(write_chunk(job, bar.update))
                bar.set_postfix(skipped=sum(len(r.skipped) for r in fresh), refresh=False)
        else:
            fresh = _run_in_pool(jobs(), options.num_workers, bar)

    results = {r.chunk: r for r in fresh}
    results.update(read_results(out, [c for c in mine if c not in results]))
    for chunk in mine:
        result = results[chunk]
        summary.images_written += result.written
        summary.skipped += result.skipped
        summary.bytes += result.bytes
        summary.shards += result.shards
    summary.images_this_run = sum(r.written + len(r.skipped) for r in fresh)

    if options.num_tasks == 1:
        summary.merge = merge_dataset(out.url)
        summary.report = out.url_of(SKIPPED_FILE)
    if options.report or options.num_tasks > 1:
        summary.report = options.report or out.url_of(
            f"reports/task-{options.task_index:04d}-of-{options.num_tasks:04d}.jsonl")
        _write_report(summary.report, summary.skipped, summary.source_problems)
    summary.seconds = time.perf_counter() - started
    return summary
