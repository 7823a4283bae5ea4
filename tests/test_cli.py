"""The command lines and the code's shape: every script answers a typo at once, in one line, with a
suggestion; options mean the same everywhere; reports never replace each other; no entry script
imports another, no import cycle, no function too long to read."""

from __future__ import annotations

import ast
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, reach, train_args

import eval as evaluate
import export
import test as predict
from imgcls import checkpoint, files, runfolder
from imgcls.cli import cli
from imgcls.errors import UsageError
from imgcls.preprocess import Preprocess

ENTRY = ("train", "eval", "test", "export", "runs")


def run_script_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """The script as `python script.py args`, reporting whether torch was imported by the time it exited."""
    code = (f"import runpy, sys\nsys.argv = [{script!r}, *{list(args)!r}]\ncode = 0\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', code)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script, args, hint", [
    ("train.py", ["--epohcs", "3"], "did you mean --epochs?"),
    ("train.py", ["--data", "/no/such/folder"], "does not exist"),
    ("train.py", ["--resume", "/no/such/run"], "nothing to resume"),
    ("eval.py", ["/no/such/folder"], "is not a folder"),
    ("eval.py", [".", "--chekpoint", "x"], "did you mean --checkpoint?"),
    ("eval.py", [".", "--checkpoint", "/no/such/run"], "does not exist"),
    ("test.py", ["/no/such/image.jpg"], "no such file"),
    ("test.py", ["README.md", "--top-k", "3"], "did you mean --topk?"),
    ("export.py", ["--format", "onnx", "--checkpoint", "/no/such.pt"], "does not exist"),
    ("export.py", ["--format", "onnx", "--int8"], "needs --data"),
    ("export.py", ["--format", "onnx", "--out", "README.md/m.onnx"], "README.md is a file"),
    ("export.py", ["--format", "onnx", "--out", "README.md/"], "README.md is a file"),
    ("dataset.py", ["check", "/no/such/folder"], "does not exist"),
    ("dataset.py", ["chek", "photos"], "invalid choice: 'chek'"),
    ("dataset.py", ["check", "/no/such/labels.csv"], "label file /no/such/labels.csv does not exist"),
    ("dataset.py", ["check", "README.md"], "is not a folder"),
    ("dataset.py", ["check", ".", "--val-split", "nan"], "--val-split must be between 0 and 1"),
    ("dataset.py", ["check", ".", "--max-file-mb", "-1"], "--max-file-mb must be a positive number"),
    ("dataset.py", ["check", ".", "--test-split", "0.8"], "--val-split plus --test-split less than 1"),
    ("dataset.py", ["check", ".", "--label-sep", ";"], "--label-sep is for a label file"),
    ("dataset.py", ["check", ".", "--seed", str(2**64)], "--seed must be"),
    ("dataset.py", ["check", ".", "--folds", "1"], "--folds must be 2 or more"),
    ("dataset.py", ["check", ".", "--cache-dir", "cache"], "is inside the data folder"),
    ("train.py", ["--data", ".", "--cache-dir", "cache"], "is inside the data folder"),
    ("train.py", ["--data", ".", "--out", "runs/mine"], "is inside the data folder"),
    ("eval.py", [".", "--cache-dir", "cache"], "is inside the data folder"),
    ("eval.py", [".", "--out", "report"], "is inside the data folder"),
    ("dataset.py", ["check", ".", "--max-file-mb", "inf"], "--max-file-mb must be a positive number"),
    ("train.py", ["--max-file-mb", "inf"], "--max-file-mb must be a positive number"),
    ("eval.py", [".", "--max-file-mb", "nan"], "--max-file-mb must be a positive number"),
    ("test.py", [".", "--max-file-mb", "1e400"], "--max-file-mb must be a positive number"),
    ("export.py", ["--format", "onnx", "--max-file-mb", "inf"], "--max-file-mb must be a positive number"),
    ("train.py", ["--seed", str(2**64)], "--seed must be"),
    ("train.py", ["--data", ".", "--label-sep", ";"], "--label-sep is for a label file"),
    ("train.py", ["--data", "demo", "--label-sep", ";"], "--label-sep is for a label file"),
    ("eval.py", [".", "--label-sep", ";"], "--label-sep is for a label file"),
])
def test_a_bad_command_line_is_answered_in_one_line_before_torch_is_imported(script, args, hint):
    result = run_script_in_process(script, *args)
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["train.py", "eval.py", "test.py", "export.py", "runs.py"])
def test_every_option_has_help_and_shows_its_default_once(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"COLUMNS": "1000", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    options = [line for line in result.stdout.splitlines() if line.startswith("  -")]
    assert options and all(line.count("default") <= 1 for line in options)
    assert "(default: None)" not in result.stdout and "(default: [])" not in result.stdout


def test_a_checkpoint_is_found_from_a_run_folder_a_file_or_the_newest_run(trained_run, tmp_path, monkeypatch):
    assert runfolder.find(str(trained_run)) == trained_run / "best.pt"
    assert runfolder.find(str(trained_run / "last.pt")) == trained_run / "last.pt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(trained_run.parent)
    assert runfolder.find(None).resolve() == (trained_run / "best.pt").resolve()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"has no best\.pt yet"):
        runfolder.find(str(tmp_path / "empty"))


