"""The evaluation result: one typed object, built once by eval, that the terminal lines, metrics.json and
report.html all render, so that the three cannot disagree and no reader has to guess a metric from its key.

`EvalResult.to_json()` is metrics.json, key for key and in the same order as before this object existed:
users and scripts read that file. No torch here: report.html is written without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METRICS_JSON = "metrics.json"  # what eval.py writes to --out: EvalResult.to_json
Bins = dict[str, list[float | None]]  # a reliability diagram's bins: count, confidence, accuracy


@dataclass(frozen=True)
class ClassScores:
    """One class of a single-label evaluation (accuracy in percent, the rest as fractions)."""
    accuracy: float
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class LabelScores:
    """One label of a multi-label evaluation; None where scikit-learn's 0/0 leaves it undefined."""
    precision: float | None
    recall: float | None
    f1: float | None
    ap: float | None
    support: int
    threshold: float


@dataclass(frozen=True)
class Confused:
    """A pair of classes the model mixes up: `count` images of `true` said to be `predicted`."""
    true: str
    predicted: str
    count: int


@dataclass(frozen=True)
class Caveat:
    """Images evaluated that the model trained on (kind "training") or was chosen on ("validation")."""
    kind: str
    why: str
    images: int
    text: str


@dataclass(frozen=True)
class Ece:
    """Expected calibration error (a fraction) of the raw softmax, after the temperature, and with TTA."""
    raw: float | None
    calibrated: float | None
    tta: float | None = None  # only with --tta

    def to_json(self) -> dict[str, float | None]:
        return {"raw": self.raw, "calibrated": self.calibrated, **({"tta": self.tta} if self.tta is not None else {})}


@dataclass(frozen=True)
class Confidence:
    """How far a single-label model's probabilities can be trusted (see calibration.py)."""
    temperature: float
    calibrated: bool  # False: the checkpoint has no fitted temperature (the raw softmax, temperature 1)
    ece: Ece
    reliability: dict[str, Bins] = field(default_factory=dict)  # "raw", "calibrated"
    risk_coverage: list[dict[str, float | None]] = field(default_factory=list)
    tta_accuracy: float | None = None  # with --tta: the accuracy with it, and without
    accuracy_without_tta: float | None = None

    def to_json(self) -> dict[str, Any]:
        tta = ({"tta_accuracy": self.tta_accuracy, "accuracy_without_tta": self.accuracy_without_tta}
               if self.tta_accuracy is not None else {})
        return {"temperature": self.temperature, "calibrated": self.calibrated, "ece": self.ece.to_json(),
                "reliability": self.reliability, "risk_coverage": self.risk_coverage, **tta}


@dataclass(frozen=True)
class MultiLabelScores:
    """A multi-label evaluation's own measures (percentages; None where undefined)."""
    map: float | None
    micro_f1: float | None
    macro_f1: float | None
    exact_match: float
    per_label: dict[str, LabelScores]
    tta: bool = False  # with --tta, map_without_tta is in metrics.json (even when undefined: null)
    map_without_tta: float | None = None


@dataclass(frozen=True)
class EvalResult:
    """What eval.py found: single-label (accuracy, confusion matrix, per class, top-k, confidence) or
    multi-label (`multilabel`), and what was evaluated. `report` is scikit-learn's text report: it goes to
    the terminal and classification_report.txt, not to metrics.json."""
    classes: list[str]
    images: int
    report: str = ""
    accuracy: float | None = None  # single-label, percent
    confusion_matrix: list[list[int]] = field(default_factory=list)
    per_class: dict[str, ClassScores] = field(default_factory=dict)
    most_confused: list[Confused] = field(default_factory=list)
    top_k: dict[int, float] = field(default_factory=dict)  # k -> percent of images whose class is in the top k
    confidence: Confidence | None = None
    multilabel: MultiLabelScores | None = None
    checkpoint: str | None = None
    data: str | None = None
    evaluated: str | None = None  # which images, in words
    caveats: list[Caveat] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def to_json(self) -> dict[str, Any]:
        """metrics.json."""
        return {**(self._multilabel_json() if self.multilabel is not None else self._single_json()),
                **{k: v for k, v in (("checkpoint", self.checkpoint), ("data", self.data),
                                     ("evaluated", self.evaluated)) if v is not None},
                "caveats": [asdict(c) for c in self.caveats], "skipped": [list(s) for s in self.skipped]}

    def _single_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "images": self.images, "classes": self.classes,
                "confusion_matrix": self.confusion_matrix,
                "per_class": {name: asdict(s) for name, s in self.per_class.items()},
                "most_confused": [asdict(c) for c in self.most_confused],
                **{f"top{k}_accuracy": v for k, v in sorted(self.top_k.items())},
                **(self.confidence.to_json() if self.confidence is not None else {})}

    def _multilabel_json(self) -> dict[str, Any]:
        ml = self.multilabel
        assert ml is not None
        return {"map": ml.map, "images": self.images, "classes": self.classes, "micro_f1": ml.micro_f1,
                "macro_f1": ml.macro_f1, "exact_match": ml.exact_match,
                "per_label": {name: asdict(s) for name, s in ml.per_label.items()},
                **({"map_without_tta": ml.map_without_tta} if ml.tta else {})}


def headline(metrics: dict[str, Any]) -> float | None:
    """A metrics.json's headline figure, as a reader of the file takes it: a multi-label evaluation's mAP, a
    single-label one's accuracy (percent; None where undefined)."""
    value = metrics["map"] if "map" in metrics else metrics["accuracy"]
    return None if value is None else float(value)
