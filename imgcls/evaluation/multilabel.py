"""Multi-label classification (a label file with a `labels` column): each image holds any number of the
labels, so each label is its own yes/no question. The network's outputs are independent logits
(probability = sigmoid), trained with binary cross-entropy; a label is said present when its
probability reaches its own threshold, tuned on the validation images (the one that maximises the
label's F1). Models are compared by mAP, the mean over labels of their average precision, which needs
no threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from imgcls.evaluation.result import EvalResult, LabelScores, MultiLabelScores

DEFAULT_THRESHOLD = 0.5  # a label never seen in validation keeps it


# No tuned threshold goes below this: on a handful of validation positives the best F1 can sit at a
# probability of 0.0003, and a label said present "at 0.0%" is no answer a user can trust. The tuning then
# takes the best F1 among the thresholds at or above the floor.
MIN_THRESHOLD = 0.1


def average_precision(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each label's average precision (scikit-learn's); NaN for a label with no positive image, whose
    precision is undefined."""
    from sklearn.metrics import average_precision_score

    return np.array([average_precision_score(y[:, c], probs[:, c]) if y[:, c].any() else np.nan
                     for c in range(y.shape[1])], dtype=float)


def mean_ap(ap: np.ndarray) -> float:
    """mAP in percent over the labels that have positives (0 when none has)."""
    known = ap[~np.isnan(ap)]
    return 100 * float(known.mean()) if len(known) else 0.0


def tune_thresholds(y: np.ndarray, probs: np.ndarray, floor: float = MIN_THRESHOLD) -> list[float]:
    """Per label, the threshold with the best F1 on these images among those at or above `floor`: half-way
    between the lowest probability it accepts and the next lower one (never below the floor), so that a new
    image scored between them is not decided by a hair. A label without positives here keeps
    DEFAULT_THRESHOLD; one whose images all score under the floor gets the floor."""
    from sklearn.metrics import precision_recall_curve

    out = []
    for c in range(y.shape[1]):
        if not y[:, c].any():
            out.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = precision_recall_curve(y[:, c], probs[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        allowed = np.flatnonzero(cuts >= floor)
        if not len(allowed):
            out.append(floor)
            continue
        cut = float(cuts[allowed[int(np.argmax(f1[allowed]))]])
        below = probs[:, c][probs[:, c] < cut]
        half_way = (cut + float(below.max())) / 2 if len(below) else cut / 2  # unrounded: between the two
        out.append(max(floor, half_way))
    return out


def decide(probs: torch.Tensor | np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Which labels each image is said to have: probability at or above the label's threshold."""
    return np.asarray(probs) >= np.asarray(thresholds, dtype=float)[None, :]


def micro_f1(y: np.ndarray, probs: np.ndarray, thresholds: Sequence[float]) -> float:
    """F1 in percent over every (image, label) decision at the thresholds (0 when nothing is positive)."""
    from sklearn.metrics import f1_score

    return 100 * float(f1_score(y, decide(probs, thresholds).astype(np.int64), average="micro", zero_division=0))


def undefined_as_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def metrics(y: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], classes: list[str]) -> EvalResult:
    """mAP; micro and macro F1 at the thresholds; per label precision, recall, F1, AP, support and
    threshold; scikit-learn's classification report; the share of images with exactly their labels.
    Scikit-learn's definitions throughout, a 0/0 left undefined (None) and out of the averages: a label
    neither present nor predicted has no F1; one predicted but absent has F1 0."""
    from sklearn.metrics import classification_report, f1_score, precision_recall_fscore_support

    pred = decide(probs, thresholds).astype(np.int64)
    ap = average_precision(y, probs)
    p, r, f1, support = precision_recall_fscore_support(y, pred, zero_division=np.nan)
    per_label = {classes[c]: LabelScores(precision=undefined_as_none(p[c]), recall=undefined_as_none(r[c]),
                                         f1=undefined_as_none(f1[c]), ap=undefined_as_none(ap[c]),
                                         support=int(support[c]), threshold=float(thresholds[c]))
                 for c in range(len(classes))}
    score = {k: undefined_as_none(f1_score(y, pred, average=k, zero_division=np.nan)) for k in ("micro", "macro")}
    scores = MultiLabelScores(map=mean_ap(ap) if not np.isnan(ap).all() else None,
                              micro_f1=None if score["micro"] is None else 100 * score["micro"],
                              macro_f1=None if score["macro"] is None else 100 * score["macro"],
                              exact_match=100 * float((pred == y).all(1).mean()) if len(y) else 0.0,
                              per_label=per_label)
    return EvalResult(classes=classes, images=len(y), multilabel=scores,
                      report=classification_report(y, pred, target_names=classes, digits=4, zero_division=np.nan))


def shown(value: float | None, spec: str = ".2f", suffix: str = "%") -> str:
    """A metric for people: 'n/a' where it is undefined (no image has the label, say)."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_metrics(result: EvalResult) -> None:
    m = result.multilabel
    assert m is not None
    print(f"mAP (mean average precision over labels) on the {result.images} images evaluated: {shown(m.map)}"
          + (" (no image evaluated has any of the labels)" if m.map is None else ""))
    print(f"F1 at the tuned thresholds: micro {shown(m.micro_f1)}, macro {shown(m.macro_f1)}; images with "
          f"exactly their labels: {m.exact_match:.2f}%")
    width = max(len(c) for c in result.classes)
    print(f"\n{'label':>{width}}  support  threshold  precision  recall     F1      AP")
    for name, r in m.per_label.items():
        print(f"{name:>{width}}  {r.support:7d}  {r.threshold:9.3f}  {shown(r.precision, '9.4f', '')}  "
              f"{shown(r.recall, '.4f', '')}  {shown(r.f1, '.4f', '')}  {shown(r.ap, '.4f', '')}")
    print("\n" + result.report)
    if m.tta:
        print(f"With test-time augmentation: mAP {shown(m.map)} (without: {shown(m.map_without_tta)})")
