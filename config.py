"""Settings and command lines: the dataclass of training defaults from which train.py builds its
options, the options every script shares (defined once, here), and the error handler every entry
script runs under. No torch here: a command line is checked, and a typo answered, before torch loads.

The resolved settings are written to each run's `config.json` and stored in every checkpoint as a
plain dict, so a run can be read, repeated and resumed from its folder alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import gc
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

MODES = ("scratch", "finetune", "transfer")
CACHE_KINDS = ("auto", "raw", "compact", "none")  # --image-cache (dataset.make_cache)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2, before anything is written."""


class WeightsUnavailable(UsageError):
    """Published weights that could not be downloaded (no internet, say): `what` happened and the
    `alternatives` to a download; train.py adds the exact command that trains offline (offline())."""

    def __init__(self, what: str, alternatives: str):
        super().__init__(f"{what}: {alternatives}, or use --mode scratch")
        self.what, self.alternatives = what, alternatives

    def offline(self, command: str) -> str:
        return f"{self.what}. Without internet, train from scratch: {command}; or {self.alternatives}"


class TrainingError(Exception):
    """A run cannot go on (NaN loss, out of memory, unreadable data): one line, exit status 1."""


class Diverged(TrainingError):
    """A loss became NaN or infinite: the run stops at once, its last good checkpoints kept."""


def fail(message: str, status: int = 2) -> NoReturn:
    """Print a one-line error for a person (no traceback) and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def printable_output() -> None:
    """File and class names that are not UTF-8 print as \\udcXX escapes instead of failing the run
    (stderr does this already; stdout would raise UnicodeEncodeError)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


_own_process = False  # set by script(): this process is a command's own, not a test's or another program's
_frozen = False  # imports_done has frozen the imports once


def script(entry: Callable[[list[str] | None], int], file: str) -> NoReturn:
    """What an entry script (`file`) runs as a program: cli(entry). Whether the process is the command's
    own (see imports_done) is read from the interpreter's command line: `python train.py`, `python -m
    train` and torchrun's workers are; a notebook's `%run train.py`, runpy and exec run the script as
    `__main__` inside another program, whose objects are not ours to freeze."""
    global _own_process
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    _own_process = started_as(file, sys.orig_argv[1:], getattr(spec, "origin", None))
    sys.exit(cli(entry))


def started_as(file: str, interpreter_args: list[str], main_origin: str | None = None) -> bool:
    """Whether the interpreter was started to run `file`, read from its arguments (after its own name) as
    Python reads them: flags may be grouped (-uB), and -c, -m, -W and -X take a value, attached (-Werror)
    or next. For -m, the running __main__ module must also come from `file` (`main_origin`), not from a
    module of the same name elsewhere."""
    args, i = interpreter_args, 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = args[i + 1] if arg == "--" and i + 1 < len(args) else arg
            return script not in ("-", "--") and same_file(script, file)
        if arg.startswith("--"):  # a long option; only this one takes a value
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        i += 1
        for j, flag in enumerate(arg[1:], start=2):
            if flag in "cmWX":
                value = arg[j:] or (args[i] if i < len(args) else "")
                i += 0 if arg[j:] else 1
                if flag == "c":
                    return False
                if flag == "m":
                    return value == Path(file).stem and main_origin is not None and same_file(main_origin, file)
                break
    return False


def typed(path: str | os.PathLike) -> str:
    """A path as it must be typed in a command we print for the user to run: quoted where a shell would
    split or expand it (`my $run`), names that are not UTF-8 with \\xNN."""
    return shlex.quote(os.fsencode(path).decode("utf-8", "backslashreplace"))


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def imports_done() -> None:
    """Torch and the modules a command needs are loaded. In a command's own process their ~400,000
    objects are taken out of the garbage collector's rounds (gc.freeze): a full round walks them all
    (0.2 s here), and a 15-second training run made seven, plus one at exit. Not in a test or another
    program calling us: what is frozen is never collected, and later garbage would be kept. Once per
    process: a k-fold job calls it for each fold, and a later call would freeze the last fold's garbage."""
    global _frozen
    if _own_process and not _frozen:
        gc.freeze()
        _frozen = True


