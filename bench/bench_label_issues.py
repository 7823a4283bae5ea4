"""Label cleaning measured: plant label noise in data sets made here, run the whole flow (a k-fold job,
clean.py find, every suggestion accepted by clean.py apply --unmarked relabel, a retrain) and compare.

    python bench/bench_label_issues.py              # digits and scenes, 2%, 5% and 10% of labels flipped
    python bench/bench_label_issues.py --quick      # digits only, 5%: a few minutes

For each set and noise level: precision and recall of the images flagged as label issues against the
planted flips, the share of planted flips whose suggested label is the true one, and the test accuracy of
a model trained on the noisy labels, on the corrected ones and on the clean ones (the same settings, the
same held-out test images with their true labels). Every label set is a label file (.csv) pointing at the
same images: nothing is copied. Writes bench/results-label-issues-<set>.json. Runs are kept in
bench/.data/label-issues/: a stopped bench started again goes on from where it was.

  digits   scikit-learn's handwritten digits (the demo), 10 classes: its train/ images (the test/ images are
           the test set), at 16 px
  scenes   crops of 11 photos (bench/synthetic.py; needs scikit-image), at 32 px: train/ crops to train, the
           val/ crops (from a part of each photo no training crop touches) as the test set
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATA = ROOT / "bench" / ".data"
SETS = {"digits": {"img_size": 16, "epochs": 5, "per_class": 100},
        "scenes": {"img_size": 32, "epochs": 10, "per_class": 80}}


def items_of(folder: Path, per_class: int | None = None) -> list[tuple[str, str]]:
    """(path, class) of a folder per class, the first `per_class` of each (sorted by name)."""
    out = []
    for c in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        files = sorted(str(p) for p in (folder / c).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        out += [(p, c) for p in files[:per_class]]
    return out


def make_set(name: str, per_class: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train items, test items) of a set, made under bench/.data once."""
    if name == "digits":
        from imgcls.data import demo

        root = demo.export_demo()
        return items_of(root / "train", per_class), items_of(root / "test")
    import synthetic

    root = DATA / f"scenes-{per_class}"
    if not (root / "val").is_dir():
        synthetic.make_scenes(root, per_class=per_class)
    return items_of(root / "train"), items_of(root / "val")


def flipped(items: list[tuple[str, str]], share: float, seed: int) -> tuple[list[tuple[str, str]], set[str]]:
    """The items with `share` of them (at random) given another class at random; and the flipped paths."""
    rng = random.Random(seed)
    classes = sorted({c for _, c in items})
    chosen = set(rng.sample(range(len(items)), round(share * len(items))))
    out = [(p, rng.choice([x for x in classes if x != c]) if i in chosen else c) for i, (p, c) in enumerate(items)]
    return out, {items[i][0] for i in chosen}


