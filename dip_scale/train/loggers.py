"""wandb for a training run: one wandb run per training run (the same id across resumes, on any machine),
the resolved recipe as a nested config, and a compatibility shim for Composer 0.32.1.

Evaluations: in-process ones (eval.mode=local) log eval/* into the training run, plotted against eval/step
(the checkpoint's step). Evaluation jobs (eval.mode=slurm) log into a wandb run of their own in the same
group (the run name), job type "eval", with the same eval/step axis: a job that finishes while training
goes on, or after it ended, never writes into the training run's history.

The shim: Composer 0.32.1 (its last release) calls `wandb.run.get_url()` when its WandBLogger starts, and
wandb 0.29 removed `Run.get_url` in favour of the `Run.url` property, so any run with wandb on stopped at
start with AttributeError. `restore_run_get_url()` puts the method back as an alias of `url` when it is
missing, and does nothing on the wandb releases that still have it. Tested in tests/train/test_loggers.py
against the installed wandb (constraints.txt pins the release CI passes with).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from dip_scale.recipe import Recipe


def restore_run_get_url() -> bool:
    """Give wandb's Run a `get_url()` again where the installed wandb removed it; True if it was added."""
    from wandb.sdk.wandb_run import Run

    if hasattr(Run, "get_url"):
        return False

    def get_url(self):
        """The run's URL (None offline): the `url` property under the name Composer 0.32.1 calls."""
        return self.url

    Run.get_url = get_url
    return True


def wandb_run_id(recipe: Recipe, where: str) -> str:
    """The id of a training run's wandb run: from its name and where it is saved, so that every resume (on any
    machine, after any requeue) continues the same wandb run, and two runs of one name in two folders do not."""
    return hashlib.sha1(f"{recipe.run_name}|{where}".encode()).hexdigest()[:16]


def wandb_logger(recipe: Recipe, where: str, local_root: str):
    """Composer's WandBLogger for this run, or None when wandb is off. `where`: the run's save location
    (s3:// URL or absolute local folder); `local_root`: where the offline files go (<run>/wandb/)."""
    w = recipe.logging.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    from composer.loggers import WandBLogger

    restore_run_get_url()
    os.environ.setdefault("WANDB_MODE", w.mode)
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and summary would flood the job log
    return WandBLogger(project=w.project, entity=w.entity, name=recipe.run_name, group=recipe.run_name,
                       rank_zero_only=True,
                       init_kwargs={"id": wandb_run_id(recipe, where), "resume": "allow", "dir": str(local_root),
                                    "config": dataclasses.asdict(recipe)})
