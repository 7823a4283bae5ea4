"""tune.py: a recipe search whose trials are train.py runs, in a study kept in a database that several
processes share, that a killed process continues, and whose best recipe train.py takes as a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT

optuna = pytest.importorskip("optuna", reason="tune.py needs optuna: pip install -r requirements-tune.txt")


def tune_cmd(data: Path, study: Path, *extra: str, trials: int = 2, epochs: int = 1) -> list[str]:
    """The smallest real search: 32 px, 8 images a step, trials of an epoch or two."""
    return [sys.executable, str(ROOT / "tune.py"), "--data", str(data), "--mode", "scratch", "--img-size", "32",
            "--epochs", str(epochs), "--batch-size", "8", "--no-summary", "--no-amp", "--workers", "0",
            "--trials", str(trials), "--study", str(study), *extra]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def trials_of(study: Path, url: str | None = None) -> list[optuna.trial.FrozenTrial]:
    loaded = optuna.load_study(study_name=study.name, storage=url or f"sqlite:///{study / 'study.db'}")
    return loaded.get_trials(deepcopy=False)


@pytest.mark.parametrize("args, hint", [
    (["--out", "x"], "--out is not for tune.py"),
    (["--folds", "3"], "--folds is not for tune.py"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--storage", "redis://host"], "give a database URL"),
    (["--params", "lr,colour"], "--params colour: tune.py searches"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--tirals", "3"], "did you mean --trials?"),
    (["--launcher", "no-such-launcher-here"], "is not a command here"),
    (["--params", "lr", "--lr", "0.01"], "nothing left to search"),
    (["--dashboard", "70000"], "--dashboard 70000: give a port"),
])
def test_a_bad_tune_command_line_is_answered_in_one_line_before_torch_is_imported(args, hint):
    code = (f"import runpy, sys\nsys.argv = ['tune.py', *{args!r}]\ncode = 0\n"
            "try:\n    runpy.run_path('tune.py', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', code)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def searched(colours, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished study of three trials, the first the default recipe, with a held-out test split."""
    study = tmp_path_factory.mktemp("tune") / "study"
    result = run(tune_cmd(colours, study, "--test-split", "0.25", trials=2))
    assert result.returncode == 0, result.stdout + result.stderr
    return study, result


def test_each_trial_is_a_run_folder_in_the_study_folder_and_the_first_is_the_default_recipe(searched):
    study, _ = searched
    trials = trials_of(study)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert trials[0].user_attrs["baseline"]
    assert trials[0].params["lr"] == pytest.approx(2e-3 * (8 / 64) ** 0.5, rel=1e-3)  # the recipe's, at batch 8
    for t in trials:
        config = json.loads((study / f"trial-{t.number:04d}" / "config.json").read_text())
        assert config["lr"] == pytest.approx(t.params["lr"]) and config["augment"] == t.params["augment"]
        assert (study / f"trial-{t.number:04d}" / "summary.json").is_file()
    listed = run([sys.executable, str(ROOT / "runs.py"), str(study)]).stdout
    assert all(f"trial-{n:04d}" in listed for n in range(2))


def test_the_best_recipe_is_printed_as_a_command_and_saved_as_a_file_train_py_accepts(searched, tmp_path):
    study, result = searched
    summary = json.loads((study / "tune_summary.json").read_text())
    assert "python train.py --data" in result.stdout and f"python train.py @{study / 'best.args'}" in result.stdout
    out = tmp_path / "again"
    trained = run([sys.executable, str(ROOT / "train.py"), f"@{study / 'best.args'}", "--out", str(out),
                   "--workers", "0"])
    assert trained.returncode == 0, trained.stderr
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in summary["params"]} == pytest.approx(summary["params"])
    assert config["epochs"] == 1 and config["test_split"] == 0.25
    assert all((study / name).is_file() for name in ("history.png", "intermediate.png"))


def test_with_a_test_split_the_best_trial_is_evaluated_once_on_the_held_out_images(searched, colours):
    study, result = searched
    summary = json.loads((study / "tune_summary.json").read_text())
    report = study / "test" / f"trial-{summary['best_trial']:04d}" / "metrics.json"
    assert summary["best_test"] == json.loads(report.read_text())["accuracy"]
    assert f"held-out test accuracy of the best trial: {summary['best_test']:.2f}%" in result.stdout
    written = report.stat().st_mtime_ns
    again = run(tune_cmd(colours, study, "--test-split", "0.25", trials=2))
    assert again.returncode == 0 and "trial 2" not in again.stdout  # nothing left to do: the same report
    assert f"held-out test accuracy of the best trial: {summary['best_test']:.2f}%" in again.stdout
    assert report.stat().st_mtime_ns == written  # evaluated once


