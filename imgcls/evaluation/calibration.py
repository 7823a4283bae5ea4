"""Confidence a user can threshold: temperature scaling fitted on the validation set, and the measures
that say whether probabilities mean what they say (expected calibration error, the reliability
diagram's bins, risk-coverage and top-k accuracy).

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T before the softmax: the
predicted class never changes, only how sure the model says it is. T minimises the validation
negative log-likelihood, with a weak prior on log T (a standard normal) so that a validation set
with no mistakes, or only a few images, cannot drive T to an extreme it has no evidence for. Its
error is measured on validation images it was not fitted on (calibrate), and a T that raises it is
not kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

BINS = 15  # the usual ECE bin count (Guo et al.; Naeini et al.)
LOG_T_RANGE = (math.log(0.05), math.log(20.0))
THRESHOLDS = [round(0.05 * i, 2) for i in range(20)] + [0.96, 0.97, 0.98, 0.99]  # for risk-coverage


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor,
                    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> float:
    """T minimising NLL(logits / T) + log(T)^2 / 2, by golden-section search over log T (the NLL is
    convex in 1/T, so the search finds the minimum). `all_reduce` sums over processes: each holds a
    shard of the validation set, and every process gets the same T."""
    logits, targets = logits.double(), targets.long()

    def cost(u: float) -> float:
        nll = F.cross_entropy(logits * math.exp(-u), targets, reduction="sum") if len(targets) else \
            torch.zeros((), dtype=torch.float64)
        return float(all_reduce(nll.reshape(1))[0]) + 0.5 * u * u

    lo, hi = LOG_T_RANGE
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = cost(a), cost(b)
    for _ in range(48):  # the bracket shrinks to ~1e-9 of its width
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = cost(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = cost(b)
    return math.exp((lo + hi) / 2)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The softmax of logits / T: what every script shows and writes as a probability."""
    return (logits.float() / temperature).softmax(-1)


def bin_sums(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Per equal-width confidence bin: (images, summed confidence, correct ones), float64; sums, so
    that processes holding shards of the data add theirs up."""
    conf, pred = probs.max(1)
    which = torch.clamp((conf.double() * bins).ceil().long() - 1, 0, bins - 1)  # (0, 1/bins] is the first bin
    return torch.stack([torch.bincount(which, minlength=bins).double(),
                        torch.bincount(which, weights=conf.double(), minlength=bins),
                        torch.bincount(which, weights=(pred == targets).double(), minlength=bins)])


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict[str, list[float]]:
    """Per bin: images, mean confidence and accuracy: the reliability diagram."""
    count, conf_sum, right = bin_sums(probs, targets, bins)
    def mean(total: torch.Tensor) -> list[float | None]:  # JSON has no NaN: an empty bin is null
        return [float(t / c) if c else None for t, c in zip(total, count)]

    return {"count": count.tolist(), "confidence": mean(conf_sum), "accuracy": mean(right)}


def ece_of(sums: torch.Tensor) -> float:
    """Expected calibration error from bin_sums: the gap between confidence and accuracy, averaged
    over bins weighted by their images (a fraction: 0.05 is five points)."""
    count, conf_sum, right = sums
    return float((conf_sum - right).abs().sum() / count.sum().clamp(min=1))


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> float:
    return ece_of(bin_sums(probs, targets, bins))


SHOWN_DIGITS = 4  # a probability as predictions.csv writes it (0.8163), and as --reject-below compares it


def shown(p: float) -> str:
    """A probability as it is written for people and files."""
    return f"{p:.{SHOWN_DIGITS}f}"


def kept(p: float, threshold: float) -> bool:
    """Whether `test.py --reject-below threshold` keeps an image whose top probability is `p`: compared as
    shown, so an image written as 0.8163 is never "unknown, 0.8163" at --reject-below 0.8163."""
    return float(shown(p)) >= threshold


def risk_coverage(probs: torch.Tensor, targets: torch.Tensor,
                  thresholds: list[float] = THRESHOLDS) -> list[dict[str, float]]:
    """For each threshold P: the share of images whose top probability is at least P (coverage) and
    the accuracy on those (what `test.py --reject-below P` keeps, by the same rule, `kept`; the rest
    become "unknown")."""
    conf, pred = probs.max(1)
    correct = (pred == targets).float()
    as_shown = torch.tensor([float(shown(c)) for c in conf.tolist()], dtype=torch.float64)
    rows = []
    for p in thresholds:
        kept = as_shown >= p
        n = int(kept.sum())
        rows.append({"threshold": p, "coverage": n / max(1, len(conf)),
                     "accuracy": 100 * float(correct[kept].mean()) if n else None})
    return rows


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Percent of images whose true class is among the k most probable."""
    if not len(targets):
        return float("nan")
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return 100 * float((top == targets[:, None]).any(1).float().mean())


def halves(targets: torch.Tensor) -> torch.Tensor:
    """The first of two halves of a set of images (a mask): every other image of each class, in the order
    given, so that both halves hold each class about equally."""
    first = torch.zeros(len(targets), dtype=torch.bool)
    for c in targets.unique():
        first[(targets == c).nonzero()[::2, 0]] = True
    return first


def calibrate(logits: torch.Tensor, targets: torch.Tensor,
              all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float | bool | int]:
    """Temperature scaling judged on images it was not fitted on, as stored with a checkpoint.

    The temperature is fitted on all the validation images (`fitted`), but its error on them (`ece_in_sample`)
    flatters it: they are the images it was fitted on, and the images best.pt was chosen on. So each half of
    them (halves()) is also calibrated by a temperature fitted on the other half alone, and the expected
    calibration error of those probabilities (`ece`) is what a new image can expect, against the raw
    softmax's (`ece_raw`, which nothing was fitted for). A temperature that raises that error (a likelihood
    pulled by a few confident mistakes, too few images) is not kept: `temperature` is then 1, the raw softmax.
    `all_reduce` sums over processes, each holding a shard of the images (and its own two halves of it)."""
    first = halves(targets)
    fitted = fit_temperature(logits, targets, all_reduce)
    t_first, t_second = (fit_temperature(logits[m], targets[m], all_reduce) for m in (first, ~first))
    held_out = torch.empty(logits.shape, dtype=torch.float32)
    held_out[first] = probabilities(logits[first], t_second)
    held_out[~first] = probabilities(logits[~first], t_first)
    raw = all_reduce(bin_sums(probabilities(logits), targets))
    ece_raw, ece_held_out = ece_of(raw), ece_of(all_reduce(bin_sums(held_out, targets)))
    kept = ece_held_out <= ece_raw
    return {"temperature": fitted if kept else 1.0, "fitted": fitted, "kept": kept, "ece_raw": ece_raw,
            "ece": ece_held_out, "ece_in_sample": ece_of(all_reduce(bin_sums(probabilities(logits, fitted), targets))),
            "images": int(raw[0].sum())}
