"""Why MobileNetV2 validated at chance: each candidate cause changed alone, against precise BN.

    python bench/bench_batchnorm.py                      # MobileNetV2 on scenes, 6 epochs at 64 px
    python bench/bench_batchnorm.py --model efficientnet_b0 --epochs 10

Each run trains from scratch with the defaults (nothing but --model, --mode, --img-size, --epochs) and
--no-precise-bn, so validation sees BatchNorm's running statistics as they were before precise BN; then
one candidate cause is changed at a time: fp32 instead of bf16 autocast, no channels_last, a quarter of the
lr, three warm-up epochs, no weight decay (also none on the norm layers), a gentler crop (train images
closer to the centre crops validation sees). The last run is the default, precise BN on. A candidate that
explains the failure lifts validation off chance by itself. Printed and written to
bench/results-batchnorm.json: best and final validation accuracy of each, and the chance level.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
from pathlib import Path

from bench_recipes import train
from synthetic import make

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results-batchnorm.json"
OFF = ["--no-precise-bn"]
VARIANTS = {
    "running statistics (before)": OFF,
    "fp32 (--no-amp)": [*OFF, "--no-amp"],
    "no channels_last": [*OFF, "--no-channels-last"],
    "lr / 4": [*OFF, "--lr", "5e-4"],
    "3 warm-up epochs": [*OFF, "--warmup-epochs", "3"],
    "no weight decay": [*OFF, "--weight-decay", "0"],
    "gentler crop (--min-scale 0.8)": [*OFF, "--min-scale", "0.8"],
    "precise BN (the default)": [],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--set", default="scenes")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--work", help="folder for the data, runs and caches (default: a new temporary one)")
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="imgcls-bn-"))
    if not a.work:  # its runs and caches: GBs a sitting, of no use once the figures are written
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    data = make(a.set, work)
    base = ["--data", data, "--model", a.model, "--mode", "scratch", "--img-size", "64", "--epochs", str(a.epochs),
            "--amp"]
    rows = {}
    print(f"| {a.model} on {a.set}, {a.epochs} epochs | best val | final val |", flush=True)
    for tag, extra in VARIANTS.items():
        args = [x for x in base if not (x == "--amp" and "--no-amp" in extra)] + extra
        rows[tag] = train(args, work / "runs" / tag.split(" (")[0].replace(" ", "-").replace("/", ""), work / "cache")
        r = rows[tag]
        print(f"| {tag} | {r.get('best_val_acc', float('nan')):.2f}% | {r.get('final_val_acc', float('nan')):.2f}% |"
              f" (chance {r.get('chance', float('nan')):.1f}%)", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[f"{a.model}/{a.set}/{a.epochs}"] = rows
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
