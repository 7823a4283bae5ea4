"""export.py: each model to each format that installs, parity checked; exported ONNX evaluated by eval.py."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import THREE, train_args

import eval as evaluate
import export
import train
from imgcls import checkpoint, cli

FORMATS = {"onnx": "onnxruntime", "executorch": "executorch", "torchscript": "torch"}


def installed(fmt: str) -> bool:
    return importlib.util.find_spec(FORMATS[fmt]) is not None and (fmt != "onnx" or
                                                                  importlib.util.find_spec("onnxscript"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, colours) -> dict[str, Path]:
    """A one-epoch 32 px run of each of the three models."""
    out = {}
    for name in THREE:
        run = tmp_path_factory.mktemp(f"export-{name}")
        assert train.main(train_args(colours, run, "--model", name, "--mode", "scratch")) == 0
        out[name] = run / "best.pt"
    return out


def call(args: list[str]) -> int:
    try:
        return cli.cli(export.main, args)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", THREE)
def test_each_model_exports_to_each_format_and_passes_the_parity_check(name, fmt, checkpoints, colours, tmp_path):
    if not installed(fmt):
        pytest.skip(f"{FORMATS[fmt]} is not installed (requirements-export.txt)")
    out = tmp_path / f"model{checkpoint.EXPORT_SUFFIX[fmt]}"
    assert call(["--checkpoint", str(checkpoints[name]), "--format", fmt, "--data", str(colours), "--out", str(out),
                 "--images", "8"]) == 0
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-3
    assert report["images"] == 8 and report["size_mb"] > 0 and report["latency_ms_batch1_cpu"] > 0
    assert report["classes"] == ["blue", "green", "red"]


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_a_float_export_that_differs_beyond_the_tolerance_fails_and_replaces_nothing(checkpoints, tmp_path, capsys):
    """The export that failed its proof is not left under the name a server or an app loads."""
    out = tmp_path / "m.onnx"
    out.write_text("the export that passed before")
    Path(str(out) + ".json").write_text("its report")
    assert call(["--checkpoint", str(checkpoints["resnet18"]), "--format", "onnx", "--out", str(out),
                 "--images", "4", "--tolerance", "0"]) == 1
    assert "does not match the PyTorch model" in capsys.readouterr().err
    assert out.read_text() == "the export that passed before" and Path(str(out) + ".json").read_text() == "its report"
    assert json.loads(Path(str(out) + ".failed.json").read_text())["max_scaled_diff"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.failed.json", "m.onnx.json"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_full_disk_is_said_as_such_and_leaves_no_file_under_the_exports_name(fmt, checkpoints, tmp_path,
                                                                               monkeypatch, capsys):
    if not installed(fmt):
        pytest.skip(f"{FORMATS[fmt]} is not installed")
    real = Path.write_bytes

    def full(path, data, *args, **kwargs):  # the disk fills up half-way through the model
        real(Path(path), data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "onnx":
        import onnx

        monkeypatch.setattr(onnx, "save", lambda proto, path, *a, **k: full(path, proto.SerializeToString()))
    else:  # torch's own writer aborted the whole process (C++ terminate) on a full disk
        monkeypatch.setattr(Path, "write_bytes", lambda path, data: full(path, data) if path.suffix == ".ptl"
                            else real(path, data))
    out = tmp_path / f"m{checkpoint.EXPORT_SUFFIX[fmt]}"
    assert call(["--checkpoint", str(checkpoints["resnet18"]), "--format", fmt, "--out", str(out),
                 "--images", "2"]) == 1
    assert "could not write the export in" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_the_folders_of_exports_killed_half_way_are_removed_by_the_next_one(checkpoints, tmp_path):
    stale, live = tmp_path / ".m.onnx.killed", tmp_path / ".m.onnx.running"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"half a model")
        os.utime(folder, (time.time() - 3600,) * 2)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.lockf(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(120)", str(live / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # an export still running there
        assert call(["--checkpoint", str(checkpoints["resnet18"]), "--format", "onnx", "--out",
                     str(tmp_path / "m.onnx"), "--images", "2"]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert not stale.exists() and live.exists()


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_an_int8_export_leaves_the_files_beside_it_alone(trained_run, colours, tmp_path):
    """Its intermediate float and prepared models are its own, not `m.float.onnx` of the user's."""
    mine = {name: f"the user's {name}" for name in ("m.float.onnx", "m.prep.onnx")}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    assert call(["--checkpoint", str(trained_run / "best.pt"), "--format", "onnx", "--int8", "--data", str(colours),
                 "--out", str(tmp_path / "m.onnx"), "--images", "8"]) == 0
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.float.onnx", "m.onnx", "m.onnx.json", "m.prep.onnx"]


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_exported_onnx_is_evaluated_by_eval_py_with_the_same_report(trained_run, colours_eval, tmp_path):
    onnx_path = tmp_path / "model.onnx"
    assert call(["--checkpoint", str(trained_run / "best.pt"), "--format", "onnx", "--out", str(onnx_path)]) == 0
    reports = {}
    for kind, ckpt in (("pt", trained_run / "best.pt"), ("onnx", onnx_path)):
        assert evaluate.main([str(colours_eval), "--checkpoint", str(ckpt), "--out", str(tmp_path / kind)]) == 0
        reports[kind] = json.loads((tmp_path / kind / "metrics.json").read_text())
    assert reports["onnx"]["confusion_matrix"] == reports["pt"]["confusion_matrix"]
    assert reports["onnx"]["classes"] == ["blue", "green", "red"]


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_int8_export_is_calibrated_on_data_and_reports_the_accuracy_change(fmt, trained_run, colours, tmp_path,
                                                                           capsys):
    if not installed(fmt):
        pytest.skip(f"{FORMATS[fmt]} is not installed")
    out = tmp_path / f"q{checkpoint.EXPORT_SUFFIX[fmt]}"
    assert call(["--checkpoint", str(trained_run / "best.pt"), "--format", fmt, "--int8", "--data", str(colours),
                 "--out", str(out), "--images", "24"]) == 0
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["int8"] and report["accuracy_pytorch"] is not None and report["accuracy_export"] is not None
    assert "accuracy on those images" in capsys.readouterr().out
    assert report["size_mb"] < 0.5 * (trained_run / "best.pt").stat().st_size / 1e6


