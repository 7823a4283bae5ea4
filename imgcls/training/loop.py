"""The epoch loop (Loop): train, validate, keep the best, checkpoint, log, stop on request. What is kept is
in keep.py (Best, Checkpoints), what is said in logs.py (RunLog); the validation is here (Validation)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from imgcls import checkpoint, runfolder
from imgcls.cli import typed
from imgcls.data.loaders import ResumableSampler, make_loader
from imgcls.errors import Diverged, TrainingError
from imgcls.evaluation import calibration
from imgcls.evaluation.inference import all_reduce_sum, evaluate, predict
from imgcls.interrupts import HardStop, deferred_interrupts, stop_requested
from imgcls.networks import heads
from imgcls.recipes import progressive_size
from imgcls.training import keep, logs, optim, runstate
from imgcls.training.batchnorm import own_statistics, recompute_batchnorm
from imgcls.training.distributed import barrier, same_buffers
from imgcls.training.health import Health, largest_share
from imgcls.training.step import Learner, Progress, train_one_epoch


class Validation:
    """What is validated after each epoch, at full precision (the accuracy eval.py computes for best.pt): the
    trained weights (`inner`, each rank its shard) and with --ema their average. Precise BN's statistics
    (`batchnorms`, from the `statistics` images) are recomputed first."""

    def __init__(self, inner: nn.Module, learner: Learner, run: runstate.Run, loader: DataLoader,
                 batchnorms: list[str], statistics: DataLoader | None):
        self.inner, self.learner, self.loader = inner, learner, loader
        self.classes, self.multi, self.lead = len(run.split.classes), run.split.multilabel, run.lead
        self.batchnorms, self.statistics = batchnorms, statistics

    def __call__(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The trained weights' validation, and with --ema the average's."""
        learner, n = self.learner, self.classes
        averaged = [learner.ema.model.module] if learner.ema else []
        if self.statistics is not None:  # what is validated (and saved) has the statistics of its own weights
            for net in [self.inner, *averaged]:
                recompute_batchnorm(net, self.batchnorms, self.statistics, learner.to_input, learner.autocast)
        exact = contextlib.nullcontext
        same_buffers(self.inner, *averaged)  # (not its CPU counter)
        val = evaluate(self.inner, self.loader, learner.to_input, exact, num_classes=n, show=self.lead,
                       multi=self.multi)
        if learner.ema is None:
            return val, None
        return val, evaluate(learner.ema.model.module, self.loader, learner.to_input, exact, num_classes=n,
                               show=self.lead, multi=self.multi)

    def batch_statistics(self) -> float | None:
        """Validation accuracy of a copy of the network whose BatchNorm layers use each batch's own statistics
        (each rank's own batches: a SyncBatchNorm acts as a plain one); None without BatchNorm, or where a
        rank could not measure (every rank answers the same: each takes part in the sum)."""
        if not self.batchnorms or self.loader is None:
            return None
        net = copy.deepcopy(self.inner).eval()
        for name in self.batchnorms:
            own_statistics(net.get_submodule(name))
        # in a fixed shuffled order: the validation images come class by class, and a batch of one class has
        # statistics that normalise its class away. A lone last image has none (BatchNorm refuses a batch of
        # one on a 1x1 map, ResNet18's at 32 px): it joins the batch before it
        images, size = self.loader.dataset, self.loader.batch_size or 1
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            lone = batches.pop()
            batches[-1] += lone
        counts = torch.zeros(3, dtype=torch.float64)  # right answers, images, ranks that could not measure
        if batches:
            mixed = make_loader(images, size, self.loader.num_workers, self.learner.device, batches=batches)
            try:
                logits, y, _ = predict(net, mixed, self.learner.to_input, contextlib.nullcontext, show=False)
                counts[:2] = torch.tensor([float((logits.argmax(1) == y).sum()) if len(y) else 0.0, len(y)])
            except (RuntimeError, ValueError):  # a batch of one left by unreadable images, say
                counts[2] = 1
        right, seen, failed = all_reduce_sum(counts, self.learner.device).tolist()
        return None if failed or not seen else 100 * right / seen

    def calibrate(self, val: dict[str, Any]) -> dict[str, Any]:
        """Temperature scaling of the new best model, on the validation images it was chosen on, judged on
        those it was not fitted on (calibration.calibrate; every rank takes part: each holds a shard of them)."""
        device = self.learner.device

        def total(t: torch.Tensor) -> torch.Tensor:
            return all_reduce_sum(t, device)

        return calibration.calibrate(val["logits"], val["targets"], total)


