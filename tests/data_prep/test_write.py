"""`dip-prep write`: exact round trips, bad inputs skipped and reported, strictness, determinism across
workers and tasks, merge, refusal to mix different writes, S3 output without leaking credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main
from dip_scale.data import DiPStreamingDataset, adm_center_crop, read_dataset_info, synthetic_image
from tests.data_prep.image_tree import ImageTree, make_image_tree

REPO = Path(__file__).resolve().parents[2]


def _read_samples(dataset: str) -> list[tuple[np.ndarray, int]]:
    """All samples of a local dataset in index order, as (H, W, 3) uint8 and label."""
    ds = DiPStreamingDataset(local=dataset, batch_size=1)
    samples = [(ds[i][0].permute(1, 2, 0).numpy(), ds[i][1]) for i in range(ds.num_samples)]
    del ds
    return samples


def _skipped(dataset: str) -> list[dict]:
    return [json.loads(line) for line in Path(dataset, "skipped.jsonl").read_text().splitlines()]


def _expected(tree: ImageTree, resolution: int) -> list[tuple[np.ndarray, int]]:
    return [(adm_center_crop(Image.open(tree.root / key), resolution), label) for key, label in tree.good]


def test_folder_tree_round_trip_with_bad_inputs(image_tree: ImageTree, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    rc = main(["write", "folder", str(image_tree.root), out, "--resolution", "16", "--encoding", "png",
               "--chunk-size", "3", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err

    # Every good image, in source order, pixel-exact against the ADM crop of its file, with its label.
    samples = _read_samples(out)
    expected = _expected(image_tree, 16)
    assert [label for _, label in samples] == [label for _, label in expected]
    for (got, _), (want, _) in zip(samples, expected):
        np.testing.assert_array_equal(got, want)

    # Every bad input and every source problem reported once, with the reason.
    skipped = _skipped(out)
    inputs = {entry["key"]: entry for entry in skipped if entry["kind"] == "input"}
    assert sorted(inputs) == sorted(image_tree.bad)
    for key, word in image_tree.bad.items():
        assert word.lower() in inputs[key]["reason"].lower(), inputs[key]
        assert inputs[key]["label"] == image_tree.classes.index(key.split("/")[0])
    assert sorted(e["key"] for e in skipped if e["kind"] == "source") == image_tree.source_problems

    info = read_dataset_info(out)
    assert info["class_names"] == image_tree.classes
    assert info["num_samples"] == len(image_tree.good)
    assert info["num_skipped"] == len(image_tree.bad)
    labels = [label for _, label in image_tree.good]
    assert info["class_counts"] == [labels.count(c) for c in range(len(image_tree.classes))]
    assert f"{len(image_tree.bad)} skipped" in printed.out
    assert "empty class folder" in printed.err  # source problems are announced up front


def test_strict_fails_on_the_first_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = make_image_tree(tmp_path / "tree", with_source_problems=False)
    rc = main(["write", "folder", str(tree.root), str(tmp_path / "out"), "--resolution", "8", "--strict",
               "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bad input 'dog/notes.txt'" in err and "--strict" in err


def test_strict_fails_on_source_problems(image_tree: ImageTree, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["write", "folder", str(image_tree.root), str(tmp_path / "out"), "--strict", "--no-progress"])
    assert rc == 1
    assert "empty_class/" in capsys.readouterr().err


def _synthetic_write(out: str, *extra: str) -> int:
    return main(["write", "synthetic", out, "--num-images", "45", "--resolution", "8", "--encoding", "png",
                 "--chunk-size", "7", "--no-progress", *extra])


def test_workers_and_tasks_do_not_change_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = str(tmp_path / "one")
    assert _synthetic_write(one) == 0
    pooled = str(tmp_path / "pooled")
    assert _synthetic_write(pooled, "--workers", "2") == 0

    # Two tasks of a Slurm array (--array=3-4: indices are offset by SLURM_ARRAY_TASK_MIN), then merge.
    split = str(tmp_path / "split")
    for task_id in ("3", "4"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        assert _synthetic_write(split) == 0
        assert not Path(split, "index.json").exists()  # several tasks: nobody merges on their own
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert sorted(os.listdir(Path(split, "reports"))) == ["task-0000-of-0002.jsonl", "task-0001-of-0002.jsonl"]
    assert main(["merge", split]) == 0

    for name in ("index.json", "dataset.json"):
        reference = Path(one, name).read_bytes()
        assert Path(pooled, name).read_bytes() == reference
        assert Path(split, name).read_bytes() == reference
    samples = _read_samples(one)
    assert len(samples) == 45
    for index, (image, label) in enumerate(samples):
        want, want_label = synthetic_image(index, 8, 0)
        np.testing.assert_array_equal(image, want)
        assert label == want_label


def test_merge_refuses_while_chunks_are_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    assert _synthetic_write(out, "--task-index", "0", "--num-tasks", "2") == 0
    capsys.readouterr()
    assert main(["merge", out]) == 1
    err = capsys.readouterr().err
    assert "chunk(s) 1, 3, 5 of 7 are not complete" in err


def test_rerun_with_other_arguments_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    assert _synthetic_write(out) == 0
    capsys.readouterr()
    assert main(["write", "synthetic", out, "--num-images", "45", "--resolution", "12", "--encoding", "png",
                 "--chunk-size", "7", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "resolution: 8 there, 12 now" in err


def test_refuses_a_non_empty_output_that_is_not_a_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert _synthetic_write(str(out)) == 1
    assert "is not empty and has no plan.json" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("encoding,extra", [("raw", ["--compression", "zstd"]), ("jpeg", ["--jpeg-quality", "95"])])
def test_encodings(tmp_path: Path, encoding: str, extra: list[str]) -> None:
    out = str(tmp_path / encoding)
    assert main(["write", "synthetic", out, "--num-images", "20", "--resolution", "32", "--encoding", encoding,
                 "--no-progress", *extra]) == 0
    info = read_dataset_info(out)
    assert info["encoding"] == encoding
    for index, (image, _) in enumerate(_read_samples(out)):
        want = synthetic_image(index, 32, 0)[0]
        if encoding == "raw":
            np.testing.assert_array_equal(image, want)
        else:  # lossy, but at q95 4:4:4 close: PSNR above 30 dB even on these hard textures
            mse = np.mean((image.astype(np.float64) - want) ** 2)
            assert 10 * np.log10(255**2 / mse) > 30
    shards = json.loads(Path(out, "index.json").read_text())["shards"]
    assert all(bool(shard["zip_data"]) == (encoding == "raw") for shard in shards)


def test_s3_output_never_prints_credentials(s3_server, s3_url: str, tmp_path: Path) -> None:
    secret = "SECRET-must-never-appear-0123456789"
    key_id = "KEYID-must-never-appear"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id}
    result = subprocess.run([sys.executable, "-m", "data_prep", "write", "synthetic", s3_url, "--num-images", "30",
                             "--resolution", "8", "--encoding", "png", "--chunk-size", "8"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert secret not in stream and key_id not in stream
    assert "30 written" in result.stdout
    assert "img/s" in result.stderr  # the progress bar: rate and ETA
    keys = s3_server.list_keys(s3_url)
    prefix = s3_url.removeprefix(f"s3://{s3_server.bucket}/")
    assert f"{prefix}/index.json" in keys and f"{prefix}/dataset.json" in keys
    assert f"{prefix}/part-00003/done.json" in keys
    assert read_dataset_info(s3_url)["num_samples"] == 30


def test_s3_errors_are_reported_without_credentials(s3_server, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    secret = "SECRET-must-never-appear-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert main(["merge", "s3://no-such-bucket/x"]) == 1
    assert main(["verify", "s3://no-such-bucket/x", "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "no-such-bucket" in printed.err and "no-such-bucket" in printed.out
    assert secret not in printed.err + printed.out
