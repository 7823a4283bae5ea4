"""Recipes: the optimiser, schedule and augmentation settings a run takes by mode and network family. No torch."""

from __future__ import annotations

import math
from typing import Any

from imgcls.settings import TrainConfig

# The recipes (--recipe): what a setting in RECIPE_FIELDS is when it is not given. "modern" was measured
# on real photos from scratch (ResNet18, 64 px, 15 epochs: 84.5% where "seed" reached 61.8%) and on the
# data sets of bench/bench_recipes.py, from scratch and fine-tuning; "seed" is the seed project's (SGD 1e-3,
# 99.85% finetuning its data set from ImageNet weights), kept as --recipe seed.
RECIPES = {
    "seed": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "step",
             "step_size": 7, "gamma": 0.1, "warmup_epochs": 0, "label_smoothing": 0.0},
    "modern": {"optimizer": "adamw", "lr": 2e-3, "momentum": 0.9, "weight_decay": 0.05, "scheduler": "cosine",
               "step_size": 7, "gamma": 0.1, "warmup_epochs": 1, "label_smoothing": 0.1},
}
RECIPE_FIELDS = tuple(RECIPES["seed"])
RECIPE_BATCH = 64  # modern's lr is for this many images per step; others scale it by sqrt(batch / 64)


# The family of a network, read from its layers (models.family): the modern recipe's lr differs by family,
# measured with bench/bench_recipes.py. Networks without normalisation layers (VGG, SqueezeNet) diverge or
# stall at the lr that suits BatchNorm networks; LayerNorm networks (ConvNeXt, ViT, Swin) want a lower one.
FAMILIES = {"batchnorm": "BatchNorm networks", "layernorm": "LayerNorm networks",
            "plain": "networks without normalisation layers"}
MODERN_LR = {"batchnorm": 2e-3, "layernorm": 1e-3, "plain": 2.5e-4}
# Fine-tuning pretrained weights takes the modern recipe at a quarter of the family's lr, transfer (a head on
# frozen features) at the family's lr: measured with bench/bench_recipes.py --finetune (networks pretrained on
# one set, fine-tuned on two others: ResNet18 60.2% and 96.3% at a quarter, 56.8% and 95.6% at a tenth, 47.7%
# and 52.5% with the seed's SGD 1e-3; MobileNetV2 56.8/66.3 against the seed's 47.7/62.5).
FINETUNE_LR_SHARE = 0.25


# the built-in demo (8x8 digits, upscaled) chooses its own size, length, mode and no flips, unless given:
# about a minute on 2 CPU cores, offline (no ImageNet weights needed)
DEMO = {"mode": "scratch", "img_size": 32, "epochs": 10, "hflip": 0.0}


