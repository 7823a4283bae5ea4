"""The feature cache (transfer mode): a frozen backbone's features computed once and served like images."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgcls import checkpoint, files, settings
from imgcls.data import compactcache, datasets, imagecache
from imgcls.data import split as data_split
from imgcls.data.loaders import make_loader
from imgcls.evaluation.inference import predict
from imgcls.machine import (
    autocast_dtype,
)
from imgcls.networks import heads
from imgcls.preprocess import Preprocess
from imgcls.settings import TrainConfig
from imgcls.training import runstate
from imgcls.training.distributed import (
    barrier,
)


class Features(Dataset):
    """Cached backbone features, served like images: (feature, label, index)."""

    def __init__(self, x: torch.Tensor, labels: list[int]):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int, int]:
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], self.labels[i], i


# ----------------------------------------------------------------------------- feature cache

FEATURE_VERSION = 3  # 2: keyed by file identities, weights identity, precision and memory format; 3: and decoding


def backbone_features(model: nn.Module, loaders: dict[str, DataLoader], to_input: Callable, autocast: Callable,
                      path: Path, show: bool) -> dict[str, torch.Tensor]:
    """The frozen backbone's output for every image, computed once and kept on disk; a cache file
    that is not what this run needs (damaged, planted, of other images) is rebuilt, never trusted."""
    if files.is_regular(path):
        feats = load_features(path, {split: len(loader.dataset) for split, loader in loaders.items()})
        if feats is not None:
            return feats
        imagecache.warn(f"rebuilding a damaged feature cache ({path.name})")
    name, head = heads.head_of(model)
    heads.set_module(model, name, nn.Identity())  # the network minus its head is the backbone
    model.eval()
    try:
        feats = {}
        for split, loader in loaders.items():
            x, _, idx = predict(model, loader, to_input, autocast, desc=f"caching {split} features", show=show)
            out = torch.full((len(loader.dataset), x.shape[1]), float("nan"))
            out[idx] = x
            feats[split] = out
    finally:
        heads.set_module(model, name, head)
    checkpoint.save(feats, path)
    return feats


def load_features(path: Path, rows: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """Cached features if the file holds a float matrix per split with one row per image, else None."""
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged in any way: rebuilt
        return None
    good = isinstance(feats, dict) and all(
        isinstance(feats.get(k), torch.Tensor) and feats[k].dtype == torch.float32 and feats[k].dim() == 2
        and feats[k].shape[0] == n for k, n in rows.items())
    return feats if good else None


def features_dataset(x: torch.Tensor, items: list[tuple[str, Any]], num_classes: int) -> Features:
    """Cached features with their targets; images that could not be read (NaN rows) are left out."""
    ok = torch.isfinite(x).all(1)
    return Features(x[ok], [y for y, good in zip(datasets.targets(items, num_classes), ok.tolist()) if good])


def feature_key(cfg: TrainConfig, weights_id: list, preprocess: Preprocess, split: data_split.DataSplit,
                device: torch.device, cache: str = "raw") -> str:
    """Everything that changes the features: each file's identity, the model and its weights, the
    preprocessing, the precision and memory format they are computed in, and the pixels they come
    from: how they were decoded (dataset.CACHE_VERSION) and the compact cache's JPEG encoding (raw and
    uncached ones are the same)."""
    dtype = autocast_dtype(device, cfg.amp)
    pixels = [f"jpeg-q{compactcache.QUALITY}"] if cache == "compact" else []  # (older keys stay valid)
    blob = json.dumps([FEATURE_VERSION, imagecache.CACHE_VERSION, cfg.model, weights_id, preprocess.to_dict(),
                       str(dtype),
                       cfg.channels_last, [files.identity(p) for p, _ in split.train + split.val], *pixels])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def feature_inputs(run: runstate.Run, model: nn.Module, images: runstate.Inputs, image_input: Callable,
                   autocast: Callable,
                   workers: int, kind: str) -> runstate.Inputs:
    """Transfer mode's fast path: the backbone is a fixed function (see models.py), so its output per
    image never changes. It is computed once (rank 0, kept on disk) and the head alone trains on it.
    Augmentation is off on this path."""
    cfg, split, device = run.cfg, run.split, run.device
    key = feature_key(cfg, run.weights_id, run.preprocess, split, device, kind)
    path = settings.cache_root(cfg.cache_dir) / "features" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if run.local_lead:  # one per machine, as the image cache
        plain_train = copy.copy(images.train)  # the same images without augmentation
        plain_train.transform = images.val.transform
        plain = {"train": plain_train, "val": images.val}
        loaders = {k: make_loader(v, 2 * cfg.batch_size, workers, device) for k, v in plain.items()}
        feats = backbone_features(model, loaders, image_input, autocast, path, run.lead)
    barrier(preparation=True)
    if not run.local_lead:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    run.say(f"transfer: training the head on cached backbone features ({path.name}); augmentation off")
    n = len(split.classes)
    return runstate.Inputs(features_dataset(feats["train"], split.train, n), features_dataset(feats["val"],
                                                                                              split.val, n),
                  heads.head_of(model)[1], lambda x: x.to(device, non_blocking=True), use_features=True)
