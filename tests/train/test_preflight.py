"""A start checks what the recipe names (data, weights, world size) before it builds anything: exit 2 with
the key and what was expected, no traceback, nothing written."""

from __future__ import annotations

from tests.train.launch import train


def run_error(tmp_path, overrides, env=None):
    proc = train([f"checkpoint.save_folder={tmp_path}", *overrides], check=False, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr


def test_missing_data_stops_before_anything_is_built(tmp_path):
    err = run_error(tmp_path, [f"data.remote={tmp_path}/no-shards"])
    assert "no index.json" in err and "dip-prep" in err
    assert not (tmp_path / "dip-tiny-cpu").exists()


def test_missing_repa_weights_say_where_to_put_them(tmp_path, tiny_shards):
    err = run_error(tmp_path, [f"data.remote={tiny_shards}", "objective.repa.enabled=true", "objective.repa.block=1"],
                    env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert "dinov2_vitb14_pretrain.pth" in err and "torch-home" in err


def test_world_size_that_does_not_divide_is_an_error(tmp_path, tiny_shards):
    err = run_error(tmp_path, [f"data.remote={tiny_shards}"], env={"WORLD_SIZE": "3"})
    assert "not divisible by the world size 3" in err


# ----------------------------------------------------------------------------------------------------
# Each check, in this process (the two subprocess tests above show the exit status and the missing traceback)
# ----------------------------------------------------------------------------------------------------


def _checked(tiny_shards, tmp_path, overrides):
    import pytest

    from dip_scale.recipe import ConfigError, load_recipe
    from dip_scale.train.preflight import check_inputs
    from tests.train.launch import PLAIN, TINY

    recipe = load_recipe(TINY, [*PLAIN, f"data.remote={tiny_shards}", f"checkpoint.save_folder={tmp_path}",
                                *overrides])
    with pytest.raises(ConfigError) as err:
        check_inputs(recipe)
    return str(err.value)


def test_data_of_another_resolution(tiny_shards, tmp_path):
    err = _checked(tiny_shards, tmp_path, ["data.image_size=[64,64]"])
    assert "holds 32x32 images but data.image_size is [64, 64]" in err and "data.remote=" in err


def test_data_with_more_classes_than_the_model(tiny_shards, tmp_path):
    err = _checked(tiny_shards, tmp_path, ["model.num_classes=5", "logging.sample_classes=[0,1]"])
    assert "has 10 classes" in err and "model.num_classes=5" in err


def test_eval_reference_that_does_not_exist(tiny_shards, tmp_path):
    err = _checked(tiny_shards, tmp_path, ["eval.every=10", "eval.mode=local", f"eval.reference={tmp_path}/ref.npz"])
    assert f"eval.reference={tmp_path}/ref.npz does not exist" in err


def test_eval_reference_that_is_not_an_npz(tiny_shards, tmp_path):
    (tmp_path / "ref.txt").write_text("not a reference")
    err = _checked(tiny_shards, tmp_path, ["eval.every=10", "eval.mode=local", f"eval.reference={tmp_path}/ref.txt"])
    assert "is a file but not an .npz" in err


def test_eval_reference_npz_with_wrong_keys(tiny_shards, tmp_path):
    import numpy as np

    np.savez(tmp_path / "ref.npz", features=np.zeros(3))
    err = _checked(tiny_shards, tmp_path, ["eval.every=10", "eval.mode=local", f"eval.reference={tmp_path}/ref.npz"])
    assert "eval.reference:" in err and "expected mu and sigma" in err


def test_local_eval_without_inception_weights(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DIP_INCEPTION_WEIGHTS", raising=False)
    err = _checked(tiny_shards, tmp_path, ["eval.every=10", "eval.mode=local", f"eval.reference={tiny_shards}"])
    assert "eval.inception_path:" in err and "weights-inception-2015-12-05" in err


def test_slurm_eval_without_its_job_script(tiny_shards, tmp_path):
    err = _checked(tiny_shards, tmp_path, ["eval.every=10", "eval.mode=slurm", f"eval.reference={tiny_shards}",
                                           f"eval.script={tmp_path}/eval_fid.sh"])
    assert f"eval.script={tmp_path}/eval_fid.sh: no such job script" in err


def test_repa_without_its_weights(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    err = _checked(tiny_shards, tmp_path, ["objective.repa.enabled=true", "objective.repa.block=1"])
    assert "objective.repa.encoder_path" in err and "dinov2_vitb14_pretrain.pth" in err
