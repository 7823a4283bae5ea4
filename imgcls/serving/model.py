"""The model a server runs: loaded as test.py loads it (predictor.load_model: a .pt or an exported .onnx,
its preprocessing, calibration temperature and multi-label thresholds), with threads sized for the server,
and its answers in the words of test.py's predictions.csv (predictions.label): the top-k labels with their
calibrated probabilities, "unknown" below --reject-below, a multi-label model's labels at or above their
thresholds. What /model tells about it, and its Grad-CAM explanations, are here too.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgcls import checkpoint
from imgcls.errors import UsageError
from imgcls.evaluation import calibration, multilabel, predictions
from imgcls.evaluation.predictor import Explainer, Loaded, OnnxModel, load_model, tta_views
from imgcls.machine import set_thread_threads
from imgcls.serving.settings import MAX_BATCH, Settings, cpus, threads_per_worker

UNKNOWN = predictions.UNKNOWN


class Served:
    """A loaded model and what the server needs around it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.threads = threads_per_worker(settings)
        set_thread_threads(1)  # here: torch runs in parallel on the model thread only (docs/serving.md)
        self.loaded: Loaded = load_model(settings.checkpoint, settings.device, settings.amp)
        onnx = isinstance(self.loaded.model, OnnxModel)
        if onnx:
            size_threads(self.loaded.model, Path(settings.checkpoint), self.threads)
        else:
            self.loaded.model.eval()
        # the model thread's torch threads: an .onnx runs on ONNX Runtime's own pool, and torch there only makes
        # the batch float: a team of torch's beside that pool would spin on the same cores
        self.torch_threads = 1 if onnx else self.threads
        if self.loaded.multilabel and settings.reject_below is not None:
            raise UsageError(f"{settings.checkpoint} is a multi-label model: each label has its own threshold (tuned "
                             "when training), so --reject-below does not apply; drop it")
        self.crop = self.loaded.preprocess.crop()
        self.explainer: Explainer | None = None  # made on the model thread, at the first explanation
        self.provenance = provenance(Path(self.loaded.source))
        # None: timed (time_model); no larger than a batch can be, as the full batch is timed at start
        self.max_batch: int | None = settings.max_batch and min(settings.max_batch, settings.largest_batch)
        self.batch_of_one_s = 0.0  # the model's time for a batch of one (time_model)
        self.full_batch_s = 0.0  # and for a batch of max_batch
        self.decode_between_batches = decodes_between_batches(self.loaded.device.type, self.threads, settings)

    def time_model(self) -> None:
        """Time the model as it will run (call it on the model's thread): a batch of one, a full batch, and
        unless --max-batch was given, the batch size that gives the most images per second here (fastest) of 1,
        2, 4, ... up to MAX_BATCH for the device (bench/bench_serve.py: on 2 cores MobileNetV2 and ResNet18 gain
        up to batches of 8-16)."""
        size = self.loaded.preprocess.img_size

        def seconds(b: int) -> float:
            x = torch.zeros(b, 3, size, size, dtype=torch.uint8)
            start = time.perf_counter()
            self.logits(x)
            return time.perf_counter() - start

        largest = min(MAX_BATCH["cpu" if self.loaded.device.type == "cpu" else "gpu"], self.settings.largest_batch)
        rates = rates_timed(seconds, doublings(largest) if self.max_batch is None else (1,))
        self.batch_of_one_s = 1 / rates[1]
        self.max_batch = self.max_batch or fastest(rates)
        if self.max_batch not in rates:  # (given by --max-batch)
            rates |= rates_timed(seconds, (self.max_batch,))
        self.full_batch_s = self.max_batch / rates[self.max_batch]

    @property
    def join_wait_s(self) -> float:
        """How long a batch that is not full waits for images being decoded. Where decoding overlaps the model,
        its time for a batch of one (its fixed cost per batch: the wait never makes them slower than a batch of
        their own would). Where decoding waits for batches, the cores do nothing but decode meanwhile, and a
        batch cut short would leave the rest to decode during it: the time of a full batch (a bound for a slow
        file; a batch's decoding takes a fraction of it)."""
        return self.full_batch_s if self.decode_between_batches else self.batch_of_one_s

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs for a uint8 batch, as test.py computes them (predictions.label via run_model); with
        --tta, N x views x classes."""
        if not self.settings.tta:
            return self.loaded(x)
        return torch.stack([self.loaded(v) for v in tta_views(x, self.loaded.flips)], 1)

    def answers(self, logits: torch.Tensor, topk: int, reject_below: float | None) -> list[dict[str, Any]]:
        """The answers for a request's images, from their logits (one row each): what test.py writes for them.
        The probabilities of the rows are computed together, as test.py computes a batch's."""
        return [self.answer(p, topk, reject_below) for p in self.loaded.probabilities(logits)]

    def answer(self, probs: torch.Tensor, topk: int, reject_below: float | None) -> dict[str, Any]:
        classes = self.loaded.classes
        top_p, top_i = probs.topk(min(topk, len(classes)))
        top = [{"label": classes[c], "probability": shown(p)} for p, c in zip(top_p.tolist(), top_i.tolist())]
        if self.loaded.multilabel:
            said = np.flatnonzero(multilabel.decide(probs[None], self.loaded.thresholds)[0])
            present = sorted(((classes[c], float(probs[c])) for c in said), key=lambda t: -t[1])
            return {"status": "ok", "labels": [{"label": lb, "probability": shown(p)} for lb, p in present],
                    "top": top}
        best = float(top_p[0])
        if reject_below is not None and not calibration.kept(best, reject_below):
            return {"status": UNKNOWN, "label": UNKNOWN, "probability": shown(best), "top": top,
                    "reason": f"below --reject-below {reject_below:g}"}
        return {"status": "ok", "label": top[0]["label"], "probability": shown(best), "top": top}

    def explain(self, image: torch.Tensor, label: str | None) -> tuple[bytes, str, str, bool]:
        """(PNG of the heat map over the image, the class explained, the method, whether any evidence was
        found) for a uint8 image as the model takes it; the predicted class unless `label` names one. Runs
        on the model thread (Grad-CAM's hooks must not see another batch)."""
        if self.explainer is None:
            self.explainer = Explainer(self.loaded)
        if label is None:
            c = int(self.loaded.probabilities(self.logits(image[None]))[0].argmax())
        else:
            c = self.loaded.classes.index(label)
        picture, found = predictions.overlay_for(self.explainer, image, c)
        out = io.BytesIO()
        Image.fromarray(picture).save(out, format="PNG")
        return out.getvalue(), self.loaded.classes[c], self.explainer.method, found

    def info(self) -> dict[str, Any]:
        """GET /model: what the model is, how it reads images, how far its probabilities can be trusted,
        and where it came from (no server paths beyond the model file's name)."""
        loaded, s = self.loaded, self.settings
        return {"model": loaded.arch, "file": Path(loaded.source).name, "format": "onnx" if
                checkpoint.is_onnx(Path(loaded.source)) else "pytorch", "classes": loaded.classes,
                "multilabel": loaded.multilabel, "thresholds": loaded.thresholds,
                "input": {**loaded.preprocess.to_dict(), "crop_mode": loaded.preprocess.crop_mode},
                "calibration": {"temperature": loaded.temperature or 1.0, "calibrated": loaded.temperature is not None},
                "provenance": self.provenance,
                "serving": {"topk": s.topk, "reject_below": s.reject_below, "tta": s.tta, "device": str(loaded.device),
                            "max_batch": self.max_batch, "max_wait_ms": s.max_wait_ms,
                            "wait_for_decoding_ms": round(self.join_wait_s * 1000, 1), "threads": self.threads,
                            "decoding": "between batches" if self.decode_between_batches else "during batches",
                            "timed_ms": {"1": round(self.batch_of_one_s * 1000, 1),
                                         str(self.max_batch): round(self.full_batch_s * 1000, 1)},
                            "max_file_mb": s.max_file_mb, "max_request_mb": s.max_request_mb,
                            "max_images": s.max_images, "timeout_s": s.timeout_s}}


