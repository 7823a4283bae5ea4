"""Export a trained model (export.py's work): the network with its normalisation inside, written as ONNX,
ExecuTorch or TorchScript Lite (optionally int8), then run side by side with the PyTorch model on
the same images to prove it gives the same answers; the proof is written beside the export.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls import checkpoint, files
from imgcls.data import folders
from imgcls.errors import TrainingError, UsageError, first_line
from imgcls.evaluation import predictor
from imgcls.export import formats, parity
from imgcls.networks import build
from imgcls.settings import file_name

CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # said as such, not as the network's fault


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """What export.py was asked for, by name: ten settings passed in a row were easy to give in the wrong order."""
    fmt: str  # a key of checkpoint.EXPORT_SUFFIX
    int8: bool
    folder: Path  # where the file goes, named after the model, when `out` is not given
    out: Path | None  # the file
    data: str | None  # images to calibrate int8 on and to prove the export on (else generated)
    check_data: str | None  # held-out images to prove it on instead
    images: int  # how many, for each
    tolerance: float  # the largest logit difference a float export may have (scaled by the largest |logit|)
    max_bytes: int = folders.DEFAULT_MAX_BYTES  # an image file's largest size

    def file(self, arch: str) -> Path:
        """`out`, else a file in `folder` named after the network (marked -int8 when quantised)."""
        name = f"{file_name(arch)}{'-int8' if self.int8 else ''}{checkpoint.EXPORT_SUFFIX[self.fmt]}"
        return self.out or self.folder / name


def export(ckpt_path: Path, options: Options) -> int:
    """export.py's work: write the export (to `out`, else into `folder` named after the model), then prove
    it on images (exit status 1 when a float export disagrees with the PyTorch model)."""
    fmt, int8, tolerance, n_images = options.fmt, options.int8, options.tolerance, options.images
    ckpt = checkpoint.view(checkpoint.load(ckpt_path))
    for note in (checkpoint.fitted_elsewhere(ckpt, ckpt_path), checkpoint.temperature_not_kept(ckpt)):
        if note:
            print(note)
    pre, classes = ckpt.preprocess, ckpt.classes
    model = formats.Deployable(build.from_checkpoint(ckpt), pre).eval()
    out = options.file(ckpt.arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    images, labels = parity.sample_images(options.data, pre, n_images, classes, max_bytes=options.max_bytes)
    check, check_labels = parity.sample_images(options.check_data, pre, n_images, classes, held_out=True,
                                               max_bytes=options.max_bytes) if options.check_data else (images, labels)
    # made and proven in a folder of its own beside `out` (intermediate files too), moved to `out` only once it
    # passed: a kill, a full disk or a failed check never leaves a broken file under the name that is loaded
    remove_stale_staging(out)
    try:
        # (its folder locked while it runs: not stale to remove_stale_staging)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work, files.FolderLock(Path(work)):
            staged = Path(work) / out.name
            run = write(model, images, staged, checkpoint.export_metadata(ckpt), fmt=fmt, int8=int8)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                reference, exported = model(check), run(check)
            if not reference.dtype == exported.dtype == torch.float32:
                raise RuntimeError(f"parity compares {reference.dtype} with {exported.dtype}: both must be float32")
            report = {"format": fmt, "int8": int8, "file": str(out), "checkpoint": str(ckpt_path),
                      "size_mb": os.path.getsize(staged) / 1e6,
                      **parity.parity(reference, exported, checkpoint.thresholds(ckpt)),
                      "accuracy_pytorch": parity.accuracy(reference, check_labels),
                      "accuracy_export": parity.accuracy(exported, check_labels),
                      "classes": classes, "preprocess": pre.to_dict(), "tolerance": tolerance}
            timed = as_evaluated(ckpt)
            latency = parity.latencies_ms({"export": run, "pytorch": timed}, images[:1])
            report |= {"latency_ms_batch1_cpu": latency["export"]["median"],
                       "pytorch_latency_ms_batch1_cpu": latency["pytorch"]["median"], "latency": latency,
                       "pytorch_timed": how_timed(model, timed)}
            failed = not int8 and (report["top1_agreement"] < 1 or report.get("label_agreement", 1) < 1
                                   or report["max_scaled_diff"] > tolerance)
            publish(staged, out, report, failed)
    except OSError as e:
        if e.errno not in CANNOT_WRITE:
            raise
        raise TrainingError(f"could not write the export in {out.parent} ({e.strerror}): make room or give another "
                            "--out") from None
    parity.print_proof(report)
    if failed:
        print(f"error: the export does not match the PyTorch model (tolerance {tolerance}, times an image's largest "
              f"|logit| when above 1), so it was not written to {out}; see {out}.failed.json", file=sys.stderr)
        return 1
    return 0


def as_evaluated(ckpt: checkpoint.Saved) -> nn.Module:
    """The PyTorch model an export's latency is compared with: the network as eval.py, test.py and serve.py run
    it on the CPU (batch norms folded, channels-last), a copy of its own (folding changes weights in place)."""
    return formats.Deployable(predictor.ready_for(build.from_checkpoint(ckpt), torch.device("cpu")),
                              ckpt.preprocess).eval()


def how_timed(trained: nn.Module, timed: nn.Module) -> str:
    """What was done to the PyTorch model timed, for the report: folding leaves batch norms that are not a
    convolution's alone (a DenseNet's, timm's BatchNormAct2d), and all of a network fx cannot trace."""
    def norms(m: nn.Module) -> int:
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    total = norms(trained)
    return ("as eval.py, test.py and serve.py run it on the CPU: channels-last, " +
            (f"{total - norms(timed)} of its {total} batch norms folded into the convolutions before them" if total
             else "no batch norm to fold"))


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


def write(model: nn.Module, images: torch.Tensor, out: Path, meta: dict[str, str], *, fmt: str, int8: bool
          ) -> Callable:
    """The export file; returns a function that runs it. int8 calibrates on `images`."""
    example = images[:1]
    try:
        if fmt == "onnx" and int8:
            float_path = out.with_suffix(".float.onnx")
            formats.export_onnx(model, example, float_path, meta)
            run = formats.quantize_onnx(float_path, out, images)
            float_path.unlink()
            return run
        if fmt == "onnx":
            return formats.export_onnx(model, example, out, meta)
        if fmt == "executorch":
            return formats.export_executorch(model, example, out, meta, calibration=images if int8 else None)
        return formats.export_torchscript(model, example, out, meta)
    except ImportError as e:
        raise UsageError(f"--format {fmt} needs packages that are not installed ({e.name}): "
                         "pip install -r requirements-export.txt") from None
    except UsageError:
        raise
    except Exception as e:  # the network uses what the exporter cannot trace: said in a line (the whole
        if os.environ.get("IMGCLS_DEBUG"):  # trace with IMGCLS_DEBUG=1)
            raise
        cause = parity.root_cause(e)
        if isinstance(cause, OSError) and cause.errno in CANNOT_WRITE:  # the disk, not the network: export() says
            raise cause from None
        raise TrainingError(f"this network could not be exported to {fmt} ({type(cause).__name__}: "
                            f"{first_line(cause)[:200]}); another --format may work (IMGCLS_DEBUG=1 shows "
                            "the exporter's whole report)") from None