def test_a_study_refuses_to_continue_with_other_settings(searched, colours):
    study, _ = searched
    result = run(tune_cmd(colours, study, "--test-split", "0.25", "--min-scale", "0.5", trials=3))
    assert result.returncode == 2 and "started with other settings: min_scale" in result.stderr
    assert len(trials_of(study)) == 2


def test_two_processes_finish_one_sqlite_study_together_and_run_no_trial_twice(colours, tmp_path):
    study = tmp_path / "study"
    cmd = tune_cmd(colours, study, trials=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(3)  # (the second opens the study the first made)
    second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    trials = trials_of(study)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 3 and all(t.state.name == "FAIL" and t.user_attrs.get("surplus") for t in trials
                                  if t not in done)
    owners = [t.user_attrs["owner"]["pid"] for t in done]
    assert set(owners) == {first.pid, second.pid}  # both worked on it
    ran = [line.split(":")[0] for out, _ in outputs for line in out.splitlines() if line.startswith("trial ")]
    assert sorted(ran) == sorted(f"trial {t.number}" for t in done)  # each trial run by one process, once
    assert all(not (study / f"trial-{t.number:04d}" / "resumes.jsonl").exists() for t in done)


def test_a_study_killed_mid_trial_continues_that_trial_from_its_last_checkpoint(colours, tmp_path):
    study = tmp_path / "study"
    cmd = tune_cmd(colours, study, "--save-interval", "0", trials=1, epochs=3)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, began = study / "trial-0000" / "metrics.csv", time.monotonic()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # an epoch finished
        assert proc.poll() is None and time.monotonic() - began < 240
        time.sleep(0.2)
    child = trials_of(study)[0].user_attrs["child"]
    proc.send_signal(signal.SIGKILL)  # no goodbye: the run itself is told by the kernel (and saves)
    proc.wait()
    while os.path.exists(f"/proc/{child}"):
        time.sleep(0.2)
    result = run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial(s) 0 were left unfinished" in result.stdout and "trial 1 (continues trial 0's run)" in result.stdout
    trials = trials_of(study)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].user_attrs["run"] == "trial-0000"
    assert len(metrics.read_text().splitlines()) == 1 + 3  # every epoch once: continued, not started again
    assert (study / "trial-0000" / "resumes.jsonl").is_file() and not (study / "trial-0001").exists()


def test_a_pruned_trial_stops_as_a_saved_run_that_train_py_resumes(colours, tmp_path):
    from imgcls.tuning import trial as one

    store = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=store, direction="maximize",  # any score is below 1000: pruned
                                pruner=optuna.pruners.ThresholdPruner(lower=1000.0))
    trial, folder = study.ask(), tmp_path / "trial"
    settings = {"data": str(colours), "mode": "scratch", "img_size": 32, "epochs": 3, "batch_size": 8,
                "summary": False, "amp": False, "workers": 0}
    cmd = one.command(ROOT / "train.py", [], settings, folder)
    outcome = one.run(trial, cmd, folder, tmp_path / "trial.log", 3, store)
    assert outcome.state == "pruned" and outcome.epochs == 1 and outcome.saved_s > 0
    assert (folder / "last.pt").is_file() and (folder / "best.pt").is_file() and not (folder / "summary.json").exists()
    resumed = run([sys.executable, str(ROOT / "train.py"), "--resume", str(folder), "--workers", "0"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((folder / "summary.json").read_text())["epochs"] == 3


def postgres_binaries() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres() -> str:
    """A throwaway PostgreSQL server on a Unix socket (as nobody when run as root: initdb refuses root)."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    bin_dir = postgres_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pg-tune-"))  # (pytest's folders are closed to nobody; a short socket path)
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        os.chown(root, 65534, -1)
    port = str(20000 + os.getpid() % 20000)
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", f"{root}/data", "-A", "trust", "-U", "tune"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", f"{root}/data", "-l", f"{root}/log", "-w", "-o",
                        f"-k {root} -p {port} -c listen_addresses=''", "start"], check=True, capture_output=True,
                       timeout=120)
        yield f"postgresql+psycopg2://tune@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", f"{root}/data", "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_a_study_on_a_postgresql_server_is_shared_through_storage(postgres, colours, tmp_path):
    result = run(tune_cmd(colours, tmp_path / "a", "--storage", postgres, "--study-name", "shared", trials=1))
    assert result.returncode == 0, result.stdout + result.stderr
    more = run(tune_cmd(colours, tmp_path / "b", "--storage", postgres, "--study-name", "shared", trials=2))
    assert more.returncode == 0, more.stdout + more.stderr
    trials = optuna.load_study(study_name="shared", storage=postgres).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2 and "trial 1:" in more.stdout  # the study went on
    assert "trial 0:" not in more.stdout and "best trial" in more.stdout
    assert not (tmp_path / "a" / "study.db").exists() and (tmp_path / "b" / "trial-0001" / "best.pt").is_file()


def test_every_tune_option_has_help_and_shows_its_default_once():
    result = subprocess.run([sys.executable, "tune.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"COLUMNS": "1000", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    options = [line for line in result.stdout.splitlines() if line.startswith("  -")]
    assert options and all(line.count("default") <= 1 for line in options) and "--trials" in result.stdout


def test_the_dashboard_serves_the_study(searched, colours):
    pytest.importorskip("optuna_dashboard", reason="--dashboard needs optuna-dashboard")
    import urllib.request

    study, _ = searched
    port = 20000 + (os.getpid() + 7) % 20000
    proc = subprocess.Popen(tune_cmd(colours, study, "--test-split", "0.25", "--dashboard", str(port)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        began, answer = time.monotonic(), None
        while answer is None and time.monotonic() - began < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert [s["study_name"] for s in answer["study_summaries"]] == ["study"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_dashboard_on_a_study_not_made_yet_is_refused_and_makes_nothing(colours, tmp_path):
    study = tmp_path / "no-study-here"
    result = run(tune_cmd(colours, study, "--dashboard", "8765"), timeout=120)
    assert result.returncode == 2 and "no study" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not study.exists()


def test_the_command_that_trains_the_best_recipe_again_quotes_a_study_folder_with_spaces_and_quotes():
    from imgcls.tuning import results

    args = Path("/tmp/my study's $HOME/best.args")
    lines = results.retrain(["--data", "/d/my data", "--lr", "0.01"], args).splitlines()
    assert shlex_words(lines[1]) == ["python", "train.py", "--data", "/d/my data", "--lr", "0.01"]
    assert shlex_words(lines[2].split("    (")[0]) == ["python", "train.py", f"@{args}"]


def shlex_words(line: str) -> list[str]:
    import shlex

    return shlex.split(line)


def test_a_stop_while_a_retry_waits_for_its_old_run_leaves_no_trial_running_for_ever(colours, tmp_path):
    """A retry waits (silently, up to minutes) for the stopped run of its failed trial to finish saving: a
    Ctrl-C or SIGTERM then must leave the study with the retry queued again, not a trial that counts as
    running for ever (no heartbeat, no owner of its own: never found)."""
    import socket

    import tune
    from imgcls.tuning import search

    study = tmp_path / "study"
    cmd = tune_cmd(colours, study, trials=1)
    given, opts = tune.read_command_line(cmd[2:])
    s, _ = search.prepare(given, opts, ROOT)
    first = s.study.ask()  # trial 0, left running by a tune.py that died while its run was still saving
    gone = subprocess.Popen(["true"])
    gone.wait()
    saving = subprocess.Popen(["sleep", "300"])
    try:
        first.set_user_attr("owner", {"host": socket.gethostname(), "pid": gone.pid, "trial": 0})
        first.set_user_attr("run", "trial-0000")
        first.set_user_attr("child", saving.pid)
        (study / "trial-0000").mkdir()
        (study / "trial-0000" / "config.json").write_text("{}")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        began = time.monotonic()
        while len(trials_of(study)) < 2 or trials_of(study)[1].state.name != "RUNNING":  # the retry, waiting
            assert proc.poll() is None and time.monotonic() - began < 120
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        saving.kill()
    states = [t.state.name for t in trials_of(study)]
    assert "RUNNING" not in states and states[-1] == "WAITING", states  # the retry queued again


def test_a_postgresql_url_without_a_driver_uses_the_installed_psycopg2(colours, tmp_path):
    """SQLAlchemy 2.1 takes postgresql:// to mean psycopg 3; requirements-tune.txt installs psycopg2: the URL
    the docs show must reach the server (here none: refused, in one line), not fail on a missing module."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    result = run(tune_cmd(colours, tmp_path / "s", "--storage", "postgresql://tune:secret@127.0.0.1:1/db"), timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "connection" in result.stderr.lower() and "secret" not in result.stderr, result.stderr
