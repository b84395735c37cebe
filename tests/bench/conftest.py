"""Fixtures for the benchmark tests: run a bench/ script the way a user does, or import it.

bench_script.run("train_bench.py", "--steps", "1")  -> CompletedProcess (stdout, stderr, returncode)
bench_script.load("fig3_detail.py")                -> the script as a module
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


class BenchScripts:
    def run(self, name: str, *args: str, env: dict | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   **(env or {})}
        command = ["bash", str(BENCH / name)] if name.endswith(".sh") else [sys.executable, str(BENCH / name)]
        done = subprocess.run([*command, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0 or not check, \
            f"{name} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    def load(self, name: str):
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))  # the scripts import their siblings by name
        module_name = name.removesuffix(".py")
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, BENCH / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module


@pytest.fixture(scope="session")
def bench_script() -> BenchScripts:
    return BenchScripts()
