"""The data module, a face of the package, and the data check's entry script.

    python dataset.py check DIR          # counts, imbalance, skipped files and why, train/val leaks
    python dataset.py check DIR --folds 5   # what each fold of train.py --folds 5 validates on
    python dataset.py demo               # export scikit-learn's digits as PNGs (data/digits/{train,test})

As a module it only re-exports the names a user of the card needs: the code lives in imgcls/data/ (folders,
label files, safe decoding, the file check, splits, caches, datasets; docs/data.md). Every image, whatever
its mode (L, LA, P, RGBA, CMYK, 16-bit, float), becomes 3-channel uint8 RGB, resized so its shorter side is
`resize_size` and centre-cropped square. Training crops randomly from that square; evaluation takes its
centre: the standard Resize + CenterCrop recipe, done once.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line, answered before torch is imported (--help, typos, a missing folder)
    import argparse
    import os

    from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
    from imgcls.data.folders import check_cache_outside
    from imgcls.data.labelfile import check_sep_applies
    from imgcls.errors import UsageError
    from imgcls.settings import TrainConfig, validate

    def main(argv: list[str] | None = None) -> int:
        parser = Parser("Check an image folder, or export the demo digits.", prog="dataset.py")
        sub = parser.add_subparsers(dest="command", required=True)
        check = sub.add_parser("check", help="scan a dataset folder and report what training will use")
        check.add_argument("data", help="dataset folder, label file (.csv) or 'demo'")
        check.add_argument("--val-split", type=float, default=TrainConfig.val_split, help="share of each class held "
                           "out for validation when DATA has no val/ folder")
        check.add_argument("--test-split", type=float, default=TrainConfig.test_split, help="share of each class set "
                           "aside as the run's test set, as train.py --test-split sets it aside")
        check.add_argument("--seed", type=int, default=TrainConfig.seed, help="random seed of the split")
        check.add_argument("--folds", type=int, default=0, help="show the K folds train.py --folds K would "
                           "validate on (per class), and look-alikes that fall in two folds")
        check.add_argument("--label-sep", help="what separates the labels in a label file's labels column "
                           "(multi-label; default: a space)")
        add_shared(check, "cache_dir", "max_file_mb")
        sub.add_parser("demo", help="export the digits demo data to data/digits/ beside this script")
        args = parser.parse_args(argv)
        if args.command == "check":
            check_command_line(args)
        from imgcls.data import demo
        from imgcls.data import report as data_report
        from imgcls.data import split as data_split
        imports_done()

        if args.command == "demo":
            print(demo.export_demo())
            return 0
        splits = [data_split.prepare_data(args.data, args.val_split, args.seed, args.cache_dir, progress=fold <= 1,
                                       max_file_mb=args.max_file_mb, test_split=args.test_split, folds=args.folds,
                                       fold=fold, label_sep=args.label_sep or TrainConfig.label_sep)
                  for fold in range(1 if args.folds else 0, args.folds + 1)]  # each fold as its run gets it
        listing = data_report.lookalikes_file(splits[0].root, args.cache_dir)  # all the pairs, when not all are shown
        data_report.report_folds(splits, listing=listing) if args.folds else data_report.report(splits[0],
                                                                                                listing=listing)
        return 0

    def check_command_line(args: argparse.Namespace) -> None:
        """What train.py refuses up front, refused here by the same rules (config.validate)."""
        check_shared(args)
        validate(TrainConfig(val_split=args.val_split, test_split=args.test_split, seed=args.seed, folds=args.folds))
        path = os.path.expanduser(args.data)
        what = "a folder with one sub-folder per class, a label file (.csv) or demo"
        if not args.data.strip():
            raise UsageError(f"no data given: give {what}")
        if args.data == "demo" or os.path.isdir(path) or (args.data.lower().endswith(".csv") and os.path.isfile(path)):
            check_sep_applies(args.data, args.label_sep)
            check_cache_outside(None if args.data == "demo" else path, args.cache_dir)
            return
        if os.path.exists(path):
            raise UsageError(f"{args.data} is not a folder: give {what}")
        kind = "label file" if args.data.lower().endswith(".csv") else "data folder"
        raise UsageError(f"{kind} {args.data} does not exist: give {what}")

    script(main, __file__)

from imgcls.data.check import check_files, list_files
from imgcls.data.datasets import ImageDataset, collate, eval_transform, train_transform
from imgcls.data.demo import export_demo
from imgcls.data.imagecache import ImageCache, make_cache
from imgcls.data.images import BadImage, load_image, open_image
from imgcls.data.report import report, report_folds
from imgcls.data.split import DataSplit, prepare_data

__all__ = ["BadImage", "DataSplit", "ImageCache", "ImageDataset", "check_files", "collate", "eval_transform",
           "export_demo", "list_files", "load_image", "make_cache", "open_image", "prepare_data", "report",
           "report_folds", "train_transform"]
