"""Weights people can share: a run's EMA network as safetensors plus a small JSON config, laid out as a Hugging
Face model repository, and loading such a folder back (a local folder, or an entry of the Hugging Face hub
cache, read offline).

    <out>/
      model.safetensors   the network's state dict (EMA weights by default), float32, contiguous
      config.json         {"format": "dip_scale.export/1", "model": DiPConfig fields, "sampler": SamplerConfig
                          fields, "image_size": [h, w], "step", "run_name", "weights": "ema" | "live"}
      README.md           what this is and how to load it

safetensors holds tensors only: loading an export runs no code from the file, whoever made it. An export of a
sharded (FSDP) or DeepSpeed checkpoint reads that checkpoint's pickled metadata once, so it asks for trust at
export time (`--trust-checkpoint`), never at load time.

Hub entries: `hf://ORG/NAME` (or `hf://ORG/NAME@REVISION`) is looked up in the local Hugging Face cache
($HF_HOME/hub, default ~/.cache/huggingface/hub) with huggingface_hub's own resolution and nothing is
downloaded: fetch it first with `huggingface-cli download ORG/NAME`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dip_scale.diffusion.sampler import SamplerConfig
from dip_scale.models.dip import DiP, DiPConfig, build_model
from dip_scale.storage import atomic_write

FORMAT = "dip_scale.export/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HUB_SCHEME = "hf://"


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()


def write_export(model: DiP, info: dict, out: str | Path, use_ema: bool = True) -> Path:
    """Write a network and its facts (as load_model returns them) to the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    config = {"format": FORMAT, "model": dataclasses.asdict(model.config),
              "sampler": {**dataclasses.asdict(info["sampler"]),
                          "guidance_interval": list(info["sampler"].guidance_interval)},
              "image_size": list(info["image_size"]), "step": info["step"],
              "run_name": info["recipe"].run_name if info.get("recipe") else None,
              "weights": "ema" if use_ema else "live"}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS_FILE)
    atomic_write(out / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    atomic_write(out / "README.md", _card(config))
    return out


def _card(config: dict) -> str:
    m, s = config["model"], config["sampler"]
    return (f"# {config['run_name'] or 'DiP'}: DiP weights exported by dip_scale\n\n"
            f"The {config['weights'].upper() if config['weights'] == 'ema' else 'live'} weights of a DiP network "
            f"(depth {m['depth']}, width {m['hidden_size']}, patch {m['patch_size']}, head `{m['detailer_head']}`, "
            f"{m['num_classes']} classes) after {config['step']} training steps, for {config['image_size'][0]} x "
            f"{config['image_size'][1]} images.\n\n"
            f"Sampler of the run: {s['steps']} {s['method']} steps, guidance {s['guidance_scale']} on "
            f"{s['guidance_interval']}.\n\n"
            "```bash\ndip-sample THIS_FOLDER --classes 1 2 3 --out grid.png\n"
            "dip-eval THIS_FOLDER --reference VIRTUAL_imagenet256_labeled.npz\n```\n\n"
            "`model.safetensors` holds tensors only; `config.json` the network's configuration "
            f"(`{FORMAT}`).\n")


def resolve_export(location: str) -> Path | None:
    """The local folder of an export: `location` itself, or the hub cache's snapshot of hf://ORG/NAME[@REV];
    None when `location` is neither."""
    if location.startswith(HUB_SCHEME):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo, _, revision = location[len(HUB_SCHEME):].partition("@")
        try:
            folder = Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(f"{location} is not in the local Hugging Face cache (nothing is downloaded "
                                    f"here): run `huggingface-cli download {repo}` first, or set HF_HOME") from err
        if not is_export(folder):
            raise ValueError(f"{location} ({folder}) holds no {WEIGHTS_FILE} and {CONFIG_FILE} of a dip_scale export")
        return folder
    return Path(location) if is_export(location) else None


def load_export(folder: Path) -> tuple[DiP, dict]:
    """An exported network (float32, CPU, eval mode) and its facts, as load_model returns them."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
    known = {f.name for f in dataclasses.fields(DiPConfig)}
    model = build_model(DiPConfig(**{k: v for k, v in config["model"].items() if k in known}))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    sampler = SamplerConfig(**{**config["sampler"], "guidance_interval": tuple(config["sampler"]["guidance_interval"])})
    info = {"step": config["step"], "image_size": tuple(config["image_size"]), "num_classes": model.config.num_classes,
            "sampler": sampler, "recipe": None, "source": str(folder)}
    return model.float().eval(), info
