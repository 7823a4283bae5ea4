"""Whether calibrated probabilities and test-time augmentation pay off on images no model selection saw.

    python bench/bench_confidence.py                      # digits, scenes, shapes, scenes-110 (see bench_recipes.py)
    python bench/bench_confidence.py --sets scenes --epochs 20

Data sets as in bench_recipes.py, with more images (scenes 160 crops per photo, shapes 300 per class) so
that the test splits (176 and 120 images) are not too small to bin; scenes-110 is scenes with only 10
validation images per photo (110 in all, the rest to test) and 8 epochs, the case of a few validation
images that picked best.pt and fit the temperature. For each data set, ResNet18 trains from scratch with
the defaults (the modern recipe; its temperature is fitted on the validation split, and kept only when it
lowers the calibration error on the validation images it was not fitted on), then eval.py runs on a
held-out test split, without and with --tta. Prints, per set: accuracy, TTA accuracy (and the
difference), the fitted temperature and whether it was kept; the expected calibration error (15 bins) on
validation as training reports it (raw softmax, and with the temperature on the half of the images it was
not fitted on; in brackets the old, in-sample figure); and on the test images, which neither training,
best-epoch choice nor the temperature saw: the raw softmax, the fitted temperature always applied, and the
temperature as kept, with the ratio to the raw softmax. Writes bench/results-confidence.json.
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
sys.path.insert(0, str(ROOT))
from imgcls import checkpoint  # noqa: E402

SETS = ("digits", "scenes", "shapes", "scenes-110")
FEW_EPOCHS = 8  # scenes-110: a short run on few validation images, as in the case that showed the problem


def hold_out_test(root: Path, keep: int | None = None) -> Path:
    """Every other validation image of each class (or all but the first `keep`) moves to test/: never
    trained on, never used to pick best.pt or fit the temperature."""
    for folder in sorted((root / "val").iterdir()):
        for k, f in enumerate(sorted(folder.iterdir())):
            if (k % 2) if keep is None else k >= keep:
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
    c = checkpoint.load(out / "best.pt")["calibration"]
    fitted = plain["ece"]["calibrated"]
    if not c["kept"]:  # the temperature training did not keep, applied all the same: what it would have done
        ckpt = checkpoint.load(out / "best.pt")
        ckpt["calibration"]["temperature"] = c["fitted"]
        checkpoint.save(ckpt, out / "fitted.pt")
        run(["eval.py", test, "--checkpoint", str(out / "fitted.pt"), "--out", str(out / "eval-fitted")], cache)
        fitted = json.loads((out / "eval-fitted" / "metrics.json").read_text())["ece"]["calibrated"]
    return {"images": plain["images"], "val_images": c["images"], "accuracy": plain["accuracy"],
            "tta_accuracy": tta["tta_accuracy"], "fitted_temperature": c["fitted"], "kept": c["kept"],
            "temperature": plain["temperature"], "val_ece_raw": c["ece_raw"], "val_ece_held_out": c["ece"],
            "val_ece_in_sample": c["ece_in_sample"], "ece_raw": plain["ece"]["raw"], "ece_fitted": fitted,
            "ece_calibrated": plain["ece"]["calibrated"], "ece_tta": tta["ece"]["tta"]}


def table(results: dict[str, dict]) -> str:
    """The README's table."""
    lines = ["| data set | val / test images | accuracy | with `--tta` | temperature fitted (kept?) | val ECE: raw -> "
             "held out (in-sample) | test ECE, raw softmax | test ECE, fitted T | test ECE, as kept | ratio | "
             "test ECE, with `--tta` |", "|---" * 11 + "|"]
    pct = "{:.2f}%".format
    for name, r in results.items():
        lines.append(f"| {name} | {r['val_images']} / {r['images']} | {pct(r['accuracy'])} | {pct(r['tta_accuracy'])} "
                     f"({r['tta_accuracy'] - r['accuracy']:+.2f}) | {r['fitted_temperature']:.2f} "
                     f"({'yes' if r['kept'] else 'no'}) | {pct(100 * r['val_ece_raw'])} -> "
                     f"{pct(100 * r['val_ece_held_out'])} ({pct(100 * r['val_ece_in_sample'])}) | "
                     f"{pct(100 * r['ece_raw'])} | {pct(100 * r['ece_fitted'])} | {pct(100 * r['ece_calibrated'])} | "
                     f"{r['ece_calibrated'] / max(r['ece_raw'], 1e-9):.2f}x | {pct(100 * r['ece_tta'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=64)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgcls-confidence-"))
    makers = {"digits": lambda: ("demo", str(ROOT / "data" / "digits" / "test")),
              "scenes": lambda: (str(hold_out_test(make_scenes(work / "scenes", per_class=160))),
                                 str(work / "scenes" / "test")),
              "shapes": lambda: (str(hold_out_test(make_shapes(work / "shapes", per_class=300))),
                                 str(work / "shapes" / "test")),
              "scenes-110": lambda: (str(hold_out_test(make_scenes(work / "scenes-110", per_class=160), keep=10)),
                                     str(work / "scenes-110" / "test"))}
    results = {}
    for name in a.sets:
        data, test = makers[name]()
        epochs = FEW_EPOCHS if name == "scenes-110" else a.epochs
        base = ["--model", "resnet18", "--mode", "scratch", "--img-size", str(a.img_size), "--epochs", str(epochs),
                "--hflip", "0" if name == "digits" else "0.5"]
        r = results[name] = measure(data, test, work / "runs" / name, work / "cache", base)
        print(f"{name:10s} {r['images']:4d} test images: accuracy {r['accuracy']:6.2f}%, with TTA "
              f"{r['tta_accuracy']:6.2f}% ({r['tta_accuracy'] - r['accuracy']:+.2f}); temperature "
              f"{r['fitted_temperature']:.2f} ({'kept' if r['kept'] else 'not kept'}); val ECE raw "
              f"{100 * r['val_ece_raw']:.2f}% -> held out {100 * r['val_ece_held_out']:.2f}% (in-sample "
              f"{100 * r['val_ece_in_sample']:.2f}%); test ECE raw {100 * r['ece_raw']:.2f}%, fitted T "
              f"{100 * r['ece_fitted']:.2f}%, as kept {100 * r['ece_calibrated']:.2f}% "
              f"({r['ece_calibrated'] / max(r['ece_raw'], 1e-9):.2f}x); with TTA {100 * r['ece_tta']:.2f}%", flush=True)
    print(table(results))
    meta = {"model": "resnet18", "img_size": a.img_size, "epochs": a.epochs, "scenes-110 epochs": FEW_EPOCHS,
            "cpus": os.cpu_count(), "rule": "temperature kept when it lowers the held-out validation ECE"}
    path = ROOT / "bench" / "results-confidence.json"  # merged: a run of some sets keeps the others' figures
    merged = json.loads(path.read_text()) if path.exists() else {}
    if merged.get("settings") != meta:  # figures of other settings are not mixed in
        merged = {"settings": meta}
    path.write_text(json.dumps(merged | results, indent=1))
    print(f"figures written to bench/results-confidence.json (runs in {work})")


if __name__ == "__main__":
    main()
