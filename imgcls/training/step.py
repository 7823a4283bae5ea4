"""One training step and one epoch: the step's precision and gradient scaling, where training is
(Progress, so a resume lands on the same result), and the learner that holds model, optimiser and EMA."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgcls import interrupts
from imgcls.data import stratify
from imgcls.errors import Diverged, TrainingError, UsageError
from imgcls.training import ema as training_ema

# ----------------------------------------------------------------------------- loops

@dataclasses.dataclass
class Progress:
    """Where training is, exactly enough to resume there to the same result: completed epochs, and
    within the current epoch the sampler positions this rank has trained on and the running
    training statistics (so an epoch interrupted at any point is logged as if it had not been)."""
    epoch: int = 0  # completed epochs: trained and validated
    seen: int = 0  # sampler positions of the current epoch already trained on (unreadable ones too)
    global_step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    bad: int = 0
    time_s: float = 0.0
    lr: float = 0.0  # of the last step

    def where(self, per_epoch: int) -> str:
        """The point a run stopped at, said the same way when it is interrupted and when it resumes."""
        if self.seen == 0:
            return f"the start of epoch {self.epoch + 1}"
        if self.seen >= per_epoch:
            return f"epoch {self.epoch + 1}, trained and not yet validated"
        return f"epoch {self.epoch + 1}, {self.seen} of its {per_epoch} training images done"

    def stats(self) -> dict[str, float]:
        n = max(1, self.images)
        return {"loss": self.loss_sum / n, "acc": 100 * self.correct / n, "images": self.images,
                "img_per_s": self.images / max(self.time_s, 1e-9), "bad": self.bad, "time_s": self.time_s,
                "lr": self.lr}

    def next_epoch(self) -> None:
        self.epoch, self.seen = self.epoch + 1, 0
        self.loss_sum, self.correct, self.images, self.bad, self.time_s = 0.0, 0, 0, 0, 0.0


@dataclasses.dataclass
class Learner:
    """What one optimisation step needs. `lr_factor(start, end)` is the schedule's factor for a step
    from position `start` to `end` in the run, in epochs; each param group's lr is its base_lr times it."""
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    to_input: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable
    device: torch.device
    lr_factor: Callable[[float, float], float]
    mix: Callable | None = None
    ema: training_ema.Ema | None = None
    multilabel: bool = False  # targets are multi-hot: no training accuracy to count
    precision: str = "fp32"  # what the forward pass runs in: fp32, bf16 or fp16 (for the advice on a NaN)

    def diverged(self, said: str) -> Diverged:
        """A NaN or infinite loss, said with what to change: the lr (a third of the run's), and fp16's range."""
        lr, base = self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[0]["base_lr"]
        return Diverged(f"{said} (lr {lr:.3g}, {self.precision}): the training diverged; try --lr {base / 3:.2g} (a "
                        "third of this run's) or find one with --lr-find" +
                        (", or --no-amp (fp16's range is narrow: large activations overflow)"
                         if self.precision == "fp16" else "") + "; the checkpoints written so far are kept")


def train_one_epoch(learner: Learner, loader: DataLoader, progress: Progress, per_epoch: int, seed: int,
                    max_bad_fraction: float = 0.5, desc: str = "", show: bool = True, rank: int = 0
                    ) -> dict[str, float]:
    """Train on what the loader yields, continuing `progress` (which may be mid-epoch). Every step's
    randomness (dropout, mixup) is seeded from (seed, epoch, position, rank), so a resumed run
    replays exactly what the unbroken run would have done."""
    opt, t0, time_before = learner.optimizer, time.perf_counter(), progress.time_s
    # BatchNorm cannot train on a batch of one (a last partial batch, or one left by unreadable files):
    # that image waits for the next epoch's shuffle. Every rank has the same batch sizes, so all skip.
    needs_two = trains_batchnorm(learner.net)
    check_batch_size(learner.net, loader.batch_size or 1)
    bar = tqdm(loader, desc=desc, disable=not show or None, leave=False, dynamic_ncols=True)
    for x, y, _, n_bad in bar:
        n = len(y) + n_bad
        if n_bad > max_bad_fraction * n:
            raise TrainingError(f"{n_bad} of {n} images in a batch could not be read (limit "
                                f"--max-bad-fraction {max_bad_fraction}): check the data folder")
        factor = learner.lr_factor(progress.epoch + progress.seen / per_epoch,
                                   progress.epoch + (progress.seen + n) / per_epoch)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        progress.lr = opt.param_groups[0]["lr"]
        torch.manual_seed(stratify.derived_seed(seed, progress.epoch, progress.seen, rank))
        if x is not None and not (needs_two and len(y) == 1):  # else nothing (trainable) in this batch
            batch = progress.seen // max(1, loader.batch_size or 1) + 1
            loss, correct = train_step(learner, x, y, f"epoch {progress.epoch + 1}, batch {batch}")
            progress.loss_sum += loss * len(y)
            progress.correct += correct
            progress.images += len(y)
            progress.global_step += 1
        progress.seen += n
        progress.bad += n_bad
        progress.time_s = time_before + time.perf_counter() - t0
        stats = progress.stats()
        bar.set_postfix(loss=f"{stats['loss']:.3f}", **({} if learner.multilabel else {"acc": f"{stats['acc']:.1f}"}),
                        img_s=f"{stats['img_per_s']:.0f}")
        interrupts.check_stop()  # a consistent point: this step is complete and counted
    return progress.stats()


def check_batch_size(net: nn.Module, batch_size: int) -> None:
    """A network in training mode that trains BatchNorm cannot learn from batches of one."""
    if batch_size == 1 and trains_batchnorm(net):
        raise UsageError("--batch-size 1 cannot train a network with BatchNorm layers (each needs two images or "
                         "more): use --batch-size 2 or more")


def trains_batchnorm(net: nn.Module) -> bool:
    """Whether a training step updates BatchNorm statistics: then a batch needs two images or more."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def train_step(learner: Learner, x: torch.Tensor, y: torch.Tensor, where: str) -> tuple[float, int]:
    """One optimizer step; (loss, correct predictions).

    One host sync per step, taken after the backward pass is queued: the GPU works through the backward
    while the host waits for the loss, so it is never left idle (a sync right after the forward pass, or
    one after the optimizer step, drains its queue every step). A non-finite loss is caught before the
    optimizer step, so the weights and the optimizer's state stay as they were."""
    x, y = learner.to_input(x), y.to(learner.device, non_blocking=True)
    target = y
    if learner.mix is not None:
        x, target = learner.mix(x, y)
    with learner.autocast():
        logits = learner.net(x)
        loss = learner.criterion(logits, target)
    correct = torch.zeros((), device=logits.device) if learner.multilabel else (logits.argmax(1) == y).sum()
    diverged = (~torch.isfinite(loss.detach())).float().reshape(1)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    if dist.is_initialized():  # DDP has averaged one rank's NaN gradients into every rank's: all stop here
        dist.all_reduce(diverged)
    value, right, anywhere = torch.cat([loss.detach().float().reshape(1), correct.float().reshape(1), diverged]
                                       ).tolist()
    if anywhere:
        learner.optimizer.zero_grad(set_to_none=True)
        said = f"loss became {value}" if not math.isfinite(value) else "loss became non-finite in another process"
        raise learner.diverged(f"{said} at {where}")
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    if learner.ema is not None:
        learner.ema.update()
    return value, int(right)
