"""What a start checks before it builds anything: that every file, folder and store the recipe names is there
and fits the recipe. Each failure is a ConfigError naming the key and what was expected (exit 2, no
traceback); a store that cannot be reached is StoreUnavailable (exit 75: try again later).

The recipe's own consistency (types, ranges, combinations) was checked when it was loaded (recipe/load.py);
here the outside world is checked against it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dip_scale.data.layout import DATASET_INFO_FILE, INDEX_FILE, read_dataset_info
from dip_scale.diffusion.repa import default_encoder_path, missing_weights_message
from dip_scale.eval.classifier import SyntheticClassifier
from dip_scale.eval.inception import find_weights
from dip_scale.eval.stats import read_npz_reference
from dip_scale.recipe import ConfigError, Recipe, model_config
from dip_scale.storage import NotFound, is_remote, open_store

log = logging.getLogger(__name__)


def check_inputs(recipe: Recipe) -> None:
    check_data(recipe)
    check_repa(recipe)
    check_eval(recipe)


def _streams(recipe: Recipe) -> list[tuple[str, str]]:
    d = recipe.data
    if d.remote is not None:
        return [("data.remote", d.remote)]
    return [(f"data.streams[{i}].remote", s.remote) for i, s in enumerate(d.streams or [])]


def check_data(recipe: Recipe) -> None:
    """The shards exist (index.json, dataset.json) and hold images and classes the model can take."""
    net = model_config(recipe)
    for key, remote in _streams(recipe):
        if "://" in remote and not is_remote(remote):
            log.info("%s=%s: a scheme Streaming reads itself; the shards are checked when the dataset opens",
                     key, remote)
            continue
        store = open_store(remote)
        try:
            has_index = store.exists(INDEX_FILE)
        except PermissionError as err:
            raise ConfigError(f"{key}={remote}: {err}") from err
        if not has_index:
            hint = f"`dip-prep write synthetic {remote} --num-images 1000 --resolution {recipe.data.image_size[0]}`"
            raise ConfigError(f"{key}={remote}: no {INDEX_FILE} there; shard the data with dip-prep first (e.g. "
                              f"{hint})" if not is_remote(remote) else
                              f"{key}={remote}: no {INDEX_FILE} there; shard the data with dip-prep first")
        try:
            info = read_dataset_info(remote)
        except (NotFound, ValueError) as err:
            raise ConfigError(f"{key}={remote}: {err}") from err
        size = list(recipe.data.image_size)
        if size != [info["resolution"], info["resolution"]]:
            raise ConfigError(f"{key}={remote} holds {info['resolution']}x{info['resolution']} images but "
                              f"data.image_size is {size}; set data.image_size=[{info['resolution']},"
                              f"{info['resolution']}] or shard at {size[0]} px")
        if info["num_classes"] > net.num_classes:
            raise ConfigError(f"{key}={remote} has {info['num_classes']} classes ({DATASET_INFO_FILE}) but the model "
                              f"has model.num_classes={net.num_classes}; set model.num_classes to at least "
                              f"{info['num_classes']}")


def check_repa(recipe: Recipe) -> None:
    r = recipe.objective.repa
    if not r.enabled:
        return
    path = r.encoder_path or default_encoder_path()
    if not os.path.isfile(path):
        raise ConfigError(f"objective.repa.encoder_path: {missing_weights_message(path, r.encoder_path is not None)}")


def check_eval(recipe: Recipe) -> None:
    e = recipe.eval
    if not e.every or e.every > recipe.train.max_steps:  # no evaluation in this run: nothing of it can fail
        return
    ref = str(e.reference)
    if not is_remote(ref):
        p = Path(ref)
        if not p.exists():
            raise ConfigError(f"eval.reference={ref} does not exist; expected an ADM reference .npz, a folder of "
                              "MDS shards or of images, or an s3:// URL")
        if ref.endswith(".npz"):
            try:
                read_npz_reference(p, load_images=False)
            except ValueError as err:
                raise ConfigError(f"eval.reference: {err}") from err
        elif p.is_file():
            raise ConfigError(f"eval.reference={ref} is a file but not an .npz; expected an ADM reference .npz, "
                              "a folder of MDS shards or of images, or an s3:// URL")
    if e.mode != "slurm" or e.inception_path:  # slurm: the job's machine may have them where this one does not
        try:
            find_weights(e.inception_path)
        except FileNotFoundError as err:
            raise ConfigError(f"eval.inception_path: {err}") from err
    if e.classifier:
        try:
            classifier = SyntheticClassifier.load(e.classifier)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"eval.classifier: {err}") from err
        if [classifier.resolution] * 2 != list(recipe.data.image_size):
            raise ConfigError(f"eval.classifier={e.classifier} was trained at {classifier.resolution} px but "
                              f"data.image_size is {list(recipe.data.image_size)}")
    if e.mode == "slurm":
        if not Path(e.script).is_file():
            raise ConfigError(f"eval.script={e.script}: no such job script (run from the repository root, or give "
                              "its absolute path)")
        if shutil.which("sbatch") is None:
            raise ConfigError("eval.mode=slurm but sbatch is not on PATH: run inside a Slurm cluster, or set "
                              "eval.mode=local (in-process), eval.mode=process (beside training) or eval.every=0")
