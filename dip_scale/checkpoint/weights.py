"""Reading a checkpoint's weights, whatever strategy wrote it, without a process group (for sampling,
evaluation, export and tests; checkpoint/load.py builds the network from them).

Safety: Composer's state.pt is a pickle. It is read with `torch.load(weights_only=True)` and an allowlist of
the plain data types Composer stores besides tensors (timedeltas, NumPy RNG state, the torch version), which
runs no code from the file. Sharded (FSDP) and DeepSpeed checkpoints keep metadata in pickles that only a
full unpickling reads: they load only with `trust=True` (`--trust-checkpoint`), for files you trust.
"""

from __future__ import annotations

import _codecs
import datetime
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.torch_version import TorchVersion

_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # renamed in NumPy 2
SAFE_GLOBALS = [datetime.timedelta, TorchVersion, np.ndarray, np.dtype, _NUMPY_CORE.multiarray._reconstruct,
                _codecs.encode, *(type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool"))]
"""What Composer's state.pt holds besides tensors and builtins: plain data, no behaviour."""

STATE = "state.pt"
SHARDED = "sharded"
DEEPSPEED = "deepspeed"


class UntrustedCheckpoint(ValueError):
    """The checkpoint can only be read by unpickling arbitrary objects, and trust was not given."""


def safe_load(path: Path, trust: bool = False):
    """torch.load of a pickled checkpoint file: weights_only with SAFE_GLOBALS, or fully when trusted."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpoint(f"{path} holds objects that only a full unpickling can read (which runs code "
                                  f"from the file): {str(err).splitlines()[-1][:200]}. If you trust the file, pass "
                                  "--trust-checkpoint") from err


def _needs_trust(path: Path, trust: bool, what: str) -> None:
    if not trust:
        raise UntrustedCheckpoint(f"{path} is a {what} checkpoint, whose metadata only a full unpickling reads "
                                  "(which runs code from the files). If you trust it (your own run's checkpoint), "
                                  "pass --trust-checkpoint; or export it once with dip-export and share that")


def read_weights(folder: Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """(the whole model state: net.*, ema_net.*, ...; the step) of a verified checkpoint folder, on CPU."""
    folder = Path(folder)
    if (folder / DEEPSPEED).is_dir():
        _needs_trust(folder, trust, "DeepSpeed")
        weights, step = _deepspeed_weights(folder)
    elif (folder / STATE).is_file():
        state = safe_load(folder / STATE, trust)["state"]
        weights, step = state["model"], int(state["timestamp"]["Timestamp"]["batch"])
    elif (folder / SHARDED).is_dir():
        _needs_trust(folder, trust, "sharded (FSDP)")
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(folder / SHARDED, Path(tmp) / "full.pt")
            state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)["state"]
        weights, step = state["model"], int(state["timestamp"]["Timestamp"]["batch"])
    else:
        raise ValueError(f"{folder} holds no {STATE}, {SHARDED}/ or {DEEPSPEED}/: not a dip_scale checkpoint")
    # Names as the network has them: without activation-checkpointing or compile wrappers.
    weights = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for k, v in weights.items()}
    return weights, step


def _deepspeed_weights(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Merge the ZeRO partitions with DeepSpeed's own reader (zero_to_fp32), which needs no process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine_dir = folder / DEEPSPEED
    weights = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="zero", exclude_frozen_parameters=False)
    # Stage 1 keeps frozen parameters (the EMA) only in rank 0's whole module state.
    whole = engine_dir / "zero" / "mp_rank_00_model_states.pt"
    if whole.is_file():
        for name, tensor in torch.load(whole, map_location="cpu", weights_only=False)["module"].items():
            weights.setdefault(name, tensor)
    state = torch.load(folder / STATE, map_location="cpu", weights_only=False)["state"]
    return weights, int(state["timestamp"]["Timestamp"]["batch"])


def network_weights(weights: dict[str, torch.Tensor], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The network's own state dict out of the whole model state (the EMA copy, or the live weights)."""
    prefix = "ema_net." if use_ema else "net."
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
