"""Find the best training recipe for a data set: a search over the settings that matter (Optuna's TPE),
each trial an ordinary train.py run, hopeless trials stopped early (pruned), the study kept in a database.

    python tune.py --data photos --model resnet18 --mode scratch --epochs 15 --trials 30
    python tune.py --data photos --mode scratch --trials 30 --test-split 0.1      # + an honest test figure
    python tune.py --data photos --mode scratch --timeout 3600 --params lr,weight_decay,mixup
    python tune.py --data photos --mode finetune --trials 40 --storage postgresql://u:p@db/tune  # on each machine
    python tune.py --data photos --mode scratch --launcher "torchrun --nproc_per_node 4"         # DDP trials
    python tune.py --data photos --mode scratch --dashboard                # Optuna's dashboard on the study

Searched (those that apply to the mode, less any given as an option, which is then fixed for every
trial): --lr, --weight-decay, --label-smoothing, --min-scale, --augment, --mixup, --cutmix, --ema, and
--backbone-lr-mult when finetuning. The first trial is the default recipe. Every other train.py option
(--epochs, --img-size, --batch-size, --test-split, ...) is fixed for all trials.

The study folder (--study, default runs/tune-<model>-<mode>-<data>) holds study.db (the study, unless
--storage), trial-NNNN/ (one run folder per trial: runs.py lists them, eval.py evaluates them,
train.py --resume continues them), logs/, best.args (`python train.py @best.args` trains the best
recipe again), history.png, importances.png, intermediate.png and tune_summary.json. The same command
started again continues the study (a trial a killed process left unfinished continues from its last
checkpoint); started on several machines with one --storage, they share the study. See docs/tuning.md.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from imgcls.cli import Parser, add_options, imports_done, script
from imgcls.data import folders, labelfile
from imgcls.errors import UsageError
from imgcls.networks import names as model_names
from imgcls.recipes import DEMO
from imgcls.settings import TrainConfig, absolute_paths, file_name, validate

NOT_HERE = ("out", "resume", "folds", "lr_find", "overwrite")  # train.py's options that tune.py sets or has no use for
PRUNERS = ("median", "hyperband", "none")


def parser() -> Parser:
    p = Parser(__doc__, prog="tune.py")
    add_options(p)
    p.add_argument("--trials", type=int, default=20, help="trials the study should have in all (completed and "
                   "pruned, by every process working on it): a study that has them has nothing more to do")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which this process starts no new "
                   "trial (the one under way finishes)")
    p.add_argument("--study", default=None, help="the study folder (default: runs/tune-<model>-<mode>-<data>)")
    p.add_argument("--study-name", default=None, help="the study's name in its database (default: the study "
                   "folder's name)")
    p.add_argument("--storage", default=None, help="a database URL shared by several processes or machines, e.g. "
                   "postgresql://user:password@host/db or mysql+pymysql://... (default: sqlite:///STUDY/study.db)")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="how hopeless trials are stopped early: "
                   "median (below the median of earlier trials at the same epoch), hyperband, none")
    p.add_argument("--params", default=None, help="search only these, comma-separated (e.g. lr,weight_decay)")
    p.add_argument("--launcher", default=None, help="what runs each trial's train.py instead of this Python, e.g. "
                   "'torchrun --nproc_per_node 4'")
    p.add_argument("--dashboard", nargs="?", const=8080, type=int, default=None, metavar="PORT",
                   help="serve Optuna's dashboard on the study at http://127.0.0.1:PORT (8080) instead of tuning")
    return p


TUNE = ("trials", "timeout", "study", "study_name", "storage", "pruner", "params", "launcher", "dashboard")


def read_command_line(argv: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train.py's options, fixed for every trial; tune.py's own), checked before torch loads."""
    args = vars(parser().parse_args(argv))
    tune = {k: args.pop(k) for k in TUNE}
    given = absolute_paths(args)
    refused = [k for k in NOT_HERE if k in given]
    if refused:
        raise UsageError(f"--{refused[0].replace('_', '-')} is not for tune.py (each trial is a run folder in the "
                         "study folder: use --study DIR; k-fold and lr range tests: train.py)")
    data = given.setdefault("data", TrainConfig.data)
    defaults = DEMO if data == "demo" else {}
    given.setdefault("mode", defaults.get("mode", TrainConfig.mode))
    given.setdefault("epochs", defaults.get("epochs", TrainConfig.epochs))
    validate(TrainConfig(**{k: v for k, v in given.items() if k != "data"}))
    check_data(given)
    check_tune(tune, given)
    return given, tune


def check_data(given: dict[str, Any]) -> None:
    """As train.py checks them: the data, the weights file, the model's name."""
    data = given["data"]
    labelfile.check_data_given(data, given.get("label_sep"), TrainConfig.label_sep)
    if given.get("weights") and not Path(given["weights"]).is_file():
        raise UsageError(f"--weights {given['weights']} does not exist: give a state_dict file")
    if "model" in given:
        model_names.check(given["model"], given.get("cache_dir"))
    if given.get("cache_dir"):
        given["cache_dir"] = str(Path(given["cache_dir"]).expanduser().absolute())
    folders.check_cache_outside(None if data == "demo" else data, given.get("cache_dir"))


