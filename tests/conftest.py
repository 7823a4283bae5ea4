"""Tiny real data made by the tests themselves: coloured-shape classes at 32 px, and weights files.

No network: ImageNet weights are stood in for by randomly initialised torchvision models saved
under the exact file names torchvision's weights API looks for in $TORCH_HOME.
"""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest


def worker_threads(workers: int) -> int:
    """An xdist worker's share of the cores this process may run on: its affinity, as `-n auto` counts them (a
    container's cpuset or taskset allows fewer than os.cpu_count(), which counts the host's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the cores shared out, or N OpenMP pools fight over them
    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import torch  # (after the thread count, which it reads once)
import torchvision
from PIL import Image

from imgcls.networks import weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from browser import chromium, watched  # noqa: F401  (the browser tests' fixtures: tests/browser.py)


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """What `start` reaches in an import graph (name -> names it imports): it is in a cycle if it reaches itself."""
    seen, todo = set(), [start]
    while todo:
        for b in graph[todo.pop()] - seen:
            seen.add(b)
            todo.append(b)
    return seen

THREE = ("vgg11", "resnet18", "mobilenet_v2")
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_image(colour: tuple[int, int, int], seed: int, size: int = 32) -> Image.Image:
    """A noisy patch of one dominant colour: separable by a tiny model in a couple of epochs."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    pixels = base + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_folder(root: Path, per_class: int = 12, classes: dict = COLOURS, offset: int = 0) -> Path:
    for c, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(colour, seed=offset + 1000 * c + i).save(root / name / f"{name}_{i:03d}.png")
    return root


# multi-label data: images holding two of four coloured squares, listed in a label file
SQUARES = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40), "yellow": (230, 210, 30)}
CORNERS = ((0, 0), (0, 16), (16, 0), (16, 16))


def make_objects_image(names: list[str], rng: random.Random) -> Image.Image:
    """Grey noise with a 13 px square of each named colour in its own random corner."""
    pixels = np.random.default_rng(rng.randrange(2**32)).normal(128, 20, (32, 32, 3))
    for name, (y, x) in zip(names, rng.sample(CORNERS, len(names))):
        dy, dx = rng.randrange(3), rng.randrange(3)
        pixels[y + dy:y + dy + 13, x + dx:x + dx + 13] = SQUARES[name]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_labels_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_labelled_set(root: Path, n: int, seed: int, split: bool = False, sep: str = " ") -> Path:
    """`n` images of two objects each, and labels.csv (with a split column: 3 train, 1 val, 1 test of 5)."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        two = sorted(rng.sample(list(SQUARES), 2))
        make_objects_image(two, rng).save(root / "img" / f"{i:03d}.png")
        rows.append([f"img/{i:03d}.png", sep.join(two)] + ([("train", "train", "train", "val", "test")[i % 5]]
                                                           if split else []))
    return write_labels_csv(root / "labels.csv", ["path", "labels"] + (["split"] if split else []), rows)


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Caches and run folders per test session, never in the user's home; offline even where
    there is a network (an unreachable proxy makes any download fail at once)."""
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # timm's hub: no retries against the dead proxy
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "empty-torch-home"))


@pytest.fixture(scope="session")
def colours(tmp_path_factory) -> Path:
    """Flat layout: 3 classes x 12 images; train.py splits it."""
    return make_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def colours_eval(tmp_path_factory) -> Path:
    """Unseen images of the same classes, for eval.py and test.py."""
    return make_folder(tmp_path_factory.mktemp("colours-eval"), per_class=6, offset=500)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A torch hub cache pre-filled with stand-in 'ImageNet' weights for the three models."""
    home = tmp_path_factory.mktemp("torch-home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    for name in THREE:
        torch.manual_seed(123)
        model = torchvision.models.get_model(name)
        url = weights.default_weights(name).url
        torch.save(model.state_dict(), folder / os.path.basename(url))
    return home


@pytest.fixture
def with_weights(torch_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def cached_weights(torch_home: Path, name: str) -> dict[str, torch.Tensor]:
    url = weights.default_weights(name).url
    return torch.load(torch_home / "hub" / "checkpoints" / os.path.basename(url), weights_only=True)


def call(entry, args: list[str]) -> int:
    """An entry point run as its script runs it (config.cli): the exit status, errors as one line."""
    from imgcls import cli

    try:
        return cli.cli(entry, args)
    except SystemExit as e:
        return int(e.code)


def train_args(data: Path, out: Path, *extra: str, precision: str | None = "--amp") -> list[str]:
    """The smallest real run: 32 px, one epoch, no summary table. The precision is given (bf16 where the CPU
    has it natively), not measured: a measurement depends on what else the machine is doing, and the tests'
    trained numbers must not (tests/test_cpu_precision.py passes precision=None)."""
    given = [precision] if precision and "--amp" not in extra and "--no-amp" not in extra else []
    return ["--data", str(data), "--out", str(out), "--img-size", "32", "--epochs", "1", "--batch-size", "8",
            "--no-summary", *given, *extra]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, colours) -> Path:
    """One small finished run that learned the colours, shared by the eval/test tests."""
    import train

    out = tmp_path_factory.mktemp("runs") / "run"
    os.environ.setdefault("IMGCLS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    assert train.main(train_args(colours, out, "--mode", "scratch", "--model", "resnet18", "--epochs", "3",
                                 "--optimizer", "adam", "--lr", "0.001", "--hflip", "0")) == 0
    return out


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, nothing runs after it."""


def kill_after_saving(monkeypatch, when) -> None:
    """The run is killed right after a checkpoint write for which `when(state, path)` is true."""
    from imgcls import checkpoint

    real = checkpoint.save

    def save(state, path):
        real(state, path)
        if when(state, path):
            raise Killed

    monkeypatch.setattr(checkpoint, "save", save)
