"""The CUDA path (marker `cuda`): mixed precision, memory format, compile, interrupts, eval, export, NCCL
and pinned-memory loading on a GPU. Skipped without one. bench/gpu_check.py runs them first on a GPU
machine; its --dry-run runs them on the CPU (IMGCLS_TEST_DEVICE=cpu), so they are known to work before a
GPU is at hand.

    python -m pytest -m cuda                          # on a GPU machine
    IMGCLS_TEST_DEVICE=cpu python -m pytest -m cuda   # the same tests on the CPU
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Killed, kill_after_saving, make_folder, train_args

import eval as evaluate
import export
import train
from imgcls import machine
from imgcls.data import loaders
from imgcls.networks import build
from imgcls.training import ema
from imgcls.training import step as training_step

DEVICE = os.environ.get("IMGCLS_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                                   reason="no CUDA GPU (IMGCLS_TEST_DEVICE=cpu runs these on the CPU)")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda-data")
    make_folder(root / "train", per_class=16)
    make_folder(root / "val", per_class=6, offset=400)
    return root


def run_on_device(data: Path, out: Path, *extra: str) -> dict:
    # (a cache folder of its own: module fixtures run before the per-test isolation of conftest)
    assert train.main(train_args(data, out, "--mode", "scratch", "--device", DEVICE, "--optimizer", "adam",
                                 "--lr", "0.002", "--hflip", "0", "--cache-dir", str(out.parent / "cache"),
                                 *extra)) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_precision(data, tmp_path_factory) -> dict:
    return run_on_device(data, tmp_path_factory.mktemp("fp32") / "run", "--epochs", "3", "--no-amp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_learns_like_full_precision(dtype, data, full_precision, tmp_path, monkeypatch):
    """bf16, and fp16 with its GradScaler (forced, whatever the GPU would choose)."""
    monkeypatch.setattr(machine, "autocast_dtype", lambda device, amp: dtype if amp else None)
    mixed = run_on_device(data, tmp_path / "run", "--epochs", "3", "--amp")
    assert mixed["best_val_acc"] >= min(90.0, full_precision["best_val_acc"] - 10), (mixed, full_precision)
    if dtype == torch.float16:
        scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
        assert scaler and scaler["scale"] > 0  # the scaler was on, and never saw an overflow it could not undo


def test_channels_last_gives_the_same_results_within_tolerance():
    """The same weights and batch in either memory format: the same logits and gradients within tolerance.
    (Compared a step at a time: on a GPU the formats pick other kernels, TF32 convolutions round
    differently, and whole training runs drift apart from such differences.)"""
    torch.manual_seed(0)
    base = build.build_model("resnet18", 3, "scratch")
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    results = []
    for fmt in (torch.channels_last, torch.contiguous_format):
        net = copy.deepcopy(base).to(DEVICE, memory_format=fmt).train()
        logits = net(x.to(DEVICE).contiguous(memory_format=fmt))
        torch.nn.functional.cross_entropy(logits, y.to(DEVICE)).backward()
        results.append((logits.detach().float().cpu(), torch.cat([p.grad.float().flatten().cpu()
                                                                  for p in net.parameters()])))
    (logits_cl, grad_cl), (logits, grad) = results
    torch.testing.assert_close(logits_cl, logits, rtol=1e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(grad_cl, grad, dim=0) > 0.999


@pytest.mark.skipif(not ON_GPU, reason="waiting for the GPU is a CUDA matter (the CPU runs in step)")
@pytest.mark.parametrize("variant", ["plain", "ema", "class weights with label smoothing"])
def test_a_training_step_waits_for_the_gpu_once(variant):
    """One host sync per step (the loss, read once the backward pass is queued): a sync after the forward
    pass or after the optimizer step would leave the GPU idle every step. Also with EMA (AveragedModel
    moved its CPU counter to the GPU each step) and with weighted, smoothed cross-entropy (torch's uses
    a data-dependent masked_select)."""
    from imgcls.training import losses

    device = torch.device(DEVICE)
    net = build.build_model("resnet18", 3, "scratch").to(device, memory_format=torch.channels_last).train()
    autocast, scaler = machine.precision(device, amp=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    criterion = losses.CrossEntropy(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1).to(device) \
        if variant.startswith("class weights") else torch.nn.CrossEntropyLoss()
    learner = training_step.Learner(net, optimizer, scaler, criterion,
                             loaders.to_model_input(build.preprocessing("resnet18", 32), device), autocast, device,
                             lambda start, end: 1.0, ema=ema.Ema(net, 0.999, 100) if variant == "ema" else None)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    for step in range(2):  # warm-up: cudnn's autotuning, the EMA's first (copying) update
        training_step.train_step(learner, x, y, f"warm-up {step}")
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(3):
                training_step.train_step(learner, x, y, f"step {step}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 3, [str(w.message)[:200] for w in syncs]


@pytest.mark.skipif(not ON_GPU and not os.environ.get("IMGCLS_TEST_COMPILE"),
                    reason="torch.compile takes a minute on a CPU: IMGCLS_TEST_COMPILE=1 to include it")
def test_compile_gives_the_same_results_within_tolerance(data, tmp_path):
    runs = [run_on_device(data, tmp_path / f"run-{flag}", f"--{flag}", "--no-amp", "--epochs", "3") for flag in
            ("compile", "no-compile")]
    assert abs(runs[0]["best_val_acc"] - runs[1]["best_val_acc"]) <= 10


def test_an_interrupted_run_resumes_on_the_device(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt" and state.get("epoch") == 1)
    with pytest.raises(Killed):
        train.main(train_args(data, run, "--mode", "scratch", "--device", DEVICE, "--epochs", "2",
                              "--save-interval", "0"))
    monkeypatch.undo()
    assert train.main(["--resume", str(run), "--device", DEVICE]) == 0
    assert [h["epoch"] for h in torch.load(run / "last.pt", weights_only=True)["history"]] == [1, 2]


@pytest.fixture(scope="module")
def device_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device-run") / "run"
    run_on_device(data, out, "--epochs", "2")
    return out


def test_a_checkpoint_trained_on_the_device_holds_cpu_tensors(device_run):
    """A plain torch.load (no map_location) of it works on a machine without a GPU."""
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(device_run / name, weights_only=True)
        tensors = [v for part in (ckpt["model"], *ckpt.get("optimizer", {}).get("state", {}).values())
                   for v in part.values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.device.type == "cpu" for t in tensors), name


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 convolutions and matrix products on the GPU (TF32 could flip a near tie)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_eval_on_the_device_equals_eval_on_the_cpu(device_run, data, tmp_path):
    for device, out in ((DEVICE, "device"), ("cpu", "cpu")):
        with no_tf32():
            assert evaluate.main([str(data / "val"), "--checkpoint", str(device_run), "--device", device,
                                  "--out", str(tmp_path / out)]) == 0
    on_device, on_cpu = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("device", "cpu"))
    assert on_device["accuracy"] == on_cpu["accuracy"]
    assert on_device["ece"]["calibrated"] == pytest.approx(on_cpu["ece"]["calibrated"], abs=1e-3)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="onnx, onnxscript and onnxruntime are needed (pip install -r requirements-export.txt)")
def test_a_checkpoint_trained_on_the_device_exports(device_run, data, tmp_path):
    assert export.main(["--checkpoint", str(device_run), "--format", "onnx", "--data", str(data / "val"),
                        "--out", str(tmp_path / "m.onnx")]) == 0


def test_torchrun_with_one_process_trains_on_the_device(data, tmp_path):
    """NCCL on a GPU (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
           *train_args(data, tmp_path / "run", "--mode", "scratch", "--device", DEVICE)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "best.pt").is_file()


def test_the_pinned_memory_loader_with_workers_trains(data, tmp_path):
    summary = run_on_device(data, tmp_path / "run", "--workers", "2", "--no-image-cache")
    assert summary["epochs"] == 1
