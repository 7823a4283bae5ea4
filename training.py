"""Training, behind train.py: settings and resuming, the run folder, data and model, the optional
feature cache (transfer mode), the schedule, the lr finder, and the loop over epochs with its
checkpoints and EMA.

train() reads as the steps: settings -> run folder -> data and model -> fit (inputs, optimizer,
loop). Resuming (see resolve_config): the settings that define the run (IDENTITY in config.py)
cannot change; every other setting given with --resume takes effect from where the run is. The
optimisation settings not given come from a recipe (config.RECIPES).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import calibration
import checkpoint
import compact_cache
import cpu_precision
import dataset
import files
import folders
import labels
import models
import multilabel
import plots
from checkpoint import Preprocess
from config import (
    Diverged,
    TrainConfig,
    TrainingError,
    UsageError,
    WeightsUnavailable,
    absolute_paths,
    cache_path,
    command_line,
    describe_recipe,
    file_name,
    identity_changes,
    progressive_size,
    resumed_recipe,
    typed,
    validate,
    with_recipe,
)
from engine import (
    Ema,
    Features,
    HardStop,
    Learner,
    Progress,
    ResumableSampler,
    Stopped,
    all_reduce_sum,
    auto_workers,
    autocast_dtype,
    barrier,
    broadcast,
    check_batch_size,
    cpu_has_bf16,
    deferred_interrupts,
    evaluate,
    from_lead,
    init_distributed,
    make_loader,
    pick_device,
    precise_bn_images,
    precision,
    precision_name,
    predict,
    recompute_batchnorm,
    same_buffers,
    seed_everything,
    shard,
    share_check,
    sigterm_as_ctrl_c,
    stop_requested,
    to_model_input,
    train_one_epoch,
    trained_batchnorms,
    trains_batchnorm,
    tune_cpu_allocator,
)
from health import Health, largest_share

RUN_FILES = ("last.pt", "best.pt", "config.json", "split.json", "skipped.txt", "metrics.csv", "summary.json",
             "curves.png", "lr_find.png", "lr_find.json", "resumes.jsonl", "model_summary.txt", "events.out.tfevents.*",
             checkpoint.CHECKPOINTED)


# ----------------------------------------------------------------------------- optimisation

class Schedule:
    """The learning-rate factor at a position in the run, in epochs (2.5: half-way through epoch 3):
    warm-up, then step/cosine/onecycle/plateau/none. It depends on the position and the settings
    alone (plateau's cuts are replayed from the validation history), so a resume with new settings
    (more epochs, another schedule) follows the new plan from where the run is, warm-up included:
    a run past its warm-up never repeats it."""

    def __init__(self, cfg: TrainConfig, history: list[dict[str, Any]] = ()):
        self.kind, self.epochs, self.warmup = cfg.scheduler, cfg.epochs, cfg.warmup_epochs
        self.step_size, self.gamma = cfg.step_size, cfg.gamma
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -math.inf, 0
        for row in history:
            self.end_epoch(val_score(row))

    def __call__(self, start: float, end: float) -> float:
        """The factor for a step from position `start` to `end`."""
        warm = min(1.0, end / self.warmup) if self.warmup else 1.0
        t = min(1.0, max(0.0, start - self.warmup) / max(1e-9, self.epochs - self.warmup))
        if self.kind == "step":
            factor = self.gamma ** (math.floor(start) // self.step_size)
        elif self.kind == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * t))
        elif self.kind == "onecycle":  # up to lr over the first 30%, then cosine down to ~0
            t = min(1.0, start / self.epochs)
            factor = (0.04 + 0.96 * (1 - math.cos(math.pi * t / 0.3)) / 2 if t < 0.3
                      else 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7)) + 1e-4)
            warm = 1.0
        elif self.kind == "plateau":
            factor = self.plateau_scale
        else:
            factor = 1.0
        return warm * factor

    def end_epoch(self, score: float, patience: int = 2) -> None:
        """Plateau: multiply by gamma after `patience` epochs without a better val accuracy (mAP)."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > patience:
                self.plateau_scale *= self.gamma
                self.bad_epochs = 0


def val_score(row: dict[str, Any]) -> float:
    """An epoch's validation score from its history row: accuracy, or a multi-label run's mAP."""
    return row["val_acc"] if "val_acc" in row else row["val_map"]


def metric_name(multi: bool) -> str:
    return "mAP" if multi else "accuracy"


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Only trainable parameters: the head's group first, then the rest (the pretrained backbone)."""
    _, head = models.head_of(model)
    head_ids = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in head_ids]}]
    backbone = [p for p in trainable if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone})
    kind = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW}[cfg.optimizer]
    extra = {"momentum": cfg.momentum} if cfg.optimizer in ("sgd", "rmsprop") else {}
    try:  # one fused kernel for the whole step: AdamW's step is ~8x faster on a CPU than the default loop
        optimizer = kind(groups, lr=cfg.lr, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # not for this optimizer or device
        optimizer = kind(groups, lr=cfg.lr, **extra)
    apply_settings(optimizer, cfg)
    return optimizer


def apply_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The settings' lr, weight decay and momentum on every param group: on a resume they replace the
    ones saved with the optimizer's state, so what the command line says takes effect. Finetune may
    give the pretrained layers a smaller lr (--backbone-lr-mult)."""
    for i, group in enumerate(optimizer.param_groups):
        pretrained = i > 0 and cfg.mode == "finetune"  # in scratch there are no pretrained layers
        group["base_lr"] = group["lr"] = cfg.lr * (cfg.backbone_lr_mult if pretrained else 1.0)
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        for key in ("fused", "foreach"):  # how this machine runs the step, not what a checkpoint says
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse frequency, scaled so the average weight per image is 1."""
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    return c.sum() / (len(counts) * c)


def find_lr(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
            to_input: Callable, autocast: Callable, device: torch.device, scaler: torch.amp.GradScaler,
            start: float = 1e-7, end: float = 10.0) -> tuple[list[float], list[float]]:
    """LR range test: raise the lr exponentially each step (one pass over the data, 30 to 100 steps),
    record the smoothed loss, stop when it explodes. Each step goes through the GradScaler as in
    training (under fp16 the small gradients would otherwise round to zero, and the curve would not be
    the training's). Weights, optimizer and scaler are restored after."""
    steps = min(100, max(30, len(loader)))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt, saved_scaler = optimizer.state_dict(), scaler.state_dict()
    mults = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches, needs_two = iter(()), trains_batchnorm(net)
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, y, _, _ = batch
        if x is None or (needs_two and len(y) < 2):  # nothing readable, or one image BatchNorm cannot train on
            continue
        lr = start * factor ** i
        for g, m in zip(optimizer.param_groups, mults):
            g["lr"] = lr * m
        with autocast():
            loss = criterion(net(to_input(x)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected moving average
        if not math.isfinite(value) or value > 4 * best:
            break
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    net.load_state_dict(saved)
    optimizer.load_state_dict(saved_opt)
    if saved_scaler:  # (a disabled scaler has no state)
        scaler.load_state_dict(saved_scaler)
    if len(lrs) < 3:
        raise TrainingError("the lr range test diverged at once: check the data, or lower the start lr")
    return lrs, losses


def suggest_lr(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The lr to train at: the steeper-descent point, but never above a tenth of the loss minimum's lr.
    The minimum is where training starts to blow up, and the smoothed curve lags behind the loss,
    which moves the steepest point towards it; a tenth of the minimum is inside the stable region."""
    skip = min(len(losses) - 1, max(3, len(losses) // 10))  # the first points are barely smoothed: noise
    stop = skip + int(np.argmin(losses[skip:])) + 1
    slopes = np.gradient(np.array(losses[skip:stop]), np.log(lrs[skip:stop])) if stop - skip > 2 else np.zeros(1)
    steepest, minimum = float(lrs[skip + int(np.argmin(slopes))]), float(lrs[stop - 1])
    return {"lr": max(lrs[skip], min(steepest, minimum / 10)), "steepest": steepest, "minimum": minimum}


# ----------------------------------------------------------------------------- settings and resuming

@dataclasses.dataclass
class Start:
    """How this invocation begins: a new run, a run resumed from its last.pt (`ckpt`), or a run folder
    that was created but never checkpointed (`in_place` without `ckpt`: the run starts again there
    with its saved settings)."""
    run_dir: Path
    ckpt: dict[str, Any] | None = None
    in_place: bool = False  # the folder is this run's own (--resume)
    named: bool = True  # False: a default name under runs/, made unique when it is created
    changes: dict[str, list] = dataclasses.field(default_factory=dict)  # setting -> [saved, now] on resume
    epochs_given: bool = False


def resolve_config(given: dict[str, Any], world: int = 1) -> tuple[TrainConfig, Start]:
    """The settings given on the command line (train.read_command_line), the recipe's for the rest; on
    --resume, the run's saved settings plus what the command line changes (a --recipe given then sets
    the settings of it not given). What defines the run (IDENTITY) cannot change; everything else
    takes effect."""
    if not given.get("resume"):
        models.check_name(given.get("model", TrainConfig.model))
        cfg = TrainConfig(**with_recipe(given, world, models.family(given.get("model", TrainConfig.model))))
        validate(cfg)
        size = models.preprocessing(cfg.model, cfg.img_size).img_size
        models.check_input_size(cfg.model, progressive_size(0, cfg.epochs, size, cfg.progressive))
        models.check_input_size(cfg.model, size)
        if cfg.out:
            return cfg, Start(Path(cfg.out))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kind = "lr-find" if cfg.lr_find else cfg.mode
        return cfg, Start(Path("runs") / f"{file_name(cfg.model)}-{kind}-{stamp}", named=False)
    run_dir, last = checkpoint.resume_target(given["resume"], given.get("out"))
    if given.get("out") and given["resume"] != "auto" and Path(given["out"]).absolute() != run_dir.absolute():
        raise UsageError(f"--out cannot change on resume: the run stays in {run_dir} (copy the folder to "
                         "continue it elsewhere)")
    ckpt = checkpoint.load_for_resume(last) if last.is_file() else None
    saved = ckpt["config"] if ckpt else saved_settings(run_dir)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = absolute_paths({k: v for k, v in saved.items() if k in fields})
    if saved.get("lr_find"):
        raise UsageError(f"{run_dir} holds an lr range test, not a run: start a run with another --out (or this "
                         "one and --overwrite)")
    saved.setdefault("recipe", "seed")  # a run from before recipes had the seed's settings as defaults
    overrides = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite")}
    models.check_name(saved["model"])
    overrides = resumed_recipe(saved, overrides, world, models.family(saved["model"]))
    if saved.get("img_size") is None and overrides.get("img_size") is not None:  # trained at the weights' own size
        trained = ckpt["preprocess"]["img_size"] if ckpt else models.preprocessing(saved["model"]).img_size
        if overrides["img_size"] == trained:
            del overrides["img_size"]  # that very size given: no change
    changed = identity_changes(saved, overrides)
    if changed:
        raise UsageError(f"cannot change {', '.join(changed)} when resuming: start a new run instead")
    if given.get("lr_find"):
        raise UsageError("--lr-find starts no run: use it without --resume")
    cfg = TrainConfig(**{**saved, **overrides, "resume": str(last), "out": str(run_dir)})
    validate(cfg)
    if cfg.data != "demo":
        folders.check_cache_outside(cfg.data, cfg.cache_dir)
    changes = {k: [saved.get(k), v] for k, v in overrides.items() if saved.get(k) != v and k != "given"}
    return cfg, Start(run_dir, ckpt, in_place=True, changes=changes, epochs_given="epochs" in given)


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """config.json of a run that was created, then stopped before its first checkpoint."""
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir / 'config.json'} cannot be read ({e.__class__.__name__}): start the run "
                         "again with its options and --overwrite") from None


def check_start(cfg: TrainConfig, start: Start, world: int) -> None:
    """What a resume cannot honour, refused before anything is loaded or written."""
    if cfg.lr_find and world > 1:
        raise UsageError("--lr-find runs in one process: run it with python, not torchrun")
    if cfg.balanced_sampler and labels.is_label_file(cfg.data) and labels.is_multilabel(cfg.data):
        raise UsageError("--balanced-sampler draws images by class, and a multi-label image has several: use "
                         "--class-weights auto (each label's positives weighted) instead")
    ckpt = start.ckpt
    if ckpt is None:
        return
    if ckpt.get("world", 1) != world:
        raise UsageError(f"{cfg.resume} was saved by {ckpt.get('world', 1)} process(es), this run has {world}: "
                         "resume with the same number of processes")
    done = ckpt["epoch"]
    if cfg.epochs < done:
        raise UsageError(f"--epochs {cfg.epochs} is fewer than the {done} epochs {start.run_dir} has "
                         f"trained: give --epochs {done + 1} or more to train longer")
    if cfg.epochs == done and not ran_to_its_end(ckpt):
        raise UsageError(f"--epochs {cfg.epochs} would end {start.run_dir} inside epoch {done + 1}, which it has "
                         f"begun: give --epochs {done + 1} or more")


def ran_to_its_end(ckpt: dict[str, Any]) -> bool:
    """All its epochs, or stopped early (checkpoints before version 2 have no flag: all epochs)."""
    return ckpt.get("finished", ckpt["epoch"] >= ckpt["config"]["epochs"])


def finished(start: Start, cfg: TrainConfig) -> bool:
    """A run that ran to its end and was given no further epochs."""
    ckpt = start.ckpt
    return ckpt is not None and ran_to_its_end(ckpt) and (not start.epochs_given or cfg.epochs <= ckpt["epoch"])


# ----------------------------------------------------------------------------- run folder

@dataclasses.dataclass
class RunFolder:
    """A run folder this process holds (locked), and what it made there: undone if the start fails."""
    path: Path
    lock: files.FolderLock
    created: bool  # the folder did not exist before
    made_lock: bool  # nor did its lock file
    parents: list[Path] = dataclasses.field(default_factory=list)  # folders made above it (runs/, say)
    wrote_config: bool = False

    def undo(self) -> None:
        """A start that fails before training leaves nothing behind (and nothing that blocks a retry)."""
        if self.wrote_config:
            (self.path / "config.json").unlink(missing_ok=True)
        if self.made_lock:
            (self.path / files.FolderLock.NAME).unlink(missing_ok=True)
        for folder in [self.path] * self.created + self.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()


def claim_run_dir(start: Start, cfg: TrainConfig, held: contextlib.ExitStack) -> RunFolder:
    """Create (or take) the run folder and lock it for this process: never two runs in one folder.
    A default name is made unique atomically (mkdir), so runs started in the same second each get
    their own. --overwrite removes the files a run writes (and nothing else). A new run's settings
    are written at once, so that a run stopped while it checks its files is resumable."""
    run_dir, created, parents = start.run_dir, not start.run_dir.exists(), files.missing_parents(start.run_dir)
    for n in itertools.count(1) if not start.named else [1]:
        run_dir = start.run_dir if n == 1 else start.run_dir.with_name(f"{start.run_dir.name}-{n}")
        try:
            run_dir.mkdir(parents=True, exist_ok=start.named)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    made_lock = not (run_dir / files.FolderLock.NAME).exists()
    try:
        lock = files.FolderLock(run_dir)
    except BlockingIOError:
        raise UsageError(f"{run_dir} is in use by another train.py that is still running: wait for it to end, "
                         "or choose another --out") from None
    except OSError as e:
        raise UsageError(f"cannot lock run folder {run_dir}: {e.strerror}") from None
    held.callback(lock.release)
    made = RunFolder(run_dir, lock, created or not start.named, made_lock, parents)
    try:
        files.check_run_dir(run_dir, start.in_place, cfg.overwrite)
        if not start.in_place or start.ckpt is None:  # a new run, or one started again in its folder
            for pattern in RUN_FILES:
                for old in run_dir.glob(pattern):
                    old.unlink()
        files.remove_temp_files(run_dir)  # left by a killed run; the folder is ours now
        if start.ckpt is None:
            write_config(run_dir, cfg)
            made.wrote_config = not start.in_place
    except BaseException:
        made.undo()
        raise
    return made


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    files.atomic_write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))


def write_run_files(run_dir: Path, cfg: TrainConfig, start: Start, split: dataset.DataSplit) -> None:
    """A new run's split and skipped files; on a resume, config.json (the settings in use now) and a
    line in resumes.jsonl saying what changed."""
    if start.ckpt is None:
        split.save(run_dir / "split.json")
        files.atomic_write_text(run_dir / "skipped.txt", folders.skipped_lines(split.not_used()))
    else:
        write_config(run_dir, cfg)
        (run_dir / "summary.json").unlink(missing_ok=True)  # it described the run as finished; written again
        line = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                "epoch": start.ckpt["epoch"], "changed": start.changes}
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def write_metrics(run_dir: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """metrics.csv (and curves.png) rewritten from the checkpoint's history, so a resume never duplicates.
    A multi-label run has mAP and F1 (at 0.5) where the others have accuracy."""
    multi = bool(history) and "val_map" in history[0]
    keys = (["epoch", "train_loss", "val_loss", "val_map", "val_f1", "lr", "img_per_s", "time_s"] if multi else
            ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "time_s"])
    ema = "ema_val_map" if multi else "ema_val_acc"
    if any(ema in h for h in history):
        keys[5:5] = ["ema_val_loss", ema]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    files.atomic_write_text(run_dir / "metrics.csv", text.getvalue())
    if curves:
        plots.save(plots.curves_figure(history, run_dir.name), run_dir / "curves.png")


# ----------------------------------------------------------------------------- data and model

def load_split(cfg: TrainConfig, start: Start, pre: Preprocess, lead: bool) -> dataset.DataSplit:
    """The run's split: a resumed run's own (split.json), else checked and made by rank 0 and shared.
    The check fills the decoded-image cache at the resize size as it goes."""
    if start.ckpt is not None:
        try:
            split = dataset.DataSplit.load(start.run_dir / "split.json")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"{start.run_dir / 'split.json'} cannot be read ({e.__class__.__name__}): a resume "
                             "needs the run's split; restore the file, or start a new run") from None
        check_still_there(split, lead)
        return split

    def check() -> dict[str, Any]:
        return dataclasses.asdict(dataset.prepare_data(
            cfg.data, cfg.val_split, cfg.seed, cfg.cache_dir,
            cache_size=pre.resize_size if cfg.image_cache != "none" else None, max_file_mb=cfg.max_file_mb,
            test_split=cfg.test_split, folds=cfg.folds, fold=cfg.fold, label_sep=cfg.label_sep,
            image_cache=cfg.image_cache, interpolation=pre.resample,
            share=share_check if dist.is_initialized() else None))

    return dataset.DataSplit(**from_lead(check, lead, mine={"cache_dir": cfg.cache_dir}))  # (each its own folder)


def check_still_there(split: dataset.DataSplit, lead: bool) -> None:
    """A resume's images gone since the run started: all of them (the data moved) is one line before anything
    is written; some (validation on fewer images, whose accuracy is not comparable) is said."""
    gone = {name: sum(not os.path.lexists(p) for p, _ in items) for name, items in (("train", split.train),
                                                                                   ("val", split.val))}
    for name, items, what in (("train", split.train, "training"), ("val", split.val, "validation")):
        if gone[name] == len(items):  # (validation on none would be recorded as 0%)
            raise UsageError(f"none of the run's {what} images are where it found them ({dataset.shown(split.root)}):"
                             " put the data back there, or a link to it, to resume (a run keeps its --data)")
    if lead and (gone["train"] or gone["val"]):
        dataset.warn(f"{gone['val']} of the run's {len(split.val)} validation images and {gone['train']} of its "
                     f"{len(split.train)} training images are gone since the run started: they are skipped"
                     + (", so validation from here on is on fewer images than before (its accuracy is not comparable "
                        "with the earlier epochs')" if gone["val"] else ""))


def report_split(split: dataset.DataSplit, run_dir: Path) -> None:
    left = f" and left out {len(split.left_out)} other file(s)" if split.left_out else ""
    test = f" / {len(split.test)} test (held out; python eval.py --checkpoint {typed(run_dir)})" if split.test else ""
    kind = "labels" if split.multilabel else "classes"
    print(f"data: {len(split.classes)} {kind}, {len(split.train)} train / {len(split.val)} val{test} images from "
          f"{dataset.shown(split.root)}" + (f"; skipped {len(split.skipped)} unreadable file(s){left}, see "
                                            f"{run_dir / 'skipped.txt'}" if split.not_used() else ""))
    if split.ignored:
        print(folders.ignored_line(split.ignored))
    if split.multilabel:
        untrained = [c for c, n, m in zip(split.classes, split.counts(split.train), split.counts(split.val))
                     if not n and m >= 2]
        if untrained:  # k folds: images whose labels pair them off cannot always be spread over the folds
            dataset.warn(f"label(s) with no training image: {', '.join(map(dataset.shown, untrained[:10]))}"
                         + (" ..." if len(untrained) > 10 else "") + ": every image of them is validated on, so "
                         "the model cannot learn them (with --folds: their images could not be spread over the folds)")
    unseen = [c for c, n in zip(split.classes, split.counts(split.val)) if not n] if split.multilabel else []
    if unseen:
        dataset.warn(f"label(s) with no validation image: {', '.join(map(dataset.shown, unseen[:10]))}"
                     + (" ..." if len(unseen) > 10 else "") + ": their thresholds stay 0.5, and the mAP that picks "
                     "best.pt leaves them out")
    if split.leaks:
        b, a, d = split.leaks[0][1], split.leaks[0][0], split.leaks[0][2]
        dataset.warn(f"{len({held for _, held, _ in split.leaks})} val/test image(s) look like train images "
                     f"(leakage), e.g. "
                     f"{dataset.shown(b)} ~ {dataset.shown(a)} ({d} bits apart); see `python dataset.py check`")


def build(cfg: TrainConfig, start: Start, num_classes: int, img_size: int) -> tuple[nn.Module, list]:
    """The network and the identity of its starting weights. A resume loads last.pt and needs neither
    the weights file nor the network: they mattered only at the start."""
    seed_everything(cfg.seed)  # same seed, same initial weights
    if start.ckpt is None:
        model = models.build_model(cfg.model, num_classes, cfg.mode, cfg.weights, img_size)
        used = cfg.mode != "scratch" or cfg.weights
        return model, models.weights_identity(cfg.model, cfg.weights) if used else ["none"]
    model = models.network(cfg.model, num_classes, options=start.ckpt.get("net_options"))
    models.load_weights(model, start.ckpt["model"])
    if cfg.mode == "transfer":
        models.freeze_backbone(model)
    return model, start.ckpt.get("weights_id", ["unknown", cfg.weights])


# ----------------------------------------------------------------------------- feature cache

FEATURE_VERSION = 3  # 2: keyed by file identities, weights identity, precision and memory format; 3: and decoding


def backbone_features(model: nn.Module, loaders: dict[str, DataLoader], to_input: Callable, autocast: Callable,
                      path: Path, show: bool) -> dict[str, torch.Tensor]:
    """The frozen backbone's output for every image, computed once and kept on disk; a cache file
    that is not what this run needs (damaged, planted, of other images) is rebuilt, never trusted."""
    if files.is_regular(path):
        feats = load_features(path, {split: len(loader.dataset) for split, loader in loaders.items()})
        if feats is not None:
            return feats
        dataset.warn(f"rebuilding a damaged feature cache ({path.name})")
    name, head = models.head_of(model)
    models.set_module(model, name, nn.Identity())  # the network minus its head is the backbone
    model.eval()
    try:
        feats = {}
        for split, loader in loaders.items():
            x, _, idx = predict(model, loader, to_input, autocast, desc=f"caching {split} features", show=show)
            out = torch.full((len(loader.dataset), x.shape[1]), float("nan"))
            out[idx] = x
            feats[split] = out
    finally:
        models.set_module(model, name, head)
    checkpoint.save(feats, path)
    return feats


def load_features(path: Path, rows: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """Cached features if the file holds a float matrix per split with one row per image, else None."""
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged in any way: rebuilt
        return None
    good = isinstance(feats, dict) and all(
        isinstance(feats.get(k), torch.Tensor) and feats[k].dtype == torch.float32 and feats[k].dim() == 2
        and feats[k].shape[0] == n for k, n in rows.items())
    return feats if good else None


def features_dataset(x: torch.Tensor, items: list[tuple[str, Any]], num_classes: int) -> Features:
    """Cached features with their targets; images that could not be read (NaN rows) are left out."""
    ok = torch.isfinite(x).all(1)
    return Features(x[ok], [y for y, good in zip(dataset.targets(items, num_classes), ok.tolist()) if good])


def feature_key(cfg: TrainConfig, weights_id: list, preprocess: Preprocess, split: dataset.DataSplit,
                device: torch.device, cache: str = "raw") -> str:
    """Everything that changes the features: each file's identity, the model and its weights, the
    preprocessing, the precision and memory format they are computed in, and the pixels they come
    from: how they were decoded (dataset.CACHE_VERSION) and the compact cache's JPEG encoding (raw and
    uncached ones are the same)."""
    dtype = autocast_dtype(device, cfg.amp)
    pixels = [f"jpeg-q{compact_cache.QUALITY}"] if cache == "compact" else []  # (older keys stay valid)
    blob = json.dumps([FEATURE_VERSION, dataset.CACHE_VERSION, cfg.model, weights_id, preprocess.to_dict(), str(dtype),
                       cfg.channels_last, [files.identity(p) for p, _ in split.train + split.val], *pixels])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- main

def main(given: dict[str, Any]) -> int:
    """Train with the settings train.py read; the process group (torchrun) is closed however it ends."""
    try:
        return train(given)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(given: dict[str, Any]) -> int:
    """Settings -> run folder -> data and model -> fit. Under torchrun rank 0 makes the run folder and
    checks the data; the other ranks take what it decided."""
    rank, world, local_rank = init_distributed(given.get("device", "auto"))
    lead = rank == 0
    cfg, start = resolve_config(given, world)
    check_start(cfg, start, world)
    if lead and start.ckpt is None and start.in_place:
        print(f"{start.run_dir} was stopped before its first checkpoint: starting it again there")
    if lead and start.ckpt is None and not cfg.lr_find:
        print(describe_recipe(cfg, given, models.family(cfg.model)))
    if finished(start, cfg):
        if lead:
            print(nothing_to_do(start))
        return 0
    device = pick_device(cfg.device, local_rank)
    with contextlib.ExitStack() as held:
        held.enter_context(sigterm_as_ctrl_c())  # so temp files are removed on the way out
        # the run folder is made (or taken) and locked first, so a run stopped in any way from here on
        # is resumable by its folder; a start that fails on bad input removes what it made
        claimed: list[RunFolder] = []

        def claim() -> str:
            claimed.append(claim_run_dir(start, cfg, held))
            return str(claimed[0].path)

        run_dir = Path(from_lead(claim, lead))
        made = claimed[0] if claimed else None
        try:
            # a resume keeps the preprocessing it was trained with (a newer torchvision or timm may say otherwise)
            preprocess = Preprocess.from_dict(start.ckpt["preprocess"]) if start.ckpt is not None \
                else models.preprocessing(cfg.model, cfg.img_size)
            if start.ckpt is None and cfg.mode != "scratch" and not cfg.weights:
                models.fetch_weights(cfg.model)  # before the data check: offline, said at once
            split = load_split(cfg, start, preprocess, lead)
            model, weights_id = build(cfg, start, len(split.classes), preprocess.img_size)
            models.set_train_mode(model, True, cfg.mode)  # as it trains: is BatchNorm trained (batches of one)?
            check_batch_size(model, cfg.batch_size)
            if lead:
                write_run_files(run_dir, cfg, start, split)
                report_split(split, run_dir)
        except KeyboardInterrupt:  # stopped while checking the data: resumable from its folder (config.json)
            return interrupted_early(run_dir, lead, not cfg.lr_find)
        except (Exception, Stopped) as e:  # (Stopped: another process met bad input, or failed)
            if made is not None and (isinstance(e, UsageError) or (isinstance(e, Stopped) and e.code == 2)):
                made.undo()  # bad input: nothing was started; anything else leaves a folder to resume
            if isinstance(e, WeightsUnavailable) and not given.get("resume"):
                raise UsageError(e.offline(offline_command(given))) from None
            raise
        try:
            return fit(Run(cfg, start, run_dir, split, preprocess, weights_id, device, rank, world, local_rank), model)
        except KeyboardInterrupt:
            return interrupted_early(run_dir, lead, not cfg.lr_find)


def offline_command(given: dict[str, Any]) -> str:
    """The command given, from scratch: what trains without internet. A fold's own folder is left out (the
    job's, given to the job, was removed with the fold's when the start failed)."""
    fold = "fold" in given
    return command_line({k: v for k, v in given.items() if not (fold and k == "out")}, mode="scratch")


def nothing_to_do(start: Start) -> str:
    ckpt = start.ckpt
    return (f"{start.run_dir} has finished ({ckpt['epoch']} epochs, best val "
            f"{metric_name(ckpt.get('multilabel', False))} {ckpt['best_acc']:.2f}% at "
            f"epoch {ckpt['best_epoch']}): nothing to do; pass --epochs {ckpt['epoch'] + 5} (or any number above "
            f"{ckpt['epoch']}) to train longer")


def interrupted_early(run_dir: Path, lead: bool, resumable: bool = True) -> int:
    """Stopped before training started: nothing to save; a folder without last.pt starts again on resume
    (an lr range test is not resumable: it is run again)."""
    if lead and resumable and not (run_dir / "last.pt").exists():
        print("\ninterrupted before the first checkpoint; start it again with: python train.py --resume "
              f"{typed(run_dir)}", file=sys.stderr)
    return 130


@dataclasses.dataclass
class Run:
    """What this process trains: the settings, where the run is, its data, and the machine."""
    cfg: TrainConfig
    start: Start
    run_dir: Path
    split: dataset.DataSplit
    preprocess: Preprocess
    weights_id: list
    device: torch.device
    rank: int
    world: int
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def local_lead(self) -> bool:
        """The first process of its machine: it builds the machine's caches."""
        return self.local_rank == 0

    notes: list[str] = dataclasses.field(default_factory=list)  # about class imbalance, for TensorBoard too

    def say(self, message: str) -> None:
        if self.lead:
            print(message)

    def note(self, message: str) -> None:
        self.say(message)
        self.notes.append(message)


@dataclasses.dataclass
class Inputs:
    """What the loop trains on: the datasets and the network they feed, with the function that turns
    a loaded batch into the network's input (images; or, on the feature path, cached features)."""
    train: Dataset
    val: Dataset
    net: nn.Module
    to_input: Callable
    use_features: bool = False


def fit(run: Run, model: nn.Module) -> int:
    cfg, device = run.cfg, run.device
    describe(run, model)
    # the cache's kind, decided once, by rank 0, for every process (auto looks at the free disk, which
    # the caches change)
    kind = broadcast(dataset.cache_kind(cfg.image_cache, run.split.files(), run.preprocess.resize_size, cfg.cache_dir,
                                        int(cfg.max_file_mb * 2**20), run.preprocess.resample)
                     if run.lead else None)
    # workers sized for this machine (compact JPEGs need decoding); left unresolved in the config so a
    # resume elsewhere sizes them again
    workers = auto_workers(device, kind == "raw") if cfg.workers is None else cfg.workers
    image_input, autocast, scaler = place(model, cfg, run.preprocess, device)
    if cfg.amp is None:  # not given: decided now, on the model as it will train, and saved with the run
        cfg = settle_precision(run, model)
        autocast, scaler = precision(device, cfg.amp)
    inputs = image_datasets(run, model, image_input, kind)
    if cfg.mode == "transfer" and cfg.feature_cache and isinstance(models.head_of(model)[1], nn.Linear):
        inputs = feature_inputs(run, model, inputs, image_input, autocast, workers, kind)

    train_counts = run.split.counts(run.split.train)
    sampler = make_sampler(run, inputs.train, train_counts)
    train_loader = make_loader(inputs.train, cfg.batch_size, workers, device, sampler)
    val_loader = make_loader(shard(inputs.val, run.rank, run.world), 2 * cfg.batch_size, workers, device)
    net = inputs.net
    if cfg.sync_bn and run.world > 1 and not inputs.use_features:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = make_optimizer(cfg, model)
    if run.start.ckpt is not None:
        restore_optimizer(optimizer, scaler, run.start.ckpt, cfg, run.say)
    criterion = make_criterion(cfg, train_counts, len(run.split.train), run.split.multilabel).to(device)
    weights = criterion.pos_weight if run.split.multilabel else criterion.weight
    if weights is not None:
        what = "positive-label weights" if run.split.multilabel else "class weights"
        run.note(f"{what}: " + ", ".join(f"{c}={w:.2f}" for c, w in zip(run.split.classes, weights.tolist())))
    inner = net  # unwrapped: evaluated on each rank's shard, saved in checkpoints
    net = parallel(net, run)
    if cfg.lr_find:
        return lr_find(run, model, net, train_loader, optimizer, criterion, inputs.to_input, autocast, scaler)

    schedule = Schedule(cfg, run.start.ckpt["history"] if run.start.ckpt else [])
    learner = Learner(net, optimizer, scaler, criterion, inputs.to_input, autocast, device, schedule,
                      make_mix(cfg, len(run.split.classes)), make_ema(cfg, inner, len(train_loader), run.start),
                      run.split.multilabel, precision_name(device, cfg.amp))
    loop = Loop(run, model, inner, learner, schedule)
    loop.batchnorms, loop.statistics = statistics_images(run, model, inputs, workers)
    loop.val_loader = val_loader
    if run.lead:
        loop.open_log(sampler.per_rank)
    return loop.run(train_loader, val_loader, sampler, inputs.use_features)


def settle_precision(run: Run, model: nn.Module) -> TrainConfig:
    """--amp when neither it nor --no-amp was given: on a CPU with native bf16, the faster of bf16 and fp32 for
    this network (cpu_precision: measured once per machine and network, so runs agree); elsewhere on, as
    before (CUDA: bf16 or fp16; a CPU without native bf16 trains in fp32 either way). One process decides
    nothing for the others, so runs under torchrun and transfer runs (whose backbone only runs forward) keep
    the old default."""
    cfg = run.cfg
    amp = True
    if run.device.type == "cpu" and run.world == 1 and cfg.mode != "transfer" and cpu_has_bf16():
        size, batch = run.preprocess.img_size, min(cfg.batch_size, 32)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        figures = cpu_precision.measured(
            cache_path(cfg.cache_dir) / "precision.json",
            cpu_precision.key(cfg.model, cfg.mode, size, batch, cfg.channels_last),
            lambda: cpu_precision.measure(model, size, batch, fmt))
        amp = cpu_precision.faster_is_bf16(figures)
        run.say(f"precision: {'bf16' if amp else 'fp32'}, the faster for {cfg.model} on this CPU (bf16 "
                f"{figures['bf16'] * 1000 / batch:.1f} ms/image, fp32 {figures['fp32'] * 1000 / batch:.1f}; "
                "--amp or --no-amp to choose)")
    run.cfg = dataclasses.replace(cfg, amp=amp)
    if run.lead:
        write_config(run.run_dir, run.cfg)
    return run.cfg


def statistics_images(run: Run, model: nn.Module, inputs: Inputs, workers: int) -> tuple[list[str], DataLoader | None]:
    """Precise BN: the BatchNorm layers that train, and a fixed sample of the training images seen as
    validation sees them (centre crops), each process its share; none where no BatchNorm trains
    (transfer mode, a VGG) or it is off."""
    models.set_train_mode(model, True, run.cfg.mode)
    layers = trained_batchnorms(inputs.net)
    if not run.cfg.precise_bn or inputs.use_features or not layers:
        return layers, None
    plain = copy.copy(inputs.train)
    plain.transform = inputs.val.transform
    count = precise_bn_images(len(plain))
    count -= count % run.world  # the same number of batches in every process (SyncBatchNorm waits on them)
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(run.cfg.seed))[:count]
    run.say(f"BatchNorm statistics: recomputed from {count} training images before each validation (precise BN; "
            "--no-precise-bn keeps the running averages)")
    return layers, make_loader(Subset(plain, order[run.rank::run.world].tolist()), run.cfg.batch_size, workers,
                               run.device)


