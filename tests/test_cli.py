"""The command lines and the code's shape: every script answers a typo at once, in one line, with a
suggestion; options mean the same everywhere; reports never replace each other; no entry script
imports another, no import cycle, no function too long to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import checkpoint
import eval as evaluate
import export
import test as predict
from checkpoint import Preprocess
from config import UsageError, cli

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
    assert "(default: None)" not in result.stdout


def test_a_checkpoint_is_found_from_a_run_folder_a_file_or_the_newest_run(trained_run, tmp_path, monkeypatch):
    assert checkpoint.find(str(trained_run)) == trained_run / "best.pt"
    assert checkpoint.find(str(trained_run / "last.pt")) == trained_run / "last.pt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(trained_run.parent)
    assert checkpoint.find(None).resolve() == (trained_run / "best.pt").resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"has no best\.pt yet"):
        checkpoint.find(str(tmp_path / "empty"))


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
    graph = {name: imports(path) & set(ours) for name, path in ours.items()}
    assert not {(a, b) for a, deps in graph.items() for b in deps if b in ENTRY}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for b in graph[todo.pop()] - seen:
                seen.add(b)
                todo.append(b)
        return seen
    assert [name for name in graph if name in reach(name)] == []


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in ROOT.glob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