def cli(entry: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point with errors for people, the same for every script: bad input (UsageError)
    is one line and exit status 2, a failed run (TrainingError, out of GPU memory) one line and 1,
    Ctrl-C before anything was saved 130. Tracebacks are for bugs."""
    printable_output()
    try:
        return entry(argv)
    except UsageError as e:
        fail(str(e), 2)
    except TrainingError as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say, and no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's, named so that this module needs no torch
            fail("out of GPU memory: try a smaller --batch-size (or --img-size)", 1)
        raise


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each option's default shown once (an option whose
    default is computed says so in its own help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
        return text if shown else f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and a "did you mean" for a misspelled option."""

    def __init__(self, doc: str | None = None, **kwargs: Any):
        kwargs.setdefault("description", doc)
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if not kwargs.get("help") and "-h" not in args:
            raise TypeError(f"option {args[0]} needs a help text")  # a bug: every option says what it does
        return super().add_argument(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        unknown = [w for w in getattr(self, "argv", []) if w.startswith("--") and w.split("=")[0] not in known
                   and not any(k.startswith(w.split("=")[0]) for k in known)]  # (argparse takes abbreviations)
        if unknown and not message.startswith("unrecognized arguments: "):
            message = f"unrecognized arguments: {' '.join(unknown)}"  # the cause of a 'required' error, say
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
                break
        fail(f"{message}; see python {self.prog} --help")


HELP = {  # the options several scripts share, said the same way everywhere
    "checkpoint": "a run folder (its best.pt), a .pt from a run, or an exported .onnx (default: the newest "
                  "runs/*/best.pt)",
    "device": "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1, mps",
    "batch_size": "images per batch",
    "workers": "DataLoader worker processes (default: sized to the machine)",
    "cache_dir": "where caches live (default: $IMGCLS_CACHE or ~/.cache/imgcls)",
    "amp": "mixed precision (bf16/fp16): faster on GPUs, but predictions may then differ slightly from full "
           "precision and from an exported model's",
    "max_file_mb": "files larger than this (MB) are skipped without being read (a 12 MP JPEG is ~5 MB; raise "
                   "it for huge TIFFs)",
    "label_sep": "what separates the labels in a label file's labels column (multi-label; default: the one the "
                 "model was trained with, else a space)",
}
DEFAULT_MAX_FILE_MB = 256.0


def add_shared(parser: argparse.ArgumentParser, *names: str, batch_size: int = 256) -> None:
    """The shared options, by field name (checkpoint, device, batch_size, workers, cache_dir, max_file_mb, amp,
    label_sep)."""
    kinds = {"checkpoint": {}, "device": {"default": "auto"}, "batch_size": {"type": int, "default": batch_size},
             "workers": {"type": int}, "cache_dir": {}, "max_file_mb": {"type": float, "default": DEFAULT_MAX_FILE_MB},
             "amp": {"action": argparse.BooleanOptionalAction, "default": False}, "label_sep": {}}
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), help=HELP[name], **kinds[name])


MAX_IMG_SIZE = 4096  # beyond it one decoded image, its cache row and a batch outgrow a machine's memory
MAX_FILE_MB_RULE = "--max-file-mb must be a positive number (MB), not inf or nan"


def check_shared(args: argparse.Namespace) -> None:
    """The shared numbers, refused before anything loads."""
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError("--batch-size must be at least 1")
    if (getattr(args, "workers", None) or 0) < 0:
        raise UsageError("--workers cannot be negative")
    if not 0 < getattr(args, "max_file_mb", 1) < math.inf:
        raise UsageError(MAX_FILE_MB_RULE)
    if getattr(args, "label_sep", None) == "":
        raise UsageError("--label-sep cannot be empty: give the character between an image's labels, e.g. ';'")
    check_device(getattr(args, "device", "auto"))


