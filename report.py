"""What eval.py and test.py report: a trained or exported model run over image files (predictor.py),
and the results written for people: accuracy, the confusion matrix, per-class metrics and the worst
mistakes (eval); labels, confidences and a picture (test).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

import dataset
import files
import folders
import plots
from config import UsageError
from predictor import load_model, run_model, thumbnail


def match_classes(folder_classes: list[str], model_classes: list[str]) -> list[int]:
    """Map each folder class to the model's index of the same name."""
    unknown = [c for c in folder_classes if c not in model_classes]
    if unknown:
        raise UsageError(f"the model does not know class(es) {', '.join(unknown)}; it knows: "
                         f"{', '.join(model_classes)}. Remove or rename those folders")
    missing = [c for c in model_classes if c not in folder_classes]
    if missing:
        dataset.warn(f"no folder for class(es) {', '.join(missing)}: the report covers the other classes")
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


def print_report(m: dict[str, Any], present: list[int]) -> None:
    classes = m["classes"]
    print(f"Accuracy of the network on the {m['images']} test images: {m['accuracy']:.2f}%")
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


def evaluate(ckpt_path: Path, folder: Path, out: Path, device: str, amp: bool, batch_size: int, workers: int | None,
             cache_dir: str | None, max_bytes: int, image_cache: bool) -> int:
    """eval.py's work: the model over every image of a labelled folder, the report printed and written."""
    loaded = load_model(ckpt_path, device, amp)
    size = loaded.preprocess.resize_size if image_cache else None
    folder_classes, items, skipped, cache = dataset.scan_folder(folder, cache_dir, cache_size=size,
                                                                max_bytes=max_bytes)
    mapping = match_classes(folder_classes, loaded.classes)
    items = [(p, mapping[y]) for p, y in items]
    if skipped:
        dataset.warn(f"skipping {len(skipped)} file(s) (listed in skipped.txt with the report), e.g. "
                     f"{folders.shown(skipped[0][0])}: {skipped[0][1]}")
    probs, y, idx = run_model(loaded, items, batch_size, workers, cache=cache, max_bytes=max_bytes)
    conf, pred = probs.max(1)
    present = sorted(set(mapping))
    m = compute_metrics(y.numpy(), pred.numpy(), loaded.classes, present)
    m.update({"checkpoint": str(loaded.source), "data": str(folder), "skipped": [list(s) for s in skipped]})
    print_report(m, present)
    wrong = [(float(conf[k]), items[int(idx[k])][0], loaded.classes[int(y[k])], loaded.classes[int(pred[k])])
             for k in range(len(idx)) if pred[k] != y[k]]
    wrong.sort(reverse=True)  # the most confident mistakes first: the ones worth looking at
    write_eval(out, m, wrong, skipped)
    return 0


def write_eval(out: Path, m: dict[str, Any], wrong: list[tuple[float, str, str, str]],
               skipped: list[tuple[str, str]]) -> None:
    files.atomic_write_text(out / "metrics.json", json.dumps({k: v for k, v in m.items() if k != "report"}, indent=1))
    files.atomic_write_text(out / "classification_report.txt", m["report"])
    files.atomic_write_text(out / "skipped.txt", folders.skipped_lines(skipped))
    plots.save(plots.confusion_figure(np.array(m["confusion_matrix"]), m["classes"]), out / "confusion_matrix.png")
    with open(out / "misclassified.csv", "w", newline="", errors="surrogateescape") as f:  # paths as on disk
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence"])
        w.writerows([p, t, q, f"{c:.4f}"] for c, p, t, q in wrong)
    if wrong:
        worst = wrong[:24]
        plots.save(plots.image_grid([thumbnail(p) for _, p, _, _ in worst],
                                    [f"{t} -> {q} ({100 * c:.0f}%)" for c, _, t, q in worst],
                                    ["red"] * len(worst)), out / "worst_mistakes.png")
    print(f"wrote {out}/metrics.json, confusion_matrix.png, misclassified.csv" +
          (", worst_mistakes.png" if wrong else ""))


def label(ckpt_path: Path, paths: list[str], out: Path, device: str, amp: bool, batch_size: int,
          workers: int | None, max_bytes: int, topk: int, grid: int) -> int:
    """test.py's work: the top-k labels of each image, printed and written with a picture."""
    loaded = load_model(ckpt_path, device, amp)
    probs, _, idx = run_model(loaded, [(p, -1) for p in paths], batch_size, workers, max_bytes=max_bytes,
                              show=len(paths) > 256)
    k = min(topk, len(loaded.classes))
    results: dict[int, list[tuple[str, float]]] = {}
    if len(idx):
        top_p, top_i = probs.topk(k, dim=1)
        for row, i in enumerate(idx.tolist()):
            results[i] = [(loaded.classes[c], float(p)) for p, c in zip(top_p[row].tolist(), top_i[row].tolist())]
    write_predictions(out, paths, results, k, grid, max_bytes)
    return 0


def write_predictions(out: Path, paths: list[str], results: dict[int, list[tuple[str, float]]], k: int, grid: int,
                      max_bytes: int) -> None:
    rows, pictures, captions, colours = [], [], [], []
    for i, path in enumerate(paths):
        if i in results:
            top = results[i]
            print(f"{folders.shown(path)}: " + ", ".join(f"{lb} ({100 * p:.1f}%)" for lb, p in top))
            rows.append([path, top[0][0], f"{top[0][1]:.4f}", ";".join(f"{lb}:{p:.4f}" for lb, p in top), "ok"])
            captions.append(f"{top[0][0]} ({100 * top[0][1]:.1f}%)")
            colours.append("black")
        else:
            reason = dataset.inspect_file(path, max_bytes=max_bytes)[0] or "unreadable"
            print(f"{folders.shown(path)}: unreadable ({reason})")
            rows.append([path, "", "", "", f"unreadable: {reason}"])
            captions.append("unreadable")
            colours.append("red")
        if len(pictures) < grid:
            pictures.append(thumbnail(path) if i in results else None)
    with open(out / "predictions.csv", "w", newline="", errors="surrogateescape") as f:  # paths as on disk
        w = csv.writer(f)
        w.writerow(["path", "label", "probability", f"top{k}", "status"])
        w.writerows(rows)
    plots.save(plots.image_grid(pictures, captions[: len(pictures)], colours[: len(pictures)]),
               out / "predictions.png")
    print(f"wrote {out / 'predictions.csv'} and {out / 'predictions.png'}")
