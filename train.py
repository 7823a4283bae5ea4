"""Train an image classifier on a folder of labelled images (one sub-folder per class).

    python train.py --data demo --mode scratch --epochs 3
    python train.py --data ~/photos --model resnet18 --mode finetune
    python train.py --data ~/photos --model mobilenet_v2 --mode transfer --epochs 10
    torchrun --nproc_per_node=4 train.py --data ~/photos --mode finetune   # many GPUs (DDP)
    python train.py --resume runs/resnet18-finetune-20261128-130000      # continue a run

Everything a run makes goes to one run folder (--out, default runs/<model>-<mode>-<time>):
last.pt, best.pt, config.json, split.json, skipped.txt, metrics.csv, summary.json, curves.png and
TensorBoard event files (`tensorboard --logdir runs`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
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
import models
import plots
from config import IDENTITY, TrainConfig, UsageError, add_options, fail, validate
from engine import (
    Features,
    Progress,
    ResumableSampler,
    TrainingError,
    auto_workers,
    barrier,
    broadcast,
    evaluate,
    init_distributed,
    make_loader,
    pick_device,
    precision,
    predict,
    save_checkpoint,
    seed_everything,
    shard,
    to_model_input,
    train_one_epoch,
    tune_cpu_allocator,
)

RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng")  # in last.pt, not in best.pt


# ----------------------------------------------------------------------------- optimisation

class Schedule:
    """Learning-rate factor per optimizer step: warm-up, then step/cosine/onecycle/plateau/none.
    Per step (not per epoch) so warm-up and onecycle are smooth; a plain object so LambdaLR saves it."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.kind, self.epochs, self.spe = cfg.scheduler, cfg.epochs, max(1, steps_per_epoch)
        self.step_size, self.gamma, self.warmup = cfg.step_size, cfg.gamma, cfg.warmup_epochs * self.spe
        self.plateau_scale, self.best, self.bad_epochs = 1.0, -1.0, 0

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        total = self.epochs * self.spe
        t = min(1.0, max(0, step - self.warmup) / max(1, total - self.warmup))
        if self.kind == "step":
            factor = self.gamma ** ((step // self.spe) // self.step_size)
        elif self.kind == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * t))
        elif self.kind == "onecycle":  # up to lr over the first 30%, then cosine down to ~0
            t = step / max(1, total)
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
    """Only trainable parameters; finetune may give the pretrained backbone a smaller lr."""
    _, head = models.head_of(model)
    head_ids = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in head_ids], "lr": cfg.lr}]
    backbone = [p for p in trainable if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
    kw = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, **kw)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, momentum=cfg.momentum, **kw)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](groups, **kw)


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


# ----------------------------------------------------------------------------- run folder

def write_metrics(run_dir: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """metrics.csv (and curves.png) rewritten from the checkpoint's history, so a resume never duplicates."""
    keys = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "time_s"]
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")
    if curves:
        plots.save(plots.curves_figure(history, run_dir.name), run_dir / "curves.png")


def resume_target(resume: str, out: str | None) -> Path:
    """--resume PATH (last.pt or a run folder) or 'auto' (--out's last.pt, else the newest run's)."""
    if resume == "auto":
        if out:
            path = Path(out) / "last.pt"
        else:
            found = sorted(Path("runs").glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise UsageError("--resume auto: no runs/*/last.pt to resume; start a run without --resume")
            path = found[-1]
    else:
        path = Path(resume)
        if path.is_dir():
            path = path / "last.pt"
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist")
    return path


def resolve_config(argv: list[str] | None) -> tuple[TrainConfig, dict[str, Any] | None, Path]:
    """Settings from the command line; on --resume, from the checkpoint plus what the command line changes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    given = vars(parser.parse_args(argv))
    ckpt = None
    if given.get("resume"):
        path = resume_target(given["resume"], given.get("out"))
        ckpt = models.load_checkpoint(path)
        saved = ckpt["config"]
        changed = [k for k in IDENTITY if k in given and given[k] != saved.get(k)]
        if changed:
            raise UsageError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when "
                             "resuming: start a new run instead")
        cfg = TrainConfig(**{**saved, **{k: v for k, v in given.items() if k not in ("resume", "out")}})
        cfg.resume, cfg.out = str(path), str(path.parent)
        run_dir = path.parent
    else:
        cfg = TrainConfig(**given)
        run_dir = Path(cfg.out) if cfg.out else None
    validate(cfg)
    models.check_name(cfg.model)
    if run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.model}-{cfg.mode}-{stamp}"
    return cfg, ckpt, run_dir


RUN_FILES = ("last.pt", "best.pt", "config.json", "split.json", "skipped.txt", "metrics.csv", "summary.json",
             "curves.png", "lr_find.png", "events.out.tfevents.*")


def check_run_dir(run_dir: Path, cfg: TrainConfig, resuming: bool) -> None:
    """Never reuse another run's folder by accident (checked first, before any slow work)."""
    if run_dir.exists() and any(run_dir.iterdir()) and not resuming and not cfg.overwrite:
        raise UsageError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                         "--overwrite to replace it, or another --out")


