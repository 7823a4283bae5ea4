"""Compare runs: one line per run folder, best validation accuracy first.

    python runs.py                              # every run under runs/
    python runs.py ~/experiments /data/runs/r50  # several folders: parents of runs, or runs themselves
    python runs.py 'runs/*-cv*' --folds          # glob patterns; --folds: a line per fold of each k-fold job

Each folder given is a run folder, a k-fold job's folder, or a folder searched for them (up to 4 levels
down, so runs written anywhere with --out are found from a folder above them). Reads each run's
config.json and summary.json (a run still going, or interrupted, shows its last finished epoch from
metrics.csv); a cross-validation job (train.py --folds K) is one line, the mean of its folds' best val
accuracy with their spread (cv_summary.json), and with --folds each of its folds below it. The time is
the training time of all its sessions (resumes added). A multi-label run's column holds its best val
mAP, marked "mAP". For curves side by side: tensorboard --logdir runs (HParams tab).
"""

from __future__ import annotations

import argparse

from imgcls import runfolder, runs_table
from imgcls.cli import Parser, script


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="runs.py")
    parser.add_argument("folders", nargs="*", default=["runs"], metavar="FOLDER", help="run folders, k-fold jobs' "
                        f"folders, or folders holding them ({runfolder.MAX_DEPTH} levels deep at most), or glob "
                        "patterns of these (default: runs)")
    parser.add_argument("--folds", action="store_true", help="also a line per fold of each k-fold job, below it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    for line in runs_table.table(runs_table.folders_given(args.folders), args.folds):
        print(line)
    return 0


if __name__ == "__main__":
    script(main, __file__)