def test_int8_without_calibration_data_is_refused(trained_run, capsys):
    assert call(["--checkpoint", str(trained_run / "best.pt"), "--format", "onnx", "--int8"]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_a_dataset_root_calibrates_on_train_and_checks_on_test(trained_run, tmp_path):
    from conftest import make_folder

    make_folder(tmp_path / "root" / "train", per_class=4)
    make_folder(tmp_path / "root" / "test", per_class=2, offset=900)
    out = tmp_path / "q.onnx"
    root = str(tmp_path / "root")
    assert call(["--checkpoint", str(trained_run / "best.pt"), "--format", "onnx", "--int8", "--data", root,
                 "--check-data", root, "--out", str(out)]) == 0
    assert json.loads(Path(str(out) + ".json").read_text())["images"] == 6  # the test/ images


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_a_float_export_of_a_model_with_huge_logits_passes_on_float32_rounding(checkpoints, tmp_path):
    """Logits in the millions differ between two correct float32 runs by far more than 1e-3 (7 digits):
    the check is relative to their size, so a correct export is not refused."""
    import torch

    ckpt = checkpoint.load(checkpoints["resnet18"])
    ckpt["model"]["fc.weight"] *= 1e6
    torch.save(ckpt, tmp_path / "huge.pt")
    out = tmp_path / "m.onnx"
    assert call(["--checkpoint", str(tmp_path / "huge.pt"), "--format", "onnx", "--out", str(out),
                 "--images", "8"]) == 0
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["max_abs_logit"] > 1e4 and report["max_abs_logit_diff"] > 1e-3
    assert report["max_scaled_diff"] <= 1e-3


def test_parity_scales_each_images_difference_by_its_own_logits():
    """One image with huge logits must not widen the tolerance of the others."""
    import torch

    from imgcls.export import parity

    reference = torch.tensor([[1e5, 0.0], [0.5, 0.2]])
    exported = reference + torch.tensor([[0.01, 0.0], [0.0, 0.01]])  # 1e-7 of the first image, 1e-2 of the second
    report = parity.parity(reference, exported)
    assert report["max_abs_logit"] == 1e5 and report["max_scaled_diff"] == pytest.approx(0.01)


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_a_network_the_exporter_cannot_trace_is_one_line_naming_the_first_cause(tmp_path):
    """Exporters wrap the cause in pages of their own advice: the line names the cause."""
    import torch
    from torch import nn

    from imgcls.errors import TrainingError
    from imgcls.export import publish

    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise LookupError("the cause, deep down")

    with pytest.raises(TrainingError, match=r"could not be exported to onnx \(LookupError: the cause, deep down\)"):
        publish.write(Untraceable(), torch.rand(2, 3, 8, 8), tmp_path / "m.onnx", {}, fmt="onnx", int8=False)


def test_latency_is_the_median_of_several_timed_runs_after_a_warm_up():
    """One slow call (the machine busy with something else, a first call's set-up) does not make the figure."""
    import torch

    from imgcls.export import parity

    calls = []

    def run(x):
        calls.append(x)
        time.sleep(0.2 if len(calls) in (1, 6) else 0.002)  # the first call (warm-up) and one timed call slow

    measured = parity.latencies_ms({"export": run, "pytorch": lambda x: None}, torch.zeros(1))
    export_ms = measured["export"]
    assert measured["warmup_runs"] >= 1 and measured["runs"] >= 5 and measured["statistic"] == "median"
    assert 1.5 < export_ms["median"] < 50 and export_ms["max"] > 150  # the slow one seen, not taken


def test_a_models_latency_is_not_timed_straight_after_the_other_models_call():
    """onnxruntime's and OpenMP's threads spin on after a call: the other model's next call, on the same cores,
    ran 1.3-2.6x slower than alone. Each model is timed after warm-up calls of its own (in blocks)."""
    import torch

    from imgcls.export import parity

    log: list[str] = []

    def model(name: str):
        def run(x):
            time.sleep(0.03 if log and log[-1] != name else 0.001)  # slow while the other one's threads spin
            log.append(name)
        return run

    measured = parity.latencies_ms({"export": model("export"), "pytorch": model("pytorch")}, torch.zeros(1))
    assert measured["runs"] >= 5
    for name in ("export", "pytorch"):
        assert measured[name]["median"] < 10, measured[name]  # 30 ms when timed straight after the other


def test_a_slow_model_is_timed_no_more_than_its_warm_up_and_the_least_runs():
    """A model slower than the budget allows gets LATENCY_MIN_RUNS timed calls each after its warm-up, as before
    the blocks: a first block of LATENCY_BLOCK timed calls each made a 3 s model's proof 12 s (25%) longer."""
    import torch

    from imgcls.export import parity

    calls = {"export": 0, "pytorch": 0}

    def model(name: str):
        def run(x):
            calls[name] += 1
            time.sleep(0.03)
        return run

    measured = parity.latencies_ms({name: model(name) for name in calls}, torch.zeros(1), budget_s=0.05)
    assert measured["runs"] == parity.LATENCY_MIN_RUNS
    assert calls == {name: parity.LATENCY_WARMUP + parity.LATENCY_MIN_RUNS for name in calls}


def test_a_slow_first_call_does_not_spend_the_latency_budget():
    """A first call's set-up (memory arenas, kernels chosen) is what the warm-up absorbs, not the model's speed:
    counted against the budget, it cut a fast model's runs from 21 to 7."""
    import torch

    from imgcls.export import parity

    calls = {"export": 0, "pytorch": 0}

    def model(name: str):
        def run(x):
            calls[name] += 1
            time.sleep(0.3 if calls[name] == 1 else 0.001)
        return run

    measured = parity.latencies_ms({name: model(name) for name in calls}, torch.zeros(1), budget_s=0.2)
    assert measured["runs"] == parity.LATENCY_RUNS


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_the_export_report_says_how_its_latency_was_measured(checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    assert call(["--checkpoint", str(checkpoints["resnet18"]), "--format", "onnx", "--out", str(out),
                 "--images", "4"]) == 0
    report = json.loads(Path(str(out) + ".json").read_text())
    how = report["latency"]
    assert how["statistic"] == "median" and how["runs"] >= 5 and how["warmup_runs"] >= 1 and how["threads"] >= 1
    assert report["latency_ms_batch1_cpu"] == how["export"]["median"]
    assert report["pytorch_latency_ms_batch1_cpu"] == how["pytorch"]["median"]


def test_the_export_latency_is_compared_with_pytorch_as_eval_runs_it(checkpoints):
    """The proof's PyTorch latency is that of the network eval.py, test.py and serve.py run on the CPU: its
    batch norms folded and channels-last, giving load_model's answers (not the network as trained)."""
    import torch

    from imgcls.evaluation.predictor import load_model
    from imgcls.export import publish

    path = checkpoints["mobilenet_v2"]
    timed = publish.as_evaluated(checkpoint.view(checkpoint.load(path)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in timed.modules())
    assert timed.net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    loaded = load_model(path, "cpu")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(timed(x.float() / 255), loaded(x))


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime is not installed")
def test_the_report_says_how_many_batch_norms_the_timed_pytorch_model_had_folded(tmp_path):
    """Folding leaves what it cannot fold (no batch norms in VGG or SqueezeNet, a DenseNet's before its
    convolutions, timm's BatchNormAct2d, a network fx cannot trace): "batch norms folded" claimed them all."""
    import torch

    from imgcls.networks import build

    ckpt, out = tmp_path / "squeezenet.pt", tmp_path / "m.onnx"
    torch.manual_seed(0)
    net = build.build_model("squeezenet1_1", 3)
    checkpoint.save(checkpoint.of_model("squeezenet1_1", ["a", "b", "c"], net.state_dict(),
                                        build.preprocessing("squeezenet1_1", 64)), ckpt)
    assert call(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--images", "2"]) == 0
    timed = json.loads(Path(f"{out}.json").read_text())["pytorch_timed"]
    assert "channels-last" in timed and "no batch norm" in timed and "folded" not in timed, timed


def test_a_torchscript_lite_export_has_its_batch_norms_folded(checkpoints, tmp_path):
    """Where torch has no XNNPACK (CUDA's wheels) optimize_for_mobile cannot run, and it is what folds batch norms
    into the convolutions: the export folds them itself (MobileNetV2's .ptl ran 1.3x slower than PyTorch)."""
    from torch.jit.mobile import _export_operator_list, _load_for_lite_interpreter

    out = tmp_path / "m.ptl"
    assert call(["--checkpoint", str(checkpoints["mobilenet_v2"]), "--format", "torchscript", "--out", str(out),
                 "--images", "4"]) == 0
    ops = _export_operator_list(_load_for_lite_interpreter(str(out)))
    assert "aten::_convolution" in ops and "aten::batch_norm" not in ops
