"""The layout (docs/architecture.md) kept by a test: what the top level holds, the layers of imgcls/ and the
direction of their imports, the faces, and the size rules. Reads the source only: no torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT, reach

ENTRY = {"train", "eval", "test", "export", "runs", "serve", "clean", "tune"}  # and dataset.py check (a face)
FACES = {"models", "dataset", "config"}
TOP = ENTRY | FACES
PACKAGE = ROOT / "imgcls"
# A module imports only from its own layer or lower ones (sub-packages take their package's layer).
LAYERS = {
    "imgcls.errors": 0, "imgcls.cli": 0, "imgcls.settings": 0, "imgcls.recipes": 0, "imgcls.files": 0,
    "imgcls.preprocess": 1, "imgcls.checkpoint": 1, "imgcls.plots": 1, "imgcls.machine": 1, "imgcls.interrupts": 1,
    "imgcls.data": 1,
    "imgcls.networks": 2, "imgcls.runfolder": 2, "imgcls.runs_table": 2,
    "imgcls.evaluation": 3,
    "imgcls.training": 4,
    "imgcls.export": 5, "imgcls.serving": 5, "imgcls.cleaning": 5, "imgcls.tuning": 5,
}
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 150, 80
# Still over the class rule, to split (issue 31): this list may only shrink.
KNOWN_LONG_CLASSES: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


MODULES = package_modules()


def imports(path: Path, top_only: bool = False) -> set[str]:
    """The modules a file imports (`from imgcls.data import split` names imgcls.data.split), lazy ones too
    unless `top_only`."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                names.add(sub if sub in MODULES else node.module)
    return names


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES or n in TOP or n.split(".")[0] == "imgcls"}


def layer(module: str) -> int:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYERS:
            return LAYERS[".".join(parts[:k])]
    raise AssertionError(f"{module} has no layer: add it to LAYERS here and to docs/architecture.md")


def test_the_top_level_holds_the_entry_scripts_and_the_three_faces_only():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP


def test_every_package_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    up = [f"{m} (L{layer(m)}) imports {d} (L{layer(d)})" for m, p in MODULES.items() if m != "imgcls"
          for d in ours(imports(p)) if d in MODULES and d != "imgcls" and layer(d) > layer(m)]
    assert up == []


def test_the_package_never_imports_a_top_level_module():
    assert [(m, sorted(ours(imports(p)) & TOP)) for m, p in MODULES.items() if ours(imports(p)) & TOP] == []


def test_scripts_and_faces_import_the_package_only():
    wrong = {p.name: sorted(ours(imports(p)) & TOP - {p.stem}) for p in ROOT.glob("*.py")}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_package_has_no_import_cycles():
    graph = {m: ours(imports(p, top_only=True)) & set(MODULES) - {m, "imgcls"} for m, p in MODULES.items()}
    assert [m for m in graph if m in reach(graph, m)] == []


def test_modules_classes_and_functions_keep_their_sizes():
    files = [*ROOT.glob("*.py"), *PACKAGE.rglob("*.py")]
    long_modules = [f"{p.relative_to(ROOT)} ({n} lines)" for p in files
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE]
    long_classes, long_functions = set(), []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                long_classes.add(f"{p.relative_to(ROOT)}:{node.name}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > MAX_FUNCTION:
                long_functions.append(f"{p.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert long_modules == []
    assert long_functions == []
    assert long_classes <= KNOWN_LONG_CLASSES, "a class over 150 lines: split it"


# The run folder's file names are spelled by their owner only: runfolder.py (and files.py, the lock's name, as
# files.FolderLock locks any folder). Other modules name them by runfolder's constants.
RUN_FOLDER_OWNER = PACKAGE / "runfolder.py"
LOCK_OWNER, LOCK = PACKAGE / "files.py", ".lock"
# the same name for another folder's file: eval.py's report lists the images it skipped as a run does
SAME_NAME_ELSEWHERE = {("imgcls/evaluation/report.py", "skipped.txt")}


def run_file_names() -> set[str]:
    """The names runfolder.py spells: its module-level string constants (`BEST = "best.pt"`, ...)."""
    names = {LOCK}
    for node in ast.parse(RUN_FOLDER_OWNER.read_text()).body:
        if isinstance(node, ast.Assign):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            names |= {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return names


def test_run_folder_file_names_are_spelled_by_runfolder_only():
    names = run_file_names()
    assert {"best.pt", "last.pt", "config.json", "summary.json", ".checkpointed", "cv.json", "fold-"} <= names

    def names_a_run_file(value: object) -> bool:
        return isinstance(value, str) and (value in names or re.fullmatch(r"fold-(\d+|\*)(/.*)?", value) is not None)
    spelled = []
    for path in [*ROOT.glob("*.py"), *PACKAGE.rglob("*.py")]:
        if path == RUN_FOLDER_OWNER:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and names_a_run_file(node.value) and (rel, node.value) not in \
                    SAME_NAME_ELSEWHERE and not (path == LOCK_OWNER and node.value == LOCK):
                spelled.append(f"{rel}:{node.lineno} {node.value!r}")
    assert spelled == [], "name it by its constant in imgcls/runfolder.py"


# eval.py's metrics.json is EvalResult.to_json: its name and its keys are the evaluation result's
# (imgcls/evaluation/result.py); a reader (tune.py's test figure) asks that module, never spells either.
def test_metrics_json_is_spelled_by_the_evaluation_result_only():
    owner = PACKAGE / "evaluation" / "result.py"
    spelled = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in [*ROOT.glob("*.py"), *PACKAGE.rglob("*.py")]
               if p != owner for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Constant) and node.value == "metrics.json"]
    assert spelled == [], "name it by imgcls.evaluation.result.METRICS_JSON"


def test_every_package_module_has_its_line_in_the_architecture_table():
    """docs/architecture.md's "One line per module": a row names a module by its path (`imgcls/data/split.py`),
    or, after one, its neighbours in the same folder by file name (`, compactcache.py`). Its rows stand in that
    table only."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## One line per module", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in (line for line in table.splitlines() if line.startswith("| `imgcls/")):
        first = row.split("|")[1]
        paths = re.findall(r"`(imgcls/[\w/]+\.py)`", first)
        folder = paths[0].rsplit("/", 1)[0]
        named |= set(paths) | {f"{folder}/{name}" for name in re.findall(r"`(\w+\.py)`", first)}
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == [], "give it its line in docs/architecture.md"
    rest = text.replace(table, "")
    assert [line for line in rest.splitlines() if re.match(r"\| `[\w/]+\.py` \|", line)] == [], \
        "a module's line outside the table"


def test_each_xdist_worker_gets_its_share_of_the_cores_it_may_run_on(monkeypatch):
    """`-n auto` counts the cores of the process's affinity (a container's cpuset, taskset); the threads per
    worker were the host's count shared out: under `taskset -c 0` one worker ran two OpenMP threads on one core,
    and a 4-core container on a 64-core host would run 16 per worker."""
    import os

    from conftest import worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert (worker_threads(4), worker_threads(2), worker_threads(8)) == (1, 2, 1)
