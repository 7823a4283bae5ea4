"""Size, parity and CPU latency of each export format for the three documented models, at 224 px.

    python bench/bench_export.py                     # prints a Markdown table for the README
    python bench/bench_export.py --models resnet18 --formats onnx

Each model is a freshly initialised 10-class checkpoint (size and latency do not depend on training);
parity is checked on real images (the demo digits' test folder). The baseline for latency is the
PyTorch model as eval.py runs it on the CPU (batch norms folded, channels-last), measured in the same run by
export.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from imgcls import checkpoint  # noqa: E402
from imgcls.data import demo  # noqa: E402
from imgcls.networks import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg11", "resnet18", "mobilenet_v2"])
    p.add_argument("--formats", nargs="+",
                   default=["onnx", "onnx-int8", "executorch", "executorch-int8", "torchscript"])
    p.add_argument("--img-size", type=int, default=224)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgcls-export-") as tmp:  # (its checkpoints: VGG11's is 0.5 GB)
        work = Path(tmp)
        data = demo.export_demo() / "test"
        rows = []
        for name in a.models:
            ckpt = work / f"{name}.pt"
            torch.manual_seed(0)
            net = build.build_model(name, 10)
            checkpoint.save(checkpoint.of_model(name, [str(i) for i in range(10)], net.state_dict(),
                                                build.preprocessing(name, a.img_size)), ckpt)
            for fmt in a.formats:
                kind, _, int8 = fmt.partition("-")
                out = work / f"{name}-{fmt}{checkpoint.EXPORT_SUFFIX[kind]}"
                cmd = [sys.executable, "export.py", "--checkpoint", str(ckpt), "--format", kind, "--data", str(data),
                       "--images", "32", "--out", str(out)] + (["--int8"] if int8 else [])
                result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if not Path(str(out) + ".json").exists():
                    rows.append(f"| {name} | {fmt} | failed: {result.stderr.strip().splitlines()[-1][:80]} | | | |")
                    continue
                r = json.loads(Path(str(out) + ".json").read_text())
                rows.append(f"| {name} | {fmt} | {r['size_mb']:.1f} | {100 * r['top1_agreement']:.0f}% / "
                            f"{r['max_abs_logit_diff']:.1e} | {r['latency_ms_batch1_cpu']:.1f} | "
                            f"{r['pytorch_latency_ms_batch1_cpu']:.1f} |")
                print(rows[-1], flush=True)
                out.unlink(missing_ok=True)
    print("\n| model | format | size (MB) | top-1 agreement / max logit diff | latency (ms, batch 1) | "
          "PyTorch latency (ms) |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
