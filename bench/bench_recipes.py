"""The default recipes against the seed's, for every family of network, in one sitting.

    python bench/bench_recipes.py          # the matrix below (1.5 hours on 2 cores)
    python bench/bench_recipes.py --models vgg11 --sets scenes --lrs 2.5e-4 5e-4 1e-3   # an lr sweep
    python bench/bench_recipes.py --finetune                        # pretrain on textures, then fine-tune
    python bench/bench_recipes.py --models convnext_tiny --sets scenes --seeds 1 2 3 4 5   # one cell, 5 seeds
    python bench/bench_recipes.py --data ~/photos --models mobilenet_v2   # also your own folder

The matrix: each model trains from scratch, 15 epochs at 64 px, batch 64, with the seed project's recipe
(`--recipe seed`: SGD 1e-3, StepLR) and with the defaults (nothing but --model, --mode, --img-size,
--epochs), on the same data, split and seed. Models, chosen to differ in normalisation and blocks: VGG11
(no normalisation), ResNet18 (BatchNorm, residual), MobileNetV2 (BatchNorm, depthwise, ReLU6),
EfficientNet-B0 (BatchNorm, depthwise, squeeze-excitation, SiLU, stochastic depth), ConvNeXt-Tiny
(LayerNorm, 7x7 depthwise, GELU) and SqueezeNet 1.1 (no normalisation, fire modules).
Data sets: see bench/synthetic.py (digits, scenes, shapes).

Printed and written to bench/results-recipes.json: per model and data set, the best validation accuracy
of each recipe, the chance level (the largest class's share of the validation images: what a network
that answers one class for every image gets), and the warnings each run gave (train.py's run health: a
healthy run gives none).

--lrs: the modern recipe at each lr instead (how the per-family lrs in config.py were chosen).

--finetune: each of the seed's three models is pretrained from scratch on `textures` (16 classes of
procedural patterns, 1,280 training images; --epochs), and its best.pt is then the starting point
(`--weights FILE`) for --mode finetune and --mode transfer on digits, scenes and shapes, with the seed's
recipe and with the modern one at the lrs given by --finetune-lrs: how the finetune and transfer defaults
were chosen. ImageNet weights cannot be downloaded on the machine this was measured on; a network
pretrained on patterns stands in for them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from synthetic import make, make_scenes, make_shapes  # noqa: F401  (bench_confidence imports them from here)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vgg11", "resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "squeezenet1_1")
SETS = ("digits", "scenes", "shapes")
RESULTS = ROOT / "bench" / "results-recipes.json"


def train(args: list[str], out: Path, cache: Path, keep: bool = False) -> dict:
    """One train.py run: best and final val accuracy, largest val loss, seconds per epoch, its warnings and
    the chance level of its validation images. Its checkpoints are removed unless `keep` (a VGG11's are
    1 GB a run: the matrix would fill a disk); the rest of the run folder stays."""
    cmd = [sys.executable, "train.py", *args, "--out", str(out), "--no-summary", "--save-interval", "1e9",
           "--overwrite"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "IMGCLS_CACHE": str(cache)})
    if done.returncode:
        print(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}", flush=True)
        return {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode)}
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    rows = [dict(zip(rows[0], map(float, r))) for r in rows[1:]]
    summary = json.loads((out / "summary.json").read_text())
    val = json.loads((out / "split.json").read_text())["val"]
    largest = max(Counter(label for _, label in val).values()) / len(val)
    for name in ([] if keep else ["best.pt", "last.pt"]):
        (out / name).unlink(missing_ok=True)
    return {"best_val_acc": max(r["val_acc"] for r in rows), "final_val_acc": rows[-1]["val_acc"],
            "max_val_loss": max(r["val_loss"] for r in rows), "wall_s": time.perf_counter() - t0,
            "s_per_epoch": float(np.mean([r["time_s"] for r in rows])), "chance": 100 * largest,
            "warnings": summary.get("warnings", []), "lr": json.loads((out / "config.json").read_text())["lr"]}


def shown(row: dict | None) -> str:
    if not row:
        return "-"
    if "failed" in row:
        return "failed"
    return f"{row['best_val_acc']:.2f}%" + (f" ({len(row['warnings'])} warning(s))" if row["warnings"] else "")


def save(results: dict, settings: dict) -> None:
    """Merged into the file: a run of some models or sets keeps the others' figures, each section (scratch,
    sweep, finetune) with its own settings, so a run of one section keeps the others' figures."""
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for section, rows in results.items():
        if merged.get("settings", {}).get(section) != settings:
            merged[section] = {}
            merged.setdefault("settings", {})[section] = settings
        for key, variants in rows.items():
            merged[section].setdefault(key, {}).update(variants)
    tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(RESULTS)


