"""The machine a model runs on: the device, its precision (on a CPU with native bf16, bf16 or fp32 by
measurement), the CPU allocator, and how many loader workers.

bf16 or fp32 on a CPU: which trains this network faster, by measurement.

On a CPU with native bf16 (AVX512-BF16, AMX) bf16 autocast is not always the faster: at 64 px on a 2-core
Xeon, ResNet18 trains ~1.4x faster in bf16 and VGG11 ~1.8x, but MobileNetV2 ~1.4x slower (its depthwise
convolutions have no fast bf16 kernel). No table per family can know every network on every CPU, so a new
run that was not told --amp or --no-amp times a few training steps of its own network in each precision
and trains in the faster. The figures are kept in the cache folder, keyed by everything that decides them
(network, mode, input size, batch, memory format, CPU, threads, torch), so a machine measures a network once
and its runs agree; the choice is saved with the run, so a resume keeps it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls import files
from imgcls.errors import UsageError

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
    Heap-only allocation with no trimming measured 1.2x faster training here (docs/performance.md).
    A thread other than the main one (serve.py's model thread) allocates from heaps of its own, each
    unmapped whenever it is wholly free, whatever the trim threshold: one heap for all threads (four
    MobileNetV2 servers side by side under the same load ran 146-147 img/s each, against 90-147 before).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed chunks
            libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
            libc.mallopt(-8, 1)  # M_ARENA_MAX: threads made from now on use that heap too


def set_thread_threads(n: int) -> None:
    """The calling thread's torch threads: `n`, for good. torch.set_num_threads alone sets the calling thread's
    OpenMP count and also a process-wide default that any thread takes at its first parallel operation, even
    a thread that was given its own before (torch's lazy per-thread init): a server's decoding threads set to 1
    after its model thread was set to 2 left the model on one core, at 0.6 of its speed. Asking the count
    first does that init now, and what is set afterwards stays."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def release_freed_memory() -> None:
    """Give the freed memory that tune_cpu_allocator keeps back to the system (glibc's malloc_trim: the free
    pages anywhere in the heap, not only at its top), for a process that has gone idle: a server kept the
    peak of a burst of large uploads for good otherwise (eight of 30 MB at once: 180 MB more per worker)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def auto_workers(device: torch.device, cached: bool) -> int:
    """Workers only where they help: cached uint8 crops are cheap, and on a small CPU box every
    worker steals a core from the model's own threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 0 if cached or cpus <= 2 else min(4, cpus // 4)
    return min(8, max(1, cpus - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precision_name(device: torch.device, amp: bool) -> str:
    dtype = autocast_dtype(device, amp)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


STEPS = 3  # timed steps per precision, after one warm-up step each
MARGIN = 0.95  # bf16 is taken only when at least 5% faster: fp32 is the more exact, so ties go to it


def cpu_name() -> str:
    """The CPU's model name (what decides its kernels' speed), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def key(model_name: str, mode: str, img_size: int, batch: int, channels_last: bool) -> str:
    return json.dumps([model_name, mode, img_size, batch, channels_last, cpu_name(), torch.get_num_threads(),
                       torch.__version__])


def step_seconds(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """One forward + backward pass (the optimiser's step is fp32 either way)."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
        out = model(x)
    out.float().logsumexp(1).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(model: nn.Module, img_size: int, batch: int, memory_format: torch.memory_format) -> dict[str, float]:
    """Seconds per step of the model as it trains, in bf16 and in fp32: the fastest of STEPS each, after a
    warm-up step each, the two taken in turn (so a change in what else the machine does touches both). The
    model's buffers (BatchNorm statistics), gradients and the random state are as they were before."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=memory_format)
    kinds = {"bf16": torch.bfloat16, "fp32": None}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for _ in range(STEPS + 1):
            for kind, dtype in kinds.items():
                times[kind].append(step_seconds(model, x, dtype))
        return {kind: min(t[1:]) for kind, t in times.items()}  # the first of each is the warm-up
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)


def measured(path: Path, entry: str, compute) -> dict[str, float]:
    """The figures for `entry` from the file at `path`, else computed and added (a file that cannot be read
    or written only costs the measurement)."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(entry), dict):
        return known[entry]
    figures = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(path, json.dumps({**(known if isinstance(known, dict) else {}), entry: figures}))
    except OSError:
        pass
    return figures


def faster_is_bf16(figures: dict[str, float]) -> bool:
    return figures["bf16"] < MARGIN * figures["fp32"]
