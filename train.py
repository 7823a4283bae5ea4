"""Train an image classifier on a folder of labelled images (one sub-folder per class).

    python train.py --data demo --mode scratch --epochs 3
    python train.py --data ~/photos --model resnet18 --mode finetune
    python train.py --data ~/photos --model mobilenet_v2 --mode transfer --epochs 10
    torchrun --nproc_per_node=4 train.py --data ~/photos --mode finetune   # many GPUs (DDP)
    python train.py --resume runs/resnet18-finetune-20261128-130000 --epochs 20   # continue, train longer

Everything a run makes goes to one run folder (--out, default runs/<model>-<mode>-<time>):
last.pt, best.pt, config.json, split.json, skipped.txt, metrics.csv, summary.json, curves.png,
resumes.jsonl and TensorBoard event files (`tensorboard --logdir runs`).

Resuming (see resolve_config): the settings that define the run (IDENTITY in config.py) cannot
change; every other setting given with --resume takes effect from where the run is.
"""

from __future__ import annotations

import argparse
import contextlib
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
from torch.utils.data import DataLoader

import dataset
import files
import folders
import models
import plots
from config import IDENTITY, TrainConfig, TrainingError, UsageError, add_options, cli, validate
from engine import (
    Features,
    HardStop,
    Learner,
    Progress,
    ResumableSampler,
    auto_workers,
    autocast_dtype,
    barrier,
    broadcast,
    deferred_interrupts,
    evaluate,
    init_distributed,
    make_loader,
    pick_device,
    precision,
    predict,
    save_checkpoint,
    seed_everything,
    shard,
    sigterm_as_ctrl_c,
    stop_requested,
    to_model_input,
    train_one_epoch,
    tune_cpu_allocator,
)

CHECKPOINT_VERSION = 2  # 2: position in samples and epoch statistics ("progress"); the schedule is derived
RESUME_ONLY = ("optimizer", "scaler", "progress")  # in last.pt, not in best.pt
RUN_FILES = ("last.pt", "best.pt", "config.json", "split.json", "skipped.txt", "metrics.csv", "summary.json",
             "curves.png", "lr_find.png", "resumes.jsonl", "model_summary.txt", "events.out.tfevents.*")


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
            self.end_epoch(row["val_acc"])

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

    def end_epoch(self, val_acc: float, patience: int = 2) -> None:
        """Plateau: multiply by gamma after `patience` epochs without a better val accuracy."""
        if val_acc > self.best:
            self.best, self.bad_epochs = val_acc, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > patience:
                self.plateau_scale *= self.gamma
                self.bad_epochs = 0


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Only trainable parameters: the head's group first, then the rest (the pretrained backbone)."""
    _, head = models.head_of(model)
    head_ids = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in head_ids]}]
    backbone = [p for p in trainable if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone})
    if cfg.optimizer in ("sgd", "rmsprop"):
        optimizer = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[cfg.optimizer](
            groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](groups, lr=cfg.lr)
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


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse frequency, scaled so the average weight per image is 1."""
    c = torch.tensor(counts, dtype=torch.float).clamp(min=1)
    return c.sum() / (len(counts) * c)


def find_lr(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
            to_input: Callable, autocast: Callable, device: torch.device, start: float = 1e-7, end: float = 10.0,
            steps: int = 100) -> tuple[list[float], list[float], float]:
    """LR range test: raise the lr exponentially each step, record the smoothed loss, stop when it
    explodes; the suggestion is the lr where the loss falls fastest. Weights are restored after."""
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = optimizer.state_dict()
    mults = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches = iter(())
    for i in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, y, _, _ = batch
        lr = start * factor ** i
        for g, m in zip(optimizer.param_groups, mults):
            g["lr"] = lr * m
        with autocast():
            loss = criterion(net(to_input(x)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected moving average
        if not math.isfinite(value) or value > 4 * best:
            break
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    net.load_state_dict(saved)
    optimizer.load_state_dict(saved_opt)
    if len(lrs) < 3:
        raise TrainingError("the lr range test diverged at once: check the data, or lower the start lr")
    stop = int(np.argmin(losses)) + 1
    slopes = np.gradient(np.array(losses[:stop]), np.log(lrs[:stop])) if stop > 2 else np.zeros(1)
    return lrs, losses, float(lrs[int(np.argmin(slopes))])


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


def absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """--data and --weights as absolute paths, so a run is the same from any working directory."""
    out = dict(settings)
    for key in ("data", "weights"):
        if out.get(key) and out[key] != "demo":
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, Start]:
    """Settings from the command line; on --resume, the run's saved settings plus what the command line
    changes. What defines the run (IDENTITY) cannot change; everything else takes effect."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    given = absolute_paths(vars(parser.parse_args(argv)))
    if not given.get("resume"):
        cfg = TrainConfig(**given)
        validate(cfg)
        models.check_name(cfg.model)
        if cfg.out:
            return cfg, Start(Path(cfg.out))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return cfg, Start(Path("runs") / f"{cfg.model}-{cfg.mode}-{stamp}", named=False)
    run_dir, last = resume_target(given["resume"], given.get("out"))
    if given.get("out") and given["resume"] != "auto" and Path(given["out"]).absolute() != run_dir.absolute():
        raise UsageError(f"--out cannot change on resume: the run stays in {run_dir} (copy the folder to "
                         "continue it elsewhere)")
    ckpt = None
    if last.is_file():
        ckpt = models.load_checkpoint(last)
        if "optimizer" not in ckpt:
            raise UsageError(f"{last} holds a model without its training state: resume with "
                             f"--resume {last.parent} (its last.pt)")
        saved = ckpt["config"]
    elif (run_dir / "config.json").is_file():  # created, then stopped before its first checkpoint
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{run_dir / 'config.json'} cannot be read ({e.__class__.__name__}): start the run "
                             "again with its options and --overwrite") from None
    else:
        raise UsageError(f"nothing to resume: {last} does not exist")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = absolute_paths({k: v for k, v in saved.items() if k in fields})
    overrides = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite")}
    changed = [k for k in IDENTITY if k in overrides and overrides[k] != saved.get(k)]
    if changed:
        raise UsageError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when "
                         "resuming: start a new run instead")
    if given.get("lr_find"):
        raise UsageError("--lr-find starts no run: use it without --resume")
    cfg = TrainConfig(**{**saved, **overrides, "resume": str(last), "out": str(run_dir)})
    validate(cfg)
    models.check_name(cfg.model)
    changes = {k: [saved.get(k), v] for k, v in overrides.items() if saved.get(k) != v}
    return cfg, Start(run_dir, ckpt, in_place=True, changes=changes, epochs_given="epochs" in given)


