"""One command for a fresh GPU machine: the CUDA tests, then training and evaluation throughput, and a
one-GPU torchrun (NCCL) run; everything in one JSON file and a table. Under 8 minutes on one modern GPU.

    python bench/gpu_check.py                    # on the GPU machine: writes bench/results-gpu.json
    python bench/gpu_check.py --dry-run          # the same steps on the CPU at toy sizes (< 3 min)

Steps (each recorded as ok / failed / skipped with its reason, so one failure does not hide the rest):
  1. the machine: GPU name, capability, bf16, torch and CUDA versions
  2. training img/s on synthetic in-memory batches at 224 px, batch 256, for ResNet18, MobileNetV2 and
     VGG11: our training step (AMP, channels_last, fused AdamW) against a plain fp32 loop on the same
     model (the seed project's way), and against timm's model of the same architecture trained the way
     timm's train.py trains it, on the same settings (AMP of the same dtype with timm's NativeScaler,
     channels_last, timm's optimizer factory), when timm is installed (timm's vgg11 is another network:
     its classifier is a 7x7-convolution MLP, so it is not compared)
  3. train.py end to end on generated JPEGs through the decoded-image cache (img/s of its last epoch)
  4. eval.py img/s on the same images
  5. train.py under torchrun with one process (NCCL on a GPU)
  6. train.py on 48 small images with the DataLoader workers it picks, and with none (start-up costs)
  7. the CUDA tests (pytest -m cuda; the dry run runs them on the CPU, torch.compile left out), last, in
     what is left of --budget: each test's outcome and duration are recorded, also when time runs out
The JSON is rewritten after every step, so a check stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train import make_photos  # noqa: E402

from imgcls import machine as imgcls_machine  # noqa: E402
from imgcls.data import loaders  # noqa: E402
from imgcls.networks import build  # noqa: E402
from imgcls.training import step as training_step  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "vgg11")
# timm's name for the same architecture; None: timm has none (its vgg11 ends in a 7x7-convolution MLP)
TIMM_NAMES = {"mobilenet_v2": "mobilenetv2_100", "vgg11": None}
FULL = {"img_size": 224, "batch": 256, "steps": 20, "warmup": 5, "images": 2560, "photo": (640, 480),
        "epochs": 2, "budget": 460, "run_timeout": 180}
DRY = {"img_size": 32, "batch": 8, "steps": 3, "warmup": 1, "images": 60, "photo": (64, 48), "epochs": 1,
       "budget": 400, "run_timeout": 180}
RESULT = re.compile(r"^tests/\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
STARTED = re.compile(r"^tests/\S+::(\S+)\s*$")  # a test under way: its outcome not yet on its line
DURATION = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+tests/\S+::(\S+)")


def machine(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_count": os.cpu_count(), "torchvision": importlib.metadata.version("torchvision"),
            "timm": importlib.metadata.version("timm") if importlib.util.find_spec("timm") else None}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability()),
                 "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda,
                 "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    else:
        info |= {"gpu": None, "cpu": platform.processor() or platform.machine()}
    return info


def cuda_tests(dry: bool, timeout: float) -> dict[str, Any]:
    """pytest -m cuda in `timeout` seconds; each test's outcome and seconds, read from pytest's verbose
    output, also when time ran out (then the test under way is named)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-n", "0", "-m", "cuda", "-p", "no:cacheprovider", "--durations=0",
           "--durations-min=0.5", "tests/test_cuda.py"]
    if timeout < 30:
        return {"ok": None, "summary": f"skipped: {timeout:.0f} s of the budget left (--budget)"}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "IMGCLS_CACHE": cache, **({"IMGCLS_TEST_DEVICE": "cpu"} if dry else {})}
        # its own process group, so a test's torchrun and train.py children go too when time runs out
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            code = None
    lines = stdout.splitlines()
    tests = {m[1]: m[2] for m in map(RESULT.match, lines) if m}
    seconds: dict[str, float] = {}
    for m in filter(None, map(DURATION.match, lines)):
        seconds[m[3]] = round(seconds.get(m[3], 0) + float(m[1]), 1)
    if code is None:
        started = [m[1] for m in map(STARTED.match, lines) if m]
        summary = (f"stopped after {timeout:.0f} s (--budget): " + ", ".join(f"{v.lower()} {k}" for k, v in
                   tests.items()) + (f"; running: {started[-1]}" if started else ""))
    else:
        summary = lines[-1].strip("= ") if lines else stderr[-300:]
    return {"ok": code == 0, "summary": summary, "tests": tests, "seconds": seconds,
            **({} if code == 0 else {"output": stdout[-4000:] + stderr[-2000:]})}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step: Callable[[], None], device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """Steps per second times the batch, warm-up excluded, the device synchronised (honest timing)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def ours(name: str, device: torch.device, size: int, batch: int) -> Callable[[], None]:
    """Our training step (engine.train_step) as train.py sets it up: AMP, channels_last, fused AdamW."""
    net = build.build_model(name, 10, "scratch").to(device, memory_format=torch.channels_last)
    autocast, scaler = imgcls_machine.precision(device, amp=True)
    try:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    to_input = loaders.to_model_input(build.preprocessing(name, size), device)
    learner = training_step.Learner(net.train(), optimizer, scaler, torch.nn.CrossEntropyLoss(), to_input, autocast,
                                    device,
                             lambda start, end: 1.0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return lambda: training_step.train_step(learner, x, y, "the benchmark")


def plain(net: torch.nn.Module, device: torch.device, size: int, batch: int) -> Callable[[], None]:
    """A plain fp32 loop, contiguous memory, SGD: the seed project's step."""
    net = net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return step


