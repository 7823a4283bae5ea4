"""Settings: the dataclass of training defaults from which train.py builds its options, their checks, the
settings that define a run (IDENTITY), and where the caches live. No torch here.

The resolved settings are written to each run's `config.json` and stored in every checkpoint as a
plain dict, so a run can be read, repeated and resumed from its folder alone."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.errors import UsageError

MODES = ("scratch", "finetune", "transfer")
CACHE_KINDS = ("auto", "raw", "compact", "none")  # --image-cache (dataset.make_cache)
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
MAX_IMG_SIZE = 4096  # beyond it one decoded image, its cache row and a batch outgrow a machine's memory
MAX_FILE_MB_RULE = "--max-file-mb must be a positive number (MB), not inf or nan"


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
                      "label smoothing; lr by network family, a quarter of it to fine-tune, scaled with the batch), "
                      "seed (the seed project's SGD 1e-3, StepLR 7/0.1), auto (modern)",
                      choices=("auto", "modern", "seed"))
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


def file_name(model: str) -> str:
    """A model's name as it begins run folders and export files: timm/NAME as timm-NAME."""
    return model.replace("/", "-")


# Settings that define what a run *is*: changing them on --resume would make a different run, so a
# resume refuses them. Every other setting given with --resume takes effect from where the run is.
IDENTITY = ("data", "label_sep", "model", "mode", "weights", "img_size", "val_split", "test_split", "folds", "fold",
            "seed")


def identity_changes(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The options given on a resume that would change what defines the run (or job), as --flags; a
    setting the saved file predates counts as its default."""
    return ["--" + k.replace("_", "-") for k in IDENTITY
            if k in given and given[k] != saved.get(k, getattr(TrainConfig, k))]


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
