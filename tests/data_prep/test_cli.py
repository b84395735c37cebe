"""The dip-prep command line: help with examples everywhere, dry runs, argument errors that name the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main

COMMANDS = [[], ["write"], ["write", "imagenet"], ["write", "folder"], ["write", "synthetic"], ["merge"], ["verify"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dip-prep")
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and "dip-prep " in text


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "dip-prep"
    result = subprocess.run([str(script), "verify", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "dip-prep verify" in result.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["write", "synthetic", str(out), "--num-images", "1000", "--resolution", "64", "--chunk-size", "300",
                 "--task-index", "1", "--num-tasks", "2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "1,000 in 4 chunks of 300" in printed and "64x64 jpeg q95" in printed
    assert "this task   1 of 2: 2 chunks" in printed
    assert not out.exists()


@pytest.mark.parametrize("arguments,message", [
    (["--resolution", "0"], "--resolution must be positive, got 0"),
    (["--jpeg-quality", "101"], "--jpeg-quality must be in [1, 100], got 101"),
    (["--compression", "zip"], "--compression 'zip' is not one Streaming knows"),
    (["--workers", "0"], "--workers must be positive, got 0"),
    (["--shard-size", "lots"], "--shard-size 'lots' is not a size"),
    (["--task-index", "2", "--num-tasks", "2"], "task index 2 is not in [0, 2)"),
])
def test_bad_arguments_are_named(arguments: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["write", "synthetic", str(tmp_path / "out"), "--num-images", "5", *arguments]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_encoding_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["write", "synthetic", str(tmp_path), "--num-images", "5", "--encoding", "webp"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'webp'" in capsys.readouterr().err
