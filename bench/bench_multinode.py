"""Data preparation on two machines, simulated on this one: until both machines' decoded-image caches are
ready, with the file check shared by the machines (now) against rank 0 checking every file alone while
the other machine waits, then builds its own cache (before), in the same run.

    python bench/bench_multinode.py                  # 2,000 generated 640x480 JPEGs
    python bench/bench_multinode.py --images 600

Each simulated machine is one process pinned to its own CPU core (so two of them have twice one's CPU, as
two machines do), with its own cache folder (a machine's local disk); they talk over gloo, as torchrun's
processes do. Both ways run the same code path: rank 0 checks the data through engine.from_lead, and each
machine's first process then builds its cache (what training.image_datasets does); "before" simply
passes no sharer. Writes bench/results-multinode.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import make_photos  # noqa: E402

SIZE = 144  # the resize size of --img-size 128


def machine(node: int, data: str, work: str, port: int, shared: bool) -> None:
    """One simulated machine: the check (rank 0's, shared or not), then this machine's cache, timed."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {node % os.cpu_count()})
    os.environ.update(RANK=str(node), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      IMGCLS_CACHE=os.path.join(work, f"cache-{node}"), OMP_NUM_THREADS="1")
    import dataclasses

    import torch.distributed as dist

    from imgcls.data import imagecache
    from imgcls.data import split as data_split
    from imgcls.training import distributed

    rank, _, _ = distributed.init_distributed()
    distributed.barrier(preparation=True)
    t0 = time.perf_counter()
    split = data_split.DataSplit(**distributed.from_lead(lambda: dataclasses.asdict(data_split.prepare_data(
        data, cache_size=SIZE, progress=False, share=distributed.share_check if shared else None)), rank == 0))
    checked = time.perf_counter() - t0
    cache = imagecache.ImageCache(split.files(), SIZE)
    cache.build(progress=False, skip={p for p, _ in split.skipped})  # training.image_datasets' step
    distributed.barrier(preparation=True)
    Path(work, f"node-{node}.json").write_text(json.dumps({"checked_s": checked, "ready_s": time.perf_counter() - t0,
                                                           "cache_ready": cache.ready}))
    dist.destroy_process_group()


def prepare(data: Path, shared: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as work:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=machine, args=(node, str(data), work, port, shared)) for node in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a simulated machine failed: exit codes {[p.exitcode for p in procs]}")
        nodes = [json.loads(Path(work, f"node-{n}.json").read_text()) for n in (0, 1)]
    assert all(n["cache_ready"] for n in nodes)
    # rank 0's check includes completing its own cache (the images the other machine checked)
    return {"both_caches_ready_s": max(n["ready_s"] for n in nodes), "rank0_check_s": nodes[0]["checked_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        print("error: needs two CPU cores (one per simulated machine)", file=sys.stderr)
        return 2
    data = make_photos(ROOT / "bench" / ".data" / f"multinode-{args.images}", args.images, (640, 480))
    before = prepare(data, shared=False)
    now = prepare(data, shared=True)
    result = {"images": args.images, "machine": f"{os.cpu_count()}-core VM, one core per simulated machine",
              "before": before, "now": now,
              "speedup_both_caches_ready": before["both_caches_ready_s"] / now["both_caches_ready_s"]}
    print(f"{args.images} photos, 2 simulated machines (one core each), until both machines' caches are ready:")
    print(f"  rank 0 checks alone, then the other machine builds: {before['both_caches_ready_s']:.1f} s")
    print(f"  check shared by the machines:                       {now['both_caches_ready_s']:.1f} s")
    print(f"  ratio: {result['speedup_both_caches_ready']:.2f}x")
    (ROOT / "bench" / "results-multinode.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