def make_run_dir(run_dir: Path, cfg: TrainConfig, resuming: bool) -> None:
    """Created before training starts. --overwrite removes the files a run writes (and nothing else),
    so the new run's folder holds only the new run."""
    check_run_dir(run_dir, cfg, resuming)
    if run_dir.exists() and not resuming:
        for pattern in RUN_FILES:
            for old in run_dir.glob(pattern):
                old.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create run folder {run_dir}: {e.strerror}") from None


# ----------------------------------------------------------------------------- feature cache

def backbone_features(model: nn.Module, loaders: dict[str, DataLoader], to_input: Callable, autocast: Callable,
                      path: Path, show: bool) -> dict[str, torch.Tensor]:
    """The frozen backbone's output for every image, computed once and kept on disk."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
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


def features_dataset(x: torch.Tensor, items: list[tuple[str, int]]) -> Features:
    """Cached features with their labels; images that could not be read (NaN rows) are left out."""
    ok = torch.isfinite(x).all(1)
    return Features(x[ok], [y for (_, y), good in zip(items, ok.tolist()) if good])


def feature_key(cfg: TrainConfig, preprocess: dict[str, Any], split: dataset.DataSplit) -> str:
    """Model, weights, preprocessing and file list: change any and the cache is rebuilt."""
    source = cfg.weights or (models.default_weights(cfg.model) or "").__str__()
    if cfg.weights:
        st = os.stat(cfg.weights)
        source += f":{st.st_size}:{st.st_mtime_ns}"
    stats = [(p, os.path.getsize(p) if os.path.exists(p) else -1) for p, _ in split.train + split.val]
    blob = json.dumps([cfg.model, source, preprocess, stats])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    rank, world, local_rank = init_distributed()
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    cfg, ckpt, run_dir = resolve_config(argv)
    run_dir = Path(broadcast(str(run_dir)))  # one run folder even if ranks started a second apart
    device = pick_device(cfg.device, local_rank)
    if ckpt is not None and ckpt.get("world", 1) != world:
        raise UsageError(f"{cfg.resume} was saved by {ckpt.get('world', 1)} process(es), this run has {world}: "
                         "resume with the same number of processes")
    if lead:
        check_run_dir(run_dir, cfg, resuming=ckpt is not None)

    # data: checked once by rank 0; the split is the run's and is reused on resume. Bad data and bad
    # weights are found before the run folder is created, so a failed start leaves nothing behind.
    preprocess = models.preprocessing(cfg.model, cfg.img_size)
    size = preprocess["resize_size"]  # of the decoded images, cached (the check fills the cache as it goes)
    split_path = run_dir / "split.json"
    if ckpt is not None:
        split = dataset.DataSplit.load(split_path)
    else:
        split = dataset.prepare_data(cfg.data, cfg.val_split, cfg.seed, cfg.cache_dir,
                                     cache_size=size if cfg.image_cache else None) if lead else None
        split = dataset.DataSplit(**broadcast(dataclasses.asdict(split) if lead else None))
    classes = split.classes
    if lead:
        print(f"data: {len(classes)} classes, {len(split.train)} train / {len(split.val)} val images from "
              f"{split.root}" + (f"; skipped {len(split.skipped)} unreadable file(s), see "
                                 f"{run_dir / 'skipped.txt'}" if split.skipped else ""))
        if split.leaks:
            dataset.warn(f"{len(split.leaks)} val image(s) are exact copies of train images, e.g. "
                         f"{split.leaks[0][1]} == {split.leaks[0][0]} (run `python dataset.py check`)")

    # model
    seed_everything(cfg.seed)  # same seed, same initial weights
    model = models.build_model(cfg.model, len(classes), "scratch" if ckpt else cfg.mode, cfg.weights)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if cfg.mode == "transfer":
            models.freeze_backbone(model)
    trainable, frozen = models.count_parameters(model)
    if lead and cfg.summary:
        from torchsummary import summary

        model.eval()  # a summary forward pass must not move BatchNorm statistics
        summary(model, (3, preprocess["img_size"], preprocess["img_size"]), device="cpu")
    say(f"model: {cfg.model}, mode {cfg.mode}: {trainable:,} trainable and {frozen:,} frozen parameters; "
        f"{preprocess['img_size']} px crops of {preprocess['resize_size']} px images")
    # sized for this machine; left unresolved in the config so a resume elsewhere sizes it again
    workers = auto_workers(device, cfg.image_cache) if cfg.workers is None else cfg.workers
    if lead:
        make_run_dir(run_dir, cfg, resuming=ckpt is not None)
        if ckpt is None:
            split.save(split_path)
            (run_dir / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in split.skipped))
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    barrier()

    model.to(device)
    on_cuda = device.type == "cuda"
    if device.type == "cpu":
        tune_cpu_allocator()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    image_input = to_model_input(preprocess, device, memory_format)
    autocast, scaler = precision(device, cfg.amp)
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    # datasets: decoded-image cache built once (rank 0; on a resume it may have been deleted), shared
    # through the file system
    cache = None
    if cfg.image_cache:
        cache = dataset.ImageCache(split.files(), size, cfg.cache_dir)
        if lead:
            cache.build(skip={p for p, _ in split.skipped})
        barrier()
    eval_tf = dataset.eval_transform(preprocess["img_size"])
    train_ds = dataset.ImageDataset(split.train, size, dataset.train_transform(
        preprocess["img_size"], cfg.augment, cfg.min_scale, cfg.hflip), cache)
    val_ds = dataset.ImageDataset(split.val, size, eval_tf, cache)
    net, to_input = model, image_input
    use_features = cfg.mode == "transfer" and cfg.feature_cache and isinstance(models.head_of(model)[1], nn.Linear)
    if use_features:
        # the backbone is a fixed function (see models.py), so its output per image never changes:
        # compute it once and train the head alone. Augmentation is off on this path.
        path = dataset.cache_root(cfg.cache_dir) / "features" / f"{feature_key(cfg, preprocess, split)}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if lead:
            plain = {"train": dataset.ImageDataset(split.train, size, eval_tf, cache),
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
    schedule = Schedule(cfg, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = make_criterion(cfg, train_counts).to(device)
    if criterion.weight is not None:
        weight_notes.append("class weights: " + ", ".join(
            f"{c}={w:.2f}" for c, w in zip(classes, criterion.weight.tolist())))
    for note in weight_notes:
        say(note)
    mix = make_mix(cfg, len(classes))
    inner = net  # unwrapped: evaluated on each rank's shard, saved in checkpoints
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if on_cuda else None)
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

    progress, history, best_acc, best_epoch = Progress(), [], -1.0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        progress = Progress(ckpt["epoch"], ckpt["step"], ckpt["global_step"])
        history, best_acc, best_epoch = ckpt["history"], ckpt["best_acc"], ckpt["best_epoch"]
        say(f"resuming {run_dir} after epoch {progress.epoch}" +
            (f", batch {progress.step}" if progress.step else ""))
        if ckpt.get("rng") and progress.step:
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(ckpt["rng"]["python"])

    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir, purge_step=progress.epoch + 1 if ckpt else None)
        for note in weight_notes:
            writer.add_text("imbalance", note)

    def checkpoint() -> dict[str, Any]:
        return {"kind": models.CHECKPOINT_KIND, "version": 1, "arch": cfg.model, "mode": cfg.mode,
                "classes": classes, "preprocess": preprocess, "model": model.state_dict(),
                "config": dataclasses.asdict(cfg), "epoch": progress.epoch, "step": progress.step,
                "global_step": progress.global_step, "best_acc": best_acc, "best_epoch": best_epoch,
                "history": history, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "world": world,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    def save(state: dict[str, Any]) -> None:
        """best.pt before last.pt: a kill in between re-runs this epoch on resume, which rewrites best.pt."""
        nonlocal best_ckpt, last_saved
        if best_ckpt is not None:
            save_checkpoint(best_ckpt, run_dir / "best.pt")
            best_ckpt = None
        save_checkpoint(state, run_dir / "last.pt")
        last_saved = time.perf_counter()

    stop = install_stop_handler()
    start_time = last_drawn = last_saved = time.perf_counter()
    best_ckpt = None  # the best epoch's checkpoint while it is not yet written
    try:
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            if not progress.step:
                seed_everything(cfg.seed + 1000 * epoch + rank)
            sampler.set_epoch(epoch, start=progress.step * cfg.batch_size)
            models.set_train_mode(model, True, cfg.mode)
            if writer is not None and epoch == 0 and not use_features and not progress.step:
                x, _, _, _ = next(iter(train_loader))
                if x is not None:
                    writer.add_images("train/augmented", x[:32], 0)
            stats = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, criterion, to_input,
                                    autocast, progress, cfg, device, mix, lead)
            models.set_train_mode(model, False, cfg.mode)
            val = evaluate(inner, val_loader, to_input, autocast, len(classes), lead)
            schedule.end_epoch(val["acc"])
            progress.epoch, progress.step = epoch + 1, 0
            row = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_acc": stats["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"],
                   "img_per_s": stats["img_per_s"] * world, "time_s": stats["time_s"]}
            history.append(row)
            improved = val["acc"] > best_acc
            if improved:
                best_acc, best_epoch = val["acc"], epoch + 1
            stopping = cfg.patience > 0 and epoch + 1 - best_epoch >= cfg.patience
            if lead:
                # short epochs (cached features, small data) would spend their time writing checkpoints:
                # write at most every --save-interval s. A hard kill in between loses only the epochs
                # since the last write: resuming trains them again (on CPU to the same digits).
                done = epoch + 1 == cfg.epochs or stopping
                due = done or time.perf_counter() - last_saved >= cfg.save_interval
                state = checkpoint()
                if improved:  # model only: what eval.py, test.py and export.py need, a third the size
                    best_ckpt = {k: v for k, v in state.items() if k not in RESUME_ONLY} | {
                        "history": list(history), "model": state["model"] if due else models.snapshot(model)}
                if due:
                    save(state)
                # pictures cost ~0.5 s: with short epochs (cached features) draw them at most once a
                # minute, and always for the last epoch
                draw = done or time.perf_counter() - last_drawn > 60
                write_metrics(run_dir, history, curves=draw)
                log_epoch(writer, row, val["confusion"] if draw else None, classes)
                last_drawn = time.perf_counter() if draw else last_drawn
                print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats['loss']:.4f} acc {stats['acc']:.2f}%  "
                      f"val loss {val['loss']:.4f} acc {val['acc']:.2f}%  {row['img_per_s']:.0f} img/s"
                      + ("  *best*" if improved else "") + (f"  ({stats['bad']} unreadable)" if stats["bad"] else ""))
            barrier()
            if stopping:
                say(f"early stop: no better val accuracy for {cfg.patience} epochs")
                break
    except KeyboardInterrupt:
        if lead:
            save(checkpoint())
            if history:
                write_metrics(run_dir, history)
            print(f"\ninterrupted: saved {run_dir / 'last.pt'} (epoch {progress.epoch + 1}, batch {progress.step}); "
                  f"continue with: python train.py --resume {run_dir}", file=sys.stderr)
        return 130
    except Exception:  # a NaN, out of memory, a bug: the best model found so far is kept all the same
        if lead and best_ckpt is not None:
            save_checkpoint(best_ckpt, run_dir / "best.pt")
        raise
    finally:
        stop()
    if lead:
        summary = {"best_val_acc": best_acc, "best_epoch": best_epoch, "epochs": progress.epoch,
                   "train_img_per_s": float(np.mean([h["img_per_s"] for h in history])) if history else 0.0,
                   "train_time_s": time.perf_counter() - start_time, "classes": classes,
                   "model": cfg.model, "mode": cfg.mode, "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        hparams = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        writer.add_hparams(hparams, {"hparam/best_val_acc": best_acc, "hparam/epochs": progress.epoch},
                           run_name=".")
        writer.close()
        print(f"best val accuracy {best_acc:.2f}% (epoch {best_epoch}); run folder {run_dir}")
    return 0


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


def install_stop_handler() -> Callable[[], None]:
    """SIGTERM (preemption, `kill`) behaves like Ctrl-C: save last.pt and exit. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run(argv: list[str] | None = None) -> int:
    """main() with errors for people: bad input exits 2, a failed run 1, with one line each."""
    try:
        return main(argv)
    except UsageError as e:
        fail(str(e), 2)
    except TrainingError as e:
        fail(str(e), 1)
    except torch.OutOfMemoryError:
        fail("out of GPU memory: try a smaller --batch-size (or --img-size)", 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
