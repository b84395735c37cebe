"""Scheduled FID evaluation during training, every `every` steps (recipe: eval.every).

mode "local" (the embedded default): in-process, small N, on the EMA weights. Every rank samples its
    share (the model's `ema_network()` context, collective for a sharded EMA); rank 0 computes the
    metrics, writes <run>/eval/step-<N>.n<num_samples>.json, updates the run's table and plot
    (dip_scale.eval.results) and logs eval/* to Composer's loggers at the current step.
mode "process": rank 0 starts `python -m dip_scale.eval.cli` (dip-eval, the program the Slurm job runs) on
    the newest complete checkpoint as a process of its own on this machine, and training goes on beside it:
    for spare capacity (the CPU demo's cores; on a GPU node it uses the first visible GPU, rank 0's). Its
    results land where local mode's do (<run>/eval/step-<N>.n<num_samples>.json, the run's table and plot),
    its output in <run>/eval/step-<N>.n<num_samples>.log; the pid goes to <run>/eval/jobs.jsonl. Retention
    keeps the checkpoint until its evaluation has ended. At the end of training the run waits for its
    evaluations. An evaluation whose process did not finish (the run was stopped or killed with it) is started
    again when the run resumes, if its checkpoint is still there.
mode "slurm": rank 0 submits `sbatch cluster/eval_fid.sh <newest checkpoint> <dip-eval args>` for the
    newest complete checkpoint of the run (<run>/checkpoints/step-N with its manifest) from a background
    thread, so training never waits; the job id goes to <run>/eval/jobs.jsonl and the job itself appends
    to the run's table. The run folder must be on a filesystem the job can read, and the checkpoint must
    outlive the queue wait (make eval steps checkpoint milestones when keep_last is small).

With a classifier of the synthetic classes (eval.classifier, dip_scale.eval.classifier) each evaluation also
reports the class accuracy of its samples, next to the FID.

The reference statistics and the Inception network are loaded at fit start, so a missing weights file
or reference fails the run at once rather than at the first evaluation. Local mode reading the reference
from shards computes their statistics once (cached next to them); use other shards than the training
data's own local folder, which Streaming does not let a job open twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.nn.parallel import DistributedDataParallel

from dip_scale.checkpoint import MANIFEST, newest_complete, step_of
from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.eval.classifier import SCORES, SyntheticClassifier
from dip_scale.eval.evaluate import EvalSettings, evaluate_model
from dip_scale.eval.flags import sampler_args
from dip_scale.eval.generate import check_num_samples, world
from dip_scale.eval.inception import InceptionFeatures
from dip_scale.eval.results import EVAL_DIR, METRICS, append_to_run, make_record, write_json
from dip_scale.eval.stats import load_reference

log = logging.getLogger(__name__)

class ScheduledEval(Callback):
    """The values come validated (recipe/load.py: ranges and combinations; train/preflight.py: the reference,
    the Inception weights and the job script exist).

    Args: every (steps), mode (local | process | slurm), num_samples (N, a multiple of the classes), batch_size (per
    rank), reference (ADM .npz, shards or image folder), inception_path (None: $DIP_INCEPTION_WEIGHTS or the
    torch hub cache), sampler (the recipe's), run_dir (the run's local folder: its checkpoints/ and eval/),
    seed (sample i uses the noise of (seed, i)), image_size (None: that of the training batches), script
    (slurm: the job script), sbatch_args (slurm: extra sbatch options), eval_args (slurm: extra dip-eval
    options), cache_dir (for s3:// references), classifier_path (None: no class accuracy), saver (process: the
    run's CheckpointSaver, which keeps each evaluated checkpoint until its process has ended)."""

    def __init__(self, every: int, mode: str = "local", num_samples: int = 1000, batch_size: int = 64,
                 reference: str | None = None, inception_path: str | None = None,
                 sampler: SamplerConfig | None = None, run_dir: str | Path = "runs/eval", seed: int = 0,
                 image_size: tuple[int, int] | None = None, script: str | Path = "cluster/eval_fid.sh",
                 sbatch_args: list[str] | None = None, eval_args: list[str] | None = None,
                 cache_dir: str | None = None, classifier_path: str | None = None, saver=None):
        self.every, self.mode = every, mode
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.reference, self.inception_path, self.cache_dir = str(reference), inception_path, cache_dir
        self.sampler = sampler or SamplerConfig()
        self.run_dir = Path(run_dir)
        self.image_size = tuple(image_size) if image_size else None
        self.script = Path(script)
        self.sbatch_args, self.eval_args = list(sbatch_args or []), list(eval_args or [])
        self.classifier_path = classifier_path
        self.saver = saver
        self.inception = None
        self.classifier = None
        self.ref_stats = None
        self.submitted_step = -1
        self._threads: list[threading.Thread] = []
        self._processes: list[tuple[int, subprocess.Popen, Path]] = []  # mode process: (step, process, log)
        self._queue: list[tuple[int, Path]] = []  # mode process: (step, checkpoint) waiting for their turn

    # -- events -------------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger):
        check_num_samples(self.num_samples, _network(state).config.num_classes)
        wandb_run = getattr(sys.modules.get("wandb"), "run", None)
        if wandb_run is not None and self.mode == "local":  # eval/* against the evaluated checkpoint's step
            wandb_run.define_metric("eval/step")
            wandb_run.define_metric("eval/*", step_metric="eval/step")
        if self.mode != "local":  # a resumed run does not submit again what it submitted before
            started = [j for j in read_jobs(self.run_dir) if "job_id" in j or "pid" in j or j.get("queued")]
            self.submitted_step = max((j["step"] for j in started), default=-1)
            if self.mode == "process" and world()[0] == 0:
                self.restart_lost(started)
        if self.mode == "local" and self.inception is None:
            device = next(_network(state).parameters()).device
            # Building the network draws its (overwritten) initial weights from the global generator.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.inception = InceptionFeatures(self.inception_path).to(device)
            self.ref_stats = load_reference(self.reference, self.inception, cache_dir=self.cache_dir,
                                            progress=world()[0] == 0 and sys.stderr.isatty())
            if self.classifier_path:
                self.classifier = SyntheticClassifier.load(self.classifier_path).to(device)

    def batch_end(self, state: State, logger: Logger):
        step = int(state.timestamp.batch)
        if self._processes:
            self.report_finished()  # and starts the next queued one
        if step % self.every:
            return
        if self.mode == "local":
            self.evaluate_local(state, logger, step)
        elif world()[0] == 0:
            self.submit(step)

    def fit_end(self, state: State, logger: Logger):
        for t in self._threads:
            t.join(timeout=120)
        while self._processes or self._queue:  # the run's table is complete when training returns
            if self._processes:
                step, proc, _ = self._processes[0]
                if proc.poll() is None:
                    log.info("waiting for the evaluation of step %d (process %d)", step, proc.pid)
                    proc.wait()
            self.report_finished()  # and starts the next queued one

    # -- local --------------------------------------------------------------------------------------

    def evaluate_local(self, state: State, logger: Logger, step: int) -> dict | None:
        settings = EvalSettings(num_samples=self.num_samples, batch_size=self.batch_size, seed=self.seed,
                                sampler=self.sampler)
        image_size = self.image_size or tuple(state.batch_get_item(0).shape[-2:])
        with _composer_model(state).ema_network() as net:
            out = evaluate_model(net, self.inception, self.ref_stats, settings, device=next(net.parameters()).device,
                                 image_size=image_size, progress=False, classifier=self.classifier)
        rank, world_size = world()
        if rank != 0:
            return None
        record = make_record(metrics=out.metrics, settings=settings.describe(), step=step, checkpoint=None,
                             reference=self.reference, wall_time_s=out.total_s, generation_s=out.generation_s,
                             images_per_s=out.images_per_s, world_size=world_size,
                             inception=self.inception.fingerprint, mode="local")
        write_json(str(self.record_path(step)), record)
        append_to_run(self.run_dir, record)
        metrics = record["metrics"]
        logger.log_metrics({"eval/step": step, **{f"eval/{m}": metrics[m] for m in (*METRICS, *SCORES)
                                                  if metrics.get(m) is not None}})
        log.info("%s", summary(record))
        return record

    # -- slurm --------------------------------------------------------------------------------------

    def command(self, checkpoint: Path) -> list[str]:
        """The Slurm submission (mode slurm) or the process (mode process) that evaluates `checkpoint`."""
        args = [str(checkpoint), "--reference", self.reference, "--num-samples", str(self.num_samples),
                "--batch-size", str(self.batch_size), "--seed", str(self.seed), *sampler_args(self.sampler),
                "--run-dir", str(self.run_dir.resolve())]
        if self.mode == "slurm":
            cmd = ["sbatch", "--parsable", *self.sbatch_args, str(self.script), *args]
        else:  # the record where local mode writes its own
            record = self.record_path(step_of(Path(checkpoint).name)).resolve()
            cmd = [sys.executable, "-m", "dip_scale.eval.cli", "--no-progress", *args, "--out", str(record)]
        if self.inception_path:
            cmd += ["--inception-weights", str(Path(self.inception_path).resolve())]
        if self.classifier_path:
            cmd += ["--classifier", str(Path(self.classifier_path).resolve())]
        wandb_run = getattr(sys.modules.get("wandb"), "run", None)
        if wandb_run is not None:  # a run of its own in this run's group, at the checkpoint's step
            step = step_of(Path(checkpoint).name)
            cmd += ["--wandb-project", wandb_run.project, "--wandb-group", wandb_run.group or wandb_run.name,
                    "--wandb-run-id", f"{wandb_run.id}-eval-{step}-n{self.num_samples}",
                    "--wandb-mode", "offline" if wandb_run.offline else "online"]
            if wandb_run.entity:
                cmd += ["--wandb-entity", wandb_run.entity]
        return cmd + self.eval_args

    def record_path(self, step: int) -> Path:
        return self.run_dir / EVAL_DIR / f"step-{step:09d}.n{self.num_samples}.json"

    def submit(self, step: int) -> threading.Thread | None:
        """Submit the newest complete checkpoint not yet submitted: in a background thread (slurm) or as a
        process of its own (process)."""
        found = newest_complete(self.run_dir)
        if found is None or found[0] <= self.submitted_step:
            log.warning("step %d: no new complete checkpoint under %s to evaluate (newest: %s)", step,
                        self.run_dir / "checkpoints", found[1] if found else None)
            return None
        ck_step, ck_path = found
        self.submitted_step = ck_step
        if self.mode == "process":
            self.start_process(ck_step, ck_path.resolve())
            return None
        thread = threading.Thread(target=self._sbatch, args=(ck_step, ck_path.resolve()), daemon=True,
                                  name=f"eval-submit-{ck_step}")
        thread.start()
        self._threads.append(thread)
        return thread

    def _sbatch(self, step: int, checkpoint: Path) -> None:
        cmd = self.command(checkpoint)
        entry = {"step": step, "checkpoint": str(checkpoint), "command": cmd,
                 "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        try:
            # sbatch hands this environment to the job; not the address of this process's wandb service, which
            # the job would try to join long after it is gone
            env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            if proc.returncode == 0:
                entry["job_id"] = proc.stdout.strip().split(";")[0]
                log.info("submitted FID evaluation of %s as Slurm job %s", checkpoint, entry["job_id"])
            else:
                entry["error"] = f"sbatch exited with {proc.returncode}: {proc.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as err:
            entry["error"] = f"sbatch failed: {err}"
        if "error" in entry:  # an evaluation that cannot be submitted must not stop training
            log.error("FID evaluation of %s not submitted: %s", checkpoint, entry["error"])
        folder = self.run_dir / EVAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "jobs.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # -- process ------------------------------------------------------------------------------------

    def start_process(self, step: int, checkpoint: Path) -> None:
        """Evaluate `checkpoint` with dip-eval beside training: now, or after the evaluation in progress (one at a
        time: evaluations that pile up on the same machine only slow each other and training down). Recorded in
        jobs.jsonl (queued, then with its pid); retention keeps the checkpoint until its evaluation has ended."""
        if self.saver is not None:
            self.saver.hold(step)
        if self._processes:
            log.info("the evaluation of step %d waits for that of step %d", step, self._processes[0][0])
            self._queue.append((step, checkpoint))
            self._record({"step": step, "checkpoint": str(checkpoint), "queued": True})
            return
        folder = self.run_dir / EVAL_DIR
        log_path = folder / f"step-{step:09d}.n{self.num_samples}.log"
        cmd = self.command(checkpoint)
        entry = {"step": step, "checkpoint": str(checkpoint), "command": cmd, "log": str(log_path)}
        # Not this rank's process group (dip-eval would join it as a rank of its own), nor its wandb service.
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES and k != "WANDB_SERVICE"}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
            entry["pid"] = proc.pid
            self._processes.append((step, proc, log_path))
            log.info("evaluating step %d beside training (process %d, output in %s)", step, proc.pid, log_path)
        except OSError as err:  # an evaluation that cannot start must not stop training
            entry["error"] = f"could not start dip-eval: {err}"
            log.error("FID evaluation of %s not started: %s", checkpoint, entry["error"])
            if self.saver is not None:
                self.saver.release(step)
        self._record(entry)

    def _record(self, entry: dict) -> None:
        folder = self.run_dir / EVAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        entry["time"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with open(folder / "jobs.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def report_finished(self) -> None:
        """Say what each evaluation process that has ended found (or where its output is, if it failed), and
        start the next queued one."""
        for entry in [e for e in self._processes if e[1].poll() is not None]:
            self._processes.remove(entry)
            step, proc, log_path = entry
            if self.saver is not None:
                self.saver.release(step)
            try:
                log.info("%s, beside training", summary(json.loads(self.record_path(step).read_text())))
            except (OSError, ValueError):
                log.error("the evaluation of step %d exited with %d without a result; its output: %s", step,
                          proc.returncode, log_path)
        if not self._processes and self._queue:
            self.start_process(*self._queue.pop(0))  # held since it was queued

    def restart_lost(self, started: list[dict]) -> None:
        """Start again the evaluations of an earlier start of this run that ended without a result (stopped or
        killed with the run, or still queued then), where the checkpoint is still there."""
        newest = {job["step"]: job for job in started if "pid" in job or job.get("queued")}  # its last entry
        for job in sorted(newest.values(), key=lambda j: j["step"]):
            if self.record_path(job["step"]).is_file() or ("pid" in job and _alive(job["pid"], job["checkpoint"])):
                continue
            checkpoint = Path(job["checkpoint"])
            if (checkpoint / MANIFEST).is_file():
                log.warning("the evaluation of step %d did not finish; starting it again", job["step"])
                self.start_process(job["step"], checkpoint)
            else:
                log.warning("the evaluation of step %d did not finish, and its checkpoint %s is gone",
                            job["step"], checkpoint)


# The variables Composer's launcher gives each rank: a process that inherits them believes it is a rank.
DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def summary(record: dict) -> str:
    """One line for the log: "step N: FID ..., class accuracy ... (N=..., ... s)"."""
    metrics = record["metrics"]
    judged = (f", class accuracy {metrics['class_accuracy']:.0%} (texture {metrics['texture_accuracy']:.0%}, "
              f"colours {metrics['colour_accuracy']:.0%})" if metrics.get("class_accuracy") is not None else "")
    return (f"step {record['step']}: FID {metrics['fid']:.4f}{judged} (N={record['num_samples']}, "
            f"{record['wall_time_s']:.1f} s)")


def _alive(pid: int, checkpoint: str) -> bool:
    """Whether process `pid` is still an evaluation of `checkpoint` (not a new process with a reused pid)."""
    try:
        return checkpoint.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_jobs(run_dir: Path) -> list[dict]:
    """The submissions recorded in <run_dir>/eval/jobs.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / EVAL_DIR / "jobs.jsonl"
    if not path.is_file():
        return []
    jobs = []
    for line in path.read_text().splitlines():
        try:
            jobs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return jobs


def _composer_model(state: State):
    model = state.model
    return model.module if isinstance(model, DistributedDataParallel) else model


def _network(state: State):
    """The DiP being trained (for its config and device)."""
    model = _composer_model(state)
    return getattr(model, "net", model)
