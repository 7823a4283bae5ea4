"""Resuming: the settings a run starts with, what may change, and whether there is anything left to do."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from imgcls import checkpoint, runfolder
from imgcls.cli import command_line, typed
from imgcls.data import folders, imagecache, labelfile
from imgcls.data import split as data_split
from imgcls.errors import UsageError
from imgcls.networks import build
from imgcls.preprocess import Preprocess
from imgcls.recipes import progressive_size, resumed_recipe, with_recipe
from imgcls.runfolder import Start
from imgcls.settings import TrainConfig, absolute_paths, file_name, identity_changes, validate
from imgcls.training import logs
from imgcls.training.distributed import from_lead, share_check


def resolve_config(given: dict[str, Any], world: int = 1) -> tuple[TrainConfig, Start]:
    """The settings given on the command line (train.read_command_line), the recipe's for the rest; on
    --resume, the run's saved settings plus what the command line changes (a --recipe given then sets
    the settings of it not given). What defines the run (IDENTITY) cannot change; everything else
    takes effect."""
    if not given.get("resume"):
        build.check_name(given.get("model", TrainConfig.model))
        cfg = TrainConfig(**with_recipe(given, world, build.family(given.get("model", TrainConfig.model))))
        validate(cfg)
        if cfg.out:
            return cfg, Start(Path(cfg.out))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kind = "lr-find" if cfg.lr_find else cfg.mode
        return cfg, Start(Path("runs") / f"{file_name(cfg.model)}-{kind}-{stamp}", named=False)
    run_dir, last = runfolder.resume_target(given["resume"], given.get("out"))
    if given.get("out") and given["resume"] != "auto" and Path(given["out"]).absolute() != run_dir.absolute():
        raise UsageError(f"--out cannot change on resume: the run stays in {run_dir} (copy the folder to "
                         "continue it elsewhere)")
    ckpt = checkpoint.view(checkpoint.load_for_resume(last)) if last.is_file() else None
    saved = ckpt.config if ckpt else saved_settings(run_dir)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = absolute_paths({k: v for k, v in saved.items() if k in fields})
    if saved.get("lr_find"):
        raise UsageError(f"{run_dir} holds an lr range test, not a run: start a run with another --out (or this "
                         "one and --overwrite)")
    saved.setdefault("recipe", "seed")  # a run from before recipes had the seed's settings as defaults
    overrides = {k: v for k, v in given.items() if k not in ("resume", "out", "overwrite")}
    build.check_name(saved["model"])
    overrides = resumed_recipe(saved, overrides, world, build.family(saved["model"]))
    if saved.get("img_size") is None and overrides.get("img_size") is not None:  # trained at the weights' own size
        trained = ckpt.preprocess.img_size if ckpt else build.preprocessing(saved["model"]).img_size
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


def run_preprocess(cfg: TrainConfig, start: Start) -> Preprocess:
    """The run's preprocessing, computed once and passed down: a resume keeps its checkpoint's (a newer
    torchvision or timm may say otherwise); a new run takes its weights' at --img-size, refused at once when
    the network cannot take that size (or the first --progressive one)."""
    if start.ckpt is not None:
        return start.ckpt.preprocess
    pre = build.preprocessing(cfg.model, cfg.img_size)
    if not start.in_place:  # (a run started again in its folder was checked when it was created)
        build.check_input_size(cfg.model, progressive_size(0, cfg.epochs, pre.img_size, cfg.progressive))
        build.check_input_size(cfg.model, pre.img_size)
    return pre


def saved_settings(run_dir: Path) -> dict[str, Any]:
    """config.json of a run that was created, then stopped before its first checkpoint."""
    try:
        return json.loads((run_dir / runfolder.CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir / runfolder.CONFIG} cannot be read ({e.__class__.__name__}): start the run "
                         "again with its options and --overwrite") from None


def check_start(cfg: TrainConfig, start: Start, world: int) -> None:
    """What a resume cannot honour, refused before anything is loaded or written."""
    if cfg.lr_find and world > 1:
        raise UsageError("--lr-find runs in one process: run it with python, not torchrun")
    if cfg.balanced_sampler and labelfile.is_label_file(cfg.data) and labelfile.is_multilabel(cfg.data):
        raise UsageError("--balanced-sampler draws images by class, and a multi-label image has several: use "
                         "--class-weights auto (each label's positives weighted) instead")
    ckpt = start.ckpt
    if ckpt is None:
        return
    if ckpt.world != world:
        raise UsageError(f"{cfg.resume} was saved by {ckpt.world} process(es), this run has {world}: "
                         "resume with the same number of processes")
    done = ckpt.epoch
    if cfg.epochs < done:
        raise UsageError(f"--epochs {cfg.epochs} is fewer than the {done} epochs {start.run_dir} has "
                         f"trained: give --epochs {done + 1} or more to train longer")
    if cfg.epochs == done and not ckpt.finished:
        raise UsageError(f"--epochs {cfg.epochs} would end {start.run_dir} inside epoch {done + 1}, which it has "
                         f"begun: give --epochs {done + 1} or more")


def finished(start: Start, cfg: TrainConfig) -> bool:
    """A run that ran to its end (all its epochs, or stopped early) and was given no further epochs."""
    ckpt = start.ckpt
    return ckpt is not None and ckpt.finished and (not start.epochs_given or cfg.epochs <= ckpt.epoch)


def check_still_there(split: data_split.DataSplit, lead: bool) -> None:
    """A resume's images gone since the run started: all of them (the data moved) is one line before anything
    is written; some (validation on fewer images, whose accuracy is not comparable) is said."""
    gone = {name: sum(not os.path.lexists(p) for p, _ in items) for name, items in (("train", split.train),
                                                                                   ("val", split.val))}
    for name, items, what in (("train", split.train, "training"), ("val", split.val, "validation")):
        if gone[name] == len(items):  # (validation on none would be recorded as 0%)
            raise UsageError(f"none of the run's {what} images are where it found them ({folders.shown(split.root)}):"
                             " put the data back there, or a link to it, to resume (a run keeps its --data)")
    if lead and (gone["train"] or gone["val"]):
        imagecache.warn(f"{gone['val']} of the run's {len(split.val)} validation images and {gone['train']} of its "
                     f"{len(split.train)} training images are gone since the run started: they are skipped"
                     + (", so validation from here on is on fewer images than before (its accuracy is not comparable "
                        "with the earlier epochs')" if gone["val"] else ""))


def offline_command(given: dict[str, Any]) -> str:
    """The command given, from scratch: what trains without internet. A fold's own folder is left out (the
    job's, given to the job, was removed with the fold's when the start failed)."""
    fold = "fold" in given
    return command_line({k: v for k, v in given.items() if not (fold and k == "out")}, mode="scratch")


def nothing_to_do(start: Start) -> str:
    ckpt = start.ckpt
    return (f"{start.run_dir} has finished ({ckpt.epoch} epochs, best val "
            f"{logs.metric_name(ckpt.multilabel)} {ckpt.best_acc:.2f}% at "
            f"epoch {ckpt.best_epoch}): nothing to do; pass --epochs {ckpt.epoch + 5} (or any number above "
            f"{ckpt.epoch}) to train longer")


def interrupted_early(run_dir: Path, lead: bool, resumable: bool = True) -> int:
    """Stopped before training started: nothing to save; a folder without last.pt starts again on resume
    (an lr range test is not resumable: it is run again)."""
    if lead and resumable and not (run_dir / runfolder.LAST).exists():
        print("\ninterrupted before the first checkpoint; start it again with: python train.py --resume "
              f"{typed(run_dir)}", file=sys.stderr)
    return 130


# ----------------------------------------------------------------------------- data and model

def load_split(cfg: TrainConfig, start: runfolder.Start, pre: Preprocess, lead: bool) -> data_split.DataSplit:
    """The run's split: a resumed run's own (split.json), else checked and made by rank 0 and shared.
    The check fills the decoded-image cache at the resize size as it goes."""
    if start.ckpt is not None:
        try:
            split = data_split.DataSplit.load(start.run_dir / runfolder.SPLIT)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"{start.run_dir / runfolder.SPLIT} cannot be read ({e.__class__.__name__}): a resume "
                             "needs the run's split; restore the file, or start a new run") from None
        check_still_there(split, lead)
        return split

    def check() -> dict[str, Any]:
        return dataclasses.asdict(data_split.prepare_data(
            cfg.data, cfg.val_split, cfg.seed, cfg.cache_dir,
            cache_size=pre.resize_size if cfg.image_cache != "none" else None, max_file_mb=cfg.max_file_mb,
            test_split=cfg.test_split, folds=cfg.folds, fold=cfg.fold, label_sep=cfg.label_sep,
            image_cache=cfg.image_cache, interpolation=pre.resample,
            share=share_check if dist.is_initialized() else None))

    return data_split.DataSplit(**from_lead(check, lead, mine={"cache_dir": cfg.cache_dir}))  # (each its own folder)
