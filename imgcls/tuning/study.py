"""The study in its database: SQLite in the study folder by default, any SQLAlchemy URL (PostgreSQL,
MySQL) with --storage, so that several tune.py processes, on one machine or many, share one study.

A trial left running by a process that died is found two ways: on this machine at once (the process
that ran it is gone), from any machine by its heartbeat (none for HEARTBEAT_GRACE_S seconds). Either
way it is marked failed and a retry of it is queued, which continues the trial's run folder where
its last checkpoint left it (optuna's RetryHeartbeatStaleTrialCallback: each failed trial is retried
once, by whichever process marked it)."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from imgcls.errors import UsageError

DB_NAME = "study.db"
HEARTBEAT_S = 20
HEARTBEAT_GRACE_S = 90
SQLITE_TIMEOUT_S = 120  # several processes on one SQLite file wait for each other's writes this long
# options that may differ between the processes of one study (the machine's own)
MACHINE = ("device", "workers", "cache_dir", "image_cache", "save_interval", "summary", "amp", "compile", "data")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def storage_url(study_dir: Path, given: str | None) -> str:
    return given or f"sqlite:///{(study_dir / DB_NAME).absolute()}"


def storage(url: str) -> optuna.storages.RDBStorage:
    """The database, with heartbeats; SQLite waits for the lock rather than failing at once."""
    kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else \
        {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=HEARTBEAT_GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        except Exception as e:  # a driver missing, a server not reachable, a bad URL: the user's to fix
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot open the study's database {safe(url)}: {first}") from None


def safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(the --storage URL)"


def open_study(name: str, store: optuna.storages.RDBStorage, settings: dict[str, Any],
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, bool]:
    """The study, made or loaded (whether made here); a loaded one must have been started with the same
    settings, or its trials would not be comparable."""
    study = optuna.create_study(study_name=name, storage=store, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
        return study, True
    before, now = comparable(saved), comparable(settings)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        said = ", ".join(f"{k} {before.get(k)!r} (now {now.get(k)!r})" for k in changed)
        raise UsageError(f"study {name!r} was started with other settings: {said}; its trials would not be "
                         "comparable: start a new study (--study DIR or --study-name NAME), or give them as before")
    return study, False


def comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """What must be the same in every process of a study: the fixed train.py options but the machine's
    own (the data folder by its name: another machine may keep it elsewhere), and what is searched."""
    fixed = settings.get("fixed", {})
    return {**{k: v for k, v in fixed.items() if k not in MACHINE}, "data": Path(str(fixed.get("data"))).name,
            "searched": settings.get("searched"), "epochs": settings.get("epochs")}


def owner(number: int) -> dict[str, Any]:
    """Who runs trial `number`: this machine and process (a trial of a process that died is found by them).
    The number is kept with them: a retry inherits its failed trial's attributes, which are not its own."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "trial": number}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reap(study: optuna.Study) -> list[int]:
    """Mark failed, and queue a retry of, the trials left running by processes gone: this machine's at
    once, others' when their heartbeat is stale. Returns the trial numbers marked here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    store, host, failed = study._storage, socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("owner") or {}
        pid = who.get("pid")
        if who.get("trial") != t.number or who.get("host") != host or not isinstance(pid, int) \
                or pid == os.getpid() or alive(pid):
            continue
        try:
            if not store.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another process got there first
            continue
        failed.append(t.number)
        store.get_heartbeat_stale_trial_callback()(study, store.get_trial(t._trial_id))
    return failed


def counted(study: optuna.Study, before: int | None = None) -> int:
    """Trials that count towards --trials: finished (completed or pruned) or running (below number `before`)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED) if before is None or t.number < before)


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out
