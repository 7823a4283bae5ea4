"""What eval.py reports: a trained or exported model run over labelled images (predictor.py, evalset.py),
its `EvalResult` built once, and rendered for people: accuracy, the confusion matrix, per-class metrics and
the worst mistakes, on the terminal, in metrics.json and report.html.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls import files, plots
from imgcls.data import folders, imagecache, stratify
from imgcls.errors import UsageError
from imgcls.evaluation import calibration, multilabel, predictions, report_html
from imgcls.evaluation.evalset import EvalOptions, RunSplit, evaluation_set, match_classes, warn_if_seen
from imgcls.evaluation.predictor import Explainer, Loaded, input_images, load_model, run_model, thumbnail
from imgcls.evaluation.result import METRICS_JSON, ClassScores, Confidence, Confused, Ece, EvalResult


def compute_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str], present: list[int]) -> EvalResult:
    """Accuracy, the confusion matrix, per-class scores, the most confused pairs and scikit-learn's report."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=present, zero_division=0)
    per_class = {classes[c]: ClassScores(accuracy=float(100 * cm[c, c] / max(1, cm[c].sum())), precision=float(p[k]),
                                         recall=float(r[k]), f1=float(f1[k]), support=int(support[k]))
                 for k, c in enumerate(present)}
    off = [(int(cm[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and cm[i, j]]
    return EvalResult(classes=classes, images=int(cm.sum()), accuracy=100 * float(np.trace(cm)) / max(1, cm.sum()),
                      confusion_matrix=cm.tolist(), per_class=per_class,
                      most_confused=[Confused(t, q, n) for n, t, q in sorted(off, reverse=True)[:10]],
                      report=classification_report(y, pred, labels=present, target_names=[classes[c] for c in present],
                                                   digits=4, zero_division=0))


def evaluated_images(r: EvalResult) -> str:
    """The images evaluated, as the accuracy line names them: test images, unless the run's split.json says
    some are images it trained or was chosen on (then they are named, and the score called optimistic)."""
    caveats, n = r.caveats, r.images
    if not caveats:
        return f"the {n} test images"
    if len(caveats) == 1 and caveats[0].images >= n:
        return f"the {n} {caveats[0].kind} images {caveats[0].why} (optimistic)"
    parts = "; ".join(f"{c.images} of them {c.kind} images {c.why}" for c in caveats)
    return f"the {n} images evaluated ({parts}: optimistic)"


def print_report(r: EvalResult) -> None:
    classes = r.classes
    print(f"Accuracy of the network on {evaluated_images(r)}: {r.accuracy:.2f}%")
    print("\nConfusion Matrix (rows: true, columns: predicted; order: " + ", ".join(classes) + ")")
    print(np.array(r.confusion_matrix))
    print("\nPer class accuracy")
    width = max(len(c) for c in classes)
    for name, scores in r.per_class.items():
        print(f"Accuracy of class {name:>{width}} : {scores.accuracy:.2f} %")
    print("\n" + r.report)
    if r.most_confused:
        print("Most confused (true -> predicted: count)")
        for e in r.most_confused[:5]:
            print(f"  {e.true} -> {e.predicted}: {e.count}")


def evaluate(ckpt_path: Path, data: Path | None, out: Path, run: RunSplit, opts: EvalOptions) -> int:
    """eval.py's work: the model over every image of a labelled folder or label file (or, without one, the
    `run`'s own held-out test split), the report printed and written. The checkpoint is loaded here, once."""
    loaded = load_model(ckpt_path, opts.device, opts.amp)
    size = loaded.preprocess.resize_size if opts.image_cache != "none" else None
    data_classes, items, skipped, cache, what = evaluation_set(data, run, opts, size=size,
                                                               interpolation=loaded.preprocess.resample,
                                                               sep=opts.label_sep or loaded.label_sep)
    check_kind(stratify.is_multilabel(items), loaded, what)
    mapping = match_classes(data_classes, loaded.classes)
    items = [(p, tuple(sorted(mapping[c] for c in y)) if loaded.multilabel else mapping[y]) for p, y in items]
    print(f"evaluating {len(items)} images: {what}")
    about = {"checkpoint": str(loaded.source), "data": str(data if data is not None else run.folder),
             "evaluated": what, "caveats": warn_if_seen(items, run), "skipped": list(skipped)}
    if skipped:
        imagecache.warn(f"skipping {len(skipped)} file(s) (listed in skipped.txt with the report), e.g. "
                        f"{folders.shown(skipped[0][0])}: {skipped[0][1]}")
    logits, y, idx = run_model(loaded, items, opts.batch_size, opts.workers, cache=cache, max_bytes=opts.max_bytes,
                               tta=opts.tta)
    if not len(idx):
        raise UsageError(f"no readable image in {what}: see the warnings above")
    probs = loaded.probabilities(logits)  # calibrated; averaged over the views with --tta
    if loaded.multilabel:
        return evaluate_multilabel(loaded, out, items, probs=probs, logits=logits, y=y, idx=idx, about=about)
    conf, pred = probs.max(1)
    result = compute_metrics(y.numpy(), pred.numpy(), loaded.classes, sorted(set(mapping)))
    top_k, confidence = confidence_metrics(loaded, logits[:, 0] if opts.tta else logits, probs, y, opts.tta)
    result = dataclasses.replace(result, top_k=top_k, confidence=confidence, **about)
    print_report(result)
    print_confidence(result)
    results = [Result(items[int(i)][0], int(t), int(q), float(c)) for i, t, q, c in zip(idx, y, pred, conf)]
    write_eval(out, result, results, loaded)
    return 0


def check_kind(multi_data: bool, loaded: Loaded, what: str) -> None:
    """Multi-label images for a multi-label model, one class per image for the others."""
    if multi_data and not loaded.multilabel:
        raise UsageError(f"{what} hold several labels per image (a labels column), and {loaded.source} is a "
                         "single-label model: evaluate it on a file with a label column, or a folder per class")
    if loaded.multilabel and not multi_data:
        raise UsageError(f"{loaded.source} is a multi-label model: evaluate it on a label file with a labels column "
                         f"(not {what})")


def evaluate_multilabel(loaded: Loaded, out: Path, items: list[tuple[str, Any]], *, probs: torch.Tensor,
                        logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, about: dict[str, Any]) -> int:
    """eval.py for a multi-label model: mAP, F1 at the model's thresholds, the per-label table and picture."""
    truth, p = y.numpy().astype(np.int64), probs.numpy()
    result = multilabel.metrics(truth, p, loaded.thresholds, loaded.classes)
    scores = result.multilabel
    assert scores is not None
    if logits.dim() == 3:  # --tta: the plain images too
        ap = multilabel.average_precision(truth, torch.sigmoid(logits[:, 0]).numpy())
        scores = dataclasses.replace(scores, tta=True,
                                     map_without_tta=None if np.isnan(ap).all() else multilabel.mean_ap(ap))
    result = dataclasses.replace(result, multilabel=scores, **about)
    multilabel.print_metrics(result)
    write_common(out, result)
    plots.save(plots.per_label_figure({name: dataclasses.asdict(s) for name, s in scores.per_label.items()}),
               out / "per_label.png")
    wrong = multilabel.decide(p, loaded.thresholds) != truth.astype(bool)
    rows = sorted(((int(wrong[r].sum()), items[int(i)][0], r) for r, i in enumerate(idx.tolist()) if wrong[r].any()),
                  key=lambda t: -t[0])
    names, sep = loaded.classes, loaded.label_sep  # label lists as the label file writes them
    lines = []
    for _, path, r in rows:
        said = p[r] >= np.asarray(loaded.thresholds)
        lines.append([path, sep.join(names[c] for c in np.flatnonzero(truth[r])),
                      sep.join(names[c] for c in np.flatnonzero(said)),
                      sep.join(names[c] for c in np.flatnonzero(truth[r] & ~said)),
                      sep.join(names[c] for c in np.flatnonzero(said & ~truth[r].astype(bool))),
                      predictions.probabilities_json([(names[c], float(p[r, c])) for c in np.flatnonzero(said)])])
    files.write_csv(out / "mistakes.csv", ["path", "labels", "predicted", "missed", "extra", "probabilities"], lines)
    report_html.write_html(out / "report.html", result, {}, [("Per label", out / "per_label.png")])
    print(f"wrote {out}/report.html, metrics.json, per_label.png, classification_report.txt, mistakes.csv")
    return 0


def write_common(out: Path, result: EvalResult) -> None:
    """What every evaluation writes: metrics.json, the classification report and the files skipped."""
    files.atomic_write_text(out / METRICS_JSON, json.dumps(result.to_json(), indent=1))
    files.atomic_write_text(out / "classification_report.txt", result.report)
    files.atomic_write_text(out / "skipped.txt", folders.skipped_lines(result.skipped))


@dataclass
class Result:
    """One evaluated image: its file, true and predicted class (model indices), top probability."""
    path: str
    true: int
    predicted: int
    confidence: float


def confidence_metrics(loaded: Loaded, logits: torch.Tensor, probs: torch.Tensor, y: torch.Tensor,
                       tta: bool) -> tuple[dict[int, float], Confidence]:
    """How far the probabilities can be trusted: top-k accuracy, calibration before and after the
    temperature (on the plain images' logits), risk-coverage; with TTA, the accuracy without it."""
    k = min(5, len(loaded.classes) - 1)  # top-k of all the classes is 100% and says nothing
    raw, calibrated = calibration.probabilities(logits), calibration.probabilities(logits, loaded.temperature or 1.0)
    top_k = {k: calibration.topk_accuracy(probs, y, k)} if k >= 2 else {}
    confidence = Confidence(
        temperature=loaded.temperature or 1.0, calibrated=loaded.temperature is not None,
        ece=Ece(raw=calibration.ece(raw, y), calibrated=calibration.ece(calibrated, y),
                tta=calibration.ece(probs, y) if tta else None),
        reliability={"raw": calibration.reliability_bins(raw, y),
                     "calibrated": calibration.reliability_bins(calibrated, y)},
        risk_coverage=calibration.risk_coverage(probs, y),
        tta_accuracy=calibration.topk_accuracy(probs, y, 1) if tta else None,
        accuracy_without_tta=calibration.topk_accuracy(calibrated, y, 1) if tta else None)
    return top_k, confidence


def print_confidence(r: EvalResult) -> None:
    for k, accuracy in sorted(r.top_k.items()):
        print(f"Top-{k} accuracy: {accuracy:.2f}%")
    c = r.confidence
    if c is None:
        return
    if c.tta_accuracy is not None:
        print(f"With test-time augmentation: {c.tta_accuracy:.2f}% (without: {c.accuracy_without_tta:.2f}%)")
    ece = c.ece
    if c.calibrated:
        print(f"Calibration: temperature {c.temperature:.3f}; expected calibration error {100 * ece.raw:.2f}% "
              f"(raw softmax) -> {100 * ece.calibrated:.2f}%")
    else:
        print(f"note: this checkpoint has no fitted temperature (trained before calibration): probabilities are the "
              f"raw softmax (temperature 1); expected calibration error {100 * ece.raw:.2f}%")
    if ece.tta is not None:  # the temperature was fitted on single views: an average of views is less sure
        print(f"  with test-time augmentation (averaged calibrated probabilities): {100 * ece.tta:.2f}%")
    tta = " --tta" if c.tta_accuracy is not None else ""
    kept = [r for r in c.risk_coverage if r["threshold"] in (0.5, 0.8, 0.9, 0.95) and r["accuracy"] is not None]
    print(f"Keeping only predictions with probability >= P (test.py{tta} --reject-below P):" +
          ("" if kept else " no P of 0.5 or more keeps any image"))
    for r in kept:
        print(f"  P={r['threshold']:.2f}: keeps {100 * r['coverage']:.1f}% of the images, "
              f"accuracy on them {r['accuracy']:.2f}%")


def write_eval(out: Path, result: EvalResult, results: list[Result], loaded: Loaded) -> None:
    write_common(out, result)
    classes, c = result.classes, result.confidence
    assert c is not None
    plots.save(plots.confusion_figure(np.array(result.confusion_matrix), classes), out / "confusion_matrix.png")
    plots.save(plots.reliability_figure(c.reliability["raw"], c.reliability["calibrated"], ece_raw=c.ece.raw,
                                        ece=c.ece.calibrated, temperature=c.temperature if c.calibrated else None),
               out / "reliability.png")
    plots.save(plots.risk_coverage_figure(c.risk_coverage), out / "risk_coverage.png")
    # the most confident mistakes first: the ones worth looking at
    wrong = sorted((r for r in results if r.predicted != r.true), key=lambda r: -r.confidence)
    files.write_csv(out / "misclassified.csv", ["path", "true", "predicted", "confidence"],
                    ([r.path, classes[r.true], classes[r.predicted], calibration.shown(r.confidence)] for r in wrong))
    if wrong:
        plots.save(worst_mistakes_figure(loaded, wrong[:WORST], classes), out / "worst_mistakes.png")
    figures = [("Reliability diagram", out / "reliability.png"), ("Risk-coverage", out / "risk_coverage.png"),
               ("Worst mistakes, with the evidence for each class", out / "worst_mistakes.png")]
    report_html.write_html(out / "report.html", result, confusion_cells(results, result.confusion_matrix), figures)
    print(f"wrote {out}/report.html, metrics.json, confusion_matrix.png, reliability.png, risk_coverage.png, "
          "misclassified.csv" + (", worst_mistakes.png" if wrong else ""))


WORST = 12  # mistakes drawn with their heatmaps
CELL_THUMBS, ALL_THUMBS = 24, 2000  # report.html: a few MB however many images


def worst_mistakes_figure(loaded: Loaded, wrong: list[Result], classes: list[str]) -> plots.Figure:
    """Each mistake as the model saw it, with the evidence for what it said and for what it is."""
    explainer = Explainer(loaded)
    pictures, captions = [], []
    for r, image in zip(wrong, input_images(loaded, [r.path for r in wrong])):
        pictures.append(None if image is None else image.permute(1, 2, 0).numpy())
        captions.append(f"{classes[r.true]} -> {classes[r.predicted]} ({100 * r.confidence:.0f}%)")
        for c in (r.predicted, r.true):
            picture, found = predictions.overlay_for(explainer, image, c) if image is not None else (None, True)
            pictures.append(picture)
            captions.append(f"evidence for {classes[c]}" + ("" if found else predictions.NONE_FOUND))
    return plots.image_grid(pictures, captions, ["red", "black", "black"] * len(wrong), columns=6)


def confusion_cells(results: list[Result], cm: list[list[int]]) -> dict[tuple[int, int], report_html.Cell]:
    """report.html's images per confusion cell of the classes its matrix shows: mistakes most confident
    first, a correct cell spread over its confidences. At most CELL_THUMBS per cell and ALL_THUMBS in
    all, shared fairly among the mistake cells first, then the correct ones: a few MB however many images."""
    shown = set(report_html.matrix_classes(cm))
    by_cell: dict[tuple[int, int], list[Result]] = {}
    for r in results:
        if r.true in shown and r.predicted in shown:
            by_cell.setdefault((r.true, r.predicted), []).append(r)
    budget, shares = ALL_THUMBS, {}
    for group in ([c for c in by_cell if c[0] != c[1]], [c for c in by_cell if c[0] == c[1]]):
        group.sort(key=lambda c: len(by_cell[c]))  # the smallest first: what they leave, the bigger ones share
        for k, c in enumerate(group):
            shares[c] = min(CELL_THUMBS, len(by_cell[c]), budget // (len(group) - k))
            budget -= shares[c]
    cells = {}
    for (t, q), rs in by_cell.items():
        rs.sort(key=lambda r: -r.confidence)
        k = shares[(t, q)]
        picked = rs[:k] if t != q else [rs[i] for i in np.linspace(0, len(rs) - 1, k).astype(int)] if k else []
        thumbs = []
        for r in picked:
            image = thumbnail(r.path, 64)
            if image is not None:
                thumbs.append((f"{Path(r.path).name} {100 * r.confidence:.0f}%", report_html.jpeg_thumbnail(image)))
        cells[(t, q)] = report_html.Cell(len(rs), thumbs)
    return cells
