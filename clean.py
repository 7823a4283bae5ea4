"""Find the images whose label is wrong, those that look like none of the classes and the same picture
labelled twice, from a k-fold job's out-of-fold predictions (cleanlab); then apply what you decided.

    python train.py --data photos --folds 5 --epochs 20 --out runs/photos-cv   # first: a k-fold job
    python clean.py find runs/photos-cv         # -> runs/photos-cv/label-issues/label_issues.csv, .png, .html
    # mark the action column of label_issues.csv: keep, relabel (to the suggested column) or drop
    python clean.py apply runs/photos-cv/label-issues/label_issues.csv --out photos-clean.csv
    python train.py --data photos-clean.csv --folds 5 ...   # trains on the corrected labels

Each image is judged by the fold model that never trained on it (the job's test-split images by every
fold's), with its calibrated probabilities; label issues are cleanlab's confident learning, outliers its
out-of-distribution score on the network's own features, look-alikes dataset.py check's perceptual hashes.
`apply` writes a new label file and never touches the image folders. Needs cleanlab:
pip install -r requirements-clean.txt. See docs/label-issues.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from imgcls import files
from imgcls.cleaning.job import read_job
from imgcls.cleaning.layout import ACTIONS, CSV, FILTERS
from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
from imgcls.data import folders
from imgcls.errors import UsageError


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="clean.py")
    sub = parser.add_subparsers(dest="command", required=True)
    find = sub.add_parser("find", help="report the label issues, outliers and look-alikes of a finished k-fold job")
    find.add_argument("job", help="the folder of a finished k-fold job (train.py --folds K --out JOB)")
    find.add_argument("--out", help="report folder, new or empty (default: JOB/label-issues; -2, -3, ... when "
                      "that exists, so a report never replaces another)")
    find.add_argument("--filter-by", default="prune_by_noise_rate", choices=FILTERS, help="cleanlab's rule for "
                      "which images count as mislabelled (find_label_issues' filter_by); predicted_neq_given flags "
                      "every image the models disagree with")
    find.add_argument("--grid", type=int, default=24, help="issues drawn in label_issues.png")
    add_shared(find, "device", "batch_size", "workers", "cache_dir", "max_file_mb")
    apply = sub.add_parser("apply", help="write a corrected label file from the reviewed label_issues.csv")
    apply.add_argument("reviewed", help="label_issues.csv with its action column filled in: keep, relabel (to the "
                       "suggested column, which you may edit) or drop")
    apply.add_argument("--out", required=True, help="the corrected label file to write (a new .csv) for "
                       "train.py --data")
    apply.add_argument("--report", help="the folder clean.py find wrote (default: the reviewed CSV's folder)")
    apply.add_argument("--unmarked", default="keep", choices=ACTIONS, help="what a row with an empty action means")
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, which knows its options: a typo gets its "did you mean"
        sub.choices[args.command].argv = list(sys.argv[1:] if argv is None else argv)
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "find":
        check_find(args)
    else:
        check_apply(args)
    return args


def check_find(args: argparse.Namespace) -> None:
    check_shared(args)
    if args.grid < 1:
        raise UsageError("--grid must be at least 1")
    args.job = read_job(args.job)
    if importlib.util.find_spec("cleanlab") is None:
        raise UsageError("finding label issues needs cleanlab: pip install -r requirements-clean.txt")
    if args.out:
        files.check_new_folder(Path(args.out))
        folders.check_outside(None if args.job.data == "demo" else args.job.data, args.out, "the report folder")


def check_apply(args: argparse.Namespace) -> None:
    args.reviewed = Path(args.reviewed)
    if not args.reviewed.is_file():
        raise UsageError(f"{args.reviewed} {'is a folder' if args.reviewed.is_dir() else 'does not exist'}: give the "
                         f"{CSV} that clean.py find wrote, its action column filled in")
    args.report = Path(args.report) if args.report else None
    args.out = Path(args.out)


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    if args.command == "apply":
        from imgcls.cleaning import apply

        return apply.apply(args.reviewed, args.out, args.report, args.unmarked)
    with files.report_folder(args.out, args.job.folder / "label-issues") as out:
        from imgcls.cleaning import find  # torch loads only for a command line that is good
        imports_done()

        return find.find(args.job, out, args.filter_by, args.grid, args.device, args.batch_size, args.workers,
                         args.cache_dir, int(args.max_file_mb * 2**20))


if __name__ == "__main__":
    script(main, __file__)