def test_test_py_and_export_take_a_run_folder_as_checkpoint(trained_run, colours_eval, tmp_path):
    assert cli(predict.main, [str(colours_eval / "red"), "--checkpoint", str(trained_run),
                              "--out", str(tmp_path / "p")]) == 0
    assert cli(export.main, ["--checkpoint", str(trained_run), "--format", "torchscript",
                             "--out", str(tmp_path)]) == 0
    assert (tmp_path / "resnet18.ptl").is_file() and (tmp_path / "resnet18.ptl.json").is_file()


def test_each_test_run_writes_a_new_folder_named_by_data_and_checkpoint(trained_run, colours_eval, capsys):
    for _ in range(2):
        assert cli(predict.main, [str(colours_eval / "red"), "--checkpoint", str(trained_run / "best.pt")]) == 0
    assert (trained_run / "predictions-red-best" / "predictions.csv").is_file()
    assert (trained_run / "predictions-red-best-2" / "predictions.csv").is_file()
    assert "predictions-red-best-2" in capsys.readouterr().out


def test_preprocessing_round_trips_through_export_metadata():
    pre = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert Preprocess.from_metadata(pre.metadata()) == pre == Preprocess.from_dict(pre.to_dict())


def test_a_checkpoint_from_a_newer_layout_is_refused_in_one_line(trained_run, colours_eval, tmp_path, capsys):
    ckpt = checkpoint.load(trained_run / "best.pt") | {"version": checkpoint.VERSION + 1}
    checkpoint.save(ckpt, tmp_path / "new.pt")
    with pytest.raises(SystemExit) as stop:
        cli(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "new.pt")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "newer version" in err and len(err.splitlines()) == 1


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_entry_script_imports_another_and_library_modules_have_no_cycles():
    ours = {p.stem: p for p in ROOT.glob("*.py")}
    # (a script importing itself as a library, once its command line is read, is no cycle: dataset.py)
    graph = {name: imports(path) & set(ours) - {name} for name, path in ours.items()}
    assert not {(a, b) for a, deps in graph.items() for b in deps if b in ENTRY}
    assert [name for name in graph if name in reach(graph, name)] == []


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in ROOT.glob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


