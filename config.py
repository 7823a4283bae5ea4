"""Settings, a face of the package: the names a user of the card needs to read or set a run's settings.

The code lives in imgcls/ (imgcls/settings.py: TrainConfig and its checks; imgcls/recipes.py: the
recipes; imgcls/cli.py: the command lines; imgcls/errors.py: the errors). This module only re-exports;
the package never imports it (docs/architecture.md). No torch here.
"""

from __future__ import annotations

from imgcls.errors import TrainingError, UsageError
from imgcls.recipes import DEMO, FAMILIES, MODERN_LR, RECIPES, describe_recipe, recipe_values
from imgcls.settings import CACHE_KINDS, IDENTITY, MODES, TrainConfig, cache_root, validate

__all__ = ["CACHE_KINDS", "DEMO", "FAMILIES", "IDENTITY", "MODERN_LR", "MODES", "RECIPES", "TrainConfig",
           "TrainingError", "UsageError", "cache_root", "describe_recipe", "recipe_values", "validate"]
