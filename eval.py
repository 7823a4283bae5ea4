"""Evaluate a trained model on a labelled image folder it has never seen.

    python eval.py eval_ds                                  # newest runs/*/best.pt
    python eval.py ~/photos/test --checkpoint runs/resnet18-finetune-20261128-130000/best.pt
    python eval.py eval_ds --checkpoint model.onnx          # an exported model, same report

Prints accuracy, the confusion matrix, per-class accuracy with the real class names, scikit-learn's
classification report and the most confused pairs; writes metrics.json, confusion_matrix.png,
misclassified.csv, skipped.txt and worst_mistakes.png to --out (default: eval-<data name> beside the
checkpoint). Classes are matched to the checkpoint's by name, never by position.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import dataset
import files
import folders
import models
import plots
from config import UsageError, cli
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="folder with one sub-folder per class (or a dataset root with "
                        "test/ or val/); also accepted as --data, like train.py and export.py")
    parser.add_argument("--data", dest="data_option", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help="a run folder (its best.pt), a .pt of a run, or an exported .onnx "
                        "(default: newest runs/*/best.pt)")
    parser.add_argument("--out", help="output folder (default: eval-<data name> beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: sized to the machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-file-mb", type=float, default=folders.DEFAULT_MAX_FILE_MB,
                        help="files larger than this are skipped without being read (default: %(default)s)")
    parser.add_argument("--image-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the decoded images in the on-disk cache, so evaluating the same files again "
                        "(another checkpoint, say) decodes nothing (default: on)")
    parser.add_argument("--cache-dir", default=None, help="where the caches live (default: $IMGCLS_CACHE or "
                        "~/.cache/imgcls)")
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.data_option):
        raise UsageError("give the folder to evaluate once: python eval.py DATA (or --data DATA)")

    loaded = load_model(args.checkpoint, args.device)
    folder = Path(args.data or args.data_option)
    size = loaded.preprocess["resize_size"] if args.image_cache else None
    max_bytes = int(args.max_file_mb * 2**20)
    folder_classes, items, skipped, cache = dataset.scan_folder(folder, args.cache_dir, cache_size=size,
                                                                max_bytes=max_bytes)
    mapping = match_classes(folder_classes, loaded.classes)
    items = [(p, mapping[y]) for p, y in items]
    if skipped:
        dataset.warn(f"skipping {len(skipped)} file(s) (listed in skipped.txt with the report), e.g. "
                     f"{folders.shown(skipped[0][0])}: {skipped[0][1]}")
    probs, y, idx = run_model(loaded, items, args.batch_size, args.workers, cache=cache, max_bytes=max_bytes)
    conf, pred = probs.max(1)
    present = sorted(set(mapping))
    m = compute_metrics(y.numpy(), pred.numpy(), loaded.classes, present)
    m.update({"checkpoint": str(loaded.source), "data": str(folder), "skipped": [list(s) for s in skipped]})
    print_report(m, present)

    out = Path(args.out) if args.out else models.unused_folder(loaded.source.parent / f"eval-{folder.resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "report"}, indent=1))
    files.atomic_write_text(out / "classification_report.txt", m["report"])
    files.atomic_write_text(out / "skipped.txt", folders.skipped_lines(skipped))
    plots.save(plots.confusion_figure(np.array(m["confusion_matrix"]), loaded.classes), out / "confusion_matrix.png")
    wrong = [(float(conf[k]), items[int(idx[k])][0], loaded.classes[int(y[k])], loaded.classes[int(pred[k])])
             for k in range(len(idx)) if pred[k] != y[k]]
    wrong.sort(reverse=True)  # the most confident mistakes first: the ones worth looking at
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
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
