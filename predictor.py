"""One predictor for trained models and exported ones: load a checkpoint (.pt) or an .onnx file, and
run it over image files in order, each image exactly once, through the checkpoint's evaluation
pipeline (Preprocess). eval.py and test.py use it for both kinds alike; export.py checks with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoint
import dataset
import models
from checkpoint import Preprocess
from config import UsageError
from engine import auto_workers, make_loader, pick_device, precision, predict, to_model_input


@dataclass
class Loaded:
    """A model ready for inference, with everything needed to feed it and name its outputs."""
    model: Callable[[torch.Tensor], torch.Tensor]
    to_input: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable
    classes: list[str]
    preprocess: Preprocess
    source: Path
    device: torch.device


def load_model(path: str | Path, device_name: str = "auto", amp: bool = False) -> Loaded:
    """A checkpoint (.pt, rebuilt from its contents alone; see checkpoint.find) or an exported .onnx.
    Full precision unless `amp`: then a .pt gives the same answers as its export."""
    path, device = Path(path), pick_device(device_name)
    if checkpoint.is_onnx(path):
        onnx = OnnxModel(path)
        return Loaded(onnx, lambda x: x, contextlib.nullcontext, onnx.classes, onnx.preprocess,
                      path, torch.device("cpu"))
    ckpt = checkpoint.load(path)
    model = models.from_checkpoint(ckpt).to(device, memory_format=torch.channels_last)
    autocast, _ = precision(device, amp)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    return Loaded(model, to_model_input(pre, device), autocast, list(ckpt["classes"]), pre, path, device)


def run_model(loaded: Loaded, items: list[tuple[str, int]], batch_size: int, workers: int | None,
              show: bool = True, cache: dataset.ImageCache | None = None, max_bytes: int = dataset.MAX_BYTES
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, targets, item indices) for every readable image, in order, each exactly once."""
    pre = loaded.preprocess
    ds = dataset.ImageDataset(items, pre.resize_size, pre.crop(), cache, max_bytes=max_bytes)
    n_workers = auto_workers(loaded.device, cached=cache is not None) if workers is None else workers
    loader = make_loader(ds, batch_size, n_workers, loaded.device)  # no shuffle, no dropped batch
    logits, targets, idx = predict(loaded.model, loader, loaded.to_input, loaded.autocast, show=show)
    return logits.softmax(1) if len(idx) else logits, targets, idx


class OnnxModel:
    """An exported .onnx run with onnxruntime, usable wherever eval.py and test.py use a model."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("running .onnx models needs onnxruntime: pip install -r requirements-export.txt") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UsageError(f"{path} is not a loadable ONNX model ({str(e).splitlines()[0][:120]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta:
            raise UsageError(f"{path} has no class names in its metadata: export it with export.py")
        self.classes = json.loads(meta["classes"])
        self.preprocess = Preprocess.from_metadata(meta)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def thumbnail(path: str, size: int = 160) -> np.ndarray | None:
    try:
        img = dataset.decode(path, draft=size)
    except (dataset.BadImage, OSError):
        return None
    img.thumbnail((size, size))
    return np.asarray(img)