def make_ema(cfg: TrainConfig, inner: nn.Module, steps_per_epoch: int, start: Start) -> Ema | None:
    """--ema: the average of what trains (the network; on the feature path, its head), resumed from
    last.pt when it holds one (a run that turns --ema on when resumed starts it there)."""
    if not cfg.ema:
        return None
    ema = Ema(inner, cfg.ema_decay, cfg.epochs * steps_per_epoch)
    if start.ckpt is not None and "ema" in start.ckpt:
        ema.load_state_dict(start.ckpt["ema"])
    return ema


def describe(run: Run, model: nn.Module) -> None:
    """The parameter count on the screen; torchsummary's layer table in the run folder."""
    trainable, frozen = models.count_parameters(model)
    pre = run.preprocess
    if run.lead and run.cfg.summary:
        write_summary(model, pre.img_size, run.run_dir / "model_summary.txt", run.cfg.model)
    run.say(f"model: {run.cfg.model}, mode {run.cfg.mode}: {trainable:,} trainable and {frozen:,} frozen parameters; "
            f"{pre.img_size} px crops of {pre.resize_size} px images")


def write_summary(model: nn.Module, img_size: int, path: Path, arch: str) -> None:
    """torchsummary's layer table; a network it cannot trace (layers returning lists or tuples: DenseNet,
    torchvision's ViTs, many of timm's) trains without one, with a warning."""
    from torchsummary import summary

    model.eval()  # a summary forward pass must not move BatchNorm statistics
    hooks = {id(m): set(m._forward_hooks) for m in model.modules()}
    table = io.StringIO()
    try:
        with contextlib.redirect_stdout(table):
            summary(model, (3, img_size, img_size), device="cpu")
    except Exception as e:  # torchsummary's own failure: the table is optional
        dataset.warn(f"no model_summary.txt: torchsummary cannot trace {arch} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:100] if str(e) else ''}); --no-summary skips it")
        return
    finally:  # hooks it left behind when it failed half-way
        for m in model.modules():
            for key in set(m._forward_hooks) - hooks.get(id(m), set()):
                del m._forward_hooks[key]
    files.atomic_write_text(path, table.getvalue())