class Loop:
    """The epochs of a run, from wherever it is, with its checkpoints, logs and interrupts."""

    def __init__(self, run: runstate.Run, model: nn.Module, learner: Learner, schedule: optim.Schedule,
                 validation: Validation):
        self.cfg, self.run_dir, self.model, self.learner = run.cfg, run.run_dir, model, learner
        self.schedule, self.classes, self.preprocess, self.validation = schedule, run.split.classes, \
            run.preprocess, validation
        self.weights_id, self.world, self.lead, self.rank = run.weights_id, run.world, run.lead, run.rank
        saved = run.start.ckpt or checkpoint.Saved()  # a new run: what a checkpoint without the fields says
        self.progress = Progress(**saved.progress) if saved.progress is not None else Progress(saved.epoch)
        self.history = list(saved.history)
        self.best = keep.Best.resumed(saved)
        self.multi, self.val_images = run.split.multilabel, len(run.split.val)
        self.time_before = saved.train_time_s
        self.log, self.checkpoints = logs.RunLog(run), keep.Checkpoints(run.run_dir, run.cfg.save_interval)
        split = run.split
        self.health = Health(largest_share(split.counts(split.val)), largest_share(split.counts(split.train)),
                             len(split.classes), self.multi, run.cfg.precise_bn, dict(saved.warnings), run.cfg.epochs)
        self.finished = False

    def state(self) -> checkpoint.Saved:
        """The checkpoint as it is now (last.pt's; the layout is in checkpoint.py)."""
        cfg, p, best, ema = self.cfg, self.progress, self.best, self.learner.ema
        return checkpoint.Saved(
            arch=cfg.model, classes=self.classes, preprocess=self.preprocess, model=self.model.state_dict(),
            mode=cfg.mode, net_options=self.model.net_options, config=dataclasses.asdict(cfg), epoch=p.epoch,
            progress=dataclasses.asdict(p), best_acc=best.acc, best_epoch=best.epoch, history=self.history,
            finished=self.finished, train_time_s=self.train_time(), weights_id=self.weights_id,
            optimizer=self.learner.optimizer.state_dict(), scaler=self.learner.scaler.state_dict(), world=self.world,
            calibration=best.calibration, best_confusion=best.confusion, multilabel=self.multi,
            thresholds=best.thresholds, best_ap=best.ap, ema=ema.state_dict() if ema else None,
            warnings=dict(self.health.said))

    def train_time(self) -> float:
        return self.time_before + time.perf_counter() - self.started

    def run(self, train_loader: DataLoader, sampler: ResumableSampler, use_features: bool) -> int:
        self.started = self.log.last_drawn = self.checkpoints.last_saved = time.perf_counter()
        with deferred_interrupts():  # also while saving and finishing: a Ctrl-C there is not lost
            try:
                while self.progress.epoch < self.cfg.epochs and not self.finished:
                    self.one_epoch(train_loader, sampler, use_features)
            except HardStop:
                return self.stopped_at_once()
            except KeyboardInterrupt:
                return self.interrupted(sampler.per_rank)
            except Exception as e:
                if stop_requested():  # a DataLoader worker ended by the same Ctrl-C or SIGTERM
                    return self.interrupted(sampler.per_rank)
                # a NaN, out of memory, a bug: the best model found so far is kept all the same
                if self.lead:
                    self.checkpoints.save_best()
                if isinstance(e, Diverged):
                    self.health.add("diverged", str(e))
                    if self.lead:
                        self.log.writer.add_text("warnings", str(e), self.progress.epoch + 1)
                        self.write_summary(self.train_time(), stopped="diverged")
                raise
            if self.lead:
                self.log.finish(self.best, self.progress.epoch)
        return 0

    def stopped_at_once(self) -> int:
        """A second Ctrl-C: the step under way may be half done, so nothing is saved from it."""
        if self.lead:
            self.checkpoints.save_best()  # a finished epoch's best model, held in memory: consistent
            print(f"\nstopped at once: {self.run_dir / runfolder.LAST} keeps the last point it saved; continue with: "
                  f"python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def interrupted(self, per_epoch: int) -> int:
        """Ctrl-C or SIGTERM: the state is that of the last complete step (or validation not begun)."""
        if self.lead:
            self.checkpoints.save(self.state())
            if self.history:
                logs.write_metrics(self.run_dir, self.history)
            print(f"\ninterrupted at {self.progress.where(per_epoch)}: saved {self.run_dir / runfolder.LAST}; "
                  f"continue with: python train.py --resume {typed(self.run_dir)}", file=sys.stderr)
        return 130

    def one_epoch(self, train_loader: DataLoader, sampler: ResumableSampler, use_features: bool) -> None:
        cfg, progress, epoch = self.cfg, self.progress, self.progress.epoch
        sampler.set_epoch(epoch, start=progress.seen)
        heads.set_train_mode(self.model, True, cfg.mode)
        if self.log.writer is not None and epoch == 0 and not use_features and not progress.seen:
            self.log.augmented(next(iter(train_loader))[0])
        stats = train_one_epoch(self.learner, train_loader, progress, sampler.per_rank, cfg.seed,
                                cfg.max_bad_fraction, f"epoch {epoch + 1}/{cfg.epochs}", self.lead, self.rank)
        heads.set_train_mode(self.model, False, cfg.mode)
        val, ema_val = self.validated(epoch + 1)
        self.schedule.end_epoch(val["score"])
        progress.next_epoch()
        row = logs.history_row(epoch + 1, stats, val, ema_val, self.multi, self.world)
        self.history.append(row)
        averaged = ema_val is not None and ema_val["score"] > val["score"]  # the average is the better model
        shown = ema_val if averaged else val
        improved = shown["score"] > self.best.acc
        if improved:
            self.best.take(shown, epoch + 1, averaged, self.multi, self.validation.calibrate)
        self.check_health(epoch + 1)
        stopping = cfg.patience > 0 and epoch + 1 - self.best.epoch >= cfg.patience
        self.finished = epoch + 1 == cfg.epochs or stopping
        if self.lead:
            self.end_epoch(row, shown.get("confusion"), improved, stats["bad"], self.val_images - val["images"])
        barrier()
        if stopping and self.lead:
            print(f"early stop: no better val {logs.metric_name(self.multi)} for {cfg.patience} epochs")

    def validated(self, epoch: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The epoch's validation, refused when it read no image or its loss diverged."""
        val, ema_val = self.validation()
        if not val["images"]:  # (its 0% would be recorded as the epoch's accuracy)
            raise TrainingError(f"no validation image could be read after epoch {epoch}: check the data folder "
                                "(python dataset.py check)")
        if self.health.diverged_loss(val["loss"]):  # the last steps diverged: NaN or absurd outputs, never "best"
            raise self.learner.diverged(f"validation loss became {val['loss']:.4g} after epoch {epoch} (a "
                                        f"uniform guess scores {self.health.guess_loss():.3f})")
        return val, ema_val

    def check_health(self, epoch: int) -> None:
        """The run-health checks, on the epochs at the final crop size (health.py)."""
        cfg, size = self.cfg, self.preprocess.img_size
        settled = [h for h in self.history if progressive_size(h["epoch"] - 1, cfg.epochs, size, cfg.progressive)
                   == size]
        for line in self.health.check(settled, self.validation.batch_statistics) if settled else []:
            self.log.warn(line, epoch)

    def end_epoch(self, row: dict[str, Any], confusion: list[list[int]] | None, improved: bool, bad: int,
                  val_bad: int = 0) -> None:
        """Metrics, pictures and checkpoints after an epoch (rank 0). The files a person reads are
        written before last.pt: a kill between them replays the epoch, which writes them again."""
        due = self.checkpoints.due(self.finished)
        state = self.state()
        if improved:
            self.checkpoints.hold_best(keep.best_checkpoint(state, self.history, self.model, self.learner.ema, due,
                                                            self.best.averaged))
        self.log.epoch(row, confusion, self.history, self.finished)
        if self.finished:
            self.write_summary(state.train_time_s)
        if due:
            self.checkpoints.save(state)
        print(self.log.epoch_line(row, improved, bad, val_bad))

    def write_summary(self, train_time_s: float, stopped: str | None = None) -> None:
        self.log.summary(self.best, self.progress.epoch, self.history, train_time_s, self.health.lines(), stopped)
