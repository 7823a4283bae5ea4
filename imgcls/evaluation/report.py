"""What eval.py and test.py report: a trained or exported model run over image files (predictor.py),
and the results written for people: accuracy, the confusion matrix, per-class metrics and the worst
mistakes (eval); labels, confidences and a picture (test).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls import files, plots, runfolder
from imgcls.data import check, folders, imagecache, labelfile, stratify
from imgcls.data import split as data_split
from imgcls.errors import UsageError
from imgcls.evaluation import calibration, multilabel, predictions, report_html
from imgcls.evaluation.predictor import Explainer, Loaded, input_images, load_model, run_model, thumbnail


def match_classes(folder_classes: list[str], model_classes: list[str]) -> list[int]:
    """Map each folder class to the model's index of the same name."""
    unknown = [c for c in folder_classes if c not in model_classes]
    if unknown:
        raise UsageError(f"the model does not know class(es) {', '.join(unknown)}; it knows: "
                         f"{', '.join(model_classes)}. Remove or rename them")
    missing = [c for c in model_classes if c not in folder_classes]
    if missing:
        imagecache.warn(f"no images of class(es) {', '.join(missing)}: the report covers the other classes")
    return [model_classes.index(c) for c in folder_classes]


def compute_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str], present: list[int]) -> dict[str, Any]:
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=present, zero_division=0)
    per_class = {classes[c]: {"accuracy": 100 * cm[c, c] / max(1, cm[c].sum()), "precision": float(p[k]),
                              "recall": float(r[k]), "f1": float(f1[k]), "support": int(support[k])}
                 for k, c in enumerate(present)}
    off = [(int(cm[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and cm[i, j]]
    return {"accuracy": 100 * float(np.trace(cm)) / max(1, cm.sum()), "images": int(cm.sum()),
            "classes": classes, "confusion_matrix": cm.tolist(), "per_class": per_class,
            "most_confused": [{"true": t, "predicted": q, "count": n} for n, t, q in sorted(off, reverse=True)[:10]],
            "report": classification_report(y, pred, labels=present, target_names=[classes[c] for c in present],
                                            digits=4, zero_division=0)}


def evaluated_images(m: dict[str, Any]) -> str:
    """The images evaluated, as the accuracy line names them: test images, unless the run's split.json says
    some are images it trained or was chosen on (then they are named, and the score called optimistic)."""
    caveats, n = m.get("caveats") or [], m["images"]
    if not caveats:
        return f"the {n} test images"
    if len(caveats) == 1 and caveats[0]["images"] >= n:
        return f"the {n} {caveats[0]['kind']} images {caveats[0]['why']} (optimistic)"
    parts = "; ".join(f"{c['images']} of them {c['kind']} images {c['why']}" for c in caveats)
    return f"the {n} images evaluated ({parts}: optimistic)"


def print_report(m: dict[str, Any], present: list[int]) -> None:
    classes = m["classes"]
    print(f"Accuracy of the network on {evaluated_images(m)}: {m['accuracy']:.2f}%")
    print("\nConfusion Matrix (rows: true, columns: predicted; order: " + ", ".join(classes) + ")")
    print(np.array(m["confusion_matrix"]))
    print("\nPer class accuracy")
    width = max(len(c) for c in classes)
    for c in present:
        print(f"Accuracy of class {classes[c]:>{width}} : {m['per_class'][classes[c]]['accuracy']:.2f} %")
    print("\n" + m["report"])
    if m["most_confused"]:
        print("Most confused (true -> predicted: count)")
        for e in m["most_confused"][:5]:
            print(f"  {e['true']} -> {e['predicted']}: {e['count']}")


def evaluate(ckpt_path: Path, data: Path | None, out: Path, device: str, amp: bool, batch_size: int,
             workers: int | None, cache_dir: str | None, max_bytes: int, image_cache: str, tta: bool = False,
             label_sep: str | None = None) -> int:
    """eval.py's work: the model over every image of a labelled folder or label file (or, without one, the
    run's own held-out test split), the report printed and written."""
    loaded = load_model(ckpt_path, device, amp)
    size = loaded.preprocess.resize_size if image_cache != "none" else None
    split = run_split(ckpt_path.parent)
    data_classes, items, skipped, cache, what = evaluation_set(data, ckpt_path, split, cache_dir, size, max_bytes,
                                                               loaded.preprocess.resample,
                                                               label_sep or loaded.label_sep, image_cache)
    check_kind(stratify.is_multilabel(items), loaded, what)
    mapping = match_classes(data_classes, loaded.classes)
    items = [(p, tuple(sorted(mapping[c] for c in y)) if loaded.multilabel else mapping[y]) for p, y in items]
    print(f"evaluating {len(items)} images: {what}")
    caveats = warn_if_seen(items, split, ckpt_path.parent / runfolder.SPLIT) if split is not None else []
    if skipped:
        imagecache.warn(f"skipping {len(skipped)} file(s) (listed in skipped.txt with the report), e.g. "
                     f"{folders.shown(skipped[0][0])}: {skipped[0][1]}")
    logits, y, idx = run_model(loaded, items, batch_size, workers, cache=cache, max_bytes=max_bytes, tta=tta)
    if not len(idx):
        raise UsageError(f"no readable image in {what}: see the warnings above")
    probs = loaded.probabilities(logits)  # calibrated; averaged over the views with --tta
    if loaded.multilabel:
        return evaluate_multilabel(loaded, out, items, probs, logits, y, idx, skipped,
                                   {"data": str(data if data is not None else ckpt_path.parent), "evaluated": what,
                                    "caveats": caveats})
    conf, pred = probs.max(1)
    present = sorted(set(mapping))
    m = compute_metrics(y.numpy(), pred.numpy(), loaded.classes, present)
    m.update(confidence_metrics(loaded, logits[:, 0] if tta else logits, probs, y, tta))
    m.update({"checkpoint": str(loaded.source), "data": str(data if data is not None else ckpt_path.parent),
              "evaluated": what, "caveats": caveats, "skipped": [list(s) for s in skipped]})
    print_report(m, present)
    print_confidence(m)
    results = [Result(items[int(i)][0], int(t), int(q), float(c)) for i, t, q, c in zip(idx, y, pred, conf)]
    write_eval(out, m, results, skipped, loaded)
    return 0


def check_kind(multi_data: bool, loaded: Loaded, what: str) -> None:
    """Multi-label images for a multi-label model, one class per image for the others."""
    if multi_data and not loaded.multilabel:
        raise UsageError(f"{what} hold several labels per image (a labels column), and {loaded.source} is a "
                         "single-label model: evaluate it on a file with a label column, or a folder per class")
    if loaded.multilabel and not multi_data:
        raise UsageError(f"{loaded.source} is a multi-label model: evaluate it on a label file with a labels column "
                         f"(not {what})")


def evaluate_multilabel(loaded: Loaded, out: Path, items: list[tuple[str, Any]], probs: torch.Tensor,
                        logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, skipped: list[tuple[str, str]],
                        about: dict[str, str]) -> int:
    """eval.py for a multi-label model: mAP, F1 at the model's thresholds, the per-label table and picture."""
    truth, p = y.numpy().astype(np.int64), probs.numpy()
    m = multilabel.metrics(truth, p, loaded.thresholds, loaded.classes)
    if logits.dim() == 3:  # --tta: the plain images too
        plain = torch.sigmoid(logits[:, 0]).numpy()
        ap = multilabel.average_precision(truth, plain)
        m["map_without_tta"] = None if np.isnan(ap).all() else multilabel.mean_ap(ap)
    m |= {"checkpoint": str(loaded.source), **about, "skipped": [list(s) for s in skipped]}
    multilabel.print_metrics(m)
    if "map_without_tta" in m:
        print(f"With test-time augmentation: mAP {multilabel.shown(m['map'])} (without: "
              f"{multilabel.shown(m['map_without_tta'])})")
    files.atomic_write_text(out / "metrics.json", json.dumps({k: v for k, v in m.items() if k != "report"}, indent=1))
    files.atomic_write_text(out / "classification_report.txt", m["report"])
    files.atomic_write_text(out / "skipped.txt", folders.skipped_lines(skipped))
    plots.save(plots.per_label_figure(m["per_label"]), out / "per_label.png")
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
    report_html.write_html(out / "report.html", m, {}, [("Per label", out / "per_label.png")])
    print(f"wrote {out}/report.html, metrics.json, per_label.png, classification_report.txt, mistakes.csv")
    return 0


def evaluation_set(data: Path | None, ckpt_path: Path, split: data_split.DataSplit | None, cache_dir: str | None,
                   size: int | None, max_bytes: int, interpolation: str, sep: str = labelfile.DEFAULT_SEP,
                   image_cache: str = "raw") -> check.Scanned:
    """The labelled images to evaluate: a folder, a label file, or the test split of the checkpoint's run
    (`split`, its split.json when readable); checked, and decoded into the cache of kind `image_cache`."""
    if data is not None and labelfile.is_label_file(data):
        return check.scan_labels(data, cache_dir, cache_size=size, max_bytes=max_bytes, sep=sep,
                                   interpolation=interpolation, image_cache=image_cache)
    if data is not None:
        return check.scan_folder(data, cache_dir, cache_size=size, max_bytes=max_bytes, interpolation=interpolation,
                                   image_cache=image_cache)
    if split is None and (ckpt_path.parent / runfolder.SPLIT).exists():
        raise UsageError(f"{ckpt_path.parent / runfolder.SPLIT} cannot be read: give the images to evaluate, "
                         "python eval.py DATA")
    root = Path(split.root) if split is not None else None
    test_dir = folders.find_layout(root)[2] if root is not None and root.is_dir() else None
    if split is None or not (split.test or test_dir):
        raise UsageError(f"{ckpt_path.parent} has no held-out test split (train with --test-split F, or give a "
                         "folder with a test/ folder): give the images to evaluate, python eval.py DATA")
    if not split.test:  # a data set root with its own test/ folder
        return check.scan_folder(root, cache_dir, cache_size=size, max_bytes=max_bytes, interpolation=interpolation,
                                   image_cache=image_cache)
    good, skipped, cache = check.check_items(split.test, "the run's test split", cache_dir, True, size, max_bytes,
                                               interpolation, image_cache)
    return split.classes, good, skipped, cache, f"the run's held-out test split ({ckpt_path.parent / runfolder.SPLIT})"


def run_split(run_dir: Path) -> data_split.DataSplit | None:
    """The run's split.json, when the checkpoint is in a run folder that has a readable one."""
    try:
        split = data_split.DataSplit.load(run_dir / runfolder.SPLIT)
        n = len(split.classes)
        if all(isinstance(p, str) and all(0 <= int(c) < n for c in stratify.label_set(y))
               for p, y in split.train + split.val + split.test):
            return split
    except Exception:  # a damaged or foreign file, whatever it holds: as if there were none
        pass
    return None


def warn_if_seen(items: list[tuple[str, int]], split: data_split.DataSplit, split_file: Path) -> list[dict[str, Any]]:
    """A warning when the images evaluated are ones the model trained on or was chosen on: then the
    accuracy is not that of new images. Returned too (kind, why, images, text), for the accuracy line,
    metrics.json and report.html, which must say the same."""
    paths = {os.path.realpath(p) for p, _ in items}  # however the folder was named: relative, a link
    caveats = []
    for name, used, why in (("training", split.train, "it learned from"), ("validation", split.val,
                                                                        "best.pt was chosen on")):
        seen = len(paths & {os.path.realpath(p) for p, _ in used})
        if seen:
            text = (f"{seen} of the {len(paths)} images evaluated are the {name} images {why} ({split_file}): its "
                    "scores are optimistic; evaluate images the run never used (train with --test-split F to keep "
                    "some aside)")
            imagecache.warn(text)
            caveats.append({"kind": name, "why": why, "images": seen, "text": text})
    return caveats


@dataclass
class Result:
    """One evaluated image: its file, true and predicted class (model indices), top probability."""
    path: str
    true: int
    predicted: int
    confidence: float


def confidence_metrics(loaded: Loaded, logits: torch.Tensor, probs: torch.Tensor, y: torch.Tensor,
                       tta: bool) -> dict[str, Any]:
    """How far the probabilities can be trusted: top-k accuracy, calibration before and after the
    temperature (on the plain images' logits), risk-coverage; with TTA, the accuracy without it."""
    k = min(5, len(loaded.classes) - 1)  # top-k of all the classes is 100% and says nothing
    raw, calibrated = calibration.probabilities(logits), calibration.probabilities(logits, loaded.temperature or 1.0)
    m = {**({f"top{k}_accuracy": calibration.topk_accuracy(probs, y, k)} if k >= 2 else {}),
         "temperature": loaded.temperature or 1.0,
         "calibrated": loaded.temperature is not None,
         "ece": {"raw": calibration.ece(raw, y), "calibrated": calibration.ece(calibrated, y)},
         "reliability": {"raw": calibration.reliability_bins(raw, y),
                         "calibrated": calibration.reliability_bins(calibrated, y)},
         "risk_coverage": calibration.risk_coverage(probs, y)}
    if tta:
        m |= {"tta_accuracy": calibration.topk_accuracy(probs, y, 1),
              "accuracy_without_tta": calibration.topk_accuracy(calibrated, y, 1)}
        m["ece"]["tta"] = calibration.ece(probs, y)
    return m


def print_confidence(m: dict[str, Any]) -> None:
    for key in m:
        if key.startswith("top") and key.endswith("_accuracy"):
            print(f"Top-{key[3:-9]} accuracy: {m[key]:.2f}%")
    if "tta_accuracy" in m:
        print(f"With test-time augmentation: {m['tta_accuracy']:.2f}% (without: {m['accuracy_without_tta']:.2f}%)")
    ece = m["ece"]
    if m["calibrated"]:
        print(f"Calibration: temperature {m['temperature']:.3f}; expected calibration error {100 * ece['raw']:.2f}% "
              f"(raw softmax) -> {100 * ece['calibrated']:.2f}%")
    else:
        print(f"note: this checkpoint has no fitted temperature (trained before calibration): probabilities are the "
              f"raw softmax (temperature 1); expected calibration error {100 * ece['raw']:.2f}%")
    if "tta" in ece:  # the temperature was fitted on single views: an average of views is less sure
        print(f"  with test-time augmentation (averaged calibrated probabilities): {100 * ece['tta']:.2f}%")
    tta = " --tta" if "tta_accuracy" in m else ""
    kept = [r for r in m["risk_coverage"] if r["threshold"] in (0.5, 0.8, 0.9, 0.95) and r["accuracy"] is not None]
    print(f"Keeping only predictions with probability >= P (test.py{tta} --reject-below P):" +
          ("" if kept else " no P of 0.5 or more keeps any image"))
    for r in kept:
        print(f"  P={r['threshold']:.2f}: keeps {100 * r['coverage']:.1f}% of the images, "
              f"accuracy on them {r['accuracy']:.2f}%")


def write_eval(out: Path, m: dict[str, Any], results: list[Result], skipped: list[tuple[str, str]],
               loaded: Loaded) -> None:
    files.atomic_write_text(out / "metrics.json", json.dumps({k: v for k, v in m.items() if k != "report"}, indent=1))
    files.atomic_write_text(out / "classification_report.txt", m["report"])
    files.atomic_write_text(out / "skipped.txt", folders.skipped_lines(skipped))
    classes = m["classes"]
    plots.save(plots.confusion_figure(np.array(m["confusion_matrix"]), classes), out / "confusion_matrix.png")
    plots.save(plots.reliability_figure(m["reliability"]["raw"], m["reliability"]["calibrated"], m["ece"]["raw"],
                                        m["ece"]["calibrated"], m["temperature"] if m["calibrated"] else None),
               out / "reliability.png")
    plots.save(plots.risk_coverage_figure(m["risk_coverage"]), out / "risk_coverage.png")
    # the most confident mistakes first: the ones worth looking at
    wrong = sorted((r for r in results if r.predicted != r.true), key=lambda r: -r.confidence)
    files.write_csv(out / "misclassified.csv", ["path", "true", "predicted", "confidence"],
                    ([r.path, classes[r.true], classes[r.predicted], calibration.shown(r.confidence)] for r in wrong))
    if wrong:
        plots.save(worst_mistakes_figure(loaded, wrong[:WORST], classes), out / "worst_mistakes.png")
    figures = [("Reliability diagram", out / "reliability.png"), ("Risk-coverage", out / "risk_coverage.png"),
               ("Worst mistakes, with the evidence for each class", out / "worst_mistakes.png")]
    report_html.write_html(out / "report.html", m, confusion_cells(results, m["confusion_matrix"]), figures)
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