TIMINGS = 3  # of each batch size at start: its fastest counts


def doublings(largest: int) -> Iterator[int]:
    """1, 2, 4, ... up to `largest`: the batch sizes timed at start."""
    return (2**i for i in range(largest.bit_length()))


def rates_timed(seconds: Callable[[int], float], sizes: Iterable[int], timings: int = TIMINGS) -> dict[int, float]:
    """Images per second at each batch size of `sizes` (ascending), from `seconds` (one batch of that size through
    the model). Each size is run once first (the first call of a shape chooses its kernels), the sizes past the
    best left out (70% of it: larger will not do better), and then each is timed `timings` times in turn with the
    others, its fastest kept: a timing that another process or the allocator slowed decides nothing (one timing
    each chose batches of 4 or 16 for the same model from one start to the next)."""
    rates: dict[int, float] = {}
    for b in sizes:
        seconds(b)
        rates[b] = b / seconds(b)
        if rates[b] < 0.7 * max(rates.values()):
            break
    for _ in range(timings - 1):
        for b in rates:
            rates[b] = max(rates[b], b / seconds(b))
    return rates


def fastest(rates: dict[int, float]) -> int:
    """The largest batch size within 10% of the best images per second of the model alone. The limit matters
    only under load, when more images wait than it takes, and there each batch costs more than alone (its
    threads share the cores with decoding and HTTP): at 16 clients on 2 cores, batches of 4 gave 0.9x the
    images per second of batches of 8 for ResNet18 and MobileNetV2, which alone timed them within 10% and
    even tied; batches of 16 gave 0.95-1.0x of 8."""
    best = max(rates.values())
    return max(b for b, r in rates.items() if r >= 0.9 * best)


