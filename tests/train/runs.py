"""Training runs the preemption tests start, watch, interrupt and rerun: real `python -m dip_scale.train`
processes (the composer launcher for several ranks), as a user or Slurm runs them.

    run = start(tmp / "a", overrides, name="first")
    run.wait_step(5)                      # polls the run's metrics.jsonl
    run.signal(signal.SIGTERM)            # rank processes only, as Slurm delivers it to a job step
    assert run.wait() == 75

Every run logs the sample ids of each step (logging.sample_ids) and the loss of every step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from tests.train.launch import PLAIN, ROOT, TINY, free_port

RUN_NAME = "tiny"
NUM_IMAGES = 48
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = NUM_IMAGES // GLOBAL_BATCH
STEPS = 12
EVERY = 4
KEEP_LAST = 2
MILESTONE = 4
BASE = [*PLAIN, "logging.sample_every=0", "logging.log_every=1", "logging.sample_ids=true", f"run_name={RUN_NAME}",
        f"train.global_batch_size={GLOBAL_BATCH}", "data.num_workers=0", f"train.max_steps={STEPS}",
        f"checkpoint.every={EVERY}", f"checkpoint.keep_last={KEEP_LAST}", f"checkpoint.milestones=[{MILESTONE}]"]


def make_data(out: Path) -> str:
    from data_prep.synthetic import write_synthetic_shards

    write_synthetic_shards(str(out), NUM_IMAGES, resolution=32, seed=0)
    return str(out)


@dataclass
class Run:
    proc: subprocess.Popen
    cmd: list[str]
    out: Path
    """Folder of this process's logs (stdout.txt, stderr.txt, rank<R>.err)."""
    run_dir: Path
    """The run's local folder (metrics.jsonl, samples_seen.jsonl, checkpoints/)."""
    nproc: int
    metrics_offset: int = 0
    started: float = field(default_factory=time.monotonic)

    def steps(self) -> list[int]:
        """Steps this process has finished (from rank 0's metrics.jsonl, past what earlier runs wrote)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        with open(path, "rb") as f:
            f.seek(self.metrics_offset)
            lines = f.read().decode().splitlines(keepends=True)
        return [json.loads(line)["step"] for line in lines if line.endswith("\n")]

    def wait_step(self, step: int, timeout: float = 300) -> int:
        """Poll until this process has finished `step`; returns the newest step it reports."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.steps()
            if done and max(done) >= step:
                return max(done)
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before step {step}\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout}s\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 300) -> None:
        """Poll until `text` appears in the process's output."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before {text!r}\n{self.log()}")
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s\n{self.log()}"
            time.sleep(0.05)

    def ranks(self) -> list[psutil.Process]:
        if "dip_scale.train" in self.cmd[1:3]:
            return [psutil.Process(self.proc.pid)]
        children = psutil.Process(self.proc.pid).children()
        return [p for p in children if "dip_scale.train" in " ".join(p.cmdline())]

    def signal(self, sig: int, ranks: list[int] | None = None) -> None:
        """Send `sig` to the rank processes (all, or those listed by index)."""
        procs = self.ranks()
        for i, p in enumerate(procs):
            if ranks is None or i in ranks:
                p.send_signal(sig)

    def signal_now(self, sig: int) -> None:
        """Send `sig` to all ranks while they are frozen (SIGSTOP ... SIGCONT), so that the step they see it
        in is the one the caller just observed or the next, however fast the steps run."""
        procs = self.ranks()
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        for p in procs:
            p.send_signal(sig)
        for p in procs:
            p.send_signal(signal.SIGCONT)

    def ctrl_c(self) -> None:
        """Ctrl-C in the terminal of a `terminal=True` run: SIGINT to every process of its group at once."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end within {timeout}s\n{self.log()}") from None

    def kill(self) -> None:
        for p in [*psutil.Process(self.proc.pid).children(recursive=True), psutil.Process(self.proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def log(self, tail: int = 20000) -> str:
        text = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.out.glob("*.txt"))
                         if p.stat().st_size)
        text += "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.out.glob("rank*.err")))
        return f"$ {' '.join(self.cmd)}\n{text[-tail:]}"


