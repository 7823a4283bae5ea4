"""Whether calibrated probabilities and test-time augmentation pay off on images no model selection saw.

    python bench/bench_confidence.py                      # digits, scenes, shapes (see bench_recipes.py)
    python bench/bench_confidence.py --sets scenes --epochs 20

Data sets as in bench_recipes.py, with more images (scenes 160 crops per photo, shapes 300 per class) so
that the test splits (176 and 120 images) are not too small to bin. For each data set, ResNet18 trains
from scratch with the defaults (the modern recipe; its temperature is
fitted on the validation split), then eval.py runs on a held-out test split, without and with --tta.
Prints, per set: accuracy, TTA accuracy (and the difference), the fitted temperature,
and the expected calibration error (15 bins) of the raw softmax against the calibrated probabilities,
with their ratio. Baseline in the same run: the raw softmax and the plain images. Writes
bench/results-confidence.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_recipes import make_scenes, make_shapes

ROOT = Path(__file__).resolve().parents[1]


def hold_out_test(root: Path) -> Path:
    """Every other validation image of each class moves to test/: never trained on, never used to pick
    best.pt or fit the temperature."""
    for folder in sorted((root / "val").iterdir()):
        for k, f in enumerate(sorted(folder.iterdir())):
            if k % 2:
                (root / "test" / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.move(f, root / "test" / folder.name / f.name)
    return root


def run(args: list[str], cache: Path) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "IMGCLS_CACHE": str(cache)})
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")


def measure(data: str, test: str, out: Path, cache: Path, base: list[str]) -> dict:
    run(["train.py", "--data", data, *base, "--out", str(out), "--no-summary", "--save-interval", "1e9"], cache)
    row = {}
    for tag, extra in (("plain", []), ("tta", ["--tta"])):
        run(["eval.py", test, "--checkpoint", str(out), "--out", str(out / f"eval-{tag}"), *extra], cache)
        row[tag] = json.loads((out / f"eval-{tag}" / "metrics.json").read_text())
    plain, tta = row["plain"], row["tta"]
    return {"images": plain["images"], "accuracy": plain["accuracy"], "tta_accuracy": tta["tta_accuracy"],
            "temperature": plain["temperature"], "ece_raw": plain["ece"]["raw"],
            "ece_calibrated": plain["ece"]["calibrated"], "ece_tta": tta["ece"]["tta"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="*", default=["digits", "scenes", "shapes"], choices=("digits", "scenes", "shapes"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=64)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcls-confidence-"))
    makers = {"digits": lambda: ("demo", str(ROOT / "data" / "digits" / "test")),
              "scenes": lambda: (str(hold_out_test(make_scenes(work / "scenes", per_class=160))),
                                 str(work / "scenes" / "test")),
              "shapes": lambda: (str(hold_out_test(make_shapes(work / "shapes", per_class=300))),
                                 str(work / "shapes" / "test"))}
    results = {}
    for name in a.sets:
        data, test = makers[name]()
        base = ["--model", "resnet18", "--mode", "scratch", "--img-size", str(a.img_size), "--epochs", str(a.epochs),
                "--hflip", "0" if name == "digits" else "0.5"]
        r = results[name] = measure(data, test, work / "runs" / name, work / "cache", base)
        print(f"{name:7s} {r['images']:4d} test images: accuracy {r['accuracy']:6.2f}%, with TTA "
              f"{r['tta_accuracy']:6.2f}% ({r['tta_accuracy'] - r['accuracy']:+.2f}); temperature "
              f"{r['temperature']:.2f}, ECE raw {100 * r['ece_raw']:.2f}% -> calibrated "
              f"{100 * r['ece_calibrated']:.2f}% ({r['ece_calibrated'] / max(r['ece_raw'], 1e-9):.2f}x); "
              f"with TTA {100 * r['ece_tta']:.2f}%", flush=True)
    meta = {"model": "resnet18", "img_size": a.img_size, "epochs": a.epochs, "cpus": os.cpu_count()}
    path = ROOT / "bench" / "results-confidence.json"  # merged: a run of some sets keeps the others' figures
    merged = json.loads(path.read_text()) if path.exists() else {}
    if merged.get("settings") != meta:  # figures of other settings are not mixed in
        merged = {"settings": meta}
    path.write_text(json.dumps(merged | results, indent=1))
    print(f"figures written to bench/results-confidence.json (runs in {work})")


if __name__ == "__main__":
    main()
