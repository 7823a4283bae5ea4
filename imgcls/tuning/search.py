"""The search: the study opened (or made, with the default recipe queued as its first trial), then
trials one after another until the study has --trials of them (counted over every process working
on it) or --timeout passes; each trial asked of the sampler, run (trial.py) and told back."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from imgcls import runfolder
from imgcls.errors import TrainingError, UsageError
from imgcls.tuning import space
from imgcls.tuning import study as db
from imgcls.tuning import trial as one
from imgcls.tuning.space import shown

MAX_FAILURES = 3  # trials failing in a row: the cause is not the settings tried, so tuning stops
CHILD_WAIT_S = 180  # how long a retry waits for the stopped run of its failed trial to finish saving


@dataclasses.dataclass
class Search:
    """What every trial of this process shares."""
    study: optuna.Study
    store: optuna.storages.RDBStorage
    study_dir: Path
    space: dict[str, Any]
    fixed: dict[str, Any]
    epochs: int
    metric: str
    train_py: Path
    launcher: list[str]


def pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """median (default): every trial trains the same epochs, so a trial's epoch-k score is compared with
    the median of the earlier trials' at epoch k, and stopped below it; not before 4 trials have finished
    (a median needs some) nor before epoch epochs // 3 (warm-up and a high lr make the first ones noisy).
    hyperband: more aggressive, for many trials of many epochs. none: every trial runs to its end."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 3))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def sampler(trials: int) -> optuna.samplers.BaseSampler:
    """TPE, multivariate (lr and weight decay go together); the constant liar keeps processes working at
    once from proposing the same settings. Not seeded: processes on one study must not draw alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(n_startup_trials=min(10, max(4, trials // 3)), multivariate=True,
                                          constant_liar=True)


def run_trials(s: Search, trials: int, timeout: float | None) -> None:
    """Trials until the study has enough or the time is up; Ctrl-C leaves the trial under way to be
    continued by the next start (KeyboardInterrupt goes on up)."""
    began, failures = time.monotonic(), 0
    # (heartbeats are recorded here while a trial runs, not by study.optimize, which has no use here)
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
    while True:
        reaped = db.reap(s.study)
        if reaped:
            print(f"trial(s) {', '.join(map(str, reaped))} were left unfinished by a process that ended: marked "
                  "failed, and queued to continue from their run folders")
        if db.counted(s.study) >= trials:
            return
        if timeout is not None and time.monotonic() - began >= timeout:
            print(f"--timeout {timeout:g} s reached: no new trial starts")
            return
        trial = s.study.ask()
        if db.counted(s.study, before=trial.number) >= trials:  # another process took the last one first
            trial.set_user_attr("surplus", "not run: the study had its trials")
            s.study.tell(trial, state=TrialState.FAIL)
            return
        outcome = run_one(s, trial)
        failures = failures + 1 if outcome.state == "failed" else 0
        if failures >= MAX_FAILURES:
            raise TrainingError(f"{failures} trials in a row failed ({outcome.note}): see the logs in "
                                f"{s.study_dir / 'logs'}")


def folder_of(s: Search, trial: optuna.Trial) -> tuple[Path, int | None]:
    """The trial's run folder: its own, or a retried trial's, to continue (when it is on this machine)."""
    retried = s.store.get_trial(trial._trial_id).system_attrs.get("failed_trial")
    run = trial.user_attrs.get("run")
    if retried is not None and run and (s.study_dir / run / runfolder.CONFIG).is_file():
        child = trial.user_attrs.get("child")
        waited = time.monotonic()
        while isinstance(child, int) and db.alive(child) and time.monotonic() - waited < CHILD_WAIT_S:
            time.sleep(1)  # the failed trial's run, stopped when its tune.py died, is still saving
            s.store.record_heartbeat(trial._trial_id)  # (waiting, not dead: no other machine retries it)
        return s.study_dir / run, retried
    return s.study_dir / f"trial-{trial.number:04d}", None


def run_one(s: Search, trial: optuna.Trial) -> one.Outcome:
    # owned and beating at once: a process stopped or killed from here on leaves a trial that is found
    trial.set_user_attr("owner", db.owner(trial.number))
    s.store.record_heartbeat(trial._trial_id)  # (a trial without one is never found stale)
    try:
        params = space.suggest(trial, s.space)
        folder, retried = folder_of(s, trial)
        trial.set_user_attr("run", folder.name)
        what = "the default recipe" if trial.user_attrs.get("baseline") else shown(params)
        print(f"trial {trial.number}" + (f" (continues trial {retried}'s run)" if retried is not None else "") +
              f": {what}", flush=True)
        cmd = one.command(s.train_py, s.launcher, {**s.fixed, **params}, folder)
        outcome = one.run(trial, cmd, folder, s.study_dir / "logs" / f"{folder.name}.log", s.epochs, s.store)
    except KeyboardInterrupt:
        s.study.tell(trial, state=TrialState.FAIL)
        frozen = s.store.get_trial(trial._trial_id)
        s.store.get_heartbeat_stale_trial_callback()(s.study, frozen)  # queued: the next start continues it
        raise
    except UsageError:
        s.study.tell(trial, state=TrialState.FAIL)
        raise
    for key, value in (("epochs_run", outcome.epochs), ("wall_s", outcome.wall_s), ("saved_s", outcome.saved_s),
                       ("note", outcome.note)):
        trial.set_user_attr(key, value)
    state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[outcome.state]
    s.study.tell(trial, outcome.value if state == TrialState.COMPLETE else None, state=state)
    print("  " + said(s, outcome), flush=True)
    return outcome


def said(s: Search, outcome: one.Outcome) -> str:
    if outcome.state == "failed":
        return f"failed: {outcome.note}"
    best = s.study.best_trial if any(t.state == TrialState.COMPLETE for t in s.study.get_trials(deepcopy=False)) \
        else None
    end = f"{outcome.note}: " if outcome.note else ""
    return (f"{end}val {s.metric} {outcome.value:.2f}% after {outcome.epochs} epochs, {outcome.wall_s:.0f} s"
            + (f"; best so far {best.value:.2f}% (trial {best.number})" if best is not None else ""))


def prepare(given: dict[str, Any], tune: dict[str, Any], root: Path) -> tuple[Search, bool]:
    """The study opened or made (with the default recipe queued as its first trial when made here)."""
    from imgcls.data import labelfile
    from imgcls.networks import build as networks

    fixed, mode, epochs = dict(given), given["mode"], given["epochs"]
    names = space.searched(given, mode, tune["params"])
    base = space.recipe(given, mode, networks.family(given.get("model", "resnet18")))
    dists = space.distributions(names, base)
    multi = labelfile.is_label_file(fixed["data"]) and labelfile.is_multilabel(fixed["data"])
    settings = {"fixed": fixed, "searched": names, "epochs": epochs, "multilabel": multi}
    study_dir: Path = tune["study"]
    study_dir.mkdir(parents=True, exist_ok=True)
    store = db.storage(db.storage_url(study_dir, tune["storage"]))
    study, made = db.open_study(tune["study_name"], store, settings, sampler(tune["trials"]),
                                pruner(tune["pruner"], epochs))
    if made and not study.get_trials(deepcopy=False):
        study.enqueue_trial(space.baseline(names, base), user_attrs={"baseline": True})
    search = Search(study, store, study_dir, dists, study.user_attrs["settings"]["fixed"] | machine(given), epochs,
                    "mAP" if multi else "accuracy", root / "train.py", tune["launcher"])
    return search, made


def machine(given: dict[str, Any]) -> dict[str, Any]:
    """This process's own machine options (the device, the cache folder, where the data is), for its trials."""
    return {k: v for k, v in given.items() if k in db.MACHINE}
