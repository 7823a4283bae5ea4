"""bench/gpu_check.py --dry-run: the GPU machine's one command, known to work before a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_every_step_on_the_cpu_in_its_dry_run(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["cuda_tests"]["ok"] and "passed" in results["cuda_tests"]["summary"]
    tests = results["cuda_tests"]["tests"]  # each test's outcome, read from pytest's verbose output
    assert tests["test_channels_last_gives_the_same_results_within_tolerance"] == "PASSED"
    assert tests["test_a_training_step_waits_for_the_gpu_once[plain]"] == "SKIPPED"  # a CUDA matter
    assert [r["model"] for r in results["throughput"]] == ["resnet18", "mobilenet_v2", "vgg11"]
    assert all(r["ours_img_s"] > 0 and r["plain_fp32_img_s"] > 0 for r in results["throughput"])
    timm = [r.get("timm_img_s") for r in results["throughput"]]  # timm's names and recipe (timm is in dev)
    assert timm[0] > 0 and timm[1] > 0 and timm[2] is None  # timm's vgg11 is another network
    assert results["train"]["ok"] and results["eval"]["ok"] and results["torchrun"]["ok"]
    assert results["small_runs"]["auto_workers_s"] > 0 and results["small_runs"]["no_workers_s"] > 0
    assert "| resnet18 | 32 | 8 |" in result.stdout
