"""Evaluate a trained model on a labelled image folder it has never seen.

    python eval.py eval_ds                                  # newest runs/*/best.pt
    python eval.py ~/photos/test --checkpoint runs/resnet18-finetune-20261128-130000
    python eval.py --data eval_ds --checkpoint model.onnx   # an exported model, same report
    python eval.py eval_ds --tta                            # also with test-time augmentation
    python eval.py --checkpoint runs/resnet18-scratch-20261129-130000   # the run's own --test-split images
    python eval.py labels.csv                               # a label file: its test rows (else val, else all)

A multi-label model (trained on a label file with a labels column) is evaluated on such a file: mAP,
micro and macro F1 at its tuned thresholds, a per-label table (precision, recall, F1, AP) and picture
(per_label.png), mistakes.csv.

Prints accuracy, top-5 accuracy, the confusion matrix, per-class accuracy with the real class names,
scikit-learn's classification report, the most confused pairs, how well the probabilities are
calibrated and what a --reject-below threshold keeps; writes report.html (everything, to browse),
metrics.json, classification_report.txt, confusion_matrix.png, reliability.png, risk_coverage.png,
misclassified.csv, skipped.txt and worst_mistakes.png (with heatmaps) to --out (default: a new folder
eval-<data>-<checkpoint> beside the checkpoint). Classes are matched to the checkpoint's by name,
never by position.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgcls import files, runfolder
from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
from imgcls.data import folders, labelfile
from imgcls.errors import UsageError
from imgcls.evaluation.evalset import EvalOptions, RunSplit
from imgcls.settings import CACHE_KINDS


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="eval.py")
    parser.add_argument("data", nargs="?", help="folder with one sub-folder per class (or a dataset root: train/ "
                        "with test/ or val/, whose test/, else val/, images are evaluated), or a label file (.csv: "
                        "its test rows, else its val rows, else all); without it, the held-out test split of the "
                        "checkpoint's run (train.py --test-split)")
    parser.add_argument("--data", dest="data_option", metavar="DATA", help="the same, as an option (as in "
                        "train.py and export.py)")
    add_shared(parser, "checkpoint", "device", "amp", "batch_size", "workers", "cache_dir", "max_file_mb", "label_sep")
    parser.add_argument("--out", help="report folder, new or empty (default: eval-<data>-<checkpoint> beside the "
                        "checkpoint; -2, -3, ... when that exists, so a report never replaces another)")
    parser.add_argument("--image-cache", nargs="?", const="auto", default="auto", choices=CACHE_KINDS,
                        help="keep the decoded images in an on-disk cache, so evaluating the same files again "
                        "(another checkpoint, say) decodes nothing: raw (uint8 pixels), compact (JPEG, for a large "
                        "set), auto (raw while it fits in half the free disk, else compact), none (default: auto)")
    parser.add_argument("--no-image-cache", dest="image_cache", action="store_const", const="none",
                        help="no image cache (--image-cache none)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average the calibrated "
                        "probabilities of the image, zoomed crops and (for models trained with flips) mirror images; "
                        "prints the accuracy with and without")
    args = parser.parse_args(argv)
    check_shared(args)
    if args.data and args.data_option:
        raise UsageError("give the data to evaluate once: python eval.py DATA (or --data DATA)")
    given = args.data or args.data_option
    args.data = Path(given) if given else None  # None: the run's own held-out test split
    if args.data is not None:
        labelfile.check_sep_applies(args.data, args.label_sep)
    if args.data is not None and labelfile.is_label_file(args.data):
        labelfile.read(args.data, args.label_sep or labelfile.DEFAULT_SEP, warn=False)  # every row, before torch loads
    elif args.data is not None and not args.data.is_dir():
        raise UsageError(f"{args.data} is not a folder: give a folder with one sub-folder per class, or a label "
                         "file (.csv)")
    if args.out:
        files.check_new_folder(Path(args.out))
        folders.check_outside(args.data, args.out, "the report folder")
    folders.check_cache_outside(args.data, args.cache_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    ckpt = runfolder.runnable(runfolder.find(args.checkpoint))
    if not args.checkpoint:
        print(f"using checkpoint {ckpt}")
    run = RunSplit.of(ckpt)  # read once: checked here, evaluated there
    if args.data is None and args.out:  # the run's own test split: its data folder is in split.json
        folders.check_outside(run.root, args.out, "the report folder")
    name = Path(args.data).resolve().stem if args.data else "test-split"
    with files.report_folder(args.out, ckpt.parent / f"eval-{name}-{ckpt.stem}") as out:
        from imgcls.evaluation import report
        imports_done()

        opts = EvalOptions(device=args.device, amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                           cache_dir=args.cache_dir, max_bytes=int(args.max_file_mb * 2**20),
                           image_cache=args.image_cache, tta=args.tta, label_sep=args.label_sep)
        return report.evaluate(ckpt, args.data, out, run, opts)


if __name__ == "__main__":
    script(main, __file__)
