"""The loop and the machine it runs on: device, precision and processes, the data loaders, one training
epoch, prediction and evaluation, and the handling of Ctrl-C and SIGTERM.

Precision and device are chosen once (`precision()` returns an autocast context and a scaler), so the
loops have no device branches; the same loops run on CPU, CUDA, MPS and under torchrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

import checkpoint
import dataset
import models
import multilabel
import splits
from checkpoint import Preprocess
from config import Diverged, TrainingError, UsageError

# ----------------------------------------------------------------------------- machine

def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA, then Apple MPS, then CPU; an explicit device that is not there is a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = f"cuda:{local_rank}"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to this PyTorch build; use --device cpu")
        check_gpu_supported(device)
        if device.index is not None:  # what autocast, the bf16 check and the pinning thread look at
            torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple MPS is not available here; use --device cpu")
    return device


def check_gpu_supported(device: torch.device) -> None:
    """Old GPUs (e.g. a K80, sm_37) have no kernels in current wheels: say so before training."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = [a for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+[a-z]?", a)]
    if archs and major * 10 + minor < min(int(re.sub(r"\D", "", a)) for a in archs):
        raise UsageError(f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) is not supported by this "
                         f"PyTorch build (needs one of {', '.join(archs)}): install an older PyTorch "
                         "for this GPU, or use --device cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 (AVX512-BF16 or AMX): there bf16 autocast trains ~1.9x faster; elsewhere it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """CUDA: bf16 where supported, else fp16; CPU: bf16 only where the CPU has it natively; else None.
    `amp` None (a run's default before it is settled by measurement) counts as on, as the default was."""
    amp = amp is not False
    if amp and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp and device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def precision(device: torch.device, amp: bool) -> tuple[Any, torch.amp.GradScaler]:
    """Chosen once, so the loop has no device branches: autocast context + (maybe disabled) scaler;
    fp16 needs the scaler."""
    dtype = autocast_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    return (lambda: torch.autocast(device.type, dtype=dtype),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in the process instead of returning it to the OS each step.

    glibc serves allocations over 32 MB (a ResNet's activations at batch 64) with fresh mmap()s,
    so every step page-faults its memory in again: 40% of CPU time in the kernel on a 2-core box.
    Heap-only allocation with no trimming measured 1.2x faster training here (README, Performance).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed chunks
            libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


def auto_workers(device: torch.device, cached: bool) -> int:
    """Workers only where they help: cached uint8 crops are cheap, and on a small CPU box every
    worker steals a core from the model's own threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 0 if cached or cpus <= 2 else min(4, cpus // 4)
    return min(8, max(1, cpus - 1))


# Training steps wait on each other for at most STEP_TIMEOUT (a rank that hangs is found in minutes);
# preparing the data (checking every file, building the caches: hours for a million images) goes
# through its own group, on the CPU (gloo), which waits up to PREPARATION_TIMEOUT
STEP_TIMEOUT = datetime.timedelta(minutes=30)
PREPARATION_TIMEOUT = datetime.timedelta(days=2)
PREPARATION: dict[str, Any] = {}  # "group": the preparation's process group, once started


def init_distributed(device: str = "auto") -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process groups when launched by torchrun. With a GPU
    (and `device` not cpu/mps), NCCL for CUDA tensors and gloo for CPU ones in the same group, so a CPU
    tensor sent by any collective (an object, a counter) does not stop NCCL; each process on its GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the folds of a cross-validation share one group
        return dist.get_rank(), world, local_rank
    on_gpu = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo", timeout=STEP_TIMEOUT)
    PREPARATION["group"] = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return dist.get_rank(), world, local_rank


def barrier(preparation: bool = False) -> None:
    """Every rank waits for the others; while the data is prepared, as long as that takes."""
    if dist.is_initialized():
        dist.barrier(group=PREPARATION.get("group") if preparation else None)


def broadcast(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (sent while the data is prepared: no step timeout)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=PREPARATION.get("group"))
    return box[0]


FAILED = "__rank-0-failed__"  # sent in place of a result: rank 0 stopped, with its own message
JOB = "__check-a-share__"  # sent while rank 0 prepares the data: every machine checks a share of the files


class Stopped(SystemExit):
    """Every rank already knows the run is off (a failure was shared inside a job): nothing more to send."""


def from_lead(work: Callable[[], Any], lead: bool, mine: dict[str, Any] | None = None) -> Any:
    """work() done by rank 0 (checking the data, making the run folder), its result on every rank. When
    it fails, rank 0 raises as usual (one line for bad input) and the other ranks stop quietly with the
    same exit status, instead of each printing a broken connection's traceback. While rank 0 works, the
    others take the jobs it sends (share_check), with `mine`: this process's own settings for them (its
    cache folder)."""
    if not dist.is_initialized():
        return work()
    if lead:
        try:
            value = work()
        except BaseException as e:
            if not isinstance(e, Stopped) and not getattr(e, "shared", False):
                collective(broadcast, (FAILED, exit_code(e)))
            raise
        return collective(broadcast, value)
    value = collective(broadcast, None)
    while isinstance(value, tuple) and len(value) == 3 and value[0] == JOB:
        run_check(value[1], {**value[2], **(mine or {})})
        value = collective(broadcast, None)
    if isinstance(value, tuple) and len(value) == 2 and value[0] == FAILED:
        raise SystemExit(value[1])
    return value


def collective(send: Callable, *args: Any) -> Any:
    """A collective of the data preparation; another process gone (killed, its machine stopped) is a
    one-line error here, not a broken connection's traceback."""
    try:
        return send(*args)
    except RuntimeError as e:
        error = TrainingError("another process of this torchrun job stopped while the data was being prepared (its "
                              f"own output says why; {checkpoint.first_line(e)[:100]})")
        error.shared = True  # (nothing more can be sent)
        raise error from None


def exit_code(e: BaseException) -> int:
    return 2 if isinstance(e, UsageError) else 130 if isinstance(e, KeyboardInterrupt) else \
        e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1


def share_check(paths: list[str], spec: dict[str, Any], inspect_here: Callable[[list[str]], dict],
                finish_here: Callable[[dict], None]) -> dict:
    """Rank 0's file check, shared: the first process of each machine inspects every n-th file (decoding
    it into its own machine's cache on the way), the results are gathered; each machine then completes
    its cache with the others' images. A check on one machine of n takes 1/n of the time, and the other
    machines no longer wait for the whole check before building their caches."""
    collective(broadcast, (JOB, paths, spec))
    return run_check(paths, spec, inspect_here, finish_here)


def run_check(paths: list[str], spec: dict[str, Any], inspect_here: Callable[[list[str]], dict] | None = None,
              finish_here: Callable[[dict], None] | None = None) -> dict:
    """Every rank's part of share_check; rank 0 passes its own inspect and finish (for the cache it has
    begun). A failure anywhere, while checking or while completing a cache, is shared, so every rank
    stops (rank 0 saying why) instead of waiting on the others."""
    rank, world = dist.get_rank(), dist.get_world_size()
    machine_leads = [None] * world
    collective(dist.all_gather_object, machine_leads, int(os.environ.get("LOCAL_RANK", "0")) == 0,
               PREPARATION.get("group"))
    leads = [r for r, first in enumerate(machine_leads) if first]
    fill = None

    def share() -> dict:
        nonlocal fill
        mine = paths[leads.index(rank)::len(leads)]
        if inspect_here is not None:
            return inspect_here(mine)
        found, fill = dataset.check_share(mine, spec)
        return found

    try:
        gathered = all_or_none(share if rank in leads else dict)
    except BaseException:
        if fill is not None:
            fill.discard()
        raise
    results = {k: v for g in gathered for k, v in g.items()}
    all_or_none(lambda: finish_here(results) if inspect_here is not None and finish_here is not None
                else dataset.finish_cache(fill, results, spec))
    return results


def all_or_none(work: Callable[[], Any]) -> list[Any]:
    """work() on every rank, every rank's value gathered; when it fails anywhere, every rank stops: the
    failing one with its own error, rank 0 saying which rank failed and why, the others quietly."""
    error: BaseException | None = None
    try:
        mine = work()
    except BaseException as e:
        said = "interrupted" if isinstance(e, KeyboardInterrupt) else checkpoint.first_line(e)
        error, mine = e, (FAILED, exit_code(e), said, dist.get_rank())
    gathered = [None] * dist.get_world_size()
    collective(dist.all_gather_object, gathered, mine, PREPARATION.get("group"))
    failed = next((g for g in gathered if isinstance(g, tuple) and g[:1] == (FAILED,)), None)
    if failed is None:
        return gathered
    if error is not None:
        error.shared = True  # (every rank knows: from_lead sends nothing more)
        raise error
    _, code, said, where = failed
    if dist.get_rank() == 0:
        print(f"error: process {where} stopped while the data was being prepared: {said}", file=sys.stderr)
    raise Stopped(code)


def same_buffers(*modules: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP sends them at the start of each training
    forward, so after an epoch's last step each rank holds its own; validation must see the saved model."""
    if dist.is_initialized():
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data

class ResumableSampler(Sampler[tuple[int, int, int]]):
    """Shuffled (or class-balanced) order fixed by (seed, epoch), split across ranks like
    DistributedSampler, and able to start mid-epoch so an interrupted epoch resumes where it stopped.
    Yields (index, epoch, draw), draw counting the image's earlier draws in the epoch's whole order (the
    balanced sampler draws a rare image many times; padding repeats some): the dataset seeds each image's
    augmentation from them, so each draw is a view of its own, and augmentation depends neither on the
    worker count nor on where a run was interrupted."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, weights: torch.Tensor | None = None):
        self.n, self.seed, self.rank, self.world, self.weights = n, seed, rank, world, weights
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        order = torch.cat([order, order[: self.per_rank * self.world - self.n]])  # pad like DistributedSampler
        drawn: dict[int, int] = {}
        keys = []
        for i in order.tolist():
            keys.append((i, self.epoch, drawn.get(i, 0)))
            drawn[i] = drawn.get(i, 0) + 1
        return iter(keys[self.rank::self.world][self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class Features(Dataset):
    """Cached backbone features, served like images: (feature, label, index)."""

    def __init__(self, x: torch.Tensor, labels: list[int]):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.labels[i], i


def make_loader(ds: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None) -> DataLoader:
    """No more worker processes than batches in an epoch: each is a fork of the whole process (with a
    CUDA context, on a GPU), and a small validation set has work for one or two."""
    n = sampler.per_rank if isinstance(sampler, ResumableSampler) else len(sampler if sampler is not None else ds)
    workers = min(workers, math.ceil(n / batch_size))
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=dataset.collate, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=ignore_ctrl_c if workers > 0 else None)


def ignore_ctrl_c(_: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops at the end of the current step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shard(ds: Dataset, rank: int, world: int) -> Dataset:
    """Every validation image on exactly one rank: no padding, so metrics count each image once."""
    return ds if world == 1 else Subset(ds, range(rank, len(ds), world))


def to_model_input(preprocess: Preprocess, device: torch.device,
                   memory_format: torch.memory_format = torch.channels_last) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch on the CPU -> normalised float batch on the device, in the model's memory format."""
    normalize = models.Normalize(preprocess.mean, preprocess.std).to(device)
    return lambda x: normalize(x.to(device, non_blocking=True)).contiguous(memory_format=memory_format)


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
    ema: Ema | None = None
    multilabel: bool = False  # targets are multi-hot: no training accuracy to count
    precision: str = "fp32"  # what the forward pass runs in: fp32, bf16 or fp16 (for the advice on a NaN)

    def diverged(self, said: str) -> Diverged:
        """A NaN or infinite loss, said with what to change: the lr (a third of the run's), and fp16's range."""
        lr, base = self.optimizer.param_groups[0]["lr"], self.optimizer.param_groups[0]["base_lr"]
        return Diverged(f"{said} (lr {lr:.3g}, {self.precision}): the training diverged; try --lr {base / 3:.2g} (a "
                        "third of this run's) or find one with --lr-find" +
                        (", or --no-amp (fp16's range is narrow: large activations overflow)"
                         if self.precision == "fp16" else "") + "; the checkpoints written so far are kept")


def precision_name(device: torch.device, amp: bool) -> str:
    dtype = autocast_dtype(device, amp)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class Ema:
    """An exponential moving average of a module's weights and buffers (torch's AveragedModel), updated
    after every step. The decay warms up ((1 + n) / (10 + n) after n updates) and is capped so that the
    average spans about the last tenth of the run: a short run is not averaged over its random start."""

    def __init__(self, source: nn.Module, decay: float, total_steps: int):
        from torch.optim.swa_utils import AveragedModel

        self.source = source
        self.decay = min(decay, 1 - 10 / max(20, total_steps))
        self.model = AveragedModel(source, use_buffers=True).eval()  # the container: its state dict as before
        pairs = list(zip([*self.model.module.parameters(), *self.model.module.buffers()],
                         [*source.parameters(), *source.buffers()]))
        floats = [(a, c) for a, c in pairs if torch.is_floating_point(a)]
        self.averaged, self.current = [a for a, _ in floats], [c for _, c in floats]
        self.counters = [(a, c) for a, c in pairs if not torch.is_floating_point(a)]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """AveragedModel.update_parameters' arithmetic without its host syncs: it moves its CPU step
        counter to the GPU once per dtype each step, a blocking copy that drains the GPU's queue. The
        first update copies; then floats move towards the source, counters (BatchNorm's
        num_batches_tracked) take its value."""
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        if self.averaged and self.steps == 0:
            torch._foreach_copy_(self.averaged, self.current)
        elif self.averaged:
            torch._foreach_lerp_(self.averaged, self.current, 1 - decay)
        for a, c in self.counters:
            a.copy_(c)
        self.model.n_averaged += 1  # (a CPU tensor: kept for the state dict, as AveragedModel keeps it)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]


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
        torch.manual_seed(splits.derived_seed(seed, progress.epoch, progress.seen, rank))
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
        check_stop()  # a consistent point: this step is complete and counted
    return progress.stats()


# ----------------------------------------------------------------------------- BatchNorm statistics

PRECISE_BN_IMAGES = 256  # at most this many training images recompute BatchNorm's statistics (precise BN)


def precise_bn_images(train_images: int) -> int:
    """How many training images recompute the statistics before each validation: a quarter of the training
    images, at least 64 and at most PRECISE_BN_IMAGES (cheap beside an epoch: one forward pass each)."""
    return min(train_images, PRECISE_BN_IMAGES, max(64, train_images // 4))


def trained_batchnorms(net: nn.Module) -> list[str]:
    """The BatchNorm layers a training step updates (in transfer mode, none of the frozen backbone's)."""
    return [name for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, names: list[str], loader: DataLoader, to_input: Callable,
                        autocast: Callable) -> int:
    """Precise BN: the running statistics of the BatchNorm layers `names`, computed afresh as the average
    over the loader's batches, with the weights as they are now. The running averages a training step
    keeps (momentum 0.1) trail the weights by ~10 steps and start at mean 0, variance 1: where the true
    variance is 1e-3 (after torchvision's depthwise convolutions) that start outweighs it for ~90 steps,
    and a network validated in between sees inputs scaled wrongly at every layer (MobileNetV2 from scratch
    stayed at chance). Only those layers run in training mode: dropout and stochastic depth stay off,
    as in evaluation. Under torchrun each process takes its share and the statistics are averaged. Returns
    the number of images used (0: the statistics are left as they were)."""
    layers = [net.get_submodule(name) for name in names]
    if not layers:
        return 0
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in layers]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    images = 0
    try:
        for x, y, _, _ in loader:
            if x is not None and len(y) > 1:  # (BatchNorm cannot take a batch of one)
                with autocast():
                    net(to_input(x))
                images += len(y)
    finally:
        for m, training in modes:
            m.training = training
        for m, (mean, var, count, momentum) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
            if not images:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
    return average_statistics(layers, images)


def average_statistics(layers: list[nn.Module], images: int) -> int:
    """Each process's statistics weighted by its images, averaged over the processes; the images in all."""
    if not dist.is_initialized():
        return images
    flat = torch.cat([torch.cat([m.running_mean, m.running_var]).float() * images for m in layers] +
                     [torch.tensor([float(images)], device=layers[0].running_mean.device)])
    dist.all_reduce(flat)
    total = int(flat[-1].item())
    if total:
        at = 0
        for m in layers:
            size = m.running_mean.numel()
            m.running_mean.copy_(flat[at:at + size] / total)
            m.running_var.copy_(flat[at + size:at + 2 * size] / total)
            at += 2 * size
    return total


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


# ----------------------------------------------------------------------------- stopping cleanly

class HardStop(KeyboardInterrupt):
    """A second Ctrl-C: raised at once, wherever the run is; nothing from that moment is saved."""


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM during training: the step (or validation batch) under way finishes,
    then KeyboardInterrupt is raised where the state is consistent, so what is saved resumes exactly.
    A second signal interrupts at once."""
    requested = False


def check_stop() -> None:
    if StopRequest.requested:
        StopRequest.requested = False
        raise KeyboardInterrupt


def stop_requested() -> bool:
    return StopRequest.requested


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `kill`) raises KeyboardInterrupt like Ctrl-C, so what is
    half-written (a cache's temp file) is cleaned up on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM ask for a clean stop (see StopRequest)."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if StopRequest.requested:
            raise HardStop
        StopRequest.requested = True

    StopRequest.requested = False
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        StopRequest.requested = False


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable,
            desc: str = "predicting", show: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, dataset indices) for every readable item, in loader order, on the CPU."""
    outs, targets, indices = [], [], []
    for x, y, idx, _ in tqdm(loader, desc=desc, disable=not show or None, leave=False, dynamic_ncols=True):
        if x is None:
            continue
        with autocast():
            outs.append(model(to_input(x)).float().cpu())
        targets.append(y)
        indices.append(idx)
        check_stop()
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(targets), torch.cat(indices)


def evaluate(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable,
             num_classes: int, show: bool = True, multi: bool = False) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix; exact across ranks (each image is on one rank only). Also
    this rank's logits and targets, for calibration. `score` is what picks the best model: the accuracy,
    or for a multi-label model (`multi`) the mAP."""
    if multi:
        return evaluate_multilabel(model, loader, to_input, autocast, show)
    logits, y, _ = predict(model, loader, to_input, autocast, desc="validating", show=show)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    if len(y):
        cm += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
    if dist.is_initialized():
        both = torch.cat([cm, loss_sum]).to(next(model.parameters()).device)
        dist.all_reduce(both)
        cm, loss_sum = both[:-1].cpu(), both[-1:].cpu()
    cm = cm.view(num_classes, num_classes).long()
    n = int(cm.sum())
    acc = 100 * float(cm.trace()) / max(1, n)
    return {"loss": float(loss_sum) / max(1, n), "acc": acc, "score": acc, "confusion": cm.tolist(), "images": n,
            "logits": logits, "targets": y}


def evaluate_multilabel(model: nn.Module, loader: DataLoader, to_input: Callable, autocast: Callable,
                        show: bool = True) -> dict[str, Any]:
    """Loss, mAP, per-label AP and F1 at 0.5 of a multi-label model. AP ranks all the images at once, so
    every rank gathers every rank's outputs: all compute the same numbers (and thresholds, later)."""
    logits, y, _ = predict(model, loader, to_input, autocast, desc="validating", show=show)
    if dist.is_initialized():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (logits, y))
        logits = torch.cat([p[0] for p in parts if len(p[1])] or [logits])
        y = torch.cat([p[1] for p in parts if len(p[1])] or [y])
    if not len(y):
        return {"loss": 0.0, "map": 0.0, "f1": 0.0, "score": 0.0, "ap": [], "images": 0, "logits": logits,
                "targets": y}
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y.float()))
    truth, probs = y.numpy().astype(np.int64), torch.sigmoid(logits).numpy()
    ap = multilabel.average_precision(truth, probs)
    f1 = multilabel.micro_f1(truth, probs, [multilabel.DEFAULT_THRESHOLD] * truth.shape[1])
    score = multilabel.mean_ap(ap)
    return {"loss": loss, "map": score, "f1": f1, "score": score,
            "ap": [None if np.isnan(a) else float(a) for a in ap], "images": len(y), "logits": logits, "targets": y}


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of `t` over processes (itself when there is one), on the CPU in float64."""
    if not dist.is_initialized():
        return t
    t = t.double().to(device)
    dist.all_reduce(t)
    return t.cpu()
