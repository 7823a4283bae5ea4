"""Out-of-fold predictions of a k-fold job: each image's calibrated probabilities from the fold model that
never trained on it (the images of the job's test split: the mean of every fold's, since none saw them),
and the network's penultimate features for outliers. Computed once per job and kept in the cache folder.

Features from different fold models live in different spaces, so they are kept per fold: the fold's
held-out images (the queries) and a sample of the images it trained on (the reference an outlier is far
from), both through the same model.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls import files, runfolder
from imgcls.cleaning.job import Job, split_of
from imgcls.data import imagecache
from imgcls.data import images as image_files
from imgcls.errors import UsageError
from imgcls.evaluation.predictor import Loaded, load_model, run_model
from imgcls.networks import heads
from imgcls.settings import cache_root

VERSION = 2  # of the cached predictions: a change in what they hold makes new ones (2: features at every stage)
REFERENCE = 1000  # training images per fold that outliers are measured against (a seeded sample)


@dataclass
class FoldFeatures:
    """One fold model's penultimate features: of the images it did not train on (`query`, indices into
    Predictions' items) and of a sample of those it trained on (`reference`)."""
    query: np.ndarray
    query_features: np.ndarray
    reference_features: np.ndarray


@dataclass
class Predictions:
    """Every image of the job (the folds' pool, then its test split), with its given label, the fold that
    held it out (0: the test split, predicted by every fold) and its out-of-fold probabilities (a NaN row: an
    image that cannot be read now)."""
    items: list[tuple[str, Any]]
    classes: list[str]
    multilabel: bool
    held_by: np.ndarray
    probs: np.ndarray
    features: list[FoldFeatures] = field(default_factory=list)

    @property
    def readable(self) -> np.ndarray:
        return np.isfinite(self.probs).all(1)


def job_items(job: Job) -> tuple[list[tuple[str, Any]], list[str], bool, np.ndarray, list[dict[str, Any]]]:
    """(every image and its label, the classes, multi-label or not, the fold that validated each (0: the test
    split), each fold's split.json): the folds must share one pool of images and validate on each once."""
    splits = [split_of(fold) for fold in job.folds]
    first = splits[0]

    def items(part: list) -> list[tuple[str, Any]]:
        return [(p, tuple(y) if first.get("multilabel") else int(y)) for p, y in part]

    pool = sorted(items(first["train"] + first["val"]))
    test = sorted(items(first.get("test", [])))
    index = {p: i for i, (p, _) in enumerate(pool + test)}
    held_by = np.zeros(len(index), dtype=np.int64)
    for k, split in enumerate(splits, 1):
        if split["classes"] != first["classes"] or sorted(items(split["train"] + split["val"])) != pool:
            raise UsageError(f"the folds of {job.folder} do not share one set of images and classes (fold-{k} differs "
                             "from fold-1): train the job again")
        for p, _ in split["val"]:
            held_by[index[p]] = k
    if (held_by[:len(pool)] == 0).any():
        raise UsageError(f"some images of {job.folder} were validated on by no fold: train the job again")
    return pool + test, list(first["classes"]), bool(first.get("multilabel")), held_by, splits


def cache_key(job: Job, items: list[tuple[str, Any]]) -> str:
    """What the predictions depend on: each fold's model file and each image file (files.identity)."""
    models = [files.identity(f / runfolder.BEST) for f in job.folds]
    blob = json.dumps([VERSION, imagecache.CACHE_VERSION, REFERENCE, models, [files.identity(p) for p, _ in items],
                       [y for _, y in items]])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def out_of_fold(job: Job, device: str = "auto", batch_size: int = 256, workers: int | None = None,
                cache_dir: str | None = None, max_bytes: int = image_files.MAX_BYTES, progress: bool = True
                ) -> Predictions:
    """The job's out-of-fold predictions: from the cache folder when the models and images are unchanged."""
    items, classes, multi, held_by, splits = job_items(job)
    path = cache_root(cache_dir) / "label-issues" / f"{cache_key(job, items)}.npz"
    found = load(path, items, classes, multi, held_by, len(job.folds))
    if found is not None:
        print(f"out-of-fold predictions of {job.folder}: from the cache ({path.name})")
        return found
    n, probs = len(items), np.full((len(items), len(classes)), np.nan, dtype=np.float32)
    test = held_by == 0
    test_sum, test_seen = np.zeros((n, len(classes)), dtype=np.float64), np.zeros(n, dtype=np.int64)
    index = {p: i for i, (p, _) in enumerate(items)}
    features = []
    for k, (fold, split) in enumerate(zip(job.folds, splits), 1):
        loaded = load_model(fold / runfolder.BEST, device)
        if loaded.classes != classes:
            raise UsageError(f"{fold / runfolder.BEST} knows other classes than its split.json: train the job again")
        query = [i for i in range(n) if held_by[i] == k or test[i]]
        rng = random.Random(k)
        trained = sorted(index[p] for p, _ in split["train"])
        reference = sorted(rng.sample(trained, min(REFERENCE, len(trained))))
        print(f"fold {k} of {len(job.folds)}: predicting {len(query)} held-out images, features of {len(reference)} "
              "it trained on")
        p, feats, ok = predict_with_features(loaded, [items[i] for i in query + reference], batch_size, workers,
                                             cache_images(loaded, splits[0], cache_dir, max_bytes, progress),
                                             max_bytes, progress)
        q = len(query)
        for row, i in enumerate(query):
            if not ok[row]:
                continue
            if test[i]:
                test_sum[i] += p[row]
                test_seen[i] += 1
            else:
                probs[i] = p[row]
        good_q, good_r = ok[:q], ok[q:]
        features.append(FoldFeatures(np.asarray(query)[good_q], feats[:q][good_q], feats[q:][good_r]))
    seen = test & (test_seen > 0)
    probs[seen] = (test_sum[seen] / test_seen[seen, None]).astype(np.float32)
    found = Predictions(items, classes, multi, held_by, probs, features)
    save(path, found)
    return found