def progressive_size(epoch: int, epochs: int, img_size: int, start: float) -> int:
    """The training crop size of an epoch (0-based) under --progressive `start`: start x img_size for the first
    40% of the epochs, growing linearly to img_size at 80%, img_size after; a multiple of 8, at least 16."""
    t = min(1.0, max(0.0, (epoch / max(1, epochs) - 0.4) / 0.4))
    if not start or t >= 1:
        return img_size
    return min(img_size, max(16, int(img_size * (start + (1 - start) * t)) // 8 * 8))


def recipe_name(mode: str, recipe: str) -> str:
    """--recipe auto is the modern recipe in every mode (its lr by mode and family: recipe_values)."""
    return recipe if recipe != "auto" else "modern"


def recipe_values(name: str, images_per_step: int, optimizer: str | None = None, family: str = "batchnorm",
                  mode: str = "scratch") -> dict[str, Any]:
    """The recipe's settings; the modern lr the family's (a quarter of it to fine-tune), scaled to the images per
    step. Its weight decay is AdamW's (decoupled): with another optimizer given it would be an L2 penalty 0.05
    strong, so it is left out."""
    values = dict(RECIPES[name])
    if name == "modern":
        share = FINETUNE_LR_SHARE if mode == "finetune" else 1.0
        values["lr"] = round(MODERN_LR[family] * share * math.sqrt(images_per_step / RECIPE_BATCH), 6)
        if optimizer not in (None, "adamw"):
            values["weight_decay"] = 0.0
    return values


def with_recipe(given: dict[str, Any], world: int = 1, family: str = "batchnorm") -> dict[str, Any]:
    """A new run's settings: those given, then the demo's own defaults (for the demo), then the recipe's
    for the optimisation settings not given. `recipe` holds the recipe's name (modern or seed), `given`
    the optimisation settings that were given."""
    settings = dict(given)
    if settings.get("data", TrainConfig.data) == "demo":
        settings = {**DEMO, **settings}
    settings["given"] = sorted(k for k in RECIPE_FIELDS if k in given)
    return recipe_settings(settings, settings.get("mode", TrainConfig.mode),
                           settings.get("batch_size", TrainConfig.batch_size), world, family)


def recipe_settings(given: dict[str, Any], mode: str, batch_size: int, world: int = 1, family: str = "batchnorm"
                    ) -> dict[str, Any]:
    """`given` with the recipe's values for the optimisation settings it lacks (the recipe: given['recipe'],
    else auto); `recipe` holds its name. Only an optimizer *given* changes what the recipe sets."""
    name = recipe_name(mode, given.get("recipe", TrainConfig.recipe))
    return {**recipe_values(name, batch_size * world, given.get("optimizer"), family, mode), **given,
            "recipe": name}


def resumed_recipe(saved: dict[str, Any], overrides: dict[str, Any], world: int = 1, family: str = "batchnorm"
                   ) -> dict[str, Any]:
    """A resume's settings from the recipe, as a new run given the run's options and these together would have
    them: when the recipe, the optimizer or the batch size is given now, the recipe's settings given neither
    then nor now are derived again (another optimizer drops the modern recipe's AdamW weight decay, a larger
    batch scales its lr). A --recipe given now takes all its settings not given now. Returns the overrides."""
    if not {"recipe", "optimizer", "batch_size"} & overrides.keys():
        return overrides
    before = set() if "recipe" in overrides else set(saved.get("given", inferred_given(saved, world, family)))
    given = before | (overrides.keys() & set(RECIPE_FIELDS))
    name = recipe_name(saved["mode"], overrides.get("recipe", saved["recipe"]))
    optimizer = overrides.get("optimizer", saved["optimizer"] if "optimizer" in before else None)
    batch = overrides.get("batch_size", saved.get("batch_size", TrainConfig.batch_size))
    values = recipe_values(name, batch * world, optimizer, family, saved["mode"])
    derived = {k: v for k, v in values.items() if k not in given and saved.get(k) != v}
    return {**derived, **overrides, "recipe": name, "given": sorted(given)}


def inferred_given(saved: dict[str, Any], world: int, family: str) -> list[str]:
    """The settings a run saved before `given` was recorded was given: those that differ from its recipe's."""
    optimizer = saved.get("optimizer")
    values = recipe_values(saved["recipe"], saved.get("batch_size", TrainConfig.batch_size) * world,
                           optimizer if optimizer != RECIPES[saved["recipe"]]["optimizer"] else None, family,
                           saved.get("mode", "scratch"))
    return [k for k in RECIPE_FIELDS if k in saved and saved[k] != values[k]]


def describe_recipe(cfg: TrainConfig, given: dict[str, Any], family: str = "batchnorm") -> str:
    """One line for the start of a run: the recipe, and which of its settings the command line changed."""
    own = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in RECIPE_FIELDS if k in given]
    other = "optimizer" in given and "lr" not in given and cfg.optimizer != RECIPES[cfg.recipe]["optimizer"]
    kind = f" (for {FAMILIES[family]})" if cfg.recipe == "modern" and "lr" not in given else ""
    return (f"recipe {cfg.recipe}: {cfg.optimizer} lr {cfg.lr:g}{kind}, weight decay {cfg.weight_decay:g}, "
            f"{cfg.scheduler} "
            f"schedule" + (f" after {cfg.warmup_epochs} warm-up epoch(s)" if cfg.warmup_epochs else "") +
            (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "") +
            (f" (given: {', '.join(own)})" if own else "") + "; --recipe seed or modern to choose another" +
            ("; note: this lr is for the recipe's own optimizer, --lr-find suggests one for yours" if other else ""))
