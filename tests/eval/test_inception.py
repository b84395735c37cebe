"""The Inception network: offline lookup (explicit path, $DIP_INCEPTION_WEIGHTS, torch hub cache), clear
errors for missing or wrong files, and features equal to torch-fidelity's own."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dip_scale.eval.inception import (
    SPATIAL_DIM,
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    InceptionFeatures,
    find_weights,
    hub_cache_path,
)
from tests.eval.images import blobs


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(blobs(n, 32, seed)).permute(0, 3, 1, 2).contiguous()  # (n, 3, 32, 32) uint8


def test_features_equal_torch_fidelity_and_spatial_is_mixed_6_conv(inception, inception_weights):
    x = images(3)
    captured = {}
    hook = inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o.clone()))
    try:
        f = inception(x)
    finally:
        hook.remove()
    assert f["pool"].shape == (3, 2048) and f["logits"].shape == (3, 1008) and f["spatial"].shape == (3, SPATIAL_DIM)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(inception_weights))
    pool, logits = reference(x)
    assert torch.equal(f["pool"], pool) and torch.equal(f["logits"], logits)
    # ADM: mixed_6/conv:0 is NHWC (17, 17, 192); it keeps [..., :7] and flattens row-major
    conv = captured["out"]  # (3, 192, 17, 17), after BN and ReLU
    assert conv.shape == (3, 192, 17, 17)
    spatial = f["spatial"].reshape(3, 17, 17, 7)
    for c in range(7):
        assert torch.equal(spatial[..., c], conv[:, c])
    assert f["pool"].abs().mean() > 1e-3, "He-initialised test weights must give features that vary"


def test_explicit_path_env_var_and_hub_cache(inception_weights, no_weights_anywhere, monkeypatch):
    assert find_weights(inception_weights) == inception_weights
    with pytest.raises(FileNotFoundError) as err:
        find_weights()
    message = str(err.value)
    assert WEIGHTS_FILENAME in message and WEIGHTS_URL in message and str(hub_cache_path()) in message
    assert WEIGHTS_ENV in message

    cached = hub_cache_path()
    assert cached.is_relative_to(no_weights_anywhere / "torch-home")
    cached.parent.mkdir(parents=True)
    shutil.copy(inception_weights, cached)
    assert find_weights() == cached

    monkeypatch.setenv(WEIGHTS_ENV, str(inception_weights))
    assert find_weights() == inception_weights
    monkeypatch.setenv(WEIGHTS_ENV, str(no_weights_anywhere / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=rf"\${WEIGHTS_ENV}=.*nope.pth does not name an existing file"):
        find_weights()
    with pytest.raises(FileNotFoundError, match="missing.pth .given explicitly. does not exist"):
        InceptionFeatures(no_weights_anywhere / "missing.pth")


def test_loading_goes_through_the_hub_cache_without_download(inception_weights, no_weights_anywhere, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the Inception weights")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    hub_cache_path().parent.mkdir(parents=True)
    shutil.copy(inception_weights, hub_cache_path())
    net = InceptionFeatures()
    assert net.weights_path == hub_cache_path()
    assert net(images(1))["pool"].shape == (1, 2048)


def test_wrong_weight_files_are_named(tmp_path):
    partial = tmp_path / "partial.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, partial)
    with pytest.raises(ValueError, match=r"partial.pth does not fit inception-v3-compat"):
        InceptionFeatures(partial)
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a module: needs full unpickling
    with pytest.raises(ValueError, match=r"pickled.pth is not a plain PyTorch state dict"):
        InceptionFeatures(pickled)


def test_rejects_float_images(inception):
    with pytest.raises(ValueError, match="uint8 images"):
        inception(torch.zeros(1, 3, 32, 32))
