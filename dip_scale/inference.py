"""Load a trained DiP for sampling and evaluation: the EMA weights of one of our checkpoints (local or
s3://; a run folder, a step-N checkpoint folder, or its state.pt), or the authors' released weights.

    model, info = load_model("s3://bucket/runs/dip-xl/checkpoints/step-000800800")
    model, info = load_model("runs/dip-xl")                      # newest intact checkpoint of a run
    model, info = load_model("DiP-XL-16.ckpt", official=True)    # released weights, through the converter

info: {"step", "image_size" (h, w), "num_classes", "sampler" (SamplerConfig fields), "source"}.
Our checkpoints are pickles written by Composer: load only checkpoints you trust.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.models.dip import DiP, build_model
from dip_scale.models.official import load_official_checkpoint
from dip_scale.train.checkpoints import CHECKPOINTS, MANIFEST, find_resume_checkpoint, verify_local
from dip_scale.train.config import Recipe, model_config
from dip_scale.train.storage import is_remote, open_store


def _fetch_remote(url: str, cache: Path) -> Path:
    """Download a remote run folder's newest checkpoint, or one remote checkpoint folder, into cache."""
    store = open_store(url)
    if store.read_text(MANIFEST) is not None:  # url is one checkpoint folder
        dest = cache / CHECKPOINTS / url.rstrip("/").rsplit("/", 1)[-1]
        dest.mkdir(parents=True, exist_ok=True)
        for rel in store.list_files(""):
            store.download(rel, dest / rel)
        reason = verify_local(dest)
        if reason:
            raise ValueError(f"checkpoint {url} is not intact: {reason}")
        return dest
    found = find_resume_checkpoint(cache, store)
    if found is None:
        raise FileNotFoundError(f"no intact checkpoint found under {url}")
    return Path(found[1]).parent


def resolve_checkpoint(path: str, cache_dir: str | None = None) -> Path:
    """-> a local, verified checkpoint folder (holding manifest.json)."""
    if is_remote(path):
        return _fetch_remote(path, Path(cache_dir or tempfile.mkdtemp(prefix="dip-ckpt-")))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (give a run folder, a step-N checkpoint folder, its "
                                "state.pt, or an s3:// URL of one of these)")
    if p.is_file():
        p = p.parent
    if p.name == "sharded":
        p = p.parent
    if (p / MANIFEST).is_file():
        reason = verify_local(p)
        if reason:
            raise ValueError(f"checkpoint {p} is not intact: {reason}")
        return p
    found = find_resume_checkpoint(p)
    if found is None:
        raise FileNotFoundError(f"{path} holds no intact checkpoint (looked for {CHECKPOINTS}/step-*/{MANIFEST})")
    return Path(found[1]).parent


def _model_state(folder: Path) -> tuple[dict, int]:
    if (folder / "deepspeed").is_dir():  # the engine holds the weights (see dip_scale/train/deepspeed.py)
        from dip_scale.train.deepspeed import checkpoint_weights

        return checkpoint_weights(folder)
    if (folder / "state.pt").is_file():
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)["state"]
        return state["model"], int(state["timestamp"]["Timestamp"]["batch"])
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder / "sharded", Path(tmp) / "full.pt")
        state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)["state"]
    return state["model"], int(state["timestamp"]["Timestamp"]["batch"])


def load_model(path: str, *, official: bool = False, trust_checkpoint: bool = False, use_ema: bool = True,
               cache_dir: str | None = None) -> tuple[DiP, dict]:
    """The network of a checkpoint in eval mode (float32, CPU) and facts about it (see the module doc)."""
    if official:
        model = load_official_checkpoint(path, trust_pickle=trust_checkpoint)
        info = {"step": 0, "image_size": (256 * model.config.patch_size // 16,) * 2,
                "num_classes": model.config.num_classes, "source": str(path),
                "sampler": dataclasses.asdict(SamplerConfig(steps=100, guidance_scale=2.9,
                                                            guidance_interval=(0.1, 1.0)))}
        return model, info
    folder = resolve_checkpoint(path, cache_dir)
    schema = OmegaConf.structured(Recipe)
    recipe: Recipe = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(folder / "recipe.yaml")))
    model = build_model(model_config(recipe))
    weights, step = _model_state(folder)
    prefix = "ema_net." if use_ema else "net."
    sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    sd = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    s = recipe.sampler
    info = {"step": step, "image_size": tuple(recipe.data.image_size), "num_classes": model.config.num_classes,
            "source": str(folder), "recipe": recipe,
            "sampler": {"steps": s.steps, "method": s.method, "guidance_scale": s.guidance_scale,
                        "guidance_interval": tuple(s.guidance_interval)}}
    return model.float().eval(), info
