"""The Inception network of the FID protocol: torch-fidelity's `inception-v3-compat`, loaded offline.

This is a PyTorch port of the TensorFlow graph (inception-2015-12-05) that the ADM evaluator runs,
including its bilinear resize to 299 x 299. Each uint8 image (B, 3, H, W) gives three feature sets:

    pool     (B, 2048)  pool_3: FID and precision/recall
    logits   (B, 1008)  pool_3 @ W, no bias ("logits_unbiased"): the Inception Score, as ADM computes it
    spatial  (B, 2023)  mixed_6/conv (Mixed_6d.branch1x1 after BN and ReLU), its first 7 channels,
                        flattened in NHWC order (17 * 17 * 7): sFID, as ADM computes it

The weights file is looked up, in order, at an explicit path, at $DIP_INCEPTION_WEIGHTS, and in the
torch hub cache where torch-fidelity itself keeps it. Nothing is ever downloaded here:

    wget -P "$(python -c 'import torch; print(torch.hub.get_dir())')/checkpoints" \\
        https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
WEIGHTS_ENV = "DIP_INCEPTION_WEIGHTS"

POOL_DIM, LOGITS_DIM = 2048, 1008
SPATIAL_CHANNELS, SPATIAL_SIDE = 7, 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023, the size of mu_s in ADM's reference
FEATURE_DIMS = {"pool": POOL_DIM, "logits": LOGITS_DIM, "spatial": SPATIAL_DIM}


def hub_cache_path() -> Path:
    """Where torch-fidelity's own download would put the weights (torch.hub.load_state_dict_from_url)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use; FileNotFoundError naming the file and where to put it when there is none."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights file {p} (given explicitly) does not exist; expected "
                                    f"torch-fidelity's {WEIGHTS_FILENAME} from {WEIGHTS_URL}")
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"${WEIGHTS_ENV}={env} does not name an existing file; expected "
                                    f"torch-fidelity's {WEIGHTS_FILENAME} from {WEIGHTS_URL}")
        return p
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"The FID Inception weights are not available offline. Needed: {WEIGHTS_FILENAME} (95 MB, "
        f"torch-fidelity's inception-v3-compat) from {WEIGHTS_URL}\n"
        f"Put it at {cached} (the torch hub cache), or set ${WEIGHTS_ENV} / pass --inception-weights to its path. "
        f"For example:\n    wget -P {cached.parent} {WEIGHTS_URL}")


def fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's SHA-256: keys cached statistics to the exact weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


def _check_weights_file(path: Path) -> None:
    """Load with the safe unpickler (tensors only): torch-fidelity then loads the same file with
    weights_only=False, and this check is what makes that safe."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Inception weights file {path} is not a plain PyTorch state dict ({err}); expected "
                         f"torch-fidelity's {WEIGHTS_FILENAME}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights file {path} holds a {type(state).__name__}, expected a state dict "
                         f"of tensors (torch-fidelity's {WEIGHTS_FILENAME})")


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) -> {"pool", "logits", "spatial"} float32 features (see module docstring)."""

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = find_weights(weights_path)
        _check_weights_file(path)
        self.weights_path = path
        self.fingerprint = fingerprint(path)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # strict load_state_dict: missing, unexpected or misshapen tensors
            raise ValueError(f"Inception weights file {path} does not fit inception-v3-compat: {err}") from err
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # (B, 192, 17, 17) -> first 7 channels, NHWC flattening as the TF graph's reshape
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        # TF32 convolutions would move the features away from the float32 TensorFlow reference.
        with _no_tf32():
            pool, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial.float(), None
        return {"pool": pool, "logits": logits, "spatial": spatial}


@contextlib.contextmanager
def _no_tf32():
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save inception-v3-compat weights with He-initialised convolutions (fixed seed): a stand-in for the real
    file where it cannot be had (tests, the offline demo). Features then vary with the input (PyTorch's
    default init collapses them to ~1e-8), so a Frechet distance still tells distributions apart, but its
    numbers are not FIDs comparable with published ones."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