def place(model: nn.Module, cfg: TrainConfig, preprocess: Preprocess, device: torch.device
          ) -> tuple[Callable, Callable, torch.amp.GradScaler]:
    """The model on its device in its memory format; (image batch -> model input, autocast, scaler)."""
    model.to(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return (to_model_input(preprocess, device, memory_format), *precision(device, cfg.amp))


def image_datasets(run: Run, model: nn.Module, image_input: Callable, kind: str) -> Inputs:
    """Train and val images, through the decoded-image cache: built once per machine by its first process
    (on a resume it may have been deleted), shared with its other processes through the file system. A
    cache folder shared by the machines is built by the first to get there."""
    cfg, split, pre = run.cfg, run.split, run.preprocess
    max_bytes = int(cfg.max_file_mb * 2**20)
    cache = dataset.make_cache(kind, split.files(), pre.resize_size, cfg.cache_dir, max_bytes, pre.resample)
    if cache is not None:
        run.say(dataset.cache_chosen(kind, cfg.image_cache))
        if run.local_lead:  # one per machine: the cache folder is on each machine's own disk (or shared)
            cache.build(progress=run.lead, skip={p for p, _ in split.skipped})
        barrier(preparation=True)
    augment = dataset.train_transform(pre.img_size, cfg.augment, cfg.min_scale, cfg.hflip)
    if cfg.progressive:
        augment = dataset.BySize(lambda epoch: progressive_size(epoch, cfg.epochs, pre.img_size, cfg.progressive),
                                 lambda size: dataset.train_transform(size, cfg.augment, cfg.min_scale, cfg.hflip))
    n = len(split.classes)
    train_ds = dataset.ImageDataset(split.train, pre.resize_size, augment, cache, cfg.seed, max_bytes, n,
                                    pre.resample)
    val_ds = dataset.ImageDataset(split.val, pre.resize_size, pre.crop(), cache, max_bytes=max_bytes, num_classes=n,
                                  interpolation=pre.resample)
    return Inputs(train_ds, val_ds, model, image_input)


def feature_inputs(run: Run, model: nn.Module, images: Inputs, image_input: Callable, autocast: Callable,
                   workers: int, kind: str) -> Inputs:
    """Transfer mode's fast path: the backbone is a fixed function (see models.py), so its output per
    image never changes. It is computed once (rank 0, kept on disk) and the head alone trains on it.
    Augmentation is off on this path."""
    cfg, split, device = run.cfg, run.split, run.device
    key = feature_key(cfg, run.weights_id, run.preprocess, split, device, kind)
    path = dataset.cache_root(cfg.cache_dir) / "features" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if run.local_lead:  # one per machine, as the image cache
        plain_train = copy.copy(images.train)  # the same images without augmentation
        plain_train.transform = images.val.transform
        plain = {"train": plain_train, "val": images.val}
        loaders = {k: make_loader(v, 2 * cfg.batch_size, workers, device) for k, v in plain.items()}
        feats = backbone_features(model, loaders, image_input, autocast, path, run.lead)
    barrier(preparation=True)
    if not run.local_lead:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    run.say(f"transfer: training the head on cached backbone features ({path.name}); augmentation off")
    n = len(split.classes)
    return Inputs(features_dataset(feats["train"], split.train, n), features_dataset(feats["val"], split.val, n),
                  models.head_of(model)[1], lambda x: x.to(device, non_blocking=True), use_features=True)


def make_sampler(run: Run, train_ds: Dataset, train_counts: list[int]) -> ResumableSampler:
    """Every image once per epoch in a seeded order; with --balanced-sampler, each class equally often."""
    weights = None
    if run.cfg.balanced_sampler:
        # per item of what is sampled: cached features leave out images that could not be read
        weights = torch.tensor([1.0 / train_counts[y] for y in train_ds.labels], dtype=torch.double)
        n = len(run.split.classes)
        run.note("balanced sampler, chance of drawing an image per class: " + ", ".join(
            f"{c}={1 / max(1, k) / n:.4f}" for c, k in zip(run.split.classes, train_counts)))
    return ResumableSampler(len(train_ds), run.cfg.seed, run.rank, run.world, weights)


def parallel(net: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel under torchrun, torch.compile when asked."""
    cfg = run.cfg
    if run.world > 1:
        device = run.device
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        run.say(f"distributed: {run.world} processes x {cfg.batch_size} = {run.world * cfg.batch_size} images "
                "per step")
    return torch.compile(net) if cfg.compile else net


def lr_find(run: Run, model: nn.Module, net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
            criterion: nn.Module, to_input: Callable, autocast: Callable, scaler: torch.amp.GradScaler) -> int:
    """--lr-find: the range test instead of a run, in a folder named for it; its plot, numbers and
    suggestion."""
    models.set_train_mode(model, True, run.cfg.mode)
    lrs, losses = find_lr(net, loader, optimizer, criterion, to_input, autocast, run.device, scaler)
    found = suggest_lr(lrs, losses)
    if run.lead:
        plots.save(plots.lr_figure(lrs, losses, found), run.run_dir / "lr_find.png")
        files.atomic_write_text(run.run_dir / "lr_find.json", json.dumps({**found, "lrs": lrs, "losses": losses}))
        print(f"suggested --lr {found['lr']:.2g} (the smaller of the steepest descent, {found['steepest']:.2g}, and a "
              f"tenth of the loss minimum's lr, {found['minimum']:.2g} / 10); plot: {run.run_dir / 'lr_find.png'}")
    return 0


def restore_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ckpt: dict[str, Any],
                      cfg: TrainConfig, say: Callable) -> None:
    """The saved optimizer state (momentum, Adam's moments), with the settings now given applied on
    top; another --optimizer starts its state afresh."""
    if ckpt.get("scaler"):  # empty when it was off (no AMP, or bf16): an enabled one then starts afresh
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["config"].get("optimizer") != cfg.optimizer:
        say(f"optimizer changed from {ckpt['config'].get('optimizer')} to {cfg.optimizer}: its state starts afresh")
        return
    optimizer.load_state_dict(ckpt["optimizer"])
    apply_settings(optimizer, cfg)


FEW_TO_CALIBRATE = 100  # validation images below which the fitted temperature is said to be rough


def unreadable(train: int, val: int) -> str:
    """The epoch line's note of images that could not be read, training's and validation's."""
    said = ", ".join(f"{n} {what}" for n, what in ((train, "train"), (val, "val")) if n)
    return f"  (unreadable: {said})" if said else ""


class Loop:
    """The epochs of a run, from wherever it is, with its checkpoints, logs and interrupts."""

    def __init__(self, run: Run, model: nn.Module, inner: nn.Module, learner: Learner, schedule: Schedule):
        self.cfg, self.run_dir, self.model, self.inner, self.learner = run.cfg, run.run_dir, model, inner, learner
        self.schedule, self.classes, self.preprocess = schedule, run.split.classes, run.preprocess
        self.weights_id, self.rank, self.world, self.lead = run.weights_id, run.rank, run.world, run.lead
        self.start, self.notes = run.start, run.notes
        ckpt = run.start.ckpt or {}
        self.progress = Progress(**ckpt["progress"]) if "progress" in ckpt else Progress(ckpt.get("epoch", 0))
        self.history = list(ckpt.get("history", []))
        self.best_acc, self.best_epoch = ckpt.get("best_acc", -1.0), ckpt.get("best_epoch", 0)
        self.best_averaged = False  # the best model is the weights' average (--ema)
        self.calibration: dict[str, float] | None = ckpt.get("calibration")  # the best model's (calibration.py)
        self.best_confusion: list[list[int]] | None = ckpt.get("best_confusion")  # its validation confusion
        # multi-label: best_acc is the best mAP; the best model's per-label thresholds and average precisions
        self.multi, self.val_images = run.split.multilabel, len(run.split.val)
        self.thresholds: list[float] | None = ckpt.get("thresholds")
        self.best_ap: list[float | None] | None = ckpt.get("best_ap")
        self.time_before = ckpt.get("train_time_s", sum(h["time_s"] for h in self.history))
        self.writer: Any = None
        self.best_ckpt: dict[str, Any] | None = None  # the best epoch's checkpoint while it is not yet written
        self.batchnorms: list[str] = []  # the BatchNorm layers that train; precise BN's images (statistics_images)
        self.statistics: DataLoader | None = None
        self.val_loader: DataLoader | None = None
        split = run.split
        self.health = Health(largest_share(split.counts(split.val)), largest_share(split.counts(split.train)),
                             len(split.classes), self.multi, run.cfg.precise_bn, dict(ckpt.get("warnings", {})))
        self.finished = False

    def open_log(self, per_epoch: int) -> None:
        """TensorBoard (rank 0): a resumed run's log continues after its last saved epoch."""
        from torch.utils.tensorboard import SummaryWriter

        start = self.start
        self.writer = SummaryWriter(self.run_dir, purge_step=self.progress.epoch + 1 if start.ckpt else None)
        for note in self.notes:
            self.writer.add_text("imbalance", literal_markdown(note))
        if start.ckpt is not None:
            print(f"resuming {self.run_dir} at {self.progress.where(per_epoch)}" +
                  (" with " + ", ".join(f"--{k.replace('_', '-')} {v[1]}" for k, v in start.changes.items())
                   if start.changes else ""))

    def state(self) -> dict[str, Any]:
        """The checkpoint as it is now (the layout is in checkpoint.py)."""
        cfg, p = self.cfg, self.progress
        return checkpoint.of_model(
            cfg.model, self.classes, self.model.state_dict(), self.preprocess, cfg.mode,
            net_options=self.model.net_options, config=dataclasses.asdict(cfg), epoch=p.epoch,
            progress=dataclasses.asdict(p), best_acc=self.best_acc, best_epoch=self.best_epoch, history=self.history,
            finished=self.finished, train_time_s=self.train_time(),
            weights_id=self.weights_id, optimizer=self.learner.optimizer.state_dict(),
            scaler=self.learner.scaler.state_dict(), world=self.world,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"best_confusion": self.best_confusion} if self.best_confusion else {}),
            **({"multilabel": True, "thresholds": self.thresholds, "best_ap": self.best_ap} if self.multi else {}),
            **({"ema": self.learner.ema.state_dict()} if self.learner.ema else {}),
            **({"warnings": dict(self.health.said)} if self.health.said else {}))

    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.started

    def save(self, state: dict[str, Any]) -> None:
        """best.pt before last.pt: a kill in between re-runs this epoch on resume, which rewrites best.pt.
        Until last.pt is first written, the run folder's marker says so (checkpoint.CHECKPOINTED)."""
        self.save_best()
        checkpoint.save(state, self.run_dir / "last.pt")
        if checkpoint.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / checkpoint.CHECKPOINTED, "saved")
        self.last_saved = time.perf_counter()

    def save_best(self) -> None:
        """best.pt, of the best model held in memory; before the run's first last.pt, marked as such (a
        folder with a best.pt and no last.pt is then one that a resume starts again, not one that lost it)."""
        if self.best_ckpt is None:
            return
        if checkpoint.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / checkpoint.CHECKPOINTED, "saving")
        checkpoint.save(self.best_ckpt, self.run_dir / "best.pt")
        self.best_ckpt = None

    def run(self, train_loader: DataLoader, val_loader: DataLoader, sampler: ResumableSampler,
            use_features: bool) -> int:
        self.started = self.last_drawn = self.last_saved = time.perf_counter()
        with deferred_interrupts():  # also while saving and finishing: a Ctrl-C there is not lost
            try:
                while self.progress.epoch < self.cfg.epochs and not self.finished:
                    self.one_epoch(train_loader, val_loader, sampler, use_features)
            except HardStop:
                return self.stopped_at_once()
            except KeyboardInterrupt:
                return self.interrupted(sampler.per_rank)
            except Exception as e:
                if stop_requested():  # a DataLoader worker ended by the same Ctrl-C or SIGTERM
                    return self.interrupted(sampler.per_rank)
                # a NaN, out of memory, a bug: the best model found so far is kept all the same
                if self.lead:
                    self.save_best()
                if isinstance(e, Diverged):
                    self.health.add("diverged", str(e))
                    if self.lead:
                        self.writer.add_text("warnings", str(e), self.progress.epoch + 1)
                        self.write_summary(self.train_time(), stopped="diverged")
                raise
            if self.lead:
                self.finish()
        return 0

    def stopped_at_once(self) -> int:
        """A second Ctrl-C: the step under way may be half done, so nothing is saved from it."""
        if self.lead:
            self.save_best()  # a finished epoch's best model, held in memory: consistent
            print(f"\nstopped at once: {self.run_dir / 'last.pt'} keeps the last point it saved; continue with: "
                  f"python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def interrupted(self, per_epoch: int) -> int:
        """Ctrl-C or SIGTERM: the state is that of the last complete step (or validation not begun)."""
        if self.lead:
            self.save(self.state())
            if self.history:
                write_metrics(self.run_dir, self.history)
            print(f"\ninterrupted at {self.progress.where(per_epoch)}: saved {self.run_dir / 'last.pt'}; "
                  f"continue with: python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def one_epoch(self, train_loader: DataLoader, val_loader: DataLoader, sampler: ResumableSampler,
                  use_features: bool) -> None:
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        sampler.set_epoch(epoch, start=progress.seen)
        models.set_train_mode(self.model, True, cfg.mode)
        if self.writer is not None and epoch == 0 and not use_features and not progress.seen:
            x, _, _, _ = next(iter(train_loader))
            if x is not None:
                self.writer.add_images("train/augmented", x[:32], 0)
        stats = train_one_epoch(self.learner, train_loader, progress, sampler.per_rank, cfg.seed,
                                cfg.max_bad_fraction, f"epoch {epoch + 1}/{cfg.epochs}", self.lead, self.rank)
        models.set_train_mode(self.model, False, cfg.mode)
        val, ema_val = self.validate(val_loader)
        if not val["images"]:  # (its 0% would be recorded as the epoch's accuracy)
            raise TrainingError(f"no validation image could be read after epoch {epoch + 1}: check the data folder "
                                "(python dataset.py check)")
        if self.health.diverged_loss(val["loss"]):  # the last steps diverged: NaN or absurd outputs, never "best"
            raise self.learner.diverged(f"validation loss became {val['loss']:.4g} after epoch {epoch + 1} (a "
                                        f"uniform guess scores {self.health.guess_loss():.3f})")
        self.schedule.end_epoch(val["score"])
        progress.next_epoch()
        row = self.history_row(epoch + 1, stats, val, ema_val)
        self.history.append(row)
        averaged = ema_val is not None and ema_val["score"] > val["score"]  # the average is the better model
        shown = ema_val if averaged else val
        improved = shown["score"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch, self.best_averaged = shown["score"], epoch + 1, averaged
            if self.multi:  # every rank holds all the validation outputs (engine.evaluate_multilabel)
                self.thresholds = multilabel.tune_thresholds(shown["targets"].numpy().astype(np.int64),
                                                             torch.sigmoid(shown["logits"]).numpy())
                self.best_ap = shown["ap"]
            else:
                self.best_confusion = shown["confusion"]
                self.calibration = self.calibrate(shown)
        settled = [h for h in self.history if progressive_size(h["epoch"] - 1, cfg.epochs, self.preprocess.img_size,
                                                              cfg.progressive) == self.preprocess.img_size]
        for line in self.health.check(settled, self.batch_statistics) if settled else []:  # (epochs of one size)
            self.warn(line, epoch + 1)
        stopping = cfg.patience > 0 and epoch + 1 - self.best_epoch >= cfg.patience
        self.finished = epoch + 1 == cfg.epochs or stopping
        if self.lead:
            self.end_epoch(row, shown.get("confusion"), improved, stats["bad"], self.val_images - val["images"])
        barrier()
        if stopping:
            if self.lead:
                print(f"early stop: no better val {metric_name(self.multi)} for {cfg.patience} epochs")

    def warn(self, line: str, epoch: int) -> None:
        """A run-health warning: on the screen, and in TensorBoard's text tab (summary.json has them all)."""
        if self.lead:
            dataset.warn(line)
            self.writer.add_text("warnings", dataset.shown(line), epoch)

    def batch_statistics(self) -> float | None:
        """Validation accuracy of a copy of the network whose BatchNorm layers use each batch's own statistics;
        None without BatchNorm, or where a batch is too small for them."""
        if not self.batchnorms or self.val_loader is None:
            return None
        net = copy.deepcopy(self.inner).eval()
        for name in self.batchnorms:
            net.get_submodule(name).train()
        try:
            val = evaluate(net, self.val_loader, self.learner.to_input, contextlib.nullcontext, len(self.classes),
                           False)
        except (RuntimeError, ValueError):  # one image left with a 1x1 map in the last batch, say
            return None
        return val["acc"]

    def history_row(self, epoch: int, stats: dict[str, float], val: dict[str, Any], ema_val: dict[str, Any] | None
                    ) -> dict[str, Any]:
        """metrics.csv's line: training loss (and accuracy), validation loss and accuracy; a multi-label
        run's validation mAP and F1 at 0.5 instead of accuracies."""
        row: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"]}
        if self.multi:
            row |= {"val_loss": val["loss"], "val_map": val["map"], "val_f1": val["f1"]}
        else:
            row |= {"train_acc": stats["acc"], "val_loss": val["loss"], "val_acc": val["acc"]}
        row |= {"lr": stats["lr"], "img_per_s": stats["img_per_s"] * self.world, "time_s": stats["time_s"]}
        if ema_val is not None:
            key = "map" if self.multi else "acc"
            row |= {"ema_val_loss": ema_val["loss"], f"ema_val_{key}": ema_val[key]}
        return row

    def validate(self, val_loader: DataLoader) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The trained weights' validation, and with --ema the average's."""
        learner, n = self.learner, len(self.classes)
        if self.statistics is not None:  # what is validated (and saved) has the statistics of its own weights
            for net in [self.inner] + ([learner.ema.model.module] if learner.ema else []):
                recompute_batchnorm(net, self.batchnorms, self.statistics, learner.to_input, learner.autocast)
        exact = contextlib.nullcontext  # full precision: the accuracy is the one eval.py computes for best.pt
        same_buffers(self.inner, *([learner.ema.model.module] if learner.ema else []))  # (not its CPU counter)
        val = evaluate(self.inner, val_loader, learner.to_input, exact, n, self.lead, self.multi)
        if learner.ema is None:
            return val, None
        return val, evaluate(learner.ema.model.module, val_loader, learner.to_input, exact, n, self.lead, self.multi)

    def calibrate(self, val: dict[str, Any]) -> dict[str, Any]:
        """Temperature scaling of the new best model, on the validation images it was chosen on, judged on
        those it was not fitted on (calibration.calibrate; every rank takes part: each holds a shard of them)."""
        device = self.learner.device

        def total(t: torch.Tensor) -> torch.Tensor:
            return all_reduce_sum(t, device)

        return calibration.calibrate(val["logits"], val["targets"], total)

    def best_weights(self, state: dict[str, Any], due: bool) -> dict[str, Any]:
        """The model for best.pt: the trained weights, or their average when it validated better. A
        checkpoint not written now holds a copy (the weights go on changing)."""
        weights = state["model"] if due else models.snapshot(self.model)
        if not self.best_averaged:
            return weights
        ema = self.learner.ema
        prefix = "" if ema.source is self.model else models.head_of(self.model)[0] + "."
        return weights | {prefix + k: v.detach().to("cpu", copy=True) for k, v in ema.model.module.state_dict().items()}

    def end_epoch(self, row: dict[str, Any], confusion: list[list[int]] | None, improved: bool, bad: int,
                  val_bad: int = 0) -> None:
        """Metrics, pictures and checkpoints after an epoch (rank 0). The files a person reads are
        written before last.pt: a kill between them replays the epoch, which writes them again."""
        # short epochs (cached features, small data) would spend their time writing checkpoints:
        # write at most every --save-interval s. A hard kill in between loses only the epochs
        # since the last write: resuming trains them again (on CPU to the same digits).
        due = self.finished or time.perf_counter() - self.last_saved >= self.cfg.save_interval
        state = self.state()
        if improved:  # model only: what eval.py, test.py and export.py need, a third the size
            self.best_ckpt = checkpoint.for_inference(state) | {
                "history": list(self.history), "model": self.best_weights(state, due), "averaged": self.best_averaged}
        # pictures cost ~0.5 s: with short epochs (cached features) draw them at most once a
        # minute, and always for the last epoch
        draw = self.finished or time.perf_counter() - self.last_drawn > 60
        write_metrics(self.run_dir, self.history, curves=draw)
        log_epoch(self.writer, row, confusion if draw else None, self.classes)
        self.last_drawn = time.perf_counter() if draw else self.last_drawn
        if self.finished:
            self.write_summary(state["train_time_s"])
        if due:
            self.save(state)
        key = "map" if self.multi else "acc"
        scores = (f"train loss {row['train_loss']:.4f} " + ("" if self.multi else f"acc {row['train_acc']:.2f}%") +
                  f"  val loss {row['val_loss']:.4f} " +
                  (f"mAP {row['val_map']:.2f}% F1@0.5 {row['val_f1']:.2f}%  " if self.multi else
                   f"acc {row['val_acc']:.2f}%  ") +
                  (f"EMA {row[f'ema_val_{key}']:.2f}%  " if f"ema_val_{key}" in row else ""))
        size = progressive_size(row["epoch"] - 1, self.cfg.epochs, self.preprocess.img_size, self.cfg.progressive)
        print(f"epoch {row['epoch']}/{self.cfg.epochs}  {scores}{row['img_per_s']:.0f} img/s"
              + (f" at {size} px" if size != self.preprocess.img_size else "")
              + ("  *best*" if improved else "") + unreadable(bad, val_bad))

    def write_summary(self, train_time_s: float, stopped: str | None = None) -> None:
        """summary.json: the run as it ended (`stopped`: why, when it did not end by itself)."""
        cfg = self.cfg
        scores = ({"best_val_map": self.best_acc, "thresholds": self.thresholds, "val_ap": self.best_ap}
                  if self.multi else
                  {"best_val_acc": self.best_acc, "calibration": self.calibration,
                   "val_confusion": self.best_confusion})
        summary = {**scores, "best_epoch": self.best_epoch, "epochs": self.progress.epoch,
                   "train_img_per_s": float(np.mean([h["img_per_s"] for h in self.history])) if self.history else 0.0,
                   "train_time_s": train_time_s, "classes": self.classes, "multilabel": self.multi,
                   "model": cfg.model, "mode": cfg.mode, "run_dir": str(self.run_dir),
                   "warnings": self.health.lines(), **({"stopped": stopped} if stopped else {})}
        files.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))

    def finish(self) -> None:
        hparams = {k: v for k, v in dataclasses.asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        key = "best_val_map" if self.multi else "best_val_acc"
        self.writer.add_hparams(hparams, {f"hparam/{key}": self.best_acc, "hparam/epochs": self.progress.epoch},
                                run_name=".")
        self.writer.close()
        print(f"best val {metric_name(self.multi)} {self.best_acc:.2f}% (epoch {self.best_epoch}); run folder "
              f"{self.run_dir}")
        if self.multi and self.thresholds:
            print(f"per-label thresholds (tuned on val for the best F1, never below {multilabel.MIN_THRESHOLD:g}): "
                  + ", ".join(f"{c}={t:.2f}" for c, t in zip(self.classes, self.thresholds)))
        if self.calibration:
            print(calibration_line(self.calibration))


def calibration_line(c: dict[str, Any]) -> str:
    """The end of a run: the temperature and the calibration error on validation images it was not fitted on
    (each half fitted on the other), or why no temperature was kept."""
    errors = f"{100 * c['ece_raw']:.2f}% -> {100 * c['ece']:.2f}%"
    few = (f" (only {c['images']} validation images: a rough fit, kept near 1 by its prior)"
           if c.get("images", FEW_TO_CALIBRATE) < FEW_TO_CALIBRATE else "")
    if "kept" not in c:  # a run from before the held-out check: its error is on the images it was fitted on
        return f"calibrated: temperature {c['temperature']:.3f}; expected calibration error on val {errors}{few}"
    if c["kept"]:
        return (f"calibrated: temperature {c['temperature']:.3f}; expected calibration error {errors}, on validation "
                f"images the temperature was not fitted on (each half fitted on the other){few}")
    return (f"not calibrated: a temperature fitted on the validation images ({c['fitted']:.3f}) raised the expected "
            f"calibration error on those it was not fitted on ({errors}, each half fitted on the other), so "
            f"probabilities stay the raw softmax (temperature 1){few}")


def make_criterion(cfg: TrainConfig, train_counts: list[int], images: int = 0, multi: bool = False) -> nn.Module:
    """Cross-entropy; for multi-label data, binary cross-entropy per label (--class-weights auto: its
    pos_weight, negatives over positives)."""
    auto = cfg.class_weights == "auto"
    if multi:
        return multilabel.BCELoss(multilabel.pos_weight(train_counts, images) if auto else None,
                                  cfg.label_smoothing)
    return CrossEntropy(weight=class_weights(train_counts) if auto else None, label_smoothing=cfg.label_smoothing)


class CrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss; with class weights and label smoothing on class-index targets, computed here:
    torch's version normalises by the targets' weights through a data-dependent masked_select (for
    ignore_index, which we never use), a host sync every training step on a GPU."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is None or not self.label_smoothing or target.dim() != 1 or target.is_floating_point():
            return super().forward(logits, target)
        logp = nn.functional.log_softmax(logits.float(), dim=1)
        weight = self.weight.float()
        weight_of_target = weight[target]
        nll = -logp.gather(1, target[:, None]).squeeze(1) * weight_of_target
        smooth = -(logp * weight).sum(1) / logits.shape[1]
        eps = self.label_smoothing
        return ((1 - eps) * nll + eps * smooth).sum() / weight_of_target.sum()


def make_mix(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """Mixup and/or CutMix on the device batch (soft targets)."""
    from torchvision.transforms import v2

    choices = []
    if cfg.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def literal_markdown(text: str) -> str:
    """Text that TensorBoard, which renders Markdown, shows as written: an indented code block (a class
    `__background__` is no bold 'background', `[a](b)` no link)."""
    return "\n".join("    " + line for line in dataset.shown(text).splitlines())


SCALARS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
           "val_map": "val/map", "val_f1": "val/f1", "ema_val_loss": "val/ema_loss", "ema_val_acc": "val/ema_acc",
           "ema_val_map": "val/ema_map"}  # history row -> TensorBoard tag


def log_epoch(writer: Any, row: dict[str, Any], confusion: list[list[int]] | None, classes: list[str]) -> None:
    step = row["epoch"]
    for key, tag in SCALARS.items():
        if key in row:
            writer.add_scalar(tag, row[key], step)
    writer.add_scalar("lr", row["lr"], step)
    writer.add_scalar("train/img_per_s", row["img_per_s"], step)
    if confusion is not None:
        writer.add_figure("val/confusion_matrix", plots.confusion_figure(np.array(confusion), classes, shares=False),
                          step)
    writer.flush()
