"""Batch norms folded into convolutions (networks/folding.py) against the network as trained: img/s of the model
as eval.py, test.py and serve.py load it on the CPU (predictor.load_model), with and without the folding, in
one sitting, taken in turn.

    python bench/bench_folding.py                      # ResNet18, MobileNetV2, EfficientNet-B0, VGG11 at 224 px
    python bench/bench_folding.py --models mobilenet_v2 --batches 1 16

Each model is a freshly initialised 10-class checkpoint (speed does not depend on the weights), run on uint8
batches as the loader gives them, every core. Printed and written to bench/results-folding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from imgcls import checkpoint  # noqa: E402
from imgcls.evaluation.predictor import Loaded, load_model  # noqa: E402
from imgcls.networks import build  # noqa: E402
from imgcls.networks.folding import fold_batch_norms  # noqa: E402
from imgcls.serving.settings import cpus  # noqa: E402


def rate(loaded: Loaded, x: torch.Tensor, seconds: float) -> tuple[int, float]:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loaded(x)
        n += len(x)
    return n, time.perf_counter() - start


def bench_model(name: str, a: argparse.Namespace, work: Path) -> dict:
    path = work / f"{name}.pt"
    net = build.build_model(name, 10)
    checkpoint.save(checkpoint.of_model(name, [str(i) for i in range(10)], net.state_dict(),
                                        build.preprocessing(name, a.img_size)), path)
    folded = fold_batch_norms(net.eval())
    models = {"as trained": load_model(path, "cpu", fold=False), "folded": load_model(path, "cpu")}
    out: dict = {"model": name, "batch_norms_folded": folded, "by_batch": {}}
    for b in a.batches:
        x = torch.randint(0, 256, (b, 3, a.img_size, a.img_size), dtype=torch.uint8)
        done = {label: [0, 0.0] for label in models}
        for loaded in models.values():
            loaded(x)
        for _ in range(a.rounds):
            for label, loaded in models.items():
                n, t = rate(loaded, x, a.seconds / a.rounds)
                done[label][0] += n
                done[label][1] += t
        r = {label: n / t for label, (n, t) in done.items()}
        out["by_batch"][b] = {**r, "ratio": r["folded"] / r["as trained"]}
        print(f"{name:16} batch {b:3}: {r['as trained']:6.1f} -> {r['folded']:6.1f} img/s  "
              f"{r['folded'] / r['as trained']:.2f}x  ({folded} batch norms folded)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--seconds", type=float, default=6.0, help="per model, batch size and variant")
    p.add_argument("--rounds", type=int, default=3, help="slices per measurement, taken in turn")
    p.add_argument("--json", default=str(ROOT / "bench" / "results-folding.json"))
    a = p.parse_args()
    torch.set_num_threads(cpus())
    with tempfile.TemporaryDirectory(prefix="imgcls-folding-") as work:  # (its checkpoints: VGG11's is 0.5 GB)
        results = [bench_model(name, a, Path(work)) for name in a.models]
    machine = (f"{cpus()} cores, load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, "
               f"{a.img_size} px")
    Path(a.json).write_text(json.dumps({"machine": machine, "seconds": a.seconds, "results": results}, indent=1))
    print(machine)


if __name__ == "__main__":
    main()
