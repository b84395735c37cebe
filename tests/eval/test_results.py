"""Results: JSON (local and s3://), the run's table/markdown/plot, the ADM-compatible .npz, wandb offline."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dip_scale.eval.results import (
    COLUMNS,
    append_to_run,
    default_json_path,
    log_wandb,
    make_record,
    save_samples_npz,
    write_json,
)
from tests.wandb_files import parsed_records

SETTINGS = {"num_samples": 1000, "batch_size": 64, "seed": 0, "precision": "auto", "compile_model": False,
            "sampler": {"steps": 100, "method": "euler", "guidance_scale": 2.9, "guidance_interval": [0.11, 0.97]}}


def record(step: int, fid: float, **kw) -> dict:
    metrics = {"fid": fid, "sfid": 5.0, "inception_score": 200.0, "inception_score_std": 2.0, "precision": 0.8,
               "recall": None, "notes": ["recall: example"]}
    settings = {**SETTINGS, **kw}
    return make_record(metrics=metrics, settings=settings, step=step, checkpoint=f"ck/step-{step:09d}",
                       reference="ref.npz", wall_time_s=12.5, generation_s=10.0, images_per_s=100.0, world_size=2,
                       inception="abc", mode="local")


def test_record_json_holds_what_reproduces_the_number(tmp_path):
    r = record(100, 12.3)
    path = write_json(str(tmp_path / "x" / "r.json"), r)
    back = json.loads(Path(path).read_text())
    assert back["metrics"] == {"fid": 12.3, "sfid": 5.0, "inception_score": 200.0, "inception_score_std": 2.0,
                               "precision": 0.8, "recall": None}
    assert back["notes"] == ["recall: example"]
    for key in ("step", "num_samples", "seed", "sampler", "reference", "wall_time_s", "checkpoint", "world_size"):
        assert back[key] == r[key]
    assert default_json_path("runs/a/checkpoints/step-000000100/", 1000) == \
        "runs/a/checkpoints/step-000000100.eval-n1000.json"


def test_json_to_s3(s3_server):
    url = s3_server.fresh_url("results") + "/step-1.eval-n1000.json"
    write_json(url, record(1, 3.0))
    bucket, key = url[5:].split("/", 1)
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert json.loads(body)["metrics"]["fid"] == 3.0


def test_run_table_markdown_and_plot(tmp_path):
    append_to_run(tmp_path, record(200, 30.0))
    append_to_run(tmp_path, record(100, 50.0))
    append_to_run(tmp_path, record(100, 40.0, num_samples=5000))  # another setting: a second series
    folder = append_to_run(tmp_path, record(200, 25.0))  # same step and settings: replaces its row
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["step"], r["num_samples"], r["fid"]) for r in rows] == \
        [("100", "1000", "50"), ("100", "5000", "40"), ("200", "1000", "25")]
    assert rows[0]["guidance_interval"] == "0.11-0.97" and rows[0]["recall"] == ""
    md = (folder / "results.md").read_text().splitlines()
    assert md[0].startswith("| step | num_samples | fid |") and len(md) == 2 + 3
    with Image.open(folder / "fid_vs_step.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_samples_npz_is_adm_compatible(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = save_samples_npz(tmp_path / "samples.npz", images, np.array([0, 1, 2, 3]))
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], images)
        assert f["arr_1"].dtype == np.int64
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(tmp_path / "bad.npz", images.astype(np.float32), np.zeros(4))


def test_wandb_offline_logs_at_the_checkpoint_step(tmp_path):
    run_id = log_wandb(record(300, 7.5), project="dip-test", group="a-run", run_id="a-run-eval-300", mode="offline",
                       directory=tmp_path)
    assert run_id == "a-run-eval-300"
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline = time.monotonic() + 60
    while True:  # wandb's own service process writes the file; finish() may return before it is flushed
        records = parsed_records(run_file)
        if any(r.WhichOneof("record_type") == "history" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "eval/*" and m.step_metric == "eval/step" for m in metrics)
    [history] = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in history.item}
    assert row["eval/step"] == 300 and row["eval/fid"] == 7.5 and row["eval/num_samples"] == 1000
    assert "eval/recall" not in row  # None is not logged
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "a-run" and run.job_type == "eval"