def resume_target(resume: str, out: str | None) -> tuple[Path, Path]:
    """(run folder, its last.pt) for --resume PATH (a run folder or a checkpoint in it) or 'auto'
    (--out's, else the newest run's)."""
    if resume == "auto":
        if out:
            return Path(out), Path(out) / "last.pt"
        found = models.newest_in_runs("last.pt")
        if found is None:
            raise UsageError("--resume auto: no runs/*/last.pt to resume; start a run without --resume")
        return found.parent, found
    path = Path(resume)
    if path.is_dir():
        return path, path / "last.pt"
    return path.parent, path


def check_start(cfg: TrainConfig, start: Start, world: int) -> None:
    """What a resume cannot honour, refused before anything is loaded or written."""
    if cfg.lr_find and world > 1:
        raise UsageError("--lr-find runs in one process: run it with python, not torchrun")
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

def check_run_dir(run_dir: Path, in_place: bool, overwrite: bool) -> None:
    """Never reuse another run's folder by accident (checked under the folder's lock)."""
    held = run_dir.exists() and any(p.name != files.FolderLock.NAME for p in run_dir.iterdir())
    if held and not in_place and not overwrite:
        raise UsageError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                         "--overwrite to replace it, or another --out")


@dataclasses.dataclass
class RunFolder:
    """A run folder this process holds (locked), and what it made there: undone if the start fails."""
    path: Path
    lock: files.FolderLock
    created: bool  # the folder did not exist before
    made_lock: bool  # nor did its lock file
    wrote_config: bool = False

    def undo(self) -> None:
        """A start refused for bad input leaves nothing behind."""
        if self.wrote_config:
            (self.path / "config.json").unlink(missing_ok=True)
        if self.made_lock:
            (self.path / files.FolderLock.NAME).unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def claim_run_dir(start: Start, cfg: TrainConfig, held: contextlib.ExitStack) -> RunFolder:
    """Create (or take) the run folder and lock it for this process: never two runs in one folder.
    A default name is made unique atomically (mkdir), so runs started in the same second each get
    their own. --overwrite removes the files a run writes (and nothing else). A new run's settings
    are written at once, so that a run stopped while it checks its files is resumable."""
    run_dir, created = start.run_dir, not start.run_dir.exists()
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
    made = RunFolder(run_dir, lock, created or not start.named, made_lock)
    try:
        check_run_dir(run_dir, start.in_place, cfg.overwrite)
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
        line = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                "epoch": start.ckpt["epoch"], "changed": start.changes}
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def write_metrics(run_dir: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """metrics.csv (and curves.png) rewritten from the checkpoint's history, so a resume never duplicates."""
    keys = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "time_s"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    files.atomic_write_text(run_dir / "metrics.csv", text.getvalue())
    if curves:
        plots.save(plots.curves_figure(history, run_dir.name), run_dir / "curves.png")


# ----------------------------------------------------------------------------- data and model

def load_split(cfg: TrainConfig, start: Start, size: int, lead: bool) -> dataset.DataSplit:
    """The run's split: a resumed run's own (split.json), else checked and made by rank 0 and shared.
    The check fills the decoded-image cache at `size` as it goes."""
    if start.ckpt is not None:
        try:
            return dataset.DataSplit.load(start.run_dir / "split.json")
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{start.run_dir / 'split.json'} cannot be read ({e.__class__.__name__}): a resume "
                             "needs the run's split; restore the file, or start a new run") from None
    split = dataset.prepare_data(cfg.data, cfg.val_split, cfg.seed, cfg.cache_dir,
                                 cache_size=size if cfg.image_cache else None,
                                 max_file_mb=cfg.max_file_mb) if lead else None
    return dataset.DataSplit(**broadcast(dataclasses.asdict(split) if lead else None))