def matrix(a: argparse.Namespace, sets: dict[str, str], work: Path, settings: dict) -> None:
    variants = {f"lr {lr:g}": ["--recipe", "modern", "--lr", f"{lr:g}"] for lr in a.lrs} if a.lrs else \
        {"seed": ["--recipe", "seed"], "default": []}
    if a.seeds:  # each variant again at each seed: a cell decided by one or two images may be a tie
        variants = {f"{tag} seed {s}": [*extra, "--seed", str(s)] for s in a.seeds for tag, extra in variants.items()}
    print("| model | data | chance | " + " | ".join(variants) + " |", flush=True)
    for model in a.models:
        for name, data in sets.items():
            base = ["--data", data, "--model", model, "--mode", "scratch", "--img-size", str(a.img_size),
                    "--epochs", str(a.epochs)]
            row = {tag: train([*base, *extra], work / "runs" / f"{model}-{name}-{tag.replace(' ', '')}",
                              work / "cache") for tag, extra in variants.items()}
            chance = next((r["chance"] for r in row.values() if "chance" in r), float("nan"))
            print(f"| {model} | {name} | {chance:.1f}% | " + " | ".join(shown(r) for r in row.values()) + " |",
                  flush=True)
            for tag, r in row.items():
                for w in r.get("warnings", []):
                    print(f"    {tag}: {w}", flush=True)
            save({"sweep" if a.lrs else "seeds" if a.seeds else "scratch": {f"{model}/{name}": row}}, settings)


def finetune(a: argparse.Namespace, sets: dict[str, str], work: Path, settings: dict) -> None:
    source = make("textures", work)
    print("| model | data | scratch default | finetune seed | " +
          " | ".join(f"finetune modern {lr:g}" for lr in a.finetune_lrs) + " | transfer seed | transfer modern |",
          flush=True)
    for model in a.models:
        pre = work / "runs" / f"{model}-textures"
        pretrained = train(["--data", source, "--model", model, "--mode", "scratch", "--img-size", str(a.img_size),
                            "--epochs", str(a.epochs)], pre, work / "cache", keep=True)
        print(f"{model} pretrained on textures: {shown(pretrained)}", flush=True)
        weights = str(pre / "best.pt")
        for name, data in sets.items():
            base = ["--data", data, "--model", model, "--img-size", str(a.img_size),
                    "--epochs", str(a.finetune_epochs), "--weights", weights]
            variants = {"finetune seed": ["--mode", "finetune", "--recipe", "seed"],
                        **{f"finetune modern {lr:g}": ["--mode", "finetune", "--recipe", "modern", "--lr", f"{lr:g}"]
                           for lr in a.finetune_lrs},
                        "transfer seed": ["--mode", "transfer", "--recipe", "seed"],
                        "transfer modern": ["--mode", "transfer", "--recipe", "modern"]}
            row = {tag: train([*base, *extra], work / "runs" / f"{model}-{name}-{tag.replace(' ', '')}",
                              work / "cache") for tag, extra in variants.items()}
            scratch = json.loads(RESULTS.read_text()).get("scratch", {}).get(f"{model}/{name}", {}).get("default") \
                if RESULTS.exists() else None
            print(f"| {model} | {name} | {shown(scratch)} | " + " | ".join(shown(r) for r in row.values()) + " |",
                  flush=True)
            save({"finetune": {f"{model}/{name}": {"pretrained": pretrained, **row}}}, settings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS)
    p.add_argument("--data", help="also this folder")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--lrs", nargs="*", type=float, help="the modern recipe at these lrs instead of seed vs default")
    p.add_argument("--seeds", nargs="*", type=int, help="each recipe again at these --seed values (section 'seeds')")
    p.add_argument("--finetune", action="store_true", help="pretrain on textures, then finetune and transfer")
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--finetune-lrs", nargs="*", type=float, default=[2e-4, 5e-4])
    p.add_argument("--work", help="folder for the data, runs and caches (default: a new temporary one)")
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="imgcls-recipes-"))
    sets = {name: make(name, work) for name in a.sets} | ({"yours": a.data} if a.data else {})
    settings = {"img_size": a.img_size, "epochs": a.epochs, "cpus": os.cpu_count()}
    (finetune if a.finetune else matrix)(a, sets, work, settings)
    print(f"figures written to {RESULTS.relative_to(ROOT)} (runs in {work})")


if __name__ == "__main__":
    main()
