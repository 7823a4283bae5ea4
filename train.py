"""Train an image classifier on a folder of labelled images (one sub-folder per class).

    python train.py --data demo --mode scratch --epochs 3
    python train.py --data ~/photos --model resnet18 --mode finetune
    python train.py --data ~/photos --model mobilenet_v2 --mode transfer --epochs 10
    torchrun --nproc_per_node=4 train.py --data ~/photos --mode finetune   # many GPUs (DDP)
    python train.py --resume runs/resnet18-finetune-20261128-130000 --epochs 20   # continue, train longer
    python train.py --data ~/photos --model timm/convnext_nano --mode finetune   # timm's models (pip install timm)
    python train.py --list-models 'efficientnet*'                                # what --model takes

Everything a run makes goes to one run folder (--out, default runs/<model>-<mode>-<time>):
last.pt, best.pt, config.json, split.json, skipped.txt, metrics.csv, summary.json, curves.png,
model_summary.txt, resumes.jsonl and TensorBoard event files (`tensorboard --logdir runs`).

Resuming: the settings that define the run (--data --model --mode --weights --img-size --val-split
--seed) cannot change; every other setting given with --resume takes effect from where the run is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imgcls import files, runfolder
from imgcls.cli import Parser, add_options, cli, imports_done, script, typed
from imgcls.data import folders, labelfile
from imgcls.errors import UsageError
from imgcls.networks import names
from imgcls.settings import TrainConfig, absolute_paths, validate
from imgcls.training import crossval


def read_command_line(argv: list[str] | None) -> dict[str, Any]:
    """The options given (those not given stay absent, so a resume can tell them apart), checked as far
    as they can be without torch: the numbers, the data folder, the weights file, the run folder (or
    the run to resume), the model's name (from the lists kept in the cache folder: model_names)."""
    parser = Parser(__doc__, prog="train.py", fromfile_prefix_chars="@")  # @FILE: options one a line (tune.py)
    add_options(parser)
    parser.add_argument("--list-models", nargs="?", const="*", default=argparse.SUPPRESS, metavar="PATTERN",
                        help="list what --model takes (torchvision's classifiers, and timm's as timm/NAME when "
                        "timm is installed), or those matching a shell-style PATTERN such as 'convnext*'")
    given = absolute_paths(vars(parser.parse_args(argv)))
    if "list_models" in given:
        return given
    validate(TrainConfig(**{k: v for k, v in given.items() if k not in ("resume", "data")}))
    if given.get("folds") and given.get("lr_find"):
        raise UsageError("--lr-find runs one range test and starts no run: use it without --folds")
    if given.get("resume") and runfolder.is_cv_folder(given["resume"]):
        return given  # a cross-validation job: its folds are resumed one by one
    if given.get("resume"):
        run_dir = runfolder.resume_target(given["resume"], given.get("out"))[0].resolve()  # (a link to a fold too)
        if runfolder.is_cv_folder(run_dir.parent) and run_dir.name.startswith(runfolder.FOLD_PREFIX):
            raise UsageError(f"{run_dir} is a fold of a k-fold job, whose summary covers all its folds: resume the "
                             f"job: python train.py --resume {typed(run_dir.parent)} (it resumes each fold)")
        return given
    data = given.get("data", TrainConfig.data)
    labelfile.check_data_given(data, given.get("label_sep"), TrainConfig.label_sep)
    if given.get("weights") and not Path(given["weights"]).is_file():
        raise UsageError(f"--weights {given['weights']} does not exist: give a state_dict file")
    if given.get("out"):
        files.check_run_dir(Path(given["out"]), in_place=False, overwrite=given.get("overwrite", False))
    if data != "demo":
        folders.check_outside(data, given.get("out") or "runs", "the run folder" if given.get("out") else
                              "runs/, the default parent of run folders,")
        folders.check_cache_outside(data, given.get("cache_dir"))
    if "model" in given:  # from the names' cache: a typo answered before torch loads, with the closest names
        names.check(given["model"], given.get("cache_dir"))
    return given


def list_models(pattern: str, cache_dir: str | None = None) -> int:
    found = names.matching(pattern, cache_dir)
    if not found:
        raise UsageError(f"no model matches {pattern!r}: python train.py --list-models lists them all")
    print("\n".join(found))
    timm = "" if names.installed("timm") else "; timm's models (timm/NAME) need: pip install timm"
    print(f"{len(found)} models match {pattern!r}{timm}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    given = read_command_line(argv)
    if "list_models" in given:
        return list_models(given["list_models"], given.get("cache_dir"))
    resume = given.get("resume")
    if runfolder.is_cv_folder(resume) if resume else given.get("folds"):
        return crossval.main(given)
    from imgcls.training import fit
    imports_done()

    return fit.main(given)


def run(argv: list[str] | None = None) -> int:
    return cli(main, argv)


if __name__ == "__main__":
    script(main, __file__)
