"""What a study gives its user: the best trial as a train.py command and a file train.py reads
(`python train.py @best.args`), the pictures, the held-out test figure of the best trial, and
tune_summary.json with all of it."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from imgcls import files, runfolder
from imgcls.evaluation import result
from imgcls.tuning.space import shown
from imgcls.tuning.trial import train_words

ARGS = "best.args"
SUMMARY = "tune_summary.json"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def best_settings(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The options that train the best trial's recipe again: the study's fixed ones and the trial's."""
    return {**study.user_attrs["settings"]["fixed"], **trial.params}


def write_args(study_dir: Path, settings: dict[str, Any]) -> Path:
    """One option or value a line: what argparse reads from `@FILE` (so it can be followed by others,
    e.g. --out, or a longer --epochs: the last one given wins)."""
    path = study_dir / ARGS
    files.atomic_write_text(path, "\n".join(train_words(settings)) + "\n")
    return path


def pictures(study: optuna.Study, study_dir: Path) -> list[Path]:
    """Optimisation history, parameter importances (fANOVA: needs a few completed trials) and the
    trials' validation curves with the pruned ones (optuna's matplotlib plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    made = []
    for name, plot in (("history.png", vis.plot_optimization_history), ("importances.png", vis.plot_param_importances),
                       ("intermediate.png", vis.plot_intermediate_values)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for it yet
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        fig.savefig(study_dir / name, dpi=110)
        plt.close(fig)
        made.append(study_dir / name)
    return made


def test_score(study: optuna.Study, trial: FrozenTrial, folder: Path, eval_py: Path) -> float | None:
    """The best trial evaluated once on the runs' held-out test split (eval.py, in a child process);
    kept in the study, so that it is measured once per best trial, whichever process asks."""
    kept = study.user_attrs.get("test") or {}
    if kept.get("trial") == trial.number:
        return kept["score"]
    out = folder.parent / "test" / folder.name
    if not (out / result.METRICS_JSON).is_file():
        if not (folder / runfolder.BEST).is_file():
            print(f"the best trial's run folder {folder} is not on this machine: its test figure is measured where "
                  "it is (tune.py there, or python eval.py --checkpoint RUN)", file=sys.stderr)
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(eval_py), "--checkpoint", str(folder), "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            if "has no held-out test split" not in done.stderr:
                print(f"the held-out test evaluation failed: {(done.stderr or done.stdout).strip()[-400:]}",
                      file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            study.set_user_attr("test", {"trial": trial.number, "score": None})  # (none to evaluate: said once)
            return None
    score = result.headline(json.loads((out / result.METRICS_JSON).read_text()))
    study.set_user_attr("test", {"trial": trial.number, "score": score, "report": str(out)})
    return score


def time_saved(study: optuna.Study) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {"trials_wall_s": sum(t.user_attrs.get("wall_s", 0.0) for t in trials),
            "pruning_saved_s": sum(t.user_attrs.get("saved_s", 0.0) for t in trials)}


def report(study: optuna.Study, study_dir: Path, eval_py: Path, counts: dict[str, int]) -> dict[str, Any] | None:
    """Print and write what the study found so far (any process may do it, at any time)."""
    trial = best_trial(study)
    if trial is None:
        print("no trial has completed yet: nothing to report")
        return None
    fixed = study.user_attrs["settings"]
    metric = "mAP" if fixed.get("multilabel") else "accuracy"
    folder = study_dir / trial.user_attrs.get("run", f"trial-{trial.number:04d}")
    settings = best_settings(study, trial)
    args = write_args(study_dir, settings)
    test = test_score(study, trial, folder, eval_py)
    made = pictures(study, study_dir)
    saved = time_saved(study)
    summary = {"best_trial": trial.number, "best_val": trial.value, "best_test": test, "metric": metric,
               "params": trial.params, "run": str(folder), "train_args": str(args), "trials": counts, **saved,
               "baseline_val": baseline_value(study)}
    files.atomic_write_text(study_dir / SUMMARY, json.dumps(summary, indent=1))
    print(f"best trial {trial.number} of {sum(counts.values())}: val {metric} {trial.value:.2f}% "
          f"({shown(trial.params)}); run folder {folder}")
    if summary["baseline_val"] is not None:
        print(f"the default recipe (trial 0): val {metric} {summary['baseline_val']:.2f}%")
    if test is not None:
        print(f"held-out test {metric} of the best trial: {test:.2f}%: the figure to quote (its val {metric} is the "
              f"best of {counts.get('complete', 0)} and so flatters it)")
    else:
        print(f"(its val {metric} is the best of several trials, and so optimistic: tune with --test-split 0.1 for "
              "an honest figure, or evaluate on images no trial saw)")
    print(f"pruned {counts.get('pruned', 0)} trials, saving about {saved['pruning_saved_s'] / 60:.1f} min of "
          f"{(saved['trials_wall_s'] + saved['pruning_saved_s']) / 60:.1f}")
    print(retrain(train_words(settings), args))
    print(f"wrote {study_dir / SUMMARY}, {args.name}" + "".join(f", {p.name}" for p in made))
    return summary


def retrain(words: list[str], args: Path) -> str:
    """The best recipe as two command lines to paste into a shell: every word quoted (a study folder may
    have spaces, quotes or a $ in its name)."""
    return ("train it again with:\n  python train.py " + " ".join(shlex.quote(w) for w in words)
            + f"\n  python train.py {shlex.quote(f'@{args}')}    (the same options, from the file; add --out DIR, "
            "or --epochs N)")


def baseline_value(study: optuna.Study) -> float | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE:
            return t.value
    return None
