"""Every value that would only fail later is refused when the recipe is loaded: one row per bad value, in
every section, with the key and what was expected in the message."""

from __future__ import annotations

import re

import pytest

from dip_scale.recipe import ConfigError, load_recipe
from tests.train.launch import TINY

BAD = [
    # (overrides, what the message must say)
    (["run_name=a/b"], "run_name='a/b' must be a non-empty name without '/'"),
    (["seed=one"], "bad value for 'seed'"),
    (["seed=-1"], "seed must be >= 0"),
    (["model.preset=DiP-H/16"], "model.preset='DiP-H/16' is not allowed"),
    (["model.depth=0"], "depth must be positive"),
    (["model.detailer_head=conv"], "detailer_head must be one of"),
    (["model.hidden_size=66"], "hidden_size 66 / num_heads 2 must give a head dim divisible by 4"),
    (["model.patch_size=8"], "detailer_head 'unet' needs patch_size divisible by 16"),
    (["model.hidden_size=many"], "bad value for 'model.hidden_size'"),
    (["model.width=64"], "unknown key 'model.width'"),
    (["data.image_size=[30,32]"], "not divisible by the model's patch size 16"),
    (["data.image_size=[32]"], "data.image_size must be [height, width]"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    (["data.num_canonical_nodes=0"], "data.num_canonical_nodes must be positive"),
    (["data.remote=null"], "data.remote (s3://bucket/prefix or a local folder of MDS shards) or data.streams"),
    (["data.streams=[{remote: x}]"], "set data.remote or data.streams, not both"),
    (["data.remote=null", "data.streams=[{proportion: 0.5}]"], "data.streams[0].remote must be set"),
    (["optim.lr=0"], "optim.lr must be positive"),
    (["optim.betas=[1.0,0.9]"], "optim.betas must be [beta1, beta2] in [0, 1)"),
    (["optim.weight_decay=-1"], "optim.weight_decay must be >= 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
    (["optim.warmup_steps=10", "parallelism.strategy=deepspeed"], "optim.warmup_steps=10 is not supported"),
    (["ema_decay=1.0"], "ema_decay must be in [0, 1)"),
    (["objective.label_dropout=1.0"], "objective.label_dropout must be in [0, 1)"),
    (["objective.repa.block=9"], "objective.repa.block=9 must be within the model's 2 blocks"),
    (["objective.repa.weight=-0.5"], "objective.repa.weight must be >= 0"),
    (["train.global_batch_size=0"], "train.global_batch_size must be positive"),
    (["train.global_batch_size=eight"], "bad value for 'train.global_batch_size'"),
    (["train.global_batchsize=8"], "unknown key 'train.global_batchsize'"),
    (["train.max_steps=0"], "train.max_steps must be positive"),
    (["train.device_microbatch_size=0"], "train.device_microbatch_size must be positive"),
    (["train.precision=fp8"], "train.precision='fp8' is not allowed"),
    (["train.nonfinite=ignore"], "train.nonfinite='ignore' is not allowed"),
    (["train.device=tpu"], "train.device='tpu' is not allowed"),
    (["train.compile_backend=xla"], "train.compile_backend='xla' is not allowed"),
    (["parallelism.strategy=zero"], "parallelism.strategy='zero' is not allowed"),
    (["parallelism.fsdp.sharding=half"], "parallelism.fsdp.sharding='half' is not allowed"),
    (["parallelism.deepspeed.stage=4"], "parallelism.deepspeed.stage=4 is not allowed"),
    (["parallelism.strategy=deepspeed", "parallelism.deepspeed.stage=1",
      "parallelism.deepspeed.offload_optimizer=true"],
     "offload_optimizer needs stage 2 or 3"),
    (["parallelism.deepspeed.param_persistence_threshold=-1"], "param_persistence_threshold must be >= 0"),
    (["checkpoint.every=0"], "checkpoint.every must be positive"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be positive"),
    (["checkpoint.milestones=[0]"], "checkpoint.milestones must be positive steps"),
    (["sampler.steps=0"], "sampler.steps must be >= 1"),
    (["sampler.method=rk4"], "sampler.method must be one of ['euler', 'heun']"),
    (["sampler.guidance_scale=-1"], "sampler.guidance_scale must be >= 0"),
    (["sampler.guidance_interval=[0.9,0.1]"], "sampler.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1"),
    (["logging.log_every=0"], "logging.log_every must be positive"),
    (["logging.sample_every=-1"], "logging.sample_every must be >= 0"),
    (["logging.sample_steps=0"], "logging.sample_steps must be positive"),
    (["logging.sample_classes=[3,12]"], "logging.sample_classes [12] are outside [0, 10)"),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode='cloud' is not allowed"),
    (["eval.every=-5"], "eval.every must be >= 0"),
    (["eval.mode=kubernetes"], "eval.mode='kubernetes' is not allowed"),
    (["eval.num_samples=15"], "eval.num_samples=15 must be a multiple of the 10 classes"),
    (["eval.batch_size=0"], "eval.batch_size must be positive"),
    (["eval.reference=null"], "eval.every=100 needs eval.reference"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[";".join(o) for o, _ in BAD])
def test_bad_value_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_recipe(TINY, overrides)
    assert str(TINY) in str(err.value)


def test_every_section_has_a_bad_value_in_the_table():
    from dip_scale.recipe.schema import Recipe

    sections = {f for f in Recipe.__dataclass_fields__}
    covered = {o.split("=")[0].split(".")[0] for overrides, _ in BAD for o in overrides}
    assert sections <= covered, sorted(sections - covered)


def test_every_recipe_field_has_a_docstring():
    """The schema is the reference of what a recipe may say: no field without its sentence."""
    import ast
    import inspect

    from dip_scale.diffusion import sampler
    from dip_scale.models import dip
    from dip_scale.recipe import schema

    missing = []
    for module in (schema, dip, sampler):
        tree = ast.parse(inspect.getsource(module))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            if not any(isinstance(d, ast.Name) and d.id == "dataclass" for d in cls.decorator_list):
                continue
            body = cls.body
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    documented = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    if not documented:
                        missing.append(f"{module.__name__}.{cls.name}.{node.target.id}")
    assert not missing, missing