def write_labels(path: Path, items: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(items)
    return path


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def trained(data: Path, out: Path, settings: dict, cache: Path, *extra: str) -> Path:
    """A run (or k-fold job) in `out`: kept when finished by an earlier bench, resumed when stopped."""
    done = out / ("cv_summary.json" if "--folds" in extra else "summary.json")
    if done.is_file():
        return out
    if (out / "config.json").is_file() or (out / "cv.json").is_file():
        run("train.py", "--resume", str(out), "--cache-dir", str(cache))
        return out
    shutil.rmtree(out, ignore_errors=True)  # stopped before it wrote its settings
    run("train.py", "--data", str(data), "--out", str(out), "--mode", "scratch", "--hflip", "0", "--no-summary",
        "--img-size", str(settings["img_size"]), "--epochs", str(settings["epochs"]), "--cache-dir", str(cache), *extra)
    return out


def accuracy(run_dir: Path, test: Path, cache: Path) -> float:
    out = run_dir / "eval-test"
    if not (out / "metrics.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        run("eval.py", str(test), "--checkpoint", str(run_dir), "--out", str(out), "--cache-dir", str(cache))
    return json.loads((out / "metrics.json").read_text())["accuracy"]


def level(name: str, settings: dict, train: list, test_csv: Path, share: float, work: Path, cache: Path,
          folds: int) -> dict:
    """One noise level of one set: the flow, and what it found against what was planted."""
    noisy, planted = flipped(train, share, seed=int(share * 1000))
    noisy_csv = write_labels(work / f"noisy-{share}.csv", noisy)
    start = time.time()
    job = trained(noisy_csv, work / f"job-{share}", settings, cache, "--folds", str(folds))
    report, fixed = work / f"report-{share}", work / f"corrected-{share}.csv"
    if not (report / "label_issues.json").is_file():
        shutil.rmtree(report, ignore_errors=True)
        run("clean.py", "find", str(job), "--out", str(report), "--cache-dir", str(cache))
    if not fixed.is_file():
        run("clean.py", "apply", str(report / "label_issues.csv"), "--out", str(fixed), "--unmarked", "relabel")
    flow_s = time.time() - start
    with open(report / "label_issues.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "label"]
    flagged = {r["path"] for r in rows}
    truth = dict(train)
    right = sum(1 for r in rows if r["path"] in planted and r["suggested"] == truth[r["path"]])
    hit = len(flagged & planted)
    return {"noise": share, "planted": len(planted), "flagged": len(flagged),
            "precision": hit / len(flagged) if flagged else None, "recall": hit / len(planted) if planted else None,
            "fixed_to_true": right / len(planted) if planted else None, "flow_s": round(flow_s, 1),
            "acc_noisy": accuracy(trained(noisy_csv, work / f"noisy-run-{share}", settings, cache), test_csv, cache),
            "acc_corrected": accuracy(trained(fixed, work / f"corrected-run-{share}", settings, cache), test_csv,
                                      cache)}


def bench(name: str, shares: list[float], folds: int, work: Path, cache: Path) -> dict:
    settings = SETS[name]
    train, test = make_set(name, settings["per_class"])
    work.mkdir(parents=True, exist_ok=True)
    clean_csv, test_csv = write_labels(work / "clean.csv", train), write_labels(work / "test.csv", test)
    acc_clean = accuracy(trained(clean_csv, work / "clean-run", settings, cache), test_csv, cache)
    levels = []
    for share in shares:
        levels.append(level(name, settings, train, test_csv, share, work, cache, folds))
        print(row(name, levels[-1], acc_clean), flush=True)
    return {"set": name, **settings, "train_images": len(train), "test_images": len(test), "acc_clean": acc_clean,
            "levels": levels}


HEADER = ("| set | noise | planted | flagged | precision | recall | fixed to the true class | acc. noisy | "
          "acc. corrected | acc. clean |\n|---|---|---|---|---|---|---|---|---|---|")


def row(name: str, r: dict, acc_clean: float) -> str:
    def share(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"
    return (f"| {name} | {100 * r['noise']:.0f}% | {r['planted']} | {r['flagged']} | {share(r['precision'])} | "
            f"{share(r['recall'])} | {share(r['fixed_to_true'])} | {r['acc_noisy']:.1f}% | {r['acc_corrected']:.1f}% | "
            f"{acc_clean:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, 5%% noise")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="the data sets")
    parser.add_argument("--noise", nargs="+", type=float, default=[0.02, 0.05, 0.10], help="shares of labels flipped")
    parser.add_argument("--folds", type=int, default=3, help="folds of the k-fold job")
    args = parser.parse_args()
    sets, shares = (["digits"], [0.05]) if args.quick else (args.sets, args.noise)
    work = DATA / ("label-issues-quick" if args.quick else "label-issues")  # runs finished before are kept
    cache = work / "cache"
    print(HEADER, flush=True)
    for name in sets:
        start = time.time()
        result = bench(name, shares, args.folds, work / name, cache)
        took = time.time() - start
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
        print(f"{name}: {machine}; {took / 60:.1f} min (runs kept from an earlier start not counted)")
        out = ROOT / "bench" / f"results-label-issues-{name}{'-quick' if args.quick else ''}.json"
        out.write_text(json.dumps({"machine": machine, "minutes": round(took / 60, 1), "folds": args.folds,
                                   **result}, indent=1))
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
