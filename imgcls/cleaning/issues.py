"""Label issues from out-of-fold predictions, by cleanlab's confident learning (Northcutt et al., 2021): images
whose given label the probabilities contradict (multi-label: labels that look missing or extra), outliers
(images far, in the network's own features, from every image it trained on) and look-alikes across
classes (the same picture labelled twice: dataset.py check's perceptual hashes)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgcls.cleaning.oof import Predictions
from imgcls.data import check as file_check
from imgcls.data import images as image_files

KINDS = ("label", "outlier", "look-alike")
NEIGHBOURS = 10  # an outlier's distance is the mean over its nearest training images in feature space
# an image is an outlier when it is further from the training images than all but this share of the training
# images are from each other (cleanlab's OutOfDistribution scores, both measured through the same fold model)
OUTLIER_SHARE = 0.002
MULTI_THRESHOLD = 0.5  # a look-alike pair's suggested labels (multi-label): those this probable


@dataclass
class Issue:
    """One finding about one image (an index into Predictions.items): its kind, how sure (0..1, higher: more
    surely an issue), the label suggested instead (a class index, a tuple of them, or None: none) and a note."""
    index: int
    kind: str
    score: float
    suggested: Any
    note: str


def find_issues(pred: Predictions, filter_by: str = "prune_by_noise_rate", cache_dir: str | None = None,
                max_bytes: int = image_files.MAX_BYTES) -> list[Issue]:
    """Every issue, by kind (label issues, outliers, look-alikes), each kind ranked surest first."""
    found = []
    for kind in (label_issues(pred, filter_by), outliers(pred), lookalikes_across(pred, cache_dir, max_bytes)):
        found += sorted(kind, key=lambda issue: (-issue.score, pred.items[issue.index][0]))
    return found


def label_issues(pred: Predictions, filter_by: str = "prune_by_noise_rate") -> list[Issue]:
    rows = np.flatnonzero(pred.readable)
    probs = pred.probs[rows].astype(np.float64)
    if pred.multilabel:
        return multilabel_issues(pred, rows, probs, filter_by)
    from cleanlab.filter import find_label_issues

    probs /= probs.sum(1, keepdims=True)  # (float32 sums drift from 1; cleanlab checks)
    given = np.array([pred.items[i][1] for i in rows])
    with warnings.catch_warnings():  # cleanlab warns of tiny classes; the folds' summary said so already
        warnings.simplefilter("ignore")
        flagged = find_label_issues(given, probs, filter_by=filter_by, n_jobs=1)
    out = []
    for r in np.flatnonzero(flagged):
        p, y = probs[r], int(given[r])
        other = np.where(np.arange(len(p)) == y, -1.0, p)
        best = int(other.argmax())
        out.append(Issue(int(rows[r]), "label", float(1 - p[y]), best,
                         f"out-of-fold probability {p[y]:.0%} for the given label, {p[best]:.0%} for the suggested"
                         + held_note(pred, int(rows[r]))))
    return out


def multilabel_issues(pred: Predictions, rows: np.ndarray, probs: np.ndarray, filter_by: str) -> list[Issue]:
    """Images whose label set looks wrong, with the labels that look missing and those that look extra."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues, find_multilabel_issues_per_class

    given = [list(pred.items[i][1]) for i in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(given, probs, filter_by=filter_by, n_jobs=1)
        per_class = np.array(find_multilabel_issues_per_class(given, probs, filter_by=filter_by, n_jobs=1))
        quality = get_label_quality_scores(given, probs)
    if per_class.shape != probs.shape:  # (documented as a list of a mask per class; 2.9 returns images x classes)
        per_class = per_class.T
    names, out = pred.classes, []
    for r in np.flatnonzero(flagged):
        has = set(given[r])
        wrong = set(np.flatnonzero(per_class[r]).tolist()) or \
            {c for c in range(len(names)) if (probs[r, c] >= MULTI_THRESHOLD) != (c in has)}
        missing, extra = sorted(wrong - has), sorted(wrong & has)
        if not missing and not extra:
            continue
        note = "; ".join(f"{what}: " + ", ".join(f"{names[c]} ({probs[r, c]:.0%})" for c in cs)
                         for what, cs in (("missing", missing), ("extra", extra)) if cs)
        out.append(Issue(int(rows[r]), "label", float(1 - quality[r]), tuple(sorted((has - set(extra)) | set(missing))),
                         note + held_note(pred, int(rows[r]))))
    return out


def held_note(pred: Predictions, i: int) -> str:
    k = int(pred.held_by[i])
    return f" (fold {k}'s model, which never saw it)" if k else " (every fold's model: a test image)"


def outlier_scores(pred: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(each image's outlier score, 0..1, higher: further from the training images; NaN: not measured, and the
    score above which an image is an outlier, per image: its fold's), by cleanlab's OutOfDistribution on the
    L2-normalised penultimate features (the mean distance to the nearest training images, scaled by its
    median among them). A test image is measured by every fold: the mean."""
    from cleanlab.outlier import OutOfDistribution

    n = len(pred.items)
    total, cut, seen = np.zeros(n), np.zeros(n), np.zeros(n)
    for fold in pred.features:
        if len(fold.reference_features) <= NEIGHBOURS or not len(fold.query):
            continue
        ood = OutOfDistribution(params={"k": NEIGHBOURS})
        reference = 1 - ood.fit_score(features=unit(fold.reference_features), verbose=False)
        scores = 1 - ood.score(features=unit(fold.query_features))
        total[fold.query] += scores
        cut[fold.query] += np.quantile(reference, 1 - OUTLIER_SHARE)
        seen[fold.query] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / seen, cut / seen


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def outliers(pred: Predictions) -> list[Issue]:
    scores, cut = outlier_scores(pred)
    out = []
    for i in np.flatnonzero(scores > cut):
        p = pred.probs[i]
        best = int(np.nanargmax(p))
        out.append(Issue(int(i), "outlier", float(scores[i]), None,
                         f"far from every image of every class (the nearest class: {pred.classes[best]}, "
                         f"{p[best]:.0%})" + held_note(pred, int(i))))
    return out


def lookalikes_across(pred: Predictions, cache_dir: str | None = None, max_bytes: int = image_files.MAX_BYTES
                      ) -> list[Issue]:
    """Pairs of images that are the same picture (dataset.py check's perceptual hashes, remembered from the
    job's own check) with different labels: a row for each, with the label the models give the pair."""
    paths = [p for p, _ in pred.items]
    checked = file_check.check_files(paths, cache_dir, progress=False, max_bytes=max_bytes)
    looks = {p: "sha1:" + c[1] if c[2] == "plain" else c[2] for p, c in checked.items() if c[2]}
    index = {p: i for i, p in enumerate(paths)}
    out = []
    for a, b, d in file_check.lookalikes(paths, None, looks):
        i, j = index[a], index[b]
        if pred.items[i][1] == pred.items[j][1]:
            continue
        both = np.nanmean(pred.probs[[i, j]], axis=0) if pred.readable[[i, j]].any() else None
        suggested = None if both is None else (tuple(np.flatnonzero(both >= MULTI_THRESHOLD).tolist())
                                               if pred.multilabel else int(both.argmax()))
        for x, y in ((i, j), (j, i)):
            out.append(Issue(x, "look-alike", 1 - d / 256, suggested,
                             f"the same picture as {paths[y]}, labelled {label_names(pred, pred.items[y][1])} "
                             f"(perceptual hash {d} bits apart of 256)"))
    return out


def label_names(pred: Predictions, y: Any, sep: str = " ") -> str:
    """A label as people read it: the class, or a multi-label image's labels joined by `sep`."""
    if y is None:
        return ""
    return sep.join(pred.classes[c] for c in y) if isinstance(y, tuple) else pred.classes[int(y)]
