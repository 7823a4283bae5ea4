"""Predict labels for sample images with a trained model: top-k labels, confidences and a picture.

    python test.py test                                     # a folder (searched recursively)
    python test.py cat.jpg 'photos/**/*.png' --topk 3       # files and glob patterns
    python test.py test --checkpoint runs/mobilenet_v2-transfer-20261128-130000/best.pt --out preds

Writes predictions.csv (path, label, probability, top-k, status) and predictions.png (a grid of the
images with the predicted label and confidence under each) to --out (default: predictions/ beside
the checkpoint). An unreadable file is reported as such; the others still run.
"""

from __future__ import annotations

import argparse
import csv
import glob
import sys
from pathlib import Path

import dataset
import folders
import models
import plots
from config import UsageError, cli
from predictor import load_model, run_model, thumbnail


def expand(patterns: list[str], max_bytes: int = dataset.MAX_BYTES) -> list[str]:
    """Files as given, folders searched recursively for images, glob patterns expanded."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):  # special files too: each is reported as unreadable, with the reason
            paths += [m for m in sorted(glob.glob(pattern, recursive=True)) if not Path(m).is_dir()]
        elif Path(pattern).is_dir():
            walk = folders.Walk(max_bytes=max_bytes)
            found = walk.image_files(Path(pattern)) + [p for p, _ in walk.skipped if not Path(p).is_dir()]
            paths += sorted(p for p in found if Path(p).suffix.lower() in dataset.IMAGE_EXTENSIONS)
        elif Path(pattern).exists():
            paths.append(pattern)
        else:
            raise UsageError(f"no such file or folder: {pattern}")
    if not paths:
        raise UsageError(f"no images found in {' '.join(patterns)}")
    return list(dict.fromkeys(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="image files, folders or glob patterns (or --data, like the "
                        "other scripts)")
    parser.add_argument("--data", action="append", default=[], metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help="a run folder (its best.pt), a .pt of a run, or an exported .onnx "
                        "(default: newest runs/*/best.pt)")
    parser.add_argument("--topk", type=int, default=3, help="labels to show per image")
    parser.add_argument("--grid", type=int, default=24, help="most images in predictions.png")
    parser.add_argument("--out", help="output folder (default: predictions/ beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-file-mb", type=float, default=folders.DEFAULT_MAX_FILE_MB,
                        help="files larger than this are reported unreadable without being read (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        raise UsageError("--topk must be at least 1")

    max_bytes = int(args.max_file_mb * 2**20)
    if not args.paths + args.data:
        raise UsageError("give the images to label: python test.py PATH [PATH ...] (files, folders or globs)")
    paths = expand(args.paths + args.data, max_bytes)
    loaded = load_model(args.checkpoint, args.device)
    probs, _, idx = run_model(loaded, [(p, -1) for p in paths], args.batch_size, args.workers, max_bytes=max_bytes,
                              show=len(paths) > 256)
    k = min(args.topk, len(loaded.classes))
    results: dict[int, list[tuple[str, float]]] = {}
    if len(idx):
        top_p, top_i = probs.topk(k, dim=1)
        for row, i in enumerate(idx.tolist()):
            results[i] = [(loaded.classes[c], float(p)) for p, c in zip(top_p[row].tolist(), top_i[row].tolist())]

    out = Path(args.out) if args.out else models.unused_folder(loaded.source.parent / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    rows, grid, captions, colours = [], [], [], []
    for i, path in enumerate(paths):
        if i in results:
            top = results[i]
            print(f"{folders.shown(path)}: " + ", ".join(f"{label} ({100 * p:.1f}%)" for label, p in top))
            rows.append([path, top[0][0], f"{top[0][1]:.4f}", ";".join(f"{lb}:{p:.4f}" for lb, p in top), "ok"])
            captions.append(f"{top[0][0]} ({100 * top[0][1]:.1f}%)")
            colours.append("black")
        else:
            reason = dataset.inspect_file(path, max_bytes=max_bytes)[0] or "unreadable"
            print(f"{folders.shown(path)}: unreadable ({reason})")
            rows.append([path, "", "", "", f"unreadable: {reason}"])
            captions.append("unreadable")
            colours.append("red")
        if len(grid) < args.grid:
            grid.append(thumbnail(path) if i in results else None)
    with open(out / "predictions.csv", "w", newline="", errors="surrogateescape") as f:  # paths as on disk
        w = csv.writer(f)
        w.writerow(["path", "label", "probability", f"top{k}", "status"])
        w.writerows(rows)
    plots.save(plots.image_grid(grid, captions[: len(grid)], colours[: len(grid)]), out / "predictions.png")
    print(f"wrote {out / 'predictions.csv'} and {out / 'predictions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
