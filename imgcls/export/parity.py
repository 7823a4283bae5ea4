"""An export's proof: its outputs against PyTorch's on sample images, its accuracy and latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data import check, folders, labelfile
from imgcls.data import images as data_images
from imgcls.errors import UsageError
from imgcls.evaluation import multilabel
from imgcls.preprocess import Preprocess


def sample_images(data: str | None, pre: Preprocess, n: int, classes: list[str], *, held_out: bool = False,
                  max_bytes: int = folders.DEFAULT_MAX_BYTES) -> tuple[torch.Tensor, list[int]]:
    """(float [0, 1] images, labels or -1): from a labelled folder, a folder of images, or noise.
    A dataset root gives its train/ images, or with `held_out` its test/ (else val/) images."""
    if data:
        labelled = data_items(Path(data), classes, held_out)
        rng = np.random.default_rng(0)
        picks = rng.permutation(len(labelled))
        images, labels = [], []
        for k in picks:
            try:
                arr = data_images.load_image(labelled[k][0], pre.resize_size, max_bytes, pre.resample)
            except (data_images.BadImage, OSError):
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
    if labelfile.is_label_file(data):
        lf = labelfile.read(data, warn=False)
        part = next((lf.rows(n) for n in (("test", "val") if held_out else ("train",)) if lf.rows(n)), lf.items)
        if lf.multilabel:  # images only: accuracy is for one class per image (the parity check covers the labels)
            return [(p, -1) for p, _ in part]
        return [(p, classes.index(lf.classes[y]) if lf.classes[y] in classes else -1) for p, y in part]
    if not data.is_dir():
        raise UsageError(f"--data {data} is not a folder or a label file (.csv)")
    train_dir, val_dir, test_dir = folders.find_layout(data)
    folder = (test_dir or val_dir or train_dir) if held_out else train_dir
    names = check.class_folders(folder)
    items = [(p, i) for i, c in enumerate(names) for p in check.list_files(folder / c)]
    return [(p, classes.index(names[y]) if names[y] in classes else -1) for p, y in items] or \
        [(p, -1) for p in check.list_files(folder)]


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


LATENCY_WARMUP, LATENCY_BLOCK, LATENCY_RUNS, LATENCY_MIN_RUNS, LATENCY_BUDGET_S = 3, 7, 21, 5, 10.0


@torch.no_grad()
def latencies_ms(runs: dict[str, Callable], example: torch.Tensor, *, warmup: int = LATENCY_WARMUP,
                 block: int = LATENCY_BLOCK, repeats: int = LATENCY_RUNS, budget_s: float = LATENCY_BUDGET_S
                 ) -> dict[str, Any]:
    """Each of `runs` on one image, in blocks taken in turn so that all see the same load on the machine:
    `warmup` untimed calls, then `block` timed ones; blocks until `repeats` timed calls each (at least
    LATENCY_MIN_RUNS; fewer when a slow model would take over `budget_s`, its first warm-up not counted). The
    warm-up is also what lets the other model's threads go quiet: onnxruntime's and OpenMP's spin on after a call,
    and a call timed straight after the other model's ran 1.3-2.6x slower than alone (ResNet18, MobileNetV2 on 2
    cores). The median is the figure: one call slowed by other work on the machine does not make it; min and max
    show the spread."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    spent = 0.0  # what the budget counts: every call but each model's first warm-up (a first call's set-up)
    while min(map(len, times.values())) < repeats:
        for name, run in runs.items():
            # once the budget is spent, a block ends as soon as its model has as many runs as any other (and at
            # least LATENCY_MIN_RUNS): a slow model is not called a whole block more than it must be
            least = max(LATENCY_MIN_RUNS, *map(len, times.values()))
            t0 = time.perf_counter()
            for _ in range(warmup):
                run(example)
            if times[name]:
                spent += time.perf_counter() - t0
            for _ in range(min(block, repeats - len(times[name]))):
                if len(times[name]) >= least and spent > budget_s:
                    break
                t0 = time.perf_counter()
                run(example)
                took = time.perf_counter() - t0
                times[name].append(1000 * took)
                spent += took
        if min(map(len, times.values())) >= LATENCY_MIN_RUNS and spent > budget_s:
            break
    return {"statistic": "median", "runs": len(times[next(iter(runs))]), "warmup_runs": warmup, "block": block,
            "threads": torch.get_num_threads(), "batch": int(example.shape[0]),
            "how": "wall clock of one call at a time on this machine's CPU, in blocks of calls of one model taken "
                   "in turn, each block after untimed warm-up calls; the median of the timed calls (min and max: "
                   "their spread)",
            **{name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in times.items()}}


def accuracy(logits: torch.Tensor, labels: list[int]) -> float | None:
    known = [i for i, y in enumerate(labels) if y >= 0]
    if not known:
        return None
    return 100 * float((logits[known].argmax(1) == torch.tensor([labels[i] for i in known])).float().mean())


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
    return (f", the median of {latency['runs']} runs in blocks of {latency.get('block', 1)} taken in turn, each "
            f"after {latency['warmup_runs']} warm-up, {latency['threads']} thread(s); export {e['min']:.1f}-"
            f"{e['max']:.1f} ms")


def print_proof(report: dict[str, Any]) -> None:
    print(f"exported {report['file']} ({report['size_mb']:.1f} MB); on {report['images']} images: top-1 agreement "
          f"{100 * report['top1_agreement']:.1f}%" +
          (f", label decisions agreeing {100 * report['label_agreement']:.1f}%" if "label_agreement" in report
           else "") +
          f", largest logit difference {report['max_abs_logit_diff']:.2e} (largest |logit| "
          f"{report['max_abs_logit']:.3g}); "
          f"CPU latency {report['latency_ms_batch1_cpu']:.1f} ms/image (PyTorch as eval.py runs it "
          f"{report['pytorch_latency_ms_batch1_cpu']:.1f} ms){latency_note(report.get('latency'))}")
    if report["accuracy_pytorch"] is not None:
        print(f"accuracy on those images: PyTorch {report['accuracy_pytorch']:.2f}%, export "
              f"{report['accuracy_export']:.2f}% ({report['accuracy_export'] - report['accuracy_pytorch']:+.2f})")
