"""What tune.py searches: the settings that matter for the mode, in ranges centred on the recipe a plain
train.py run would use (so the first trial, the recipe itself, is inside every range and the search
starts from the default rather than from nowhere)."""

from __future__ import annotations

import math
from typing import Any

import optuna

from imgcls.errors import UsageError
from imgcls.recipes import RECIPE_FIELDS, recipe_name, recipe_values
from imgcls.settings import TrainConfig

AUGMENT = ("none", "basic", "randaugment", "trivialaugment")
MIXUP = (0.0, 0.2, 0.4, 0.8)  # alpha: 0 is off; categorical, so that "off" is a choice the search can make
CUTMIX = (0.0, 0.5, 1.0)
# every name tune.py can search, in the order trials print them
ALL = ("lr", "weight_decay", "label_smoothing", "min_scale", "augment", "mixup", "cutmix", "ema", "backbone_lr_mult")
AUGMENTATION = ("min_scale", "augment", "mixup", "cutmix")


def searched(given: dict[str, Any], mode: str, only: list[str] | None) -> list[str]:
    """The settings searched: those that matter for the mode (transfer's cached features have no
    augmentation; only finetune has a backbone lr), less the ones given on the command line (fixed),
    cut to --params when given."""
    names = [n for n in ALL if n not in given]
    if mode == "transfer" and given.get("feature_cache", True):
        names = [n for n in names if n not in AUGMENTATION]
    if mode != "finetune":
        names = [n for n in names if n != "backbone_lr_mult"]
    if only is not None:
        unknown = [n for n in only if n not in ALL]
        if unknown:
            raise UsageError(f"--params {','.join(unknown)}: tune.py searches {', '.join(ALL)}")
        names = [n for n in names if n in only]
    if not names:
        raise UsageError("nothing left to search: every setting --params names is fixed on the command line or "
                         f"does not apply to --mode {mode}")
    return names


def recipe(given: dict[str, Any], mode: str, family: str) -> dict[str, Any]:
    """The optimisation settings a train.py run with these options would take from its recipe."""
    name = recipe_name(mode, given.get("recipe", "auto"))
    values = recipe_values(name, given.get("batch_size", 64), given.get("optimizer"), family, mode)
    return {**values, **{k: v for k, v in given.items() if k in RECIPE_FIELDS}}


def distributions(names: list[str], base: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Each searched setting's range. lr: a decade either side of the recipe's; weight decay from none
    to 4x the recipe's (AdamW's decoupled decay, 0.05 in the modern recipe), or to 5e-4 as an L2
    penalty (SGD and the others)."""
    D = optuna.distributions
    decoupled = base.get("optimizer") == "adamw"
    wd_top = max(0.2, 4 * base.get("weight_decay", 0.0)) if decoupled else max(5e-4, base.get("weight_decay", 0.0))
    every = {"lr": D.FloatDistribution(base["lr"] / 10, base["lr"] * 10, log=True),
             "weight_decay": D.FloatDistribution(0.0, wd_top),
             "label_smoothing": D.FloatDistribution(0.0, 0.2),
             "min_scale": D.FloatDistribution(0.08, 1.0),
             "augment": D.CategoricalDistribution(AUGMENT),
             "mixup": D.CategoricalDistribution(MIXUP),
             "cutmix": D.CategoricalDistribution(CUTMIX),
             "ema": D.CategoricalDistribution((False, True)),
             "backbone_lr_mult": D.FloatDistribution(0.03, 1.0, log=True)}
    return {n: every[n] for n in names}


def suggest(trial: optuna.Trial, space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
    """The trial's settings (an enqueued trial, the baseline or a retry, gets its own values back)."""
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return values


def baseline(names: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """The default recipe's values of the searched settings: the study's first trial, what tuning is
    measured against."""
    values = {**{f: getattr(TrainConfig, f) for f in ALL if f not in RECIPE_FIELDS}, **base}
    return {n: values[n] for n in names}


def shown(params: dict[str, Any]) -> str:
    """A trial's settings in one short line, as train.py options."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, float):
            return f"{v:.3g}" if v and not math.isclose(v, round(v, 2)) else f"{v:g}"
        return str(v)

    return " ".join(f"--{k.replace('_', '-')} {value(params[k])}" for k in ALL if k in params)
