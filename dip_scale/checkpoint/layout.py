"""The checkpoint format: where a run's checkpoints lie, what makes one complete, and how it is verified.

    <run>/checkpoints/step-000005005/     one checkpoint (the same layout under s3:// for a remote save folder)
        state.pt                          Composer's state (ddp; under deepspeed without weights and optimizer)
        sharded/__<rank>_0.distcp, .metadata    fsdp: every rank's shard (torch.distributed.checkpoint)
        deepspeed/zero/...                deepspeed: the engine's per-rank partitions
        recipe.yaml                       the resolved recipe of the run
        manifest.json                     written last: step, load target, world size, size and digest of every file
    <run>/latest                          names the newest committed checkpoint (a hint: the manifests decide)

A checkpoint folder without a manifest is incomplete and never loaded. Each file's digest is XXH3-128 (the
xxhash package, which Streaming depends on): at over 10 GB/s it keeps a DiP-XL checkpoint's hashing small
next to writing it, where SHA-256 was a third of the save (docs/benchmarks.md). Manifests of older runs name
SHA-256, which is still verified. The digest guards against torn and corrupted files, not against tampering.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import xxhash

from dip_scale.storage import atomic_write

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
RECIPE = "recipe.yaml"
DIGEST = "xxh3_128"
"""The digest written into new manifests (see the module docstring); "sha256" is read too."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def step_of(name: str) -> int | None:
    """The step of a `step-N` folder name; None for anything else (a `.tmp` folder, a stray file)."""
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def file_digest(path: Path, algorithm: str = DIGEST, chunk: int = 1 << 22) -> str:
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """Size and digest of each file (names relative to folder), as the manifest records them."""
    return {n: {"size": (folder / n).stat().st_size, DIGEST: file_digest(folder / n)} for n in names}


def write_manifest(folder: Path, step: int, files: dict[str, dict], load: str, meta: dict) -> str:
    """Write the manifest last: from then on the checkpoint folder is complete. Returns its text."""
    text = json.dumps({"step": step, "load": load, "files": files, "time": time.time(), **meta}, indent=1,
                      sort_keys=True)
    atomic_write(folder / MANIFEST, text)
    return text


def parse_manifest(text: str) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, what is wrong with it)."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"unreadable manifest ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "load" not in manifest:
        return None, "malformed manifest"
    return manifest, None


def read_manifest(folder: Path) -> dict:
    manifest, reason = parse_manifest((Path(folder) / MANIFEST).read_text())
    if manifest is None:
        raise ValueError(f"{Path(folder) / MANIFEST}: {reason}")
    return manifest


def verify_local(folder: Path) -> str | None:
    """None when the checkpoint folder is complete and intact, else the reason it is not."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return "no manifest (incomplete checkpoint)"
    manifest, reason = parse_manifest(path.read_text())
    if manifest is None:
        return reason
    for name, info in manifest["files"].items():
        p = Path(folder) / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {info['size']}"
        algorithm = DIGEST if DIGEST in info else "sha256"
        if file_digest(p, algorithm) != info.get(algorithm):
            return f"checksum mismatch in {name}"
    return None


def load_target(folder: Path) -> str:
    """What to hand to Composer's load_path: the state file, or the sharded folder."""
    return str(Path(folder) / read_manifest(folder)["load"])


def local_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under <root>/checkpoints, complete or not, newest first."""
    base = Path(root) / CHECKPOINTS
    if not base.is_dir():
        return []
    found = [(step_of(d.name), d) for d in base.iterdir() if d.is_dir()]
    return sorted(((s, d) for s, d in found if s is not None), key=lambda x: x[0], reverse=True)


def newest_complete(root: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest checkpoint with a manifest under <root>/checkpoints (not verified)."""
    for step, folder in local_checkpoints(root):
        if (folder / MANIFEST).is_file():
            return step, folder
    return None
