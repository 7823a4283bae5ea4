"""The epoch loop (Loop): train, validate, keep the best, checkpoint, log, stop on request."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgcls import checkpoint, files, runfolder
from imgcls.cli import typed
from imgcls.data import folders, imagecache
from imgcls.data.loaders import ResumableSampler
from imgcls.errors import Diverged, TrainingError
from imgcls.evaluation import calibration, multilabel
from imgcls.evaluation.inference import all_reduce_sum, evaluate
from imgcls.interrupts import HardStop, deferred_interrupts, stop_requested
from imgcls.networks import heads
from imgcls.recipes import progressive_size
from imgcls.training import logs, optim, runstate
from imgcls.training.batchnorm import recompute_batchnorm
from imgcls.training.distributed import (
    barrier,
    same_buffers,
)
from imgcls.training.health import Health, largest_share
from imgcls.training.step import Learner, Progress, train_one_epoch


class Loop:
    """The epochs of a run, from wherever it is, with its checkpoints, logs and interrupts."""

    def __init__(self, run: runstate.Run, model: nn.Module, inner: nn.Module, learner: Learner,
                 schedule: optim.Schedule):
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
                             len(split.classes), self.multi, run.cfg.precise_bn, dict(ckpt.get("warnings", {})),
                             run.cfg.epochs)
        self.finished = False

    def open_log(self, per_epoch: int) -> None:
        """TensorBoard (rank 0): a resumed run's log continues after its last saved epoch."""
        from torch.utils.tensorboard import SummaryWriter

        start = self.start
        self.writer = SummaryWriter(self.run_dir, purge_step=self.progress.epoch + 1 if start.ckpt else None)
        for note in self.notes:
            self.writer.add_text("imbalance", logs.literal_markdown(note))
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
        checkpoint.save(state, self.run_dir / runfolder.LAST)
        if runfolder.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / runfolder.CHECKPOINTED, "saved")
        self.last_saved = time.perf_counter()

    def save_best(self) -> None:
        """best.pt, of the best model held in memory; before the run's first last.pt, marked as such (a
        folder with a best.pt and no last.pt is then one that a resume starts again, not one that lost it)."""
        if self.best_ckpt is None:
            return
        if runfolder.marked(self.run_dir) != "saved":
            files.atomic_write_text(self.run_dir / runfolder.CHECKPOINTED, "saving")
        checkpoint.save(self.best_ckpt, self.run_dir / runfolder.BEST)
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
            print(f"\nstopped at once: {self.run_dir / runfolder.LAST} keeps the last point it saved; continue with: "
                  f"python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def interrupted(self, per_epoch: int) -> int:
        """Ctrl-C or SIGTERM: the state is that of the last complete step (or validation not begun)."""
        if self.lead:
            self.save(self.state())
            if self.history:
                logs.write_metrics(self.run_dir, self.history)
            print(f"\ninterrupted at {self.progress.where(per_epoch)}: saved {self.run_dir / runfolder.LAST}; "
                  f"continue with: python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def one_epoch(self, train_loader: DataLoader, val_loader: DataLoader, sampler: ResumableSampler,
                  use_features: bool) -> None:
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        sampler.set_epoch(epoch, start=progress.seen)
        heads.set_train_mode(self.model, True, cfg.mode)
        if self.writer is not None and epoch == 0 and not use_features and not progress.seen:
            x, _, _, _ = next(iter(train_loader))
            if x is not None:
                self.writer.add_images("train/augmented", x[:32], 0)
        stats = train_one_epoch(self.learner, train_loader, progress, sampler.per_rank, cfg.seed,
                                cfg.max_bad_fraction, f"epoch {epoch + 1}/{cfg.epochs}", self.lead, self.rank)
        heads.set_train_mode(self.model, False, cfg.mode)
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
                print(f"early stop: no better val {logs.metric_name(self.multi)} for {cfg.patience} epochs")

    def warn(self, line: str, epoch: int) -> None:
        """A run-health warning: on the screen, and in TensorBoard's text tab (summary.json has them all)."""
        if self.lead:
            imagecache.warn(line)
            self.writer.add_text("warnings", folders.shown(line), epoch)

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
        weights = state["model"] if due else heads.snapshot(self.model)
        if not self.best_averaged:
            return weights
        ema = self.learner.ema
        prefix = "" if ema.source is self.model else heads.head_of(self.model)[0] + "."
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
        logs.write_metrics(self.run_dir, self.history, curves=draw)
        logs.log_epoch(self.writer, row, confusion if draw else None, self.classes)
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
              + ("  *best*" if improved else "") + logs.unreadable(bad, val_bad))

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
        files.atomic_write_text(self.run_dir / runfolder.SUMMARY, json.dumps(summary, indent=1))

    def finish(self) -> None:
        hparams = {k: v for k, v in dataclasses.asdict(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        key = "best_val_map" if self.multi else "best_val_acc"
        self.writer.add_hparams(hparams, {f"hparam/{key}": self.best_acc, "hparam/epochs": self.progress.epoch},
                                run_name=".")
        self.writer.close()
        print(f"best val {logs.metric_name(self.multi)} {self.best_acc:.2f}% (epoch {self.best_epoch}); run folder "
              f"{self.run_dir}")
        if self.multi and self.thresholds:
            print(f"per-label thresholds (tuned on val for the best F1, never below {multilabel.MIN_THRESHOLD:g}): "
                  + ", ".join(f"{c}={t:.2f}" for c, t in zip(self.classes, self.thresholds)))
        if self.calibration:
            print(logs.calibration_line(self.calibration))
