"""`dip-prep verify` passes a good dataset and fails, naming the culprit, on each kind of damage."""

from __future__ import annotations

import json
import shutil
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from streaming import MDSWriter

from data_prep.cli import main
from data_prep.merge import merge_dataset
from data_prep.verify import verify_dataset
from dip_scale.data.synthetic import synthetic_image


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "good"
    assert main(["write", "synthetic", str(out), "--num-images", "30", "--resolution", "8", "--encoding", "jpeg",
                 "--chunk-size", "10", "--no-progress"]) == 0
    return out


@pytest.fixture
def dataset(good_dataset: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(good_dataset, tmp_path / "copy"))


def test_good_dataset_passes(good_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(good_dataset), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "30 of 30 decoded" in printed and "3 of 3 checked" in printed


def test_good_dataset_passes_with_workers(good_dataset: Path) -> None:
    report = verify_dataset(str(good_dataset), num_workers=2, progress=False)
    assert report.ok and report.samples_checked == 30, report.format()


def test_flipped_byte_fails_the_hash(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    shard = dataset / "part-00001" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(dataset), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "part-00001/shard.00000.mds: sha1 hash" in printed


def test_missing_shard_fails(dataset: Path) -> None:
    (dataset / "part-00002" / "shard.00000.mds").unlink()
    report = verify_dataset(str(dataset), progress=False)
    assert any("part-00002/shard.00000.mds: missing" in p for p in report.problems), report.problems


def test_incomplete_part_fails(dataset: Path) -> None:
    (dataset / "part-00000" / "done.json").unlink()
    report = verify_dataset(str(dataset), progress=False)
    assert "chunk(s) 0 of 3 are incomplete" in report.problems


def test_count_mismatch_fails(dataset: Path) -> None:
    info = json.loads((dataset / "dataset.json").read_text())
    info["num_samples"] = 31
    (dataset / "dataset.json").write_text(json.dumps(info))
    report = verify_dataset(str(dataset), progress=False)
    assert any("holds 30 samples, dataset.json says 31" in p for p in report.problems), report.problems


def test_undecodable_image_and_bad_label_fail(dataset: Path) -> None:
    # Rewrite part 1 as a valid MDS part (good hashes) whose records are bad: garbage image bytes in one,
    # an out-of-range label in another. Then re-merge, as a buggy writer would have left it.
    part = dataset / "part-00001"
    shutil.rmtree(part)
    with MDSWriter(out=str(part), columns={"image": "jpeg", "label": "int"}, hashes=["sha1", "xxh3_64"]) as writer:
        for index in range(10, 20):
            image = synthetic_image(index, 8)[0]
            buffer = BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            payload = b"\xff\xd8 not a jpeg" if index == 12 else buffer.getvalue()
            writer.write({"image": payload, "label": 99 if index == 15 else index % 10})
    (part / "done.json").write_text(json.dumps({"chunk": 1, "written": 10, "skipped": [], "bytes": 0, "shards": 1,
                                                "class_counts": {str(i % 10): 1 for i in range(10, 20)}}))
    merge_dataset(str(dataset))
    report = verify_dataset(str(dataset), progress=False)
    assert not report.ok
    assert any("part-00001/shard.00000.mds sample 2: does not decode" in p for p in report.problems)
    assert any("part-00001/shard.00000.mds sample 5: label 99 is not in [0, 10)" in p for p in report.problems)


def test_not_a_dataset_fails_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path), "--no-progress"]) == 1
    assert "no dataset.json" in capsys.readouterr().out


def test_raw_with_compression_verifies_decompressed_hashes(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    assert main(["write", "synthetic", str(out), "--num-images", "12", "--resolution", "8", "--encoding", "raw",
                 "--compression", "zstd", "--no-progress"]) == 0
    report = verify_dataset(str(out), progress=False)
    assert report.ok and report.samples_checked == 12, report.format()