def timm_recipe(name: str, device: torch.device, size: int, batch: int) -> Callable[[], None]:
    """timm's model trained as timm's train.py's loop trains it: autocast (the dtype ours uses, so the
    comparison is of the toolkits, not of number formats), NativeScaler, channels_last, create_optimizer_v2."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler

    net = timm.create_model(TIMM_NAMES.get(name, name), num_classes=10).to(device, memory_format=torch.channels_last)
    net.train()
    optimizer = create_optimizer_v2(net, opt="adamw", lr=1e-3)
    dtype = imgcls_machine.autocast_dtype(device, amp=True)
    scaler = NativeScaler() if dtype == torch.float16 else None
    criterion = torch.nn.CrossEntropyLoss().to(device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(net(x), y)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler(loss, optimizer, parameters=net.parameters())
    return step


def throughput(name: str, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    size, batch = p["img_size"], p["batch"]
    row: dict[str, Any] = {"model": name, "img_size": size, "batch": batch}
    try:
        return measure(row, name, device, p)
    finally:  # also after an out-of-memory error: the next model starts with the memory free
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def measure(row: dict[str, Any], name: str, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    size, batch = p["img_size"], p["batch"]
    row["ours_img_s"] = images_per_s(ours(name, device, size, batch), device, batch, p["steps"], p["warmup"])
    row["plain_fp32_img_s"] = images_per_s(plain(build.build_model(name, 10, "scratch"), device, size, batch), device,
                                           batch, p["steps"], p["warmup"])
    if importlib.util.find_spec("timm") is not None and TIMM_NAMES.get(name, name) is None:
        row["timm"] = f"not compared: timm's {name} is another network"
    elif importlib.util.find_spec("timm") is not None:
        row["timm_img_s"] = images_per_s(timm_recipe(name, device, size, batch), device, batch, p["steps"],
                                         p["warmup"])
        row["ours_vs_timm"] = row["ours_img_s"] / row["timm_img_s"]
    else:
        row["timm"] = "not installed (pip install timm to compare)"
    row["speedup_vs_plain"] = row["ours_img_s"] / row["plain_fp32_img_s"]
    return row


def run(cmd: list[str], timeout: int) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, out


def train_args(data: Path, out: Path, device: torch.device, p: dict[str, Any], model: str = "resnet18") -> list[str]:
    return ["--data", str(data), "--out", str(out), "--model", model, "--mode", "scratch", "--img-size",
            str(p["img_size"]), "--batch-size", str(p["batch"]), "--epochs", str(p["epochs"]), "--device",
            device.type, "--no-summary", "--save-interval", "600"]


def real_training(data: Path, work: Path, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    """train.py end to end: image check, cache, epochs; the last epoch's img/s (the cache is warm then)."""
    seconds, out = run([sys.executable, "train.py", *train_args(data, work / "train-run", device, p)],
                       p["run_timeout"])
    if out.returncode:
        return {"ok": False, "output": out.stderr[-3000:]}
    with open(work / "train-run" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {"ok": True, "wall_s": seconds, "last_epoch_img_s": float(last["img_per_s"]),
            "val_acc": float(last["val_acc"])}


def real_eval(data: Path, work: Path, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    """eval.py decoding every image (no cache): what a first evaluation of new images costs, start-up included."""
    n = sum(1 for _ in (data / "val").rglob("*.jpg"))
    startup, _ = run([sys.executable, "eval.py", "--help"], p["run_timeout"])
    seconds, out = run([sys.executable, "eval.py", str(data / "val"), "--checkpoint", str(work / "train-run"),
                        "--device", device.type, "--batch-size", str(p["batch"]), "--no-image-cache",
                        "--out", str(work / "eval")], p["run_timeout"])
    if out.returncode:
        return {"ok": False, "output": out.stderr[-3000:]}
    return {"ok": True, "images": n, "wall_s": seconds, "img_s_incl_startup": n / seconds, "help_s": startup}


def torchrun_one(data: Path, work: Path, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    seconds, out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "train.py", *train_args(data, work / "ddp-run", device, {**p, "epochs": 1})],
                       p["run_timeout"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    return {"ok": out.returncode == 0, "backend": backend, "wall_s": seconds,
            **({} if out.returncode == 0 else {"output": out.stderr[-3000:]})}


def small_runs(work: Path, device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    """train.py on 48 small images (the CUDA tests' size: 32 px, batch 8, 2 epochs) with the DataLoader
    workers it picks for the machine, and with none: what a worker pool costs a short run (each worker is
    a fork of a process holding a CUDA context), and so how much of a CUDA test's time is start-up."""
    data = make_photos(work / "small", 48, (64, 48))
    small = {**p, "img_size": 32, "batch": 8, "epochs": 2}
    out: dict[str, Any] = {"ok": True}
    for name, extra in (("auto_workers", []), ("no_workers", ["--workers", "0"])):
        seconds, done = run([sys.executable, "train.py", *train_args(data, work / f"small-{name}", device, small),
                             *extra], p["run_timeout"])
        out[f"{name}_s"] = seconds
        if done.returncode:
            out |= {"ok": False, "output": done.stderr[-3000:]}
            break
    return out


def step(results: dict[str, Any], name: str, work: Callable[[], Any], save: Callable[[], None]) -> None:
    """One step of the check; a failure is recorded and the next step runs; the JSON is saved after each."""
    t0 = time.perf_counter()
    try:
        results[name] = work()
    except Exception as e:  # recorded, not raised: the other steps still run
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    print(f"[{time.perf_counter() - t0:6.1f} s] {name}: " + ("failed" if isinstance(results[name], dict) and
                                                              results[name].get("ok") is False else "done"),
          flush=True)
    save()


def table(results: dict[str, Any]) -> str:
    m = results["machine"] if "torch" in results["machine"] else {"cpu": "unknown (the step failed)", "torch": "?"}
    lines = [f"machine: {m.get('gpu') or m.get('cpu')} (torch {m['torch']}" +
             (f", CUDA {m['cuda']}, bf16 {m['bf16']})" if m.get("gpu") else ")"),
             "", "| model | img px | batch | ours (img/s) | plain fp32 (img/s) | ours / plain | timm's recipe (img/s) "
             "| ours / timm |", "|---|---|---|---|---|---|---|---|"]
    for row in results.get("throughput", []):
        if "ours_img_s" in row:
            timm = (f"{row['timm_img_s']:.0f} | {row['ours_vs_timm']:.2f}x" if "timm_img_s" in row else "– | –")
            lines.append(f"| {row['model']} | {row['img_size']} | {row['batch']} | {row['ours_img_s']:.0f} | "
                         f"{row['plain_fp32_img_s']:.0f} | {row['speedup_vs_plain']:.2f}x | {timm} |")
        else:
            lines.append(f"| {row.get('model')} | failed: {row.get('error', '')[:80]} |")
    t, e, d = results.get("train", {}), results.get("eval", {}), results.get("torchrun", {})
    timm = next((r["timm"] for r in results.get("throughput", []) if "timm" in r), None)
    if timm:
        lines.append(f"(timm: {timm})")
    lines.append(f"\ntrain.py on generated JPEGs, cached: {t['last_epoch_img_s']:.0f} img/s (last epoch), "
                 f"{t['wall_s']:.0f} s in all" if t.get("ok") else "\ntrain.py: FAILED (its output is in the JSON)")
    lines.append(f"eval.py, decoding every image: {e['img_s_incl_startup']:.0f} img/s ({e['images']} images, "
                 f"{e['wall_s']:.0f} s with start-up and the report; eval.py --help {e['help_s']:.1f} s)"
                 if e.get("ok") else "eval.py: FAILED (its output is in the JSON)")
    lines.append(f"torchrun, 1 process ({d.get('backend')}): " + (f"ok, {d['wall_s']:.0f} s" if d.get("ok") else
                                                                  "FAILED"))
    r = results.get("small_runs", {})
    lines.append(f"train.py on 48 small images, 2 epochs: {r['auto_workers_s']:.1f} s with the workers it picks, "
                 f"{r['no_workers_s']:.1f} s with --workers 0" if r.get("ok") else "small runs: FAILED")
    slow = sorted(results.get("cuda_tests", {}).get("seconds", {}).items(), key=lambda kv: -kv[1])[:3]
    if slow:
        lines.append("slowest CUDA tests: " + ", ".join(f"{k} {v:.0f} s" for k, v in slow))
    tests = results.get("cuda_tests", {})
    lines.append(f"CUDA tests: {tests.get('summary', tests.get('error'))}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results-gpu.json, or "
                        "bench/results-gpu-dry-run.json with --dry-run)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests (step 7)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check; the CUDA tests, last, get what "
                        "is left (default: 460, or 400 with --dry-run)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; python bench/gpu_check.py --dry-run checks the script on the CPU",
              file=sys.stderr)
        return 2
    p = DRY if args.dry_run else FULL
    args.budget = p["budget"] if args.budget is None else args.budget
    out = args.out or ROOT / "bench" / f"results-gpu{'-dry-run' if args.dry_run else ''}.json"
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):  # before the (scarce) GPU minutes
        print(f"error: cannot write --out {out}: its folder does not exist or is not writable", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"dry_run": args.dry_run, "settings": {k: v for k, v in p.items() if k != "photo"},
                               "throughput": []}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    started = time.perf_counter()
    step(results, "machine", lambda: machine(device), save)
    for name in MODELS:
        box: dict[str, Any] = {}
        step(box, f"throughput {name}", lambda name=name: throughput(name, device, p), lambda: None)
        row = {"model": name, **next(iter(box.values()))}
        results["throughput"].append(row)
        save()
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k.endswith("img_s")), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("IMGCLS_CACHE", str(work / "cache"))
        data = make_photos(work / "photos", p["images"], p["photo"])
        step(results, "train", lambda: real_training(data, work, device, p), save)
        step(results, "eval", lambda: real_eval(data, work, device, p), save)
        step(results, "torchrun", lambda: torchrun_one(data, work, device, p), save)
        step(results, "small_runs", lambda: small_runs(work, device, p), save)
    if args.skip_tests:
        results["cuda_tests"] = {"ok": None, "summary": "skipped (--skip-tests)"}
    else:
        left = args.budget - (time.perf_counter() - started)
        step(results, "cuda_tests", lambda: cuda_tests(args.dry_run, left), save)
    print("\n" + table(results) + f"\n\nwrote {out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    failed += [r["model"] for r in results["throughput"] if "ours_img_s" not in r]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
