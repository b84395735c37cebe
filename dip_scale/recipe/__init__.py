"""The recipe: what a training run is (recipe/schema.py) and how a YAML file becomes one (recipe/load.py).

It sits below data, eval and train, so that everything that reads a recipe (a training start, or the recipe
saved in a checkpoint, for sampling and evaluation) goes through the same validated loader.
"""

from dip_scale.recipe.load import (
    ConfigError,
    check_world_size,
    load_recipe,
    load_recipe_text,
    model_config,
    stall_timeout,
    to_yaml,
    validate,
)
from dip_scale.recipe.schema import Recipe

__all__ = ["ConfigError", "Recipe", "check_world_size", "load_recipe", "load_recipe_text", "model_config",
           "stall_timeout", "to_yaml", "validate"]