def check_tune(tune: dict[str, Any], given: dict[str, Any]) -> None:
    if tune["trials"] < 1:
        raise UsageError("--trials must be at least 1")
    if tune["timeout"] is not None and not tune["timeout"] > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    data = given["data"]
    name = "demo" if data == "demo" else Path(data).stem
    study = Path(tune["study"] or Path("runs") / f"tune-{file_name(given.get('model', TrainConfig.model))}-"
                 f"{given['mode']}-{name}").expanduser().absolute()
    if study.exists() and not study.is_dir():
        raise UsageError(f"--study {study} is a file: give a folder for the study")
    if not tune["storage"] and study.is_dir() and any(study.iterdir()) and not (study / "study.db").is_file():
        raise UsageError(f"--study {study} already holds files that are no study: give a new or empty folder")
    if data != "demo":
        folders.check_outside(data, study, "the study folder")
    check_dashboard(tune["dashboard"], study, tune["storage"])
    tune["study"], tune["study_name"] = study, tune["study_name"] or study.name
    tune["params"] = [p.strip().replace("-", "_") for p in tune["params"].split(",")] if tune["params"] else None
    from imgcls.tuning.space import searched  # (optuna, no torch)

    searched(given, given["mode"], tune["params"])  # names known, and something left to search
    tune["launcher"] = shlex.split(tune["launcher"]) if tune["launcher"] else []
    if tune["launcher"] and not shutil.which(tune["launcher"][0]):
        raise UsageError(f"--launcher {tune['launcher'][0]} is not a command here: give e.g. 'torchrun "
                         "--nproc_per_node 4'")
    check_storage(tune)


def check_dashboard(port: int | None, study: Path, storage: str | None) -> None:
    """The dashboard shows a study that exists (it makes none) on a port there can be."""
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise UsageError(f"--dashboard {port}: give a port between 1 and 65535 (default 8080)")
    if not storage and not (study / "study.db").is_file():
        raise UsageError(f"--dashboard: no study in {study} yet: tune there first (the same command without "
                         "--dashboard), or give the study's --study DIR")


def check_storage(tune: dict[str, Any]) -> None:
    """The database's driver (and the dashboard's package) installed: said before anything starts. A URL
    that names no driver gets one that is installed (SQLAlchemy 2.1 reads postgresql:// as psycopg 3,
    requirements-tune.txt installs psycopg2)."""
    url = tune["storage"] or "sqlite://"
    scheme = url.split(":", 1)[0]
    dialect, _, driver = scheme.partition("+")
    if dialect not in ("postgresql", "mysql", "sqlite") or "://" not in url:
        raise UsageError(f"--storage {url.split('@')[-1]}: give a database URL, e.g. postgresql://user:password@host/"
                         "db, mysql+pymysql://user:password@host/db or sqlite:////path/study.db")
    from sqlalchemy.engine import make_url  # (optuna's, no torch)
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise UsageError(f"--storage {url.split('@')[-1]}: not a database URL SQLAlchemy reads ({e}): give e.g. "
                         "postgresql://user:password@host/db or mysql+pymysql://user:password@host/db") from None
    if not driver and not has_driver(parsed):
        other = next((d for d in OTHER_DRIVERS.get(dialect, ()) if has_driver(parsed.set(drivername=f"{dialect}+{d}"))),
                     None)
        if other:
            parsed = parsed.set(drivername=f"{dialect}+{other}")
            tune["storage"] = parsed.render_as_string(hide_password=False)
    if not has_driver(parsed):
        module = parsed.get_dialect().driver
        raise UsageError(f"--storage {dialect} needs the {module} driver: pip install "
                         f"{PACKAGES.get(module, module)}")
    if tune["dashboard"] is not None and importlib.util.find_spec("optuna_dashboard") is None:
        raise UsageError("--dashboard needs optuna-dashboard: pip install -r requirements-tune.txt")


OTHER_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql",)}
PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "mysqldb": "mysqlclient"}


def has_driver(url: Any) -> bool:
    """Whether the URL's database module imports here."""
    try:
        url.get_dialect().import_dbapi()
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    given, tune = read_command_line(argv)
    import optuna  # loads only for a command line that is good

    from imgcls.tuning import results, search
    from imgcls.tuning import study as db
    imports_done()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if tune["dashboard"] is not None:  # (the study as it is: nothing made, its settings not compared)
        return dashboard(db.storage(db.storage_url(tune["study"], tune["storage"])), tune["study_name"],
                         tune["dashboard"])
    s, made = search.prepare(given, tune, Path(__file__).resolve().parent)
    print(f"study {tune['study_name']} in {tune['study']} ({'new' if made else 'continued'}; "
          f"{db.storage_url(tune['study'], tune['storage']).split('@')[-1]}): searching "
          f"{', '.join(s.space)} over {tune['trials']} trials of {s.epochs} epochs", flush=True)
    signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        search.run_trials(s, tune["trials"], tune["timeout"])
    except KeyboardInterrupt:
        print("\ninterrupted: the trial under way saved its run; the same command continues the study",
              file=sys.stderr)
        return 130
    results.report(s.study, tune["study"], Path(__file__).resolve().parent / "eval.py", db.states(s.study))
    return 0


def as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler, a machine going down) stops tune.py as Ctrl-C does: the trial's run saves."""
    raise KeyboardInterrupt


def dashboard(store: Any, name: str, port: int) -> int:
    import optuna
    import optuna_dashboard

    if name not in optuna.get_all_study_names(store):
        raise UsageError(f"--dashboard: the database has no study {name!r} yet: tune first (the same command "
                         "without --dashboard), or give its --study-name")
    print(f"Optuna's dashboard on the study: http://127.0.0.1:{port} (Ctrl-C ends it)", flush=True)
    try:
        optuna_dashboard.run_server(store, host="127.0.0.1", port=port)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port taken, or not ours to use
        raise UsageError(f"--dashboard {port}: cannot serve on it ({e.strerror or e}): give another port") from None
    return 0


if __name__ == "__main__":
    script(main, __file__)