def cache_images(loaded: Loaded, split: dict[str, Any], cache_dir: str | None, max_bytes: int, progress: bool
                 ) -> Any:
    """The decoded-image cache training filled (the same files at the same size: nothing decoded again), or
    built now when it is gone; None when it cannot hold every image asked for (a label file's test rows,
    which training never decodes, are then read from their files)."""
    if split.get("test") and not split.get("test_cached"):
        return None
    pre = loaded.preprocess
    paths = sorted([p for p, _ in split["train"] + split["val"] + split.get("test", [])] +
                   [p for p, _ in split.get("skipped", [])])  # as data_split.DataSplit.files() lists them
    cache = imagecache.make_cache("auto", paths, pre.resize_size, cache_dir, max_bytes, pre.resample)
    if cache is not None and not cache.ready:
        cache.build(progress)
    return cache


def stage_ends(model: torch.nn.Module, size: int, to_input: Any) -> list[torch.nn.Module]:
    """The modules whose outputs end each stage of the network, found by one forward pass of a blank image:
    at each spatial size, the module that finishes last (a stage's container after its blocks), among those
    run once per pass. Any network that keeps image-shaped activations has them (a ViT has none)."""
    runs: dict[torch.nn.Module, list] = {}

    def seen(module: torch.nn.Module, _: Any, output: Any) -> None:
        runs.setdefault(module, []).append(tuple(output.shape[-2:]) if isinstance(output, torch.Tensor) and
                                           output.dim() == 4 else None)

    handles = [m.register_forward_hook(seen) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(to_input(torch.zeros(1, 3, size, size, dtype=torch.uint8)))
    finally:
        for h in handles:
            h.remove()
    last: dict[tuple, torch.nn.Module] = {}
    for module, shapes in runs.items():  # in the order they finished
        if len(shapes) == 1 and shapes[0] is not None:
            last.pop(shapes[0], None)
            last[shapes[0]] = module
    return list(last.values())


def predict_with_features(loaded: Loaded, items: list[tuple[str, Any]], batch_size: int, workers: int | None,
                          cache: Any, max_bytes: int, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated probabilities, features, readable or not) of each item, in order, from one pass. The
    features are the network's own at several depths: each stage's output averaged over the image, and what
    enters the head, each scaled to unit length. The last layer alone keeps what tells the classes apart;
    the earlier ones also keep what makes a photo unlike a drawing (Lee et al., 2018, measure outliers so)."""
    _, head = heads.head_of(loaded.model)
    taps = [*stage_ends(loaded.model, loaded.preprocess.img_size, loaded.to_input), head]
    caught: list[list[torch.Tensor]] = [[] for _ in taps]

    def catcher(k: int) -> Any:
        def catch(_: torch.nn.Module, inputs: Any, output: Any = None) -> None:
            x = (inputs[0] if output is None else output).detach().float()
            x = x.mean((2, 3)) if x.dim() == 4 else x.flatten(1)
            caught[k].append(torch.nn.functional.normalize(x, dim=1).cpu())
        return catch

    handles = [m.register_forward_hook(catcher(k)) for k, m in enumerate(taps[:-1])]
    handles.append(head.register_forward_pre_hook(catcher(len(taps) - 1)))
    try:
        logits, _, idx = run_model(loaded, items, batch_size, workers, show=progress, cache=cache, max_bytes=max_bytes)
    finally:
        for h in handles:
            h.remove()
    n = len(items)
    ok = np.zeros(n, dtype=bool)
    probs, feats = np.full((n, len(loaded.classes)), np.nan, np.float32), np.zeros((n, 0), np.float32)
    if len(idx):
        x = torch.cat([torch.cat(c) for c in caught], 1).numpy() / np.sqrt(len(taps))
        feats = np.zeros((n, x.shape[1]), np.float32)
        rows = idx.numpy()
        ok[rows], probs[rows], feats[rows] = True, loaded.probabilities(logits).numpy(), x
    return probs, feats, ok


def save(path: Path, found: Predictions) -> None:
    arrays = {"probs": found.probs, "held_by": found.held_by}
    for k, f in enumerate(found.features):
        arrays |= {f"query{k}": f.query, f"query_features{k}": f.query_features,
                   f"reference_features{k}": f.reference_features}
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path: Path, items: list[tuple[str, Any]], classes: list[str], multi: bool, held_by: np.ndarray,
         folds: int) -> Predictions | None:
    """Cached predictions that fit these images and folds, else None (a damaged or foreign file: computed again)."""
    if not files.is_regular(path):
        return None
    try:
        with np.load(path) as z:
            probs = z["probs"]
            feats = [FoldFeatures(z[f"query{k}"], z[f"query_features{k}"], z[f"reference_features{k}"])
                     for k in range(folds)]
            if probs.shape != (len(items), len(classes)) or not np.array_equal(z["held_by"], held_by):
                return None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return Predictions(items, classes, multi, held_by, probs, feats)
