"""bf16 or fp32 on a CPU: which trains this network faster, by measurement.

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
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

import files

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
