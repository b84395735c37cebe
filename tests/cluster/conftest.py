"""Real Slurm clusters for the tests of cluster/, started as root from a temporary folder (key, sockets, spool,
state, logs and slurm.conf all inside it) and stopped at the end of the session:

slurm          one node on localhost: munged, slurmctld and slurmd.
slurm_hosts    two nodes, each a network namespace of tests/cluster/hosts.py with its own slurmd, hostname,
               /etc/hosts and /dev/shm; slurmctld on the switch namespace (`head`), which the client commands
               (sbatch, scontrol, ...) enter too. munged serves all of them through its socket file.

Without the binaries (Debian packages slurm-wlm, munge; iproute2 for the hosts) or without root the tests are
skipped with the reason, except when DIP_REQUIRE_SLURM=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.train.launch import PLAIN

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
REQUEUE_DELAY_S = 3  # a requeued job starts this long after its requeue (Slurm's own delay: ~120 s)


def _missing_reason() -> str | None:
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local Slurm daemons must be started as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class LocalSlurm:
    """The daemons of a cluster (one node on localhost, or one node per host of `hosts`) and helpers to submit
    and watch jobs."""

    # Seconds without an answer from a node before slurmctld marks it DOWN: short on the hosts, whose nodes the
    # tests kill; Slurm's default on localhost.
    SLURMD_TIMEOUT = {True: 10, False: 300}

    def __init__(self, root: Path, hosts=None):
        self.root = root
        self.hosts = hosts
        self.host = socket.gethostname().split(".")[0]
        self.nodes = hosts.names if hosts else [self.host]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self._requeued_since: dict[tuple[str, str | None], float] = {}  # (job id, restarts) -> first seen
        # Jobs inherit this environment (sbatch exports it), so scontrol inside a job finds this cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    # -- daemons ------------------------------------------------------------------------------------

    def start(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(self._slurm_conf())
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", 20)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], host=None)
        self._wait_for(lambda: self._run("scontrol", "ping").returncode == 0 and
                       "UP" in self._run("scontrol", "ping").stdout, "slurmctld", 30)
        for i in range(len(self.nodes)):
            self.start_slurmd(i)
        self._wait_for(lambda: all(self.node_state(n) in ("idle", "mixed", "allocated") for n in self.nodes),
                       "slurmd to register", 60)

    def start_slurmd(self, i: int) -> None:
        """(Re)start node i's slurmd; it registers with slurmctld (ReturnToService=2 brings a DOWN node back)."""
        self._spawn(f"slurmd@{self.nodes[i]}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.nodes[i]],
                    host=i)

    def kill_node(self, i: int) -> None:
        """Node i dies: its link goes first (nothing it sends reaches anyone, as with a power loss), then every
        process on it, slurmd included."""
        self.hosts.unplug(i)
        self.hosts.kill(i)
        self.procs.pop(f"slurmd@{self.nodes[i]}").wait()

    def revive_node(self, i: int) -> None:
        self.hosts.plug(i)
        self.start_slurmd(i)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run("scancel", "--full", "--user", "root")  # nothing of ours keeps running after the tests
        for name in reversed(list(self.procs)):  # slurmd(s), slurmctld, munged
            proc = self.procs.pop(name)
            if proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _slurm_conf(self) -> str:
        mem = max(256, int(_real_memory_mb() * 0.8 / len(self.nodes)))
        root, host = self.root, self.host
        if self.hosts:
            from tests.cluster.hosts import HEAD_ADDR

            controller = f"head({HEAD_ADDR})"
            nodes = [f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN"
                     for n, a in zip(self.hosts.names, self.hosts.addrs)]
        else:
            controller = f"{host}(127.0.0.1)"
            nodes = [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN"]
        return "\n".join([
            "ClusterName=diptest",
            f"SlurmctldHost={controller}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",  # %n: the node's name, one folder per slurmd
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            f"SlurmdTimeout={self.SLURMD_TIMEOUT[self.hosts is not None]}",
            f"PlugStackConfig={root / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for the whole session
            f"KillWait={10 if self.hosts else 30}",  # SIGTERM to SIGKILL (a dead node's job waits for it)
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            *nodes,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, cmd: list[str], host: int | None = None) -> None:
        """Start a daemon: on localhost, or on host `host` of the hosts (None: on `head`)."""
        if self.hosts:
            cmd = self.hosts.command(host, cmd)
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.daemon_logs())
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n" + self.daemon_logs())

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted((self.root / "log").iterdir()):
            if not f.is_file():
                continue
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- clients ------------------------------------------------------------------------------------

    def _run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        command = list(cmd)
        if self.hosts:  # clients talk to slurmctld from `head`, the only place that reaches every node
            command = ["nsenter", f"--net=/run/netns/{self.hosts.switch}", "--", *command]
        return subprocess.run(command, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True)

    def node_state(self, node: str | None = None) -> str:
        """State of one node (default: the first) as sinfo prints it, lower case, without its flags."""
        r = self._run("sinfo", "-h", "-N", "-n", node or self.nodes[0], "-o", "%T")
        return r.stdout.strip().rstrip("*~#").lower() if r.returncode == 0 else ""

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        r = self._run("sbatch", "--parsable", *args, cwd=cwd, env=env)
        assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr}"
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...); {} once it is gone."""
        r = self._run("scontrol", "show", "job", "-o", str(job_id))
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def array_jobs(self, job_id: int) -> list[dict[str, str]]:
        r = self._run("scontrol", "show", "job", "-o", str(job_id))
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in r.stdout.splitlines() if line.strip()]

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self._run("scontrol", *args)

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        return self._run("scancel", *args)

    def wait(self, job_id: int, until=lambda j: j.get("JobState") in FINAL, timeout: float = 300,
             on_poll=None) -> dict[str, str]:
        """Poll the job until `until(job)`; `on_poll(job)` runs on every poll (e.g. to release a requeue)."""
        deadline = time.monotonic() + timeout
        job: dict[str, str] = {}
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if until(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not done within {timeout}s; last state {job}\n" + self.daemon_logs())

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no job is queued or running (e.g. before a node is made to fail)."""
        deadline = time.monotonic() + timeout
        while (jobs := self._run("squeue", "-h", "-o", "%i %T").stdout.split("\n")) and any(jobs):
            for line in filter(None, jobs):
                self.release_requeued(self.job(int(line.split()[0])))
            assert time.monotonic() < deadline, f"jobs still queued after {timeout}s: {jobs}"
            time.sleep(0.5)

    def release_requeued(self, job: dict[str, str]) -> None:
        """A requeued job waits ~120 s (Reason=BeginTime) before it may start again; start it after a few
        seconds instead.

        Not at once: slurmd may still be cleaning up the job's previous run, and a run launched then fails
        in the same second with exit code 1 (seen in 2 of 5 runs of tests/cluster/test_train.py). Nor with a
        start time a few seconds ahead: the scheduler would only notice it on its next pass, ~30-60 s later.
        So: note when the requeue is first seen, and start it now once REQUEUE_DELAY_S have passed."""
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            key = (job["JobId"], job.get("Restarts"))
            first_seen = self._requeued_since.setdefault(key, time.monotonic())
            if time.monotonic() - first_seen >= REQUEUE_DELAY_S:
                self.scontrol("update", f"jobid={job['JobId']}", "starttime=now")


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def require(reason: str | None) -> None:
    """Skip with `reason`, or fail when DIP_REQUIRE_SLURM=1 (CI must run these tests)."""
    if reason:
        if os.environ.get("DIP_REQUIRE_SLURM") == "1":
            pytest.fail(f"DIP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    require(_missing_reason())
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def hosts(tmp_path_factory):
    """Two hosts as network namespaces (tests/cluster/hosts.py), removed at the end of the session."""
    from tests.cluster.hosts import Hosts, namespaces_possible

    require(namespaces_possible())
    with Hosts(2, tmp_path_factory.mktemp("hosts")) as created:
        yield created


@pytest.fixture(scope="session")
def slurm_hosts(tmp_path_factory):
    """A two-node Slurm cluster on two hosts of its own (not `hosts`: its faults must not reach other tests):
    one slurmd per host, slurmctld on `head`."""
    from tests.cluster.hosts import Hosts, namespaces_possible

    require(_missing_reason() or namespaces_possible())
    with Hosts(2, tmp_path_factory.mktemp("slurm-hosts")) as own_hosts:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm2"), hosts=own_hosts)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


# ----------------------------------------------------------------------------------------------------
# Training jobs on the tiny CPU recipe
# ----------------------------------------------------------------------------------------------------

TINY = REPO / "recipes" / "dip_tiny_cpu.yaml"
TRAIN_SH = REPO / "cluster" / "train.sh"
# Small enough for two CPU cores, long enough to be preempted in the middle.
TRAIN_STEPS = 16
TINY_OVERRIDES = [*PLAIN, f"train.max_steps={TRAIN_STEPS}", "checkpoint.every=4", "logging.log_every=1",
                  "logging.sample_every=0"]


def venv_env() -> dict[str, str]:
    """What the jobs need to find this interpreter's environment."""
    return {"VENV": sys.prefix, "PYTHONUNBUFFERED": "1"}


@dataclass
class TrainJob:
    job_id: int
    workdir: Path
    save_folder: Path
    name: str
    cluster: LocalSlurm

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}-{self.job_id}.out"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def diagnosis(self, job: dict, lines: int = 40) -> str:
        """For a failed wait, most telling first (a long message is cut in the middle): the end of the job log
        (the first rank of each node writes there), the ends of the other ranks' stderr in the latest restart,
        the job's state, then the whole job log."""
        log = self.log_text()
        parts = [f"--- the job log's last {lines} lines", *log.splitlines()[-lines:]]
        restarts = sorted((self.workdir / "logs" / f"{self.name}-{self.job_id}").glob("restart-*"),
                          key=lambda p: int(p.name.split("-")[1]))
        for err in sorted(restarts[-1].glob("rank*.err")) if restarts else []:
            parts += [f"--- {restarts[-1].name}/{err.name}", *err.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join([*parts, f"--- job {job}", "--- the whole job log", log])

    @property
    def run_dir(self) -> Path:
        return self.save_folder / "dip-tiny-cpu"

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step-{step:09d}"

    def steps_logged(self) -> int:
        """Lines in the run's metrics.jsonl: steps trained so far, counting those a resumed run trains again."""
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def wait_log(self, text: str, timeout: float = 300) -> float:
        """Poll until `text` is in the job log (releasing a requeued job as it goes); returns the time it took."""
        started = time.monotonic()
        while text not in self.log_text():
            job = self.cluster.job(self.job_id)
            self.cluster.release_requeued(job)
            assert time.monotonic() - started < timeout, f"no {text!r} within {timeout}s: \n{self.diagnosis(job)}"
            assert job.get("JobState") not in FINAL, f"job ended before {text!r}: \n{self.diagnosis(job)}"
            time.sleep(0.1)
        return time.monotonic() - started

    def wait_steps(self, more: int, timeout: float = 300) -> None:
        """Poll until the run has logged `more` further steps (releasing a requeued job as it goes)."""
        target = self.steps_logged() + more
        started = time.monotonic()
        while self.steps_logged() < target:
            job = self.cluster.job(self.job_id)
            self.cluster.release_requeued(job)
            assert time.monotonic() - started < timeout, f"no step within {timeout}s: \n{self.diagnosis(job)}"
            assert job.get("JobState") not in FINAL, f"job ended: \n{self.diagnosis(job)}"
            time.sleep(0.05)


def submit_train(slurm: LocalSlurm, workdir: Path, shards: Path, name: str, overrides=(), env=None,
                 sbatch_args=()) -> TrainJob:
    """sbatch cluster/train.sh with the tiny recipe, as a user would (no GPU: --gpus-per-node=0)."""
    workdir.mkdir(parents=True, exist_ok=True)
    save = workdir / "runs"
    job_id = slurm.sbatch("--gpus-per-node=0", f"--job-name={name}", *sbatch_args, str(TRAIN_SH), str(TINY),
                          f"data.remote={shards}", f"checkpoint.save_folder={save}", *TINY_OVERRIDES, *overrides,
                          cwd=workdir, env={**venv_env(), **(env or {})})
    return TrainJob(job_id, workdir, save, name, slurm)


def model_tensors(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)["state"]["model"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """256 synthetic 32x32 images as local MDS shards (the tiny recipe's data)."""
    from data_prep.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("data") / "synthetic-32"
    write_synthetic_shards(str(out), num_images=256, resolution=32, seed=0)
    return out


@pytest.fixture(scope="session")
def reference_job(slurm_hosts, shards, tmp_path_factory) -> TrainJob:
    """An uninterrupted training job on two nodes, submitted once per session (not waited for here)."""
    return submit_train(slurm_hosts, tmp_path_factory.mktemp("reference"), shards, "ref", sbatch_args=["--nodes=2"])
