"""One predictor for trained models and exported ones: load a checkpoint (.pt) or an .onnx file, and
run it over image files in order, each image exactly once, through the checkpoint's evaluation
pipeline (Preprocess), optionally with test-time augmentation; turn its logits into calibrated
probabilities; explain its answers with heatmaps. eval.py and test.py use it for both kinds alike;
export.py checks with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgcls import checkpoint
from imgcls.data import datasets, imagecache
from imgcls.data import images as data_images
from imgcls.data.loaders import make_loader, to_model_input
from imgcls.errors import UsageError
from imgcls.evaluation import calibration, explain
from imgcls.evaluation.inference import predict
from imgcls.machine import auto_workers, pick_device, precision, tune_cpu_allocator
from imgcls.networks import build
from imgcls.networks.folding import fold_batch_norms
from imgcls.preprocess import Preprocess


@dataclass(kw_only=True)
class Loaded:
    """A model ready for inference, with everything needed to feed it and name its outputs."""
    model: Callable[[torch.Tensor], torch.Tensor]
    to_input: Callable[[torch.Tensor], torch.Tensor]
    autocast: Callable
    classes: list[str]
    preprocess: Preprocess
    source: Path
    device: torch.device
    arch: str = "model"
    temperature: float | None = None  # None: a model trained before calibration (softmax as it is)
    flips: bool = True  # mirror images are the same class (trained with flips): TTA may flip
    thresholds: list[float] | None = None  # a multi-label model's, one per label; None: single-label
    label_sep: str = " "  # what separated the labels of its training label file (eval.py reads alike)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (a multi-label model's: each label's sigmoid); logits of several views
        (N x views x classes) are averaged."""
        probs = torch.sigmoid(logits) if self.multilabel else calibration.probabilities(logits, self.temperature or 1.0)
        return probs.mean(1) if probs.dim() == 3 else probs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a uint8 batch as the loader gives it."""
        with torch.no_grad(), self.autocast():
            return self.model(self.to_input(x)).float().cpu()


def load_model(path: str | Path, device_name: str = "auto", amp: bool = False, fold: bool = True) -> Loaded:
    """A checkpoint (.pt, rebuilt from its contents alone; see checkpoint.find) or an exported .onnx.
    Full precision unless `amp`: then a .pt gives the same answers as its export. On the CPU, batch norms
    are folded into the convolutions before them unless not `fold` (networks/folding.py)."""
    path, device = Path(path), pick_device(device_name)
    if checkpoint.is_onnx(path):
        onnx = OnnxModel(path)
        return Loaded(model=onnx, to_input=lambda x: x, autocast=contextlib.nullcontext, classes=onnx.classes,
                      preprocess=onnx.preprocess, source=path, device=torch.device("cpu"), arch=onnx.arch,
                      temperature=onnx.temperature, flips=onnx.flips, thresholds=onnx.thresholds,
                      label_sep=onnx.label_sep)
    ckpt = checkpoint.view(checkpoint.load(path))
    for note in (checkpoint.fitted_elsewhere(ckpt, path), checkpoint.temperature_not_kept(ckpt)):
        if note:
            print(note)
    model = ready_for(build.from_checkpoint(ckpt), device, fold)
    autocast, _ = precision(device, amp)
    pre = ckpt.preprocess
    return Loaded(model=model, to_input=to_model_input(pre, device), autocast=autocast, classes=list(ckpt.classes),
                  preprocess=pre, source=path, device=device, arch=ckpt.arch,
                  temperature=checkpoint.temperature(ckpt, path), flips=checkpoint.trained_with_flips(ckpt),
                  thresholds=checkpoint.thresholds(ckpt, path), label_sep=checkpoint.label_sep(ckpt))


def ready_for(model: torch.nn.Module, device: torch.device, fold: bool = True) -> torch.nn.Module:
    """A network (in eval mode) as eval.py, test.py and serve.py run it on `device`: channels-last, and on
    the CPU its batch norms folded unless not `fold` (export.py times this one against its export)."""
    if device.type == "cpu":
        if fold:  # measured on CPUs only (bench/bench_folding.py); a GPU runs the network as it was trained
            fold_batch_norms(model)
        tune_cpu_allocator()  # as training does: a batch's activations are not page-faulted in again each time
    return model.to(device, memory_format=torch.channels_last)


def run_model(loaded: Loaded, items: list[tuple[str, int]], batch_size: int, workers: int | None, *,
              show: bool = True, cache: imagecache.ImageCache | None = None, max_bytes: int = data_images.MAX_BYTES,
              tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, item indices) for every readable image, in order, each exactly once. With `tta`,
    the logits are N x views x classes, the plain image being view 0."""
    pre = loaded.preprocess
    ds = datasets.ImageDataset(items, pre.resize_size, pre.crop(), cache, max_bytes=max_bytes,
                              num_classes=len(loaded.classes), interpolation=pre.resample)
    n_workers = auto_workers(loaded.device, cached=cache is not None) if workers is None else workers
    loader = make_loader(ds, batch_size, n_workers, loaded.device)  # no shuffle, no dropped batch
    if not tta:
        return predict(loaded.model, loader, loaded.to_input, loaded.autocast, show=show)

    def views(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([loaded.model(loaded.to_input(v)) for v in tta_views(x, loaded.flips)], 1)

    return predict(views, loader, lambda x: x, loaded.autocast, show=show)


TTA_ZOOM = 0.875  # the crops' side, as a share of the image's: the usual eval crop ratio


def tta_views(x: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """Test-time augmentation of a uint8 batch: the image itself, its centre and two opposite corners
    zoomed to the same size; and, for a model trained with flips, the image and its centre mirrored."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * TTA_ZOOM)), max(1, round(w * TTA_ZOOM))

    def zoom(top: int, left: int) -> torch.Tensor:
        crop = x[..., top:top + ch, left:left + cw].float()
        return F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True,
                             align_corners=False).round().clamp(0, 255).to(x.dtype)

    centre = zoom((h - ch) // 2, (w - cw) // 2)
    views = [x, centre, zoom(0, 0), zoom(h - ch, w - cw)]
    return [*views, x.flip(-1), centre.flip(-1)] if flips else views


def input_images(loaded: Loaded, paths: list[str], max_bytes: int = data_images.MAX_BYTES
                 ) -> Iterator[torch.Tensor | None]:
    """Each file as the model sees it (uint8 3 x img_size x img_size), or None when unreadable; one at a
    time, so that explaining 100,000 images holds one in memory."""
    pre, crop = loaded.preprocess, loaded.preprocess.crop()
    for path in paths:
        try:
            arr = data_images.load_image(path, pre.resize_size, max_bytes, pre.resample)
            yield crop(torch.from_numpy(arr).permute(2, 0, 1))
        except (data_images.BadImage, OSError):
            yield None


class Explainer:
    """Heatmaps of the evidence for a class in an image: Grad-CAM for a .pt whose network ends in a
    convolutional feature map, occlusion for the rest (an .onnx file, a vision transformer). `note`
    says which, and why."""

    def __init__(self, loaded: Loaded):
        self.loaded, self.target = loaded, None
        if not isinstance(loaded.model, torch.nn.Module):
            self.method, self.note = "occlusion", "an .onnx file has no gradients: the heatmaps are occlusion maps"
            return
        size = loaded.preprocess.img_size
        example = loaded.to_input(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        try:
            self.target = explain.find_target(loaded.model, example)
            self.method, self.note = "grad-cam", f"Grad-CAM on {loaded.arch}'s {self.target.name}"
        except explain.NoFeatureMap as e:
            self.method = "occlusion"
            self.note = f"Grad-CAM does not apply to {loaded.arch}: {e}; the heatmaps are occlusion maps"

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """N x H x W maps in [0, 1] for uint8 images N x 3 x H x W as the model takes them."""
        if self.target is not None:
            return torch.cat([explain.grad_cam(self.loaded.model, self.loaded.to_input(images[i:i + 16]),
                                               classes[i:i + 16], self.target).cpu()
                              for i in range(0, len(images), 16)])
        return torch.stack([explain.occlusion(self.loaded, image, int(c), self.loaded.temperature or 1.0,
                                              multilabel=self.loaded.multilabel)
                            for image, c in zip(images, classes)])


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
        self.temperature = checkpoint.checked_temperature(meta["temperature"], path) if "temperature" in meta else None
        self.flips = json.loads(meta.get("hflip", "true"))
        self.thresholds = checkpoint.checked_thresholds(json.loads(meta["thresholds"]), len(self.classes), path) \
            if meta.get("multilabel") == "true" else None
        self.label_sep = meta.get("label_sep") or " "
        self.arch = meta.get("arch", Path(path).stem)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def thumbnail(path: str, size: int = 160) -> np.ndarray | None:
    try:
        img = data_images.decode(path, draft=size)
    except (data_images.BadImage, OSError):
        return None
    img.thumbnail((size, size))
    return np.asarray(img)
