"""One way to get a trained network for sampling and evaluation, whatever it was saved as:

    model, info = load_model("s3://bucket/runs/dip-xl")           # the newest intact checkpoint of a run
    model, info = load_model("runs/dip-xl/checkpoints/step-000800800", use_ema=False)
    model, info = load_model("exports/dip-xl")                    # a dip-export folder (safetensors)
    model, info = load_model("hf://org/dip-xl-256")               # the same, from the Hugging Face hub cache
    model, info = load_model("DiP-XL-16.ckpt", official=True)     # the authors' released weights

info: {"step", "image_size" (h, w), "num_classes", "sampler" (SamplerConfig), "recipe" (ours only), "source"}.
"""

from __future__ import annotations

from pathlib import Path

from dip_scale.checkpoint.export import load_export, resolve_export
from dip_scale.checkpoint.find import resolve_checkpoint
from dip_scale.checkpoint.layout import RECIPE
from dip_scale.checkpoint.weights import network_weights, read_weights
from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.models.dip import DiP, build_model
from dip_scale.models.official import load_official_checkpoint
from dip_scale.recipe import load_recipe_text, model_config

RELEASED_SAMPLER = SamplerConfig(steps=100, guidance_scale=2.9, guidance_interval=(0.1, 1.0))
"""The released configs' sampler (the paper's guidance interval is [0.11, 0.97])."""


def load_model(location: str, *, official: bool = False, trust: bool = False, use_ema: bool = True,
               cache_dir: str | Path | None = None) -> tuple[DiP, dict]:
    """The network of a checkpoint (float32, CPU, eval mode) and facts about it:
    {"step", "image_size" (h, w), "num_classes", "sampler" (SamplerConfig), "recipe" (ours only), "source"}."""
    if official:
        model = load_official_checkpoint(location, trust_pickle=trust)
        size = 256 * model.config.patch_size // 16
        info = {"step": 0, "image_size": (size, size), "num_classes": model.config.num_classes,
                "sampler": RELEASED_SAMPLER, "recipe": None, "source": str(location)}
        return model, info
    exported = resolve_export(str(location))
    if exported is not None:
        return load_export(exported)
    folder = resolve_checkpoint(location, cache_dir)
    recipe = load_recipe_text((folder / RECIPE).read_text(), source=str(folder / RECIPE))
    model = build_model(model_config(recipe))
    weights, step = read_weights(folder, trust)
    model.load_state_dict(network_weights(weights, use_ema), strict=True)
    info = {"step": step, "image_size": tuple(recipe.data.image_size), "num_classes": model.config.num_classes,
            "sampler": recipe.sampler, "recipe": recipe, "source": str(folder)}
    return model.float().eval(), info
