"""Export a trained model (export.py's work): the network with its normalisation inside, written as ONNX,
ExecuTorch or TorchScript Lite (optionally int8), then run side by side with the PyTorch model on
the same images to prove it gives the same answers; the proof is written beside the export.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import checkpoint
import dataset
import folders
import labels
import models
import multilabel
from checkpoint import Preprocess
from imgcls import files
from imgcls.errors import TrainingError, UsageError
from imgcls.settings import file_name
from predictor import OnnxModel


class Deployable(nn.Module):
    """The trained network with its normalisation inside: float [0, 1] RGB in, logits out."""

    def __init__(self, net: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.normalize = models.Normalize(preprocess.mean, preprocess.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> Callable:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    # traced with two images: a batch of one is specialised by torch.export (0/1 specialisation), and
    # networks that look at the batch size (timm's) then fail the dynamic batch
    example = example[:1].expand(2, *example.shape[1:])
    torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    proto = onnx.load(str(out))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return OnnxModel(out)


def export_executorch(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str],
                      calibration: torch.Tensor | None = None) -> Callable:
    """XNNPACK-delegated .pte; with `calibration`, int8 through the XNNPACK quantiser (PT2E, per-channel)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    if calibration is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
        for i in range(len(calibration)):  # the graph has the example's batch size (1)
            prepared(calibration[i:i + 1])
        model = convert_pt2e(prepared)
    program = torch.export.export(model, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(lowered.buffer)
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=1))
    method = Runtime.get().load_program(str(out)).load_method("forward")
    # the .pte has the example's batch size baked in: run larger batches one image at a time
    return lambda x: torch.cat([method.execute([x[i:i + 1].contiguous()])[0] for i in range(len(x))])


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> Callable:
    from torch.utils.mobile_optimizer import optimize_for_mobile

    traced = torch.jit.trace(model, example)
    try:
        traced = optimize_for_mobile(traced)
    except RuntimeError:  # builds without XNNPACK (e.g. CUDA wheels) cannot run the mobile passes
        print("note: this PyTorch build has no XNNPACK; saving the TorchScript Lite model without mobile "
              "optimisation")
    # written from Python: torch's own writer aborts the process on a full disk
    out.write_bytes(traced._save_to_buffer_for_lite_interpreter(_extra_files={"meta.json": json.dumps(meta)}))
    from torch.jit.mobile import _load_for_lite_interpreter

    lite = _load_for_lite_interpreter(str(out))
    return lambda x: lite(x)