def report_split(split: dataset.DataSplit, run_dir: Path) -> None:
    left = f" and left out {len(split.left_out)} other file(s)" if split.left_out else ""
    print(f"data: {len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val images from "
          f"{dataset.shown(split.root)}" + (f"; skipped {len(split.skipped)} unreadable file(s){left}, see "
                                            f"{run_dir / 'skipped.txt'}" if split.not_used() else ""))
    if split.ignored:
        print(f"ignored folder(s) by name: {', '.join(dataset.shown(p) for p in split.ignored[:5])}"
              + (" ..." if len(split.ignored) > 5 else ""))
    if split.leaks:
        b, a, d = split.leaks[0][1], split.leaks[0][0], split.leaks[0][2]
        dataset.warn(f"{len(split.leaks)} val/test image(s) look like train images (leakage), e.g. "
                     f"{dataset.shown(b)} ~ {dataset.shown(a)} ({d} bits apart); see `python dataset.py check`")


def build(cfg: TrainConfig, start: Start, num_classes: int) -> tuple[nn.Module, list]:
    """The network and the identity of its starting weights. A resume loads last.pt and needs neither
    the weights file nor the network: they mattered only at the start."""
    seed_everything(cfg.seed)  # same seed, same initial weights
    if start.ckpt is None:
        model = models.build_model(cfg.model, num_classes, cfg.mode, cfg.weights)
        used = cfg.mode != "scratch" or cfg.weights
        return model, models.weights_identity(cfg.model, cfg.weights) if used else ["none"]
    model = models.build_model(cfg.model, num_classes, "scratch")
    model.load_state_dict(start.ckpt["model"])
    if cfg.mode == "transfer":
        models.freeze_backbone(model)
    return model, start.ckpt.get("weights_id", ["unknown", cfg.weights])


# ----------------------------------------------------------------------------- feature cache

FEATURE_VERSION = 2  # 2: keyed by file identities, weights identity, precision and memory format


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
    save_checkpoint(feats, path)
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


def features_dataset(x: torch.Tensor, items: list[tuple[str, int]]) -> Features:
    """Cached features with their labels; images that could not be read (NaN rows) are left out."""
    ok = torch.isfinite(x).all(1)
    return Features(x[ok], [y for (_, y), good in zip(items, ok.tolist()) if good])