@pytest.mark.parametrize("script, args, hint", [
    ("train.py", ["--resume", "/tmp", "--lr", "-1"], "--lr must be a positive number"),
    ("train.py", ["--lr", "inf"], "--lr must be a positive number"),
    ("train.py", ["--img-size", "100000"], "--img-size must be between 16 and 4096"),
    ("train.py", ["--weights", "/no/such.pt", "--mode", "scratch"], "/no/such.pt does not exist"),
    ("train.py", ["--device", "bogus"], "--device bogus"),
    ("train.py", ["--data", "README.md"], "is not a folder"),
    ("train.py", ["--out", "tests", "--mode", "scratch"], "already holds"),
    ("eval.py", [".", "--out", "README.md"], "already holds"),
    ("eval.py", [".", "--out", "tests"], "already holds"),
    ("test.py", ["README.md", "--out", "tests"], "already holds"),
    ("test.py", ["README.md", "--grid", "0"], "--grid must be at least 1"),
    ("export.py", ["--format", "onnx", "--tolerance", "nan"], "--tolerance"),
    ("export.py", ["--format", "onnx", "--out", "model.bin"], "model.bin"),
    ("export.py", ["--fromat", "onnx"], "did you mean --format?"),
])
def test_more_bad_command_lines_are_answered_before_torch_is_imported(script, args, hint):
    result = run_script_in_process(script, *args)
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"junk\n", b"epoch,loss\n1,2\n", b"", b"\x80\x02}q\x00."])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(content, tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b'{"epoch": 3}', bytes(range(256)) * 8, b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_a_file_that_is_no_pytorch_file_is_not_said_to_need_code(content, tmp_path):
    """JSON, noise or a picture given as a checkpoint: named for what it is, not as a security refusal."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="is not a PyTorch file") as e:
        checkpoint.load(path)
    assert "pickled code" not in str(e.value)


def test_a_folder_that_is_no_run_is_named_as_such(tmp_path):
    with pytest.raises(UsageError, match="is not a run folder"):
        runfolder.find(str(tmp_path))


def test_report_folders_are_claimed_atomically_by_concurrent_processes(tmp_path):
    import threading

    claimed = []
    threads = [threading.Thread(target=lambda: claimed.append(files.claim_folder(tmp_path / "eval-x")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8 and all(p.is_dir() for p in claimed)


def test_an_exported_onnx_gives_the_same_probabilities_as_its_pt(colours, colours_eval, tmp_path):
    import train

    run = tmp_path / "barely"  # one epoch: near ties, where reduced precision would flip or move them
    assert train.main(["--data", str(colours), "--out", str(run), "--img-size", "32", "--epochs", "1",
                       "--no-summary", "--mode", "scratch"]) == 0
    assert cli(export.main, ["--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                             "--images", "4"]) == 0
    rows = {}
    for kind, ckpt in (("pt", run / "best.pt"), ("onnx", tmp_path / "m.onnx")):
        assert cli(predict.main, [str(colours_eval), "--checkpoint", str(ckpt), "--out", str(tmp_path / kind)]) == 0
        with open(tmp_path / kind / "predictions.csv", newline="") as f:
            rows[kind] = list(csv.DictReader(f))
    assert [r["path"] for r in rows["pt"]] == [r["path"] for r in rows["onnx"]]
    for pt, onnx in zip(rows["pt"], rows["onnx"]):  # the same to the digits shown, give or take the last one
        a, b = ({r[f"label_{k}"]: float(r[f"probability_{k}"]) for k in (1, 2, 3)} for r in (pt, onnx))
        assert a.keys() == b.keys() and all(a[c] == pytest.approx(b[c], abs=1.5e-4) for c in a)
        tie = float(pt["probability_1"]) - float(pt["probability_2"]) <= 2e-4  # either may come first
        assert pt["label"] == onnx["label"] or tie


def test_a_train_start_that_fails_leaves_no_folder_behind(colours, tmp_path, monkeypatch, capsys):
    import train

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.run(["--data", str(colours), "--mode", "scratch", "--weights", str(junk), "--out", "a/b/run"])
    assert stop.value.code == 2 and not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        train.run(["--data", str(colours), "--mode", "scratch", "--weights", str(junk)])
    assert not (tmp_path / "runs").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stop:
        train.run(["--data", str(colours), "--mode", "scratch", "--cache-dir", "afile", "--out", "r"])
    assert stop.value.code == 2 and not (tmp_path / "r").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


def test_export_out_ending_in_a_slash_is_a_folder_made_for_it(trained_run, tmp_path):
    assert cli(export.main, ["--checkpoint", str(trained_run), "--format", "torchscript", "--images", "2",
                             "--out", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / "resnet18.ptl").is_file()


def test_a_closed_pipe_ends_quietly():
    def printing(argv):
        raise BrokenPipeError

    assert cli(printing) == 141


def test_runs_table_skips_a_run_whose_settings_cannot_be_read(tmp_path, capsys):
    import runs

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(UsageError, match="no runs"):
        runs.main([str(tmp_path)])
    assert "broken/config.json" in capsys.readouterr().err


def test_runs_table_skips_a_run_whose_files_hold_other_json_and_names_that_file(trained_run, tmp_path, capsys):
    import runs

    shutil.copytree(trained_run, tmp_path / "good")
    for name, config, summary in (("listed", "[1]", None), ("summed", '{"model": "x"}', "[1, 2]"),
                                  ("nulled", None, '{"best_val_acc": null, "epochs": 2}'),
                                  ("worded", None, '{"best_val_acc": "95", "epochs": 2}')):
        shutil.copytree(trained_run, tmp_path / name)
        if config:
            (tmp_path / name / "config.json").write_text(config)
        if summary:
            (tmp_path / name / "summary.json").write_text(summary)
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cv.json").write_text('{"folds": 100000000}')  # (was looked up fold by fold: a hang)
    odd = {"typed": '{"model": 5, "mode": null, "optimizer": [], "lr": 0.1, "epochs": 1}',
           "nested": "[" * 100_000 + "]" * 100_000}
    for name, config in odd.items():
        shutil.copytree(trained_run, tmp_path / name)
        (tmp_path / name / "config.json").write_text(config)
    shutil.copytree(trained_run, tmp_path / "wide")
    (tmp_path / "wide" / "summary.json").unlink()
    (tmp_path / "wide" / "metrics.csv").write_text("epoch,val_acc\n1," + "9" * 200_000 + "\n")
    shutil.copytree(trained_run, tmp_path / "piped")
    (tmp_path / "piped" / "summary.json").unlink()
    os.mkfifo(tmp_path / "piped" / "summary.json")  # (reading it waited for ever)
    assert runs.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].startswith("good") and len(out.splitlines()) == 2
    assert "listed/config.json" in err and "summed/summary.json" in err and "summed/config.json" not in err
    assert "nulled/summary.json" in err and "worded/summary.json" in err and "job/cv.json" in err
    assert all(f"skipping {tmp_path / name}" in err for name in ("typed", "nested", "wide", "piped")), err


def test_the_check_command_answers_help_before_torch_is_imported():
    result = run_script_in_process("dataset.py", "check", "--help")
    assert result.stdout.split()[-3:] == ["no", "torch", "0"] and "--val-split" in result.stdout


REPORT_FREEZE = ("import atexit, gc\n"
                 "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen'))\n")


def frozen_at_exit(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python cmd`, reporting at exit whether objects were frozen for the garbage collector (through a
    sitecustomize module, which Python imports at start-up, so the command line stays the user's)."""
    import os

    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(REPORT_FREEZE)
    env = {**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "site")}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_a_command_takes_its_imports_out_of_the_garbage_collectors_rounds(trained_run, colours, colours_eval,
                                                                          tmp_path):
    commands = [["train.py", *train_args(colours, tmp_path / "run", "--mode", "scratch")],
                ["eval.py", str(colours_eval), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")],
                ["-m", "test", str(next(colours_eval.rglob("*.png"))), "--checkpoint", str(trained_run),
                 "--out", str(tmp_path / "t")],
                ["-X", "faulthandler", str(ROOT / "export.py"), "--checkpoint", str(trained_run), "--format",
                 "torchscript", "--out", str(tmp_path)],
                ["dataset.py", "check", str(colours)]]
    for cmd in commands:
        result = frozen_at_exit(cmd, tmp_path)
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "frozen", (cmd, result.stderr)


def test_a_script_run_inside_another_program_freezes_nothing(trained_run, colours_eval, tmp_path):
    """A notebook's `%run eval.py ...`, runpy, exec: the host's objects are not ours to freeze (what is
    frozen is never collected)."""
    host = (f"import runpy, sys\nsys.argv = ['eval.py', {str(colours_eval)!r}, '--checkpoint', "
            f"{str(trained_run)!r}, '--out', {str(tmp_path / 'e')!r}]\n"
            "try:\n    runpy.run_path('eval.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0\n")
    result = frozen_at_exit(["-c", host], tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "not frozen", result.stderr


def test_a_command_called_in_process_freezes_nothing(trained_run, colours_eval, tmp_path):
    import gc

    assert cli(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    assert gc.get_freeze_count() == 0  # a test's or another program's garbage would never be collected


@pytest.mark.parametrize("args, own", [
    (["train.py", "--epochs", "3"], True), (["-u", "-X", "importtime", "-W", "ignore", "./train.py"], True),
    (["-uW", "ignore", "train.py"], True), (["-uX", "dev", "train.py"], True), (["-Werror", "-uB", "train.py"], True),
    (["--check-hash-based-pycs", "always", "train.py"], True), (["--", "train.py"], True),
    (["-m", "train"], True), (["-um", "train"], True), (["-mtrain"], True),
    (["-m", "ipykernel_launcher", "-f", "k.json"], False), (["host.py", "train.py"], False),
    (["-c", "import runpy"], False), (["-uc", "import runpy"], False), (["-m", "runpy", "train"], False), ([], False)])
def test_a_process_is_the_commands_own_when_the_interpreter_was_started_for_it(args, own):
    from imgcls import cli as imgcls_cli

    script = str(ROOT / "train.py")
    assert imgcls_cli.started_as(script, args, main_origin=script) is own


def test_a_module_of_the_same_name_run_with_dash_m_is_not_the_command():
    """`python -m train` running a user's own train.py, which runs ours through runpy: the user's
    process, whose objects are not ours to freeze; its __main__ module comes from elsewhere."""
    from imgcls import cli as imgcls_cli

    assert not imgcls_cli.started_as(str(ROOT / "train.py"), ["-m", "train"], main_origin="/home/me/train.py")
    assert not imgcls_cli.started_as(str(ROOT / "train.py"), ["-m", "train"], main_origin=None)


def test_garbage_made_after_the_first_freeze_is_still_collected(monkeypatch):
    """A k-fold job calls imports_done once per fold: a fold's garbage (its model, in reference cycles)
    must not be frozen by the next fold's call, or each fold would keep the last one's memory."""
    import gc
    import weakref

    from imgcls import cli as imgcls_cli

    class Cycle:
        pass

    monkeypatch.setattr(imgcls_cli, "_own_process", True)
    monkeypatch.setattr(imgcls_cli, "_frozen", False)
    try:
        imgcls_cli.imports_done()  # the first fold
        garbage = Cycle()
        garbage.me = garbage
        alive = weakref.ref(garbage)
        del garbage
        imgcls_cli.imports_done()  # the next fold
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_a_misspelled_model_is_answered_before_torch_loads_with_the_three_closest_names():
    from imgcls.networks import names as networks_names

    networks_names.torchvision_names()  # what a first listing (or any run) leaves in the cache folder
    result = run_script_in_process("train.py", "--model", "resnt18")
    assert result.stdout.split() == ["no", "torch", "2"], result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "did you mean resnet18, " in err and "mobilenet_v2" not in err


def test_models_are_listed_from_the_cache_before_torch_loads():
    from imgcls.networks import names as networks_names

    networks_names.torchvision_names()
    if networks_names.installed("timm"):
        networks_names.timm_names()
    result = run_script_in_process("train.py", "--list-models", "resnet1*")
    assert result.stdout.split()[-3:] == ["no", "torch", "0"], result.stderr
    assert {"resnet18", "resnet101", "resnet152"} <= set(result.stdout.split())


def test_a_damaged_list_of_model_names_is_made_again(tmp_path, monkeypatch):
    from imgcls.networks import names as networks_names

    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path))
    first = networks_names.torchvision_names()
    (path,) = (tmp_path / "model-names").glob("torchvision-*.json")
    path.write_text('{"models": ["only_this"')
    assert networks_names.torchvision_names() == first and "resnet18" in first
    assert networks_names.package_key("torchvision") in path.name  # keyed by the version installed


def test_runs_py_takes_several_folders_and_globs_and_finds_runs_written_deeper_with_out(trained_run, tmp_path,
                                                                                         monkeypatch, capsys):
    import runs

    shutil.copytree(trained_run, tmp_path / "exp" / "cats" / "2026" / "r1")  # --out exp/cats/2026/r1
    shutil.copytree(trained_run, tmp_path / "elsewhere" / "r2")
    shutil.copytree(trained_run, tmp_path / "other-r3")
    monkeypatch.chdir(tmp_path)
    assert runs.main(["exp", "elsewhere/r2", "other-*"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert names == {"exp/cats/2026/r1", "elsewhere/r2", "other-r3"}
    assert runs.main(["exp"]) == 0 and capsys.readouterr().out.splitlines()[1].startswith("cats/2026/r1 ")
