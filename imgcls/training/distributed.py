"""Distributed runs (torchrun): process groups, the lead's answers shared with every rank, and failures that stop
all."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imgcls.data import check
from imgcls.errors import TrainingError, UsageError, first_line

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
                              f"own output says why; {first_line(e)[:100]})")
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
        found, fill = check.check_share(mine, spec)
        return found

    try:
        gathered = all_or_none(share if rank in leads else dict)
    except BaseException:
        if fill is not None:
            fill.discard()
        raise
    results = {k: v for g in gathered for k, v in g.items()}
    all_or_none(lambda: finish_here(results) if inspect_here is not None and finish_here is not None
                else check.finish_cache(fill, results, spec))
    return results


def all_or_none(work: Callable[[], Any]) -> list[Any]:
    """work() on every rank, every rank's value gathered; when it fails anywhere, every rank stops: the
    failing one with its own error, rank 0 saying which rank failed and why, the others quietly."""
    error: BaseException | None = None
    try:
        mine = work()
    except BaseException as e:
        said = "interrupted" if isinstance(e, KeyboardInterrupt) else first_line(e)
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