def quantize_onnx(float_path: Path, out: Path, calibration: torch.Tensor) -> Callable:
    """Static int8 (QDQ, per-channel weights), activations calibrated on real training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i:i + 8].numpy()} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    prepared.unlink(missing_ok=True)
    import onnx

    src, dst = onnx.load(str(float_path)), onnx.load(str(out))
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    onnx.save(dst, str(out))
    return OnnxModel(out)


def sample_images(data: str | None, pre: Preprocess, n: int, classes: list[str], held_out: bool = False,
                  max_bytes: int = folders.DEFAULT_MAX_BYTES
                  ) -> tuple[torch.Tensor, list[int]]:
    """(float [0, 1] images, labels or -1): from a labelled folder, a folder of images, or noise.
    A dataset root gives its train/ images, or with `held_out` its test/ (else val/) images."""
    if data:
        labelled = data_items(Path(data), classes, held_out)
        rng = np.random.default_rng(0)
        picks = rng.permutation(len(labelled))
        images, labels = [], []
        for k in picks:
            try:
                arr = dataset.load_image(labelled[k][0], pre.resize_size, max_bytes, pre.resample)
            except (dataset.BadImage, OSError):
                continue
            images.append(torch.from_numpy(arr).permute(2, 0, 1))
            labels.append(labelled[k][1])
            if len(images) == n:
                break
        if not images:
            raise UsageError(f"no readable images in {data}")
        crop = pre.crop()
        return torch.stack([crop(x) for x in images]).float() / 255, labels
    g = torch.Generator().manual_seed(0)
    size = pre.img_size
    return torch.rand(n, 3, size, size, generator=g), [-1] * n


def data_items(data: Path, classes: list[str], held_out: bool) -> list[tuple[str, int]]:
    """(path, the model's class index or -1) of a labelled folder, a folder of images, or a label file:
    its training part, or with `held_out` its test (else val) part."""
    if labels.is_label_file(data):
        lf = labels.read(data, warn=False)
        part = next((lf.rows(n) for n in (("test", "val") if held_out else ("train",)) if lf.rows(n)), lf.items)
        if lf.multilabel:  # images only: accuracy is for one class per image (the parity check covers the labels)
            return [(p, -1) for p, _ in part]
        return [(p, classes.index(lf.classes[y]) if lf.classes[y] in classes else -1) for p, y in part]
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder or a label file (.csv)")
    train_dir, val_dir, test_dir = folders.find_layout(data)
    folder = (test_dir or val_dir or train_dir) if held_out else train_dir
    names = dataset.class_folders(folder)
    items = [(p, i) for i, c in enumerate(names) for p in dataset.list_files(folder / c)]
    return [(p, classes.index(names[y]) if names[y] in classes else -1) for p, y in items] or \
        [(p, -1) for p in dataset.list_files(folder)]


def parity(reference: torch.Tensor, exported: torch.Tensor, thresholds: list[float] | None = None
           ) -> dict[str, float]:
    """How closely the export's outputs follow the model's; for a multi-label model also the share of
    (image, label) decisions at the thresholds that agree. float32 carries ~7 digits: two correct runs
    of a network whose logits are in the thousands differ in their last bits by more than any fixed
    amount, so each image's difference is also given relative to its largest |logit| (when above 1):
    `max_scaled_diff`, what --tolerance bounds."""
    diff = (reference - exported).abs()
    scale = reference.abs().amax(1, keepdim=True).clamp(min=1.0)
    out = {"images": len(reference),
           "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).float().mean()),
           "max_abs_logit_diff": float(diff.max()), "max_abs_logit": float(reference.abs().max()),
           "max_scaled_diff": float((diff / scale).max())}
    if thresholds is not None:
        out["label_agreement"] = float((multilabel.decide(torch.sigmoid(reference), thresholds) ==
                                        multilabel.decide(torch.sigmoid(exported), thresholds)).mean())
    return out


LATENCY_WARMUP, LATENCY_RUNS, LATENCY_MIN_RUNS, LATENCY_BUDGET_S = 3, 21, 5, 10.0


@torch.no_grad()
def latencies_ms(runs: dict[str, Callable], example: torch.Tensor, warmup: int = LATENCY_WARMUP,
                 repeats: int = LATENCY_RUNS, budget_s: float = LATENCY_BUDGET_S) -> dict[str, Any]:
    """Each of `runs` on one image: `warmup` untimed calls each (first-call set-up, caches), then up to
    `repeats` timed calls each, taken in turn so that all see the same load on the machine (at least
    LATENCY_MIN_RUNS; fewer than `repeats` when a slow model would take over `budget_s`). The median is
    the figure: one call slowed by other work on the machine does not make it; min and max show the spread."""
    for _ in range(warmup):
        for run in runs.values():
            run(example)
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    for i in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(example)
            times[name].append(1000 * (time.perf_counter() - t0))
        if i + 1 >= LATENCY_MIN_RUNS and time.perf_counter() - start > budget_s:
            break
    return {"statistic": "median", "runs": len(times[next(iter(runs))]), "warmup_runs": warmup,
            "threads": torch.get_num_threads(), "batch": int(example.shape[0]),
            "how": "wall clock of one call at a time on this machine's CPU, the models taken in turn after the "
                   "warm-up; the median of the timed calls (min and max: their spread)",
            **{name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}}


def accuracy(logits: torch.Tensor, labels: list[int]) -> float | None:
    known = [i for i, y in enumerate(labels) if y >= 0]
    if not known:
        return None
    return 100 * float((logits[known].argmax(1) == torch.tensor([labels[i] for i in known])).float().mean())




CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # said as such, not as the network's fault


def export(ckpt_path: Path, fmt: str, int8: bool, folder: Path, out: Path | None, data: str | None,
           check_data: str | None, n_images: int, tolerance: float, max_bytes: int = folders.DEFAULT_MAX_BYTES) -> int:
    """export.py's work: write the export (to `out`, else into `folder` named after the model), then prove
    it on images (exit status 1 when a float export disagrees with the PyTorch model)."""
    ckpt = checkpoint.load(ckpt_path)
    for note in (checkpoint.fitted_elsewhere(ckpt, ckpt_path), checkpoint.temperature_not_kept(ckpt)):
        if note:
            print(note)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    model = Deployable(models.from_checkpoint(ckpt), pre).eval()
    out = out or folder / f"{file_name(ckpt['arch'])}{'-int8' if int8 else ''}{checkpoint.EXPORT_SUFFIX[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    images, labels = sample_images(data, pre, n_images, ckpt["classes"], max_bytes=max_bytes)
    check, check_labels = sample_images(check_data, pre, n_images, ckpt["classes"], True, max_bytes) \
        if check_data else (images, labels)
    # made and proven in a folder of its own beside `out` (intermediate files too), moved to `out` only once it
    # passed: a kill, a full disk or a failed check never leaves a broken file under the name that is loaded
    remove_stale_staging(out)
    try:
        # (its folder locked while it runs: not stale to remove_stale_staging)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work, files.FolderLock(Path(work)):
            staged = Path(work) / out.name
            run = write(fmt, model, images, staged, checkpoint.export_metadata(ckpt), int8)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                reference, exported = model(check), run(check)
            if not reference.dtype == exported.dtype == torch.float32:
                raise RuntimeError(f"parity compares {reference.dtype} with {exported.dtype}: both must be float32")
            report = {"format": fmt, "int8": int8, "file": str(out), "checkpoint": str(ckpt_path),
                      "size_mb": os.path.getsize(staged) / 1e6,
                      **parity(reference, exported, checkpoint.thresholds(ckpt)),
                      "accuracy_pytorch": accuracy(reference, check_labels),
                      "accuracy_export": accuracy(exported, check_labels),
                      "classes": ckpt["classes"], "preprocess": pre.to_dict(), "tolerance": tolerance}
            latency = latencies_ms({"export": run, "pytorch": lambda x: model(x)}, images[:1])
            report |= {"latency_ms_batch1_cpu": latency["export"]["median"],
                       "pytorch_latency_ms_batch1_cpu": latency["pytorch"]["median"], "latency": latency}
            failed = not int8 and (report["top1_agreement"] < 1 or report.get("label_agreement", 1) < 1
                                   or report["max_scaled_diff"] > tolerance)
            publish(staged, out, report, failed)
    except OSError as e:
        if e.errno not in CANNOT_WRITE:
            raise
        raise TrainingError(f"could not write the export in {out.parent} ({e.strerror}): make room or give another "
                            "--out") from None
    print_proof(report)
    if failed:
        print(f"error: the export does not match the PyTorch model (tolerance {tolerance}, times an image's largest "
              f"|logit| when above 1), so it was not written to {out}; see {out}.failed.json", file=sys.stderr)
        return 1
    return 0


def publish(staged: Path, out: Path, report: dict[str, Any], failed: bool) -> None:
    """A proven export moved to its name with its report (a .pte's metadata beside it, the model last); a
    failed one only leaves its report, as <out>.failed.json."""
    if failed:
        files.atomic_write_text(Path(f"{out}.failed.json"), json.dumps(report, indent=1))
        return
    for made in (Path(f"{staged}.meta.json"), staged):
        if made.exists():
            os.replace(made, out.parent / made.name)
    files.atomic_write_text(Path(f"{out}.json"), json.dumps(report, indent=1))
    Path(f"{out}.failed.json").unlink(missing_ok=True)  # an earlier attempt's


def remove_stale_staging(out: Path, min_age_s: float = 60.0) -> None:
    """The folders of exports to `out` killed half-way: a minute old, and no export holds their lock."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if folder.is_symlink() or not folder.is_dir() or time.time() - folder.stat().st_mtime < min_age_s:
            continue
        try:
            with files.FolderLock(folder):
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # its export is alive
            continue


def write(fmt: str, model: nn.Module, images: torch.Tensor, out: Path, meta: dict[str, str], int8: bool) -> Callable:
    """The export file; returns a function that runs it. int8 calibrates on `images`."""
    example = images[:1]
    try:
        if fmt == "onnx" and int8:
            float_path = out.with_suffix(".float.onnx")
            export_onnx(model, example, float_path, meta)
            run = quantize_onnx(float_path, out, images)
            float_path.unlink()
            return run
        if fmt == "onnx":
            return export_onnx(model, example, out, meta)
        if fmt == "executorch":
            return export_executorch(model, example, out, meta, images if int8 else None)
        return export_torchscript(model, example, out, meta)
    except ImportError as e:
        raise UsageError(f"--format {fmt} needs packages that are not installed ({e.name}): "
                         "pip install -r requirements-export.txt") from None
    except UsageError:
        raise
    except Exception as e:  # the network uses what the exporter cannot trace: said in a line (the whole
        if os.environ.get("IMGCLS_DEBUG"):  # trace with IMGCLS_DEBUG=1)
            raise
        cause = root_cause(e)
        if isinstance(cause, OSError) and cause.errno in CANNOT_WRITE:  # the disk, not the network: export() says
            raise cause from None
        raise TrainingError(f"this network could not be exported to {fmt} ({type(cause).__name__}: "
                            f"{checkpoint.first_line(cause)[:200]}); another --format may work (IMGCLS_DEBUG=1 shows "
                            "the exporter's whole report)") from None


def root_cause(e: BaseException) -> BaseException:
    """The first exception of a chain: exporters wrap it in their own, with pages of advice."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    return e


def latency_note(latency: dict[str, Any] | None) -> str:
    """How the latency was measured, for the proof's line."""
    if not latency:
        return ""
    e = latency["export"]
    return (f", the median of {latency['runs']} runs each after {latency['warmup_runs']} warm-up, taken in turn, "
            f"{latency['threads']} thread(s); export {e['min']:.1f}-{e['max']:.1f} ms")


def print_proof(report: dict[str, Any]) -> None:
    print(f"exported {report['file']} ({report['size_mb']:.1f} MB); on {report['images']} images: top-1 agreement "
          f"{100 * report['top1_agreement']:.1f}%" +
          (f", label decisions agreeing {100 * report['label_agreement']:.1f}%" if "label_agreement" in report
           else "") +
          f", largest logit difference {report['max_abs_logit_diff']:.2e} (largest |logit| "
          f"{report['max_abs_logit']:.3g}); "
          f"CPU latency {report['latency_ms_batch1_cpu']:.1f} ms/image (PyTorch "
          f"{report['pytorch_latency_ms_batch1_cpu']:.1f} ms){latency_note(report.get('latency'))}")
    if report["accuracy_pytorch"] is not None:
        print(f"accuracy on those images: PyTorch {report['accuracy_pytorch']:.2f}%, export "
              f"{report['accuracy_export']:.2f}% ({report['accuracy_export'] - report['accuracy_pytorch']:+.2f})")