def feature_key(cfg: TrainConfig, weights_id: list, preprocess: dict[str, Any], split: dataset.DataSplit,
                device: torch.device) -> str:
    """Everything that changes the features: each file's identity, the model and its weights, the
    preprocessing, the precision and memory format they are computed in."""
    dtype = autocast_dtype(device, cfg.amp)
    blob = json.dumps([FEATURE_VERSION, cfg.model, weights_id, preprocess, str(dtype), cfg.channels_last,
                       [files.identity(p) for p, _ in split.train + split.val]])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    rank, world, local_rank = init_distributed()
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    cfg, start = resolve_config(argv)
    check_start(cfg, start, world)
    if finished(start, cfg):
        say(f"{start.run_dir} has finished ({start.ckpt['epoch']} epochs, best val accuracy "
            f"{start.ckpt['best_acc']:.2f}% at epoch {start.ckpt['best_epoch']}): nothing to do; "
            f"pass --epochs {start.ckpt['epoch'] + 5} (or any number above {start.ckpt['epoch']}) to train longer")
        return 0
    device = pick_device(cfg.device, local_rank)
    with contextlib.ExitStack() as held:
        held.enter_context(sigterm_as_ctrl_c())  # so temp files are removed on the way out
        # the run folder is made (or taken) and locked first, so a run stopped in any way from here on
        # is resumable by its folder; a start that fails on bad input removes what it made
        made = None
        if lead:
            made = claim_run_dir(start, cfg, held)
        run_dir = Path(broadcast(str(made.path) if made else None))
        try:
            preprocess = models.preprocessing(cfg.model, cfg.img_size)
            split = load_split(cfg, start, preprocess["resize_size"], lead)
            model, weights_id = build(cfg, start, len(split.classes))
            if lead:
                write_run_files(run_dir, cfg, start, split)
                report_split(split, run_dir)
        except UsageError:
            if made is not None:
                made.undo()
            raise
        except KeyboardInterrupt:
            return interrupted_early(run_dir, lead)
        try:
            return fit(cfg, start, run_dir, split, model, weights_id, preprocess, device, rank, world)
        except KeyboardInterrupt:
            return interrupted_early(run_dir, lead)


def interrupted_early(run_dir: Path, lead: bool) -> int:
    """Stopped before training started: nothing to save; a folder without last.pt starts again on resume."""
    if lead and not (run_dir / "last.pt").exists():
        print(f"\ninterrupted before the first checkpoint; start it again with: python train.py --resume {run_dir}",
              file=sys.stderr)
    return 130