def own_shm_possible() -> bool:
    """Whether a process can get a /dev/shm of its own (a private mount: needs root), which is what lets two
    'nodes' share this machine (Streaming keys its shared memory by node, not by job)."""
    try:
        return subprocess.run(_OWN_SHM + ["true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_OWN_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


def start(out: Path, overrides: list[str], run_dir: Path, nproc: int = 1, env: dict | None = None,
          node: tuple[int, int, int] | None = None, terminal: bool = False) -> Run:
    """Start a training process; `run_dir` is where the run keeps its local files (for watching it).

    nproc > 1 starts the composer launcher with that many ranks; `node=(node_rank, nodes, master_port)` makes it
    one node of a multi-node job (each node a launcher of nproc ranks, as cluster/launch_node.sh runs them,
    with a /dev/shm of its own). terminal=True runs `composer -n nproc -m dip_scale.train ...` as typed in a
    terminal: the launcher as shipped, in a process group of its own (see Run.ctrl_c)."""
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    args = ["-m", "dip_scale.train", str(TINY), *BASE, *overrides]
    if terminal:
        cmd = [str(bin_dir / "composer"), "-n", str(nproc), "--stdout", str(out / "rank{rank}.out"),
               "--stderr", str(out / "rank{rank}.err"), *args]
    elif nproc == 1 and node is None:
        cmd = [sys.executable, *args]
    else:
        # The launcher ignores the signals (as cluster/launch_node.sh does) and waits for its ranks.
        launcher = ("import signal, sys\nfrom composer.cli.launcher import main\n"
                    "for s in (signal.SIGUSR1, signal.SIGTERM): signal.signal(s, lambda *_: None)\nsys.exit(main())")
        node_rank, nodes, port = node or (0, 1, free_port())
        cmd = [sys.executable, "-c", launcher, "-n", str(nproc), "--world_size", str(nproc * nodes),
               "--node_rank", str(node_rank), "--base_rank", str(node_rank * nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--stdout", str(out / "rank{rank}.out"),
               "--stderr", str(out / "rank{rank}.err"), *args]
        if node is not None:
            cmd = _OWN_SHM + cmd
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DIP_CACHE_DIR": str(out / "cache"),
                **(env or {})}
    metrics = run_dir / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.is_file() else 0
    with open(out / "stdout.txt", "ab") as stdout, open(out / "stderr.txt", "ab") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=stdout, stderr=stderr, start_new_session=terminal)
    return Run(proc, cmd, out, run_dir, nproc, offset)


def run(out: Path, overrides: list[str], run_dir: Path, nproc: int = 1, env: dict | None = None,
        expect: int = 0, timeout: float = 600) -> Run:
    """Train to the end; assert the exit status."""
    r = start(out, overrides, run_dir, nproc, env)
    rc = r.wait(timeout)
    assert rc == expect, f"exit {rc}, expected {expect}\n{r.log()}"
    return r


# ----------------------------------------------------------------------------------------------------
# What a run left behind
# ----------------------------------------------------------------------------------------------------


def checkpoint_state(run_dir: Path, step: int) -> dict:
    """Composer's state of a step-N checkpoint (model with EMA, optimizer, timestamp, ...)."""
    path = run_dir / "checkpoints" / f"step-{step:09d}" / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{what}: different entries {sorted(ta.keys() ^ tb.keys())[:5]}"
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{what}: {len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"


def samples_by_step(*run_dirs: Path) -> dict[int, list[int]]:
    """step -> the ids of its global batch (ranks in order), from samples_seen.jsonl of one or more local
    folders of a run. A step repeated after a resume keeps its last record: that update is the one that
    survived; the earlier record must have had the same ids (the same data after the same checkpoint)."""
    per_rank: dict[tuple[int, int], list[int]] = {}
    for run_dir in run_dirs:
        path = run_dir / "samples_seen.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            r = json.loads(line)
            key = (r["step"], r["rank"])
            assert per_rank.get(key, r["ids"]) == r["ids"], f"step {r['step']} rank {r['rank']}: other data on replay"
            per_rank[key] = r["ids"]
    steps: dict[int, list[int]] = {}
    for (step, rank) in sorted(per_rank):
        steps.setdefault(step, []).extend(per_rank[(step, rank)])
    return steps


def assert_each_epoch_once(steps: dict[int, list[int]], total_steps: int) -> None:
    """Steps 1..total all ran, and every full epoch saw every sample exactly once."""
    assert sorted(steps) == list(range(1, total_steps + 1)), f"steps seen: {sorted(steps)}"
    for epoch in range(total_steps // STEPS_PER_EPOCH):
        ids = [i for s in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1) for i in steps[s]]
        assert sorted(ids) == list(range(NUM_IMAGES)), f"epoch {epoch}: ids {sorted(ids)}"


def losses(*run_dirs: Path, key: str = "loss/train/total") -> dict[int, float]:
    """step -> loss of the surviving update (the last record of each step)."""
    out = {}
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():  # written by global rank 0 only
            continue
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[r["step"]] = r[key]
    return out


def data_args(data: str, save_folder: str | Path, local_folder: str | Path | None = None) -> list[str]:
    args = [f"data.remote={data}", f"checkpoint.save_folder={save_folder}"]
    return args + ([f"checkpoint.local_folder={local_folder}"] if local_folder is not None else [])


def straight(tmp: Path, data: str) -> Path:
    """Train STEPS steps without interruption; returns the run's folder."""
    run(tmp / "log", data_args(data, tmp / "ckpt"), tmp / "ckpt" / RUN_NAME)
    return tmp / "ckpt" / RUN_NAME
