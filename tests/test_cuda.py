"""The CUDA path (marker `cuda`): mixed precision, memory format, compile, interrupts, eval, export, NCCL
and pinned-memory loading on a GPU. Skipped without one. bench/gpu_check.py runs them first on a GPU
machine; its --dry-run runs them on the CPU (IMGCLS_TEST_DEVICE=cpu), so they are known to work before a
GPU is at hand.

    python -m pytest -m cuda                          # on a GPU machine
    IMGCLS_TEST_DEVICE=cpu python -m pytest -m cuda   # the same tests on the CPU
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Killed, kill_after_saving, make_folder, train_args

import engine
import eval as evaluate
import export
import train

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
    assert train.main(train_args(data, out, "--mode", "scratch", "--device", DEVICE, "--optimizer", "adam",
                                 "--lr", "0.002", "--hflip", "0", *extra)) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_precision(data, tmp_path_factory) -> dict:
    return run_on_device(data, tmp_path_factory.mktemp("fp32") / "run", "--epochs", "3", "--no-amp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_learns_like_full_precision(dtype, data, full_precision, tmp_path, monkeypatch):
    """bf16, and fp16 with its GradScaler (forced, whatever the GPU would choose)."""
    monkeypatch.setattr(engine, "autocast_dtype", lambda device, amp: dtype if amp else None)
    mixed = run_on_device(data, tmp_path / "run", "--epochs", "3", "--amp")
    assert mixed["best_val_acc"] >= min(90.0, full_precision["best_val_acc"] - 10), (mixed, full_precision)
    if dtype == torch.float16:
        scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
        assert scaler and scaler["scale"] > 0  # the scaler was on, and never saw an overflow it could not undo


def test_channels_last_gives_the_same_results_within_tolerance(data, tmp_path):
    runs = [run_on_device(data, tmp_path / f"run-{flag}", f"--{flag}", "--no-amp") for flag in
            ("channels-last", "no-channels-last")]
    losses = [float(next(csv.DictReader(open(Path(r["run_dir"], "metrics.csv"))))["val_loss"]) for r in runs]
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


@pytest.mark.skipif(not ON_GPU and not os.environ.get("IMGCLS_TEST_COMPILE"),
                    reason="torch.compile takes a minute on a CPU: IMGCLS_TEST_COMPILE=1 to include it")
def test_compile_gives_the_same_results_within_tolerance(data, tmp_path):
    runs = [run_on_device(data, tmp_path / f"run-{flag}", f"--{flag}", "--no-amp") for flag in
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


def test_eval_on_the_device_equals_eval_on_the_cpu(device_run, data, tmp_path):
    for device, out in ((DEVICE, "device"), ("cpu", "cpu")):
        assert evaluate.main([str(data / "val"), "--checkpoint", str(device_run), "--device", device,
                              "--out", str(tmp_path / out)]) == 0
    on_device, on_cpu = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("device", "cpu"))
    assert on_device["accuracy"] == on_cpu["accuracy"]
    assert on_device["ece"]["calibrated"] == pytest.approx(on_cpu["ece"]["calibrated"], abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
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