def fit(cfg: TrainConfig, start: Start, run_dir: Path, split: dataset.DataSplit, model: nn.Module,
        weights_id: list, preprocess: dict[str, Any], device: torch.device, rank: int, world: int) -> int:
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    classes = split.classes
    trainable, frozen = models.count_parameters(model)
    if lead and cfg.summary:  # the layer table goes to a file; the screen keeps the one line below
        from torchsummary import summary

        model.eval()  # a summary forward pass must not move BatchNorm statistics
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            summary(model, (3, preprocess["img_size"], preprocess["img_size"]), device="cpu")
        files.atomic_write_text(run_dir / "model_summary.txt", table.getvalue())
    say(f"model: {cfg.model}, mode {cfg.mode}: {trainable:,} trainable and {frozen:,} frozen parameters; "
        f"{preprocess['img_size']} px crops of {preprocess['resize_size']} px images")
    # sized for this machine; left unresolved in the config so a resume elsewhere sizes it again
    workers = auto_workers(device, cfg.image_cache) if cfg.workers is None else cfg.workers

    model.to(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    image_input = to_model_input(preprocess, device, memory_format)
    autocast, scaler = precision(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # datasets: decoded-image cache built once (rank 0; on a resume it may have been deleted), shared
    # through the file system
    size, max_bytes = preprocess["resize_size"], int(cfg.max_file_mb * 2**20)
    cache = None
    if cfg.image_cache:
        cache = dataset.ImageCache(split.files(), size, cfg.cache_dir, max_bytes)
        if lead:
            cache.build(skip={p for p, _ in split.skipped})
        barrier()
    eval_tf = dataset.eval_transform(preprocess["img_size"])
    train_ds = dataset.ImageDataset(split.train, size, dataset.train_transform(
        preprocess["img_size"], cfg.augment, cfg.min_scale, cfg.hflip), cache, cfg.seed, max_bytes)
    val_ds = dataset.ImageDataset(split.val, size, eval_tf, cache, max_bytes=max_bytes)
    net, to_input = model, image_input
    use_features = cfg.mode == "transfer" and cfg.feature_cache and isinstance(models.head_of(model)[1], nn.Linear)
    if use_features:
        # the backbone is a fixed function (see models.py), so its output per image never changes:
        # compute it once and train the head alone. Augmentation is off on this path.
        path = (dataset.cache_root(cfg.cache_dir) / "features" /
                f"{feature_key(cfg, weights_id, preprocess, split, device)}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        if lead:
            plain = {"train": dataset.ImageDataset(split.train, size, eval_tf, cache, max_bytes=max_bytes),
                     "val": val_ds}
            feats = backbone_features(model, {k: make_loader(v, 2 * cfg.batch_size, workers, device)
                                              for k, v in plain.items()}, image_input, autocast, path, lead)
        barrier()
        if not lead:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        train_ds, val_ds = (features_dataset(feats[s], items) for s, items in (("train", split.train),
                                                                               ("val", split.val)))
        net = models.head_of(model)[1]
        to_input = lambda x: x.to(device, non_blocking=True)
        say(f"transfer: training the head on cached backbone features ({path.name}); augmentation off")

    weights, weight_notes = None, []
    train_counts = split.counts(split.train)
    if cfg.balanced_sampler:
        # per item of what is sampled: cached features leave out images that could not be read
        weights = torch.tensor([1.0 / train_counts[y] for y in train_ds.labels], dtype=torch.double)
        weight_notes.append("balanced sampler, chance of drawing an image per class: " + ", ".join(
            f"{c}={1 / max(1, n) / len(classes):.4f}" for c, n in zip(classes, train_counts)))
    sampler = ResumableSampler(len(train_ds), cfg.seed, rank, world, weights)
    train_loader = make_loader(train_ds, cfg.batch_size, workers, device, sampler)
    val_loader = make_loader(shard(val_ds, rank, world), 2 * cfg.batch_size, workers, device)

    if cfg.sync_bn and world > 1 and not use_features:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = make_optimizer(cfg, model)
    history = start.ckpt["history"] if start.ckpt else []
    if start.ckpt is not None:
        restore_optimizer(optimizer, scaler, start.ckpt, cfg, say)
    criterion = make_criterion(cfg, train_counts).to(device)
    if criterion.weight is not None:
        weight_notes.append("class weights: " + ", ".join(
            f"{c}={w:.2f}" for c, w in zip(classes, criterion.weight.tolist())))
    for note in weight_notes:
        say(note)
    inner = net  # unwrapped: evaluated on each rank's shard, saved in checkpoints
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        say(f"distributed: {world} processes x {cfg.batch_size} = {world * cfg.batch_size} images per step")
    if cfg.compile:
        net = torch.compile(net)

    if cfg.lr_find:
        models.set_train_mode(model, True, cfg.mode)
        lrs, losses, suggestion = find_lr(net, train_loader, optimizer, criterion, to_input, autocast, device)
        if lead:
            plots.save(plots.lr_figure(lrs, losses, suggestion), run_dir / "lr_find.png")
            print(f"suggested --lr {suggestion:.2g} (steepest loss descent); plot: {run_dir / 'lr_find.png'}")
        return 0

    schedule = Schedule(cfg, history)
    learner = Learner(net, optimizer, scaler, criterion, to_input, autocast, device, schedule,
                      make_mix(cfg, len(classes)))
    loop = Loop(cfg, start, run_dir, model, inner, learner, schedule, classes, preprocess, weights_id, rank, world)
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        loop.writer = SummaryWriter(run_dir, purge_step=loop.progress.epoch + 1 if start.ckpt else None)
        for note in weight_notes:
            loop.writer.add_text("imbalance", dataset.shown(note))
        if start.ckpt is not None:
            print(f"resuming {run_dir} at {loop.progress.where(sampler.per_rank)}" +
                  (" with " + ", ".join(f"--{k.replace('_', '-')} {v[1]}" for k, v in start.changes.items())
                   if start.changes else ""))
    return loop.run(train_loader, val_loader, sampler, use_features)


def restore_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ckpt: dict[str, Any],
                      cfg: TrainConfig, say: Callable) -> None:
    """The saved optimizer state (momentum, Adam's moments), with the settings now given applied on
    top; another --optimizer starts its state afresh."""
    scaler.load_state_dict(ckpt["scaler"])
    if ckpt["config"].get("optimizer") != cfg.optimizer:
        say(f"optimizer changed from {ckpt['config'].get('optimizer')} to {cfg.optimizer}: its state starts afresh")
        return
    optimizer.load_state_dict(ckpt["optimizer"])
    apply_settings(optimizer, cfg)


class Loop:
    """The epochs of a run, from wherever it is, with its checkpoints, logs and interrupts."""

    def __init__(self, cfg: TrainConfig, start: Start, run_dir: Path, model: nn.Module, inner: nn.Module,
                 learner: Learner, schedule: Schedule, classes: list[str], preprocess: dict[str, Any],
                 weights_id: list, rank: int, world: int):
        self.cfg, self.run_dir, self.model, self.inner, self.learner = cfg, run_dir, model, inner, learner
        self.schedule, self.classes, self.preprocess, self.weights_id = schedule, classes, preprocess, weights_id
        self.rank, self.world, self.lead = rank, world, rank == 0
        ckpt = start.ckpt or {}
        self.progress = Progress(**ckpt["progress"]) if "progress" in ckpt else Progress(ckpt.get("epoch", 0))
        self.history = list(ckpt.get("history", []))
        self.best_acc, self.best_epoch = ckpt.get("best_acc", -1.0), ckpt.get("best_epoch", 0)
        self.time_before = ckpt.get("train_time_s", sum(h["time_s"] for h in self.history))
        self.writer: Any = None
        self.best_ckpt: dict[str, Any] | None = None  # the best epoch's checkpoint while it is not yet written
        self.finished = False

    def checkpoint(self) -> dict[str, Any]:
        cfg, p = self.cfg, self.progress
        return {"kind": models.CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "arch": cfg.model, "mode": cfg.mode,
                "classes": self.classes, "preprocess": self.preprocess, "model": self.model.state_dict(),
                "config": dataclasses.asdict(cfg), "epoch": p.epoch, "progress": dataclasses.asdict(p),
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "history": self.history,
                "finished": self.finished, "train_time_s": self.train_time(), "weights_id": self.weights_id,
                "optimizer": self.learner.optimizer.state_dict(), "scaler": self.learner.scaler.state_dict(),
                "world": self.world}

    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.started

    def save(self, state: dict[str, Any]) -> None:
        """best.pt before last.pt: a kill in between re-runs this epoch on resume, which rewrites best.pt."""
        if self.best_ckpt is not None:
            save_checkpoint(self.best_ckpt, self.run_dir / "best.pt")
            self.best_ckpt = None
        save_checkpoint(state, self.run_dir / "last.pt")
        self.last_saved = time.perf_counter()

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
            except Exception:
                if stop_requested():  # a DataLoader worker ended by the same Ctrl-C or SIGTERM
                    return self.interrupted(sampler.per_rank)
                # a NaN, out of memory, a bug: the best model found so far is kept all the same
                if self.lead and self.best_ckpt is not None:
                    save_checkpoint(self.best_ckpt, self.run_dir / "best.pt")
                raise
            if self.lead:
                self.finish()
        return 0

    def stopped_at_once(self) -> int:
        """A second Ctrl-C: the step under way may be half done, so nothing is saved from it."""
        if self.lead:
            if self.best_ckpt is not None:  # a finished epoch's best model, held in memory: consistent
                save_checkpoint(self.best_ckpt, self.run_dir / "best.pt")
            print(f"\nstopped at once: {self.run_dir / 'last.pt'} keeps the last point it saved; continue with: "
                  f"python train.py --resume {self.run_dir}", file=sys.stderr)
        return 130

    def interrupted(self, per_epoch: int) -> int:
        """Ctrl-C or SIGTERM: the state is that of the last complete step (or validation not begun)."""
        if self.lead:
            self.save(self.checkpoint())
            if self.history:
                write_metrics(self.run_dir, self.history)
            print(f"\ninterrupted at {self.progress.where(per_epoch)}: saved {self.run_dir / 'last.pt'}; "
                  f"continue with: python train.py --resume {self.run_dir}", file=sys.stderr)
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
        val = evaluate(self.inner, val_loader, self.learner.to_input, self.learner.autocast, len(self.classes),
                       self.lead)
        self.schedule.end_epoch(val["acc"])
        progress.next_epoch()
        row = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"],
               "val_loss": val["loss"], "val_acc": val["acc"], "lr": stats["lr"],
               "img_per_s": stats["img_per_s"] * self.world, "time_s": stats["time_s"]}
        self.history.append(row)
        improved = val["acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = val["acc"], epoch + 1
        stopping = cfg.patience > 0 and epoch + 1 - self.best_epoch >= cfg.patience
        self.finished = epoch + 1 == cfg.epochs or stopping
        if self.lead:
            self.end_epoch(row, val["confusion"], improved, stats["bad"])
        barrier()
        if stopping:
            if self.lead:
                print(f"early stop: no better val accuracy for {cfg.patience} epochs")

    def end_epoch(self, row: dict[str, Any], confusion: list[list[int]], improved: bool, bad: int) -> None:
        """Metrics, pictures and checkpoints after an epoch (rank 0). The files a person reads are
        written before last.pt: a kill between them replays the epoch, which writes them again."""
        # short epochs (cached features, small data) would spend their time writing checkpoints:
        # write at most every --save-interval s. A hard kill in between loses only the epochs
        # since the last write: resuming trains them again (on CPU to the same digits).
        due = self.finished or time.perf_counter() - self.last_saved >= self.cfg.save_interval
        state = self.checkpoint()
        if improved:  # model only: what eval.py, test.py and export.py need, a third the size
            self.best_ckpt = {k: v for k, v in state.items() if k not in RESUME_ONLY} | {
                "history": list(self.history), "model": state["model"] if due else models.snapshot(self.model)}
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
        print(f"epoch {row['epoch']}/{self.cfg.epochs}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_acc']:.2f}%  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%  "
              f"{row['img_per_s']:.0f} img/s"
              + ("  *best*" if improved else "") + (f"  ({bad} unreadable)" if bad else ""))

    def write_summary(self, train_time_s: float) -> None:
        cfg = self.cfg
        summary = {"best_val_acc": self.best_acc, "best_epoch": self.best_epoch, "epochs": self.progress.epoch,
                   "train_img_per_s": float(np.mean([h["img_per_s"] for h in self.history])) if self.history else 0.0,
                   "train_time_s": train_time_s, "classes": self.classes,
                   "model": cfg.model, "mode": cfg.mode, "run_dir": str(self.run_dir)}
        files.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))

    def finish(self) -> None:
        hparams = {k: v for k, v in dataclasses.asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(hparams, {"hparam/best_val_acc": self.best_acc, "hparam/epochs": self.progress.epoch},
                                run_name=".")
        self.writer.close()
        print(f"best val accuracy {self.best_acc:.2f}% (epoch {self.best_epoch}); run folder {self.run_dir}")


def make_criterion(cfg: TrainConfig, train_counts: list[int]) -> nn.CrossEntropyLoss:
    weight = class_weights(train_counts) if cfg.class_weights == "auto" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


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


def log_epoch(writer: Any, row: dict[str, Any], confusion: list[list[int]] | None, classes: list[str]) -> None:
    step = row["epoch"]
    for split in ("train", "val"):
        writer.add_scalar(f"{split}/loss", row[f"{split}_loss"], step)
        writer.add_scalar(f"{split}/acc", row[f"{split}_acc"], step)
    writer.add_scalar("lr", row["lr"], step)
    writer.add_scalar("train/img_per_s", row["img_per_s"], step)
    if confusion is not None:
        writer.add_figure("val/confusion_matrix", plots.confusion_figure(np.array(confusion), classes, shares=False),
                          step)
    writer.flush()


def run(argv: list[str] | None = None) -> int:
    """main() with the errors every entry script gives (config.cli); the process group is closed."""
    try:
        return cli(main, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