def decodes_between_batches(device: str, threads: int, settings: Settings) -> bool:
    """Whether a decode waits for the batch running: where the model runs on the CPU with every core the
    worker has, on more than one thread, unless --overlap-decoding. Its threads wait for each other at every
    operation, so a decoding thread that takes a core from one of them holds up all of them (docs/serving.md:
    1.01-1.08x the images per second at 16 clients, and the model at 0.9-1.0 of its speed alone in the server,
    against ~0.7). A model on one thread has no team to hold up."""
    return (device == "cpu" and not settings.overlap_decoding and threads > 1
            and threads * settings.workers >= cpus())


def shown(p: float) -> float:
    """A probability to the digits test.py writes it with (calibration.shown: 0.8163)."""
    return round(float(p), calibration.SHOWN_DIGITS)


def size_threads(onnx: OnnxModel, path: Path, threads: int) -> None:
    """ONNX Runtime's session again, with the server's thread count (its default takes every core, as if
    alone on the machine: with --workers N that is N times too many)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    onnx.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


TRAINING_FIELDS = ("mode", "epoch", "best_epoch", "best_acc", "finished", "train_time_s", "averaged", "world")
EXPORT_FIELDS = ("format", "int8", "top1_agreement", "max_abs_logit_diff", "accuracy_pytorch", "accuracy_export",
                 "tolerance")


def provenance(source: Path) -> dict[str, Any]:
    """Where the model came from: a checkpoint's training (epochs, best validation score, calibration figures,
    the run's folder name), an export's proof (export.py's <file>.json beside it, when there)."""
    if checkpoint.is_onnx(source):
        proof = Path(f"{source}.json")
        try:
            made = json.loads(proof.read_text())
        except (OSError, ValueError):
            return {"export": None}
        return {"export": {k: made[k] for k in EXPORT_FIELDS if k in made} |
                {"checkpoint": Path(str(made.get("checkpoint", ""))).name or None}}
    saved = checkpoint.view(checkpoint.load(source))
    cfg = saved.config
    return {"run": source.resolve().parent.name,
            "training": {k: getattr(saved, k) for k in TRAINING_FIELDS if k in saved.held} |
            {k: cfg[k] for k in ("model", "img_size", "epochs", "recipe", "seed") if k in cfg},
            "calibration": saved.calibration}
