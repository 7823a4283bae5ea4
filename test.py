"""Predict labels for sample images with a trained model: top-k labels, confidences and a picture.

    python test.py test                                     # a folder (searched recursively)
    python test.py cat.jpg 'photos/**/*.png' --topk 3       # files and glob patterns
    python test.py --data test --checkpoint runs/mobilenet_v2-transfer-20261128-130000 --out preds
    python test.py photos --reject-below 0.8 --explain      # "unknown" below 80%; heatmaps of the evidence

Writes predictions.csv (path, label, probability, label_1, probability_1, ... label_k, probability_k,
status; see docs/evaluation.md for the columns) and predictions.png (a grid of the
images with the predicted label and confidence under each) to --out (default: a new folder
predictions-<data>-<checkpoint> beside the checkpoint); with --explain, explanations/ (a heatmap per
image) and explanations.png. Probabilities are calibrated (the temperature fitted when training). An
unreadable file is reported as such; the others still run. A multi-label model lists every label at or
above its threshold (tuned when training), with its probability (the sigmoid of its output).
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from imgcls import files, runfolder
from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
from imgcls.data import folders
from imgcls.errors import UsageError


def expand(patterns: list[str], max_bytes: int = folders.DEFAULT_MAX_BYTES) -> list[str]:
    """Files as given, folders searched recursively as eval.py reads them (every file: one that is not
    an image is reported as such), glob patterns expanded; a name that exists is never a pattern
    (`photo [1].jpg`)."""
    paths: list[str] = []
    for pattern in patterns:
        if Path(pattern).is_dir():
            walk = folders.Walk(max_bytes=max_bytes)  # (each file once: another path to one is not another image)
            paths += sorted(walk.image_files(Path(pattern)) + [p for p, why in walk.skipped if not Path(p).is_dir()
                                                               and not folders.is_another_path(why)])
        elif os.path.lexists(pattern):
            paths.append(pattern)
        elif glob.has_magic(pattern):  # special files too: each is reported as unreadable, with the reason
            paths += [m for m in sorted(glob.glob(pattern, recursive=True)) if not Path(m).is_dir()]
        else:
            raise UsageError(f"no such file or folder: {pattern}")
    if not paths:
        raise UsageError(f"no images found in {' '.join(patterns)}")
    first: dict[tuple | str, str] = {}  # each file once, as first named
    for path in paths:
        first.setdefault(identity(path), path)
    return list(first.values())


def identity(path: str) -> tuple | str:
    """What makes two names one file: its device and inode (a link, a hard link, `./a.png` and `a.png`)."""
    try:
        st = os.stat(path)
    except OSError:
        return path
    return st.st_dev, st.st_ino


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="test.py")
    parser.add_argument("paths", nargs="*", help="image files, folders or glob patterns")
    parser.add_argument("--data", action="append", default=[], metavar="PATH", help="the same, as an option (as "
                        "in the other scripts; may be repeated)")
    add_shared(parser, "checkpoint", "device", "amp", "batch_size", "workers", "max_file_mb")
    parser.add_argument("--topk", type=int, default=3, help="labels to show per image")
    parser.add_argument("--grid", type=int, default=24, help="most images in predictions.png")
    parser.add_argument("--reject-below", type=float, metavar="P", help="label an image 'unknown' when its top "
                        "probability is below P (0-1; eval.py's risk-coverage table shows what a P keeps)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average the calibrated "
                        "probabilities of the image, zoomed crops and (for models trained with flips) mirror images")
    parser.add_argument("--explain", action="store_true", help="write a heatmap per image of the evidence for the "
                        "predicted class (and for the true one when the image's folder names a class): Grad-CAM for "
                        "CNNs, occlusion for .onnx files and transformers")
    parser.add_argument("--out", help="output folder, new or empty (default: predictions-<data>-<checkpoint> "
                        "beside the checkpoint; -2, -3, ... when that exists)")
    args = parser.parse_args(argv)
    check_shared(args)
    if args.topk < 1 or args.grid < 1:
        raise UsageError(f"--{'topk' if args.topk < 1 else 'grid'} must be at least 1")
    if args.reject_below is not None and not 0 <= args.reject_below <= 1:
        raise UsageError(f"--reject-below {args.reject_below!r} is not a probability: give a number from 0 to 1, "
                         "e.g. --reject-below 0.8")
    if args.out:
        files.check_new_folder(Path(args.out))
    args.paths += args.data
    if not args.paths:
        raise UsageError("give the images to label: python test.py PATH [PATH ...] (files, folders or globs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    max_bytes = int(args.max_file_mb * 2**20)
    paths = expand(args.paths, max_bytes)
    ckpt = runfolder.runnable(runfolder.find(args.checkpoint))
    if not args.checkpoint:
        print(f"using checkpoint {ckpt}")
    name = Path(args.paths[0]).resolve().name if len(args.paths) == 1 and not glob.has_magic(args.paths[0]) \
        else "images"
    with files.report_folder(args.out, ckpt.parent / f"predictions-{name}-{ckpt.stem}") as out:
        from imgcls.evaluation import predictions
        imports_done()

        return predictions.label(ckpt, paths, out, args.device, args.amp, args.batch_size, args.workers, max_bytes,
                            args.topk, args.grid, args.reject_below, args.tta, args.explain)


if __name__ == "__main__":
    script(main, __file__)