def check_device(name: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise UsageError(f"--device {name} is not a device: give auto, cpu, cuda, cuda:N or mps")


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that also carries its argparse help, type and choices."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # data
    data: str = opt("demo", "image folder (DIR/train + DIR/val, or DIR/<class>/...), a label file (a .csv with "
                    "path,label[,split] columns; path,labels[,split] for several labels per image: multi-label), or "
                    "'demo' for scikit-learn's digits exported as PNGs (the demo trains from scratch at 32 px for 10 "
                    "epochs without flips, unless told otherwise)")
    label_sep: str = opt(" ", "what separates the labels in a label file's labels column (multi-label; default: "
                         "a space)")
    val_split: float = opt(0.2, "share of each class held out for validation when DATA has no val/ folder (or "
                           "split column)")
    test_split: float = opt(0.0, "share of each class set aside as the run's test set, never trained on nor used "
                            "to choose best.pt (flat folders and label files without a split column); "
                            "python eval.py --checkpoint RUN evaluates it")
    folds: int = opt(0, "k-fold cross-validation: train K runs (fold-1/ ... fold-K/ in one folder), each validated "
                     "on one stratified fold of the data (the test split, if any, outside all folds), then report "
                     "the mean and spread (cv_summary.json); 0: one run")
    fold: int = opt(0, "which fold this run validates on (1..K; set by --folds)", cli=False)
    img_size: int | None = opt(None, "training/eval crop size in pixels, 16 to 4096 (default: the weights' own, 224)",
                               type=int)
    progressive: float = opt(0.0, "progressive resizing: the first epochs train on crops this share of --img-size "
                             "(e.g. 0.75), growing to --img-size from 40%% to 80%% of the epochs; cheaper early epochs "
                             "(0: off)")
    augment: str = opt("basic", "training augmentation preset",
                       choices=("none", "basic", "randaugment", "trivialaugment"))
    min_scale: float = opt(0.35, "smallest area share kept by the random resized crop")
    hflip: float = opt(0.5, "probability of a horizontal flip (0 for text, digits, asymmetric things)")
    mixup: float = opt(0.0, "mixup alpha (0 = off)")
    cutmix: float = opt(0.0, "cutmix alpha (0 = off)")
    # model
    model: str = opt("resnet18", "any torchvision classification model, e.g. vgg11, resnet18, mobilenet_v2, or "
                     "timm/NAME with timm installed (--list-models lists them)")
    mode: str = opt("finetune", "scratch: random init; finetune: ImageNet weights, all layers train; "
                    "transfer: ImageNet weights, frozen backbone, only the new head trains",
                    choices=MODES)
    weights: str | None = opt(None, "local state_dict file to use instead of downloading ImageNet weights",
                              type=str)
    # optimisation (the fields in RECIPES take the recipe's value unless given)
    recipe: str = opt("auto", "optimisation settings for what you do not set: modern (AdamW, cosine with warm-up, "
                      "label smoothing; lr scaled with the batch), seed (the seed project's SGD 1e-3, StepLR 7/0.1), "
                      "auto (modern from scratch, seed for pretrained weights)", choices=("auto", "modern", "seed"))
    epochs: int = opt(10, "number of epochs")
    batch_size: int = opt(64, "images per step (per process under torchrun)")
    lr: float = opt(1e-3, "learning rate")
    optimizer: str = opt("sgd", "optimizer", choices=("sgd", "adam", "adamw", "rmsprop"))
    momentum: float = opt(0.9, "momentum (sgd, rmsprop)")
    weight_decay: float = opt(0.0, "weight decay")
    scheduler: str = opt("step", "learning-rate schedule",
                         choices=("step", "cosine", "onecycle", "plateau", "none"))
    step_size: int = opt(7, "epochs between learning-rate drops (step schedule)")
    gamma: float = opt(0.1, "learning-rate drop factor (step; plateau: after 2 epochs without a better "
                       "val accuracy)")
    warmup_epochs: int = opt(0, "linear warm-up epochs before the schedule")
    backbone_lr_mult: float = opt(1.0, "finetune only: learning-rate multiplier for the pretrained layers")
    label_smoothing: float = opt(0.0, "label smoothing for the loss")
    class_weights: str = opt("none", "'auto': weigh the loss by inverse class frequency",
                             choices=("none", "auto"))
    balanced_sampler: bool = opt(False, "draw training images so each class is seen equally often")
    patience: int = opt(0, "stop after this many epochs without a better val accuracy (0 = never)")
    precise_bn: bool = opt(True, "recompute BatchNorm's statistics from up to 256 training images before each "
                           "validation (precise BN): the running averages trail the weights, by far in short runs")
    ema: bool = opt(False, "also keep an exponential moving average of the weights, validate it each epoch and "
                    "keep it as the model when it is better")
    ema_decay: float = opt(0.9998, "EMA decay per step; a short run uses less, so that the average spans about "
                           "the last tenth of the run")
    # machine
    device: str = opt("auto", HELP["device"])
    workers: int | None = opt(None, HELP["workers"], type=int)
    amp: bool | None = opt(None, "mixed precision: bf16 on CUDA where supported (else fp16) and on CPUs with "
                           "native bf16 (AVX512-BF16, AMX); --no-amp: fp32 (default: on CUDA; on such a CPU, the "
                           "faster for this network, by a few timed steps kept in the cache folder)", switch=True)
    channels_last: bool = opt(True, "channels_last memory format (faster convolutions on CUDA and CPU)")
    compile: bool = opt(False, "torch.compile the model (a minute or more to start, faster steps: for long runs)")
    sync_bn: bool = opt(False, "SyncBatchNorm across processes under torchrun")
    image_cache: str = opt("auto", "decode each image once into an on-disk cache: raw (uint8 pixels, fastest to "
                           "read, ~196 KB per image at 256 px), compact (JPEG, ~13 KB per photo), auto (raw while it "
                           "fits in half the free disk, else compact); --no-image-cache: none",
                           choices=CACHE_KINDS)
    feature_cache: bool = opt(True, "transfer mode: compute the frozen backbone's features once "
                              "(turns augmentation off)")
    cache_dir: str | None = opt(None, HELP["cache_dir"], type=str)
    max_file_mb: float = opt(DEFAULT_MAX_FILE_MB, HELP["max_file_mb"])
    max_bad_fraction: float = opt(0.5, "stop if more than this share of a batch cannot be read")
    save_interval: float = opt(60.0, "seconds between checkpoint writes at epoch ends; always after the last "
                               "epoch and on Ctrl-C (0 = every epoch; a hard kill loses at most this much)")
    seed: int = opt(42, "random seed (split, init, shuffling, augmentation)")
    # run folder
    out: str | None = opt(None, "run folder (default: runs/<model>-<mode>-<time>)", type=str)
    resume: str | None = opt(None, "continue a run: a run folder (or its last.pt), or 'auto' for the newest; "
                             "options given with it take effect, except those that define the run", type=str)
    overwrite: bool = opt(False, "allow --out to be an existing non-empty folder")
    summary: bool = opt(True, "write the torchsummary layer table to model_summary.txt in the run folder")
    lr_find: bool = opt(False, "run a learning-rate range test, plot it, suggest an lr and exit")
    given: list[str] = field(default_factory=list, metadata={  # so that a resume re-derives the others alike
        "help": "the optimisation settings given (the others are the recipe's)", "cli": False})

    def __post_init__(self) -> None:
        if isinstance(self.image_cache, bool):  # settings saved when the cache was on or off
            self.image_cache = "auto" if self.image_cache else "none"


# The recipes (--recipe): what a setting in RECIPE_FIELDS is when it is not given. "modern" was measured
# on real photos from scratch (ResNet18, 64 px, 15 epochs: 84.5% where "seed" reached 61.8%) and on the
# data sets of bench/bench_recipes.py; "seed" is the seed project's, kept for pretrained weights, where it
# works (99.85% finetuning its data set).
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


def file_name(model: str) -> str:
    """A model's name as it begins run folders and export files: timm/NAME as timm-NAME."""
    return model.replace("/", "-")


def recipe_name(mode: str, recipe: str) -> str:
    return recipe if recipe != "auto" else "modern" if mode == "scratch" else "seed"


def recipe_values(name: str, images_per_step: int, optimizer: str | None = None, family: str = "batchnorm"
                  ) -> dict[str, Any]:
    """The recipe's settings; the modern lr the family's, scaled to the images per step. Its weight decay is
    AdamW's (decoupled): with another optimizer given it would be an L2 penalty 0.05 strong, so it is left out."""
    values = dict(RECIPES[name])
    if name == "modern":
        values["lr"] = round(MODERN_LR[family] * math.sqrt(images_per_step / RECIPE_BATCH), 6)
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
    return {**recipe_values(name, batch_size * world, given.get("optimizer"), family), **given, "recipe": name}


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
    values = recipe_values(name, batch * world, optimizer, family)
    derived = {k: v for k, v in values.items() if k not in given and saved.get(k) != v}
    return {**derived, **overrides, "recipe": name, "given": sorted(given)}


def inferred_given(saved: dict[str, Any], world: int, family: str) -> list[str]:
    """The settings a run saved before `given` was recorded was given: those that differ from its recipe's."""
    optimizer = saved.get("optimizer")
    values = recipe_values(saved["recipe"], saved.get("batch_size", TrainConfig.batch_size) * world,
                           optimizer if optimizer != RECIPES[saved["recipe"]]["optimizer"] else None, family)
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


# Settings that define what a run *is*: changing them on --resume would make a different run, so a
# resume refuses them. Every other setting given with --resume takes effect from where the run is.
IDENTITY = ("data", "label_sep", "model", "mode", "weights", "img_size", "val_split", "test_split", "folds", "fold",
            "seed")


def identity_changes(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The options given on a resume that would change what defines the run (or job), as --flags; a
    setting the saved file predates counts as its default."""
    return ["--" + k.replace("_", "-") for k in IDENTITY
            if k in given and given[k] != saved.get(k, getattr(TrainConfig, k))]


def add_options(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add one --option per dataclass field; unset options stay absent from the namespace (so a resume
    can tell what was given), with the field's default shown in the help."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if not meta.pop("cli", True):  # set by the toolkit itself, stored with the run
            continue
        if f.name in RECIPE_FIELDS:
            seed, modern = RECIPES["seed"][f.name], RECIPES["modern"][f.name]
            help_text += f" (default: the recipe's: seed {seed}, modern {modern}" + \
                (" x sqrt(batch/64)" if f.name == "lr" else "") + ")"
        elif "default" not in help_text and f.default is not None:
            help_text += f" (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if f.name == "image_cache":  # --image-cache [KIND] and --no-image-cache, as when it was on/off
            parser.add_argument(flag, nargs="?", const="auto", help=help_text, default=argparse.SUPPRESS, **meta)
            parser.add_argument("--no-image-cache", dest=f.name, action="store_const", const="none",
                                default=argparse.SUPPRESS, help="no image cache (--image-cache none)")
        elif isinstance(f.default, bool) or meta.pop("switch", False):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text,
                                default=argparse.SUPPRESS)
        else:
            meta.setdefault("type", type(f.default))
            parser.add_argument(flag, help=help_text, default=argparse.SUPPRESS, **meta)


SEED_LIMIT = 2**62  # torch's generators take 64 bits, and the seed is offset by the epoch
SEED_RULE = "--seed must be a whole number between -2^62 and 2^62 (e.g. 42)"


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work before anything is loaded or written."""
    checks = [
        (0 < cfg.val_split < 1, "--val-split must be between 0 and 1, both excluded (a run needs validation images)"),
        (0 <= cfg.test_split < 1 and cfg.val_split + cfg.test_split < 1,
         "--test-split must be 0 or more, and --val-split plus --test-split less than 1"),
        (cfg.folds == 0 or cfg.folds >= 2, "--folds must be 2 or more (or 0: no cross-validation)"),
        (abs(cfg.seed) < SEED_LIMIT, SEED_RULE),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (0 < cfg.lr < math.inf, "--lr must be a positive number (not inf or nan)"),
        (cfg.img_size is None or 16 <= cfg.img_size <= MAX_IMG_SIZE,
         f"--img-size must be between 16 and {MAX_IMG_SIZE} (one {MAX_IMG_SIZE} px image is 50 MB decoded)"),
        (0 < cfg.min_scale <= 1, "--min-scale must be in (0, 1]"),
        (cfg.progressive == 0 or 0.25 <= cfg.progressive <= 1, "--progressive must be 0 (off) or a share of "
         "--img-size between 0.25 and 1 (e.g. 0.75)"),
        (0 <= cfg.hflip <= 1, "--hflip must be a probability"),
        (0 <= cfg.max_bad_fraction <= 1, "--max-bad-fraction must be between 0 and 1"),
        (0 < cfg.max_file_mb < math.inf, MAX_FILE_MB_RULE),
        (cfg.workers is None or cfg.workers >= 0, "--workers cannot be negative"),
        (cfg.save_interval >= 0, "--save-interval cannot be negative"),
        (cfg.patience >= 0 and cfg.warmup_epochs >= 0, "--patience and --warmup-epochs cannot be negative"),
        (cfg.step_size >= 1, "--step-size must be at least 1 epoch"),
        (cfg.gamma > 0, "--gamma must be positive"),
        (cfg.momentum >= 0 and cfg.weight_decay >= 0, "--momentum and --weight-decay cannot be negative"),
        (cfg.backbone_lr_mult >= 0, "--backbone-lr-mult cannot be negative"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 < cfg.ema_decay < 1, "--ema-decay must be between 0 and 1"),
        (cfg.mixup >= 0 and cfg.cutmix >= 0, "--mixup and --cutmix cannot be negative"),
        (cfg.label_sep != "", "--label-sep cannot be empty: give the character between an image's labels, e.g. ';'"),
        (cfg.image_cache in CACHE_KINDS, f"--image-cache {cfg.image_cache!r} is not one of {', '.join(CACHE_KINDS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_device(cfg.device)


def command_line(settings: dict[str, Any], **changes: Any) -> str:
    """`python train.py` with the options in `settings` (as train.py reads them) changed by `changes`, as a
    user would type it: paths inside the working directory relative to it, every word quoted for a shell."""
    options = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    words = ["python", "train.py"]
    for key, value in {**settings, **changes}.items():
        if key not in options or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
            continue
        if key in ("data", "weights", "out", "cache_dir") and value != "demo" and os.path.isabs(str(value)):
            relative = os.path.relpath(str(value))
            value = value if relative.startswith("..") else relative
        words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """--data and --weights as absolute paths, so a run is the same from any working directory."""
    out = dict(settings)
    for key in ("data", "weights"):
        if out.get(key) and out[key] != "demo":
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


def cache_path(cfg_dir: str | None = None) -> Path:
    """Where the caches live (--cache-dir, else $IMGCLS_CACHE, else ~/.cache/imgcls), not made yet."""
    return Path(cfg_dir or os.environ.get("IMGCLS_CACHE") or Path.home() / ".cache" / "imgcls")


def cache_root(cfg_dir: str | None = None) -> Path:
    """Caches (dataset checks, decoded images, features) survive runs; never inside the data folder
    (folders.check_outside)."""
    path = cache_path(cfg_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot use {path} as the cache folder ({e.strerror or e}): give another --cache-dir "
                         "(or $IMGCLS_CACHE)") from None
    return path
