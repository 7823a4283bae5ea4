"""Export a trained model for servers (ONNX) and phones (ExecuTorch .pte, or TorchScript Lite .ptl),
and prove the export gives the same answers as the PyTorch model before calling it done.

    python export.py --format onnx                                   # newest runs/*/best.pt
    python export.py --checkpoint runs/demo --format onnx --out exports/   # a folder: named after the model
    python export.py --checkpoint runs/demo/best.pt --format executorch --data data/digits/test
    python export.py --format onnx --int8 --data data/digits/train --check-data data/digits/test  # int8

The exported model takes float32 RGB images in [0, 1], N x 3 x S x S (S = the checkpoint's crop
size, after resizing the shorter side to the resize size and centre-cropping), and returns logits;
normalisation is inside. Class names and preprocessing travel with it (ONNX metadata; a JSON beside
a .pte; inside a .ptl). After exporting, N images (from --data, else generated) go through both models:
top-1 agreement and the largest logit difference are printed and written to <out>.json with the
file size and CPU latency. A float export that disagrees on any top-1, or differs by more than
--tolerance (times the image's largest |logit| when that is above 1), fails with exit status 1 and
is not written to <out> (its figures: <out>.failed.json).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from imgcls import checkpoint, runfolder
from imgcls.cli import Parser, add_shared, check_shared, imports_done, script
from imgcls.data import labelfile
from imgcls.errors import UsageError


def read_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(__doc__, prog="export.py")
    parser.add_argument("--checkpoint", help="a run folder (its best.pt) or a .pt from a run (default: the newest "
                        "runs/*/best.pt)")
    add_shared(parser, "max_file_mb")
    parser.add_argument("--format", required=True, choices=tuple(checkpoint.EXPORT_SUFFIX),
                        help="onnx (servers, onnxruntime), executorch (phones: .pte with XNNPACK) or "
                        "torchscript (PyTorch Mobile Lite: .ptl)")
    parser.add_argument("--int8", action="store_true", help="post-training int8 quantisation (onnx, executorch), "
                        "calibrated on --data")
    parser.add_argument("--data", help="image folder or label file (.csv: its train rows) for calibration and the "
                        "parity check, e.g. the training data (default: generated images)")
    parser.add_argument("--check-data", help="labelled folder for the parity check and accuracies (default: "
                        "--data; give held-out images when --data calibrates --int8)")
    parser.add_argument("--out", help="output file (named .onnx, .pte or .ptl as --format says), or a folder (an "
                        "existing one, or ending in /) to write <model>.<format> in (default: beside the checkpoint)")
    parser.add_argument("--images", type=int, default=64, help="images for the parity check and calibration")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference a float export "
                        "may have, relative to the image's largest |logit| when that is above 1 (float32 keeps ~7 "
                        "digits)")
    args = parser.parse_args(argv)
    check_shared(args)
    if args.int8 and args.format == "torchscript":
        raise UsageError("--int8 is available for --format onnx and --format executorch")
    if args.int8 and not args.data:
        raise UsageError("--int8 needs --data: a folder of training images to calibrate on")
    if args.images < 1:
        raise UsageError("--images must be at least 1")
    if not 0 <= args.tolerance < math.inf:
        raise UsageError("--tolerance must be a number, 0 or more")
    suffix = checkpoint.EXPORT_SUFFIX[args.format]
    if args.out and not is_folder(args.out) and Path(args.out).suffix.lower() != suffix:
        raise UsageError(f"--out {args.out}: a {args.format} export is a {suffix} file (or give a folder, ending in /)")
    if args.out:  # (a folder given as `name/` must not be a file either)
        check_writable_below(Path(args.out) / "model" if args.out.endswith(("/", os.sep)) else Path(args.out))
    for option, folder in (("--data", args.data), ("--check-data", args.check_data)):
        if folder and labelfile.is_label_file(folder):
            labelfile.read(folder, warn=False)  # every row checked before torch loads
        elif folder and not Path(folder).is_dir():
            raise UsageError(f"{option} {folder} is not a folder or a label file (.csv)")
    return args


def check_writable_below(out: Path) -> None:
    """The folders --out needs can be made: none of them is a file."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is a file, not a folder")
            return


def is_folder(out: str) -> bool:
    return out.endswith(("/", os.sep)) or Path(out).is_dir()


def main(argv: list[str] | None = None) -> int:
    args = read_command_line(argv)
    ckpt = runfolder.find(args.checkpoint)
    if checkpoint.is_onnx(ckpt):
        raise UsageError(f"{ckpt} is already an export: give the run's checkpoint (.pt) or run folder")
    folder = Path(args.out) if args.out and is_folder(args.out) else None
    out = Path(args.out) if args.out and folder is None else None
    from imgcls.export import publish
    imports_done()

    return publish.export(ckpt, publish.Options(
        fmt=args.format, int8=args.int8, folder=folder or ckpt.parent, out=out, data=args.data,
        check_data=args.check_data, images=args.images, tolerance=args.tolerance,
        max_bytes=int(args.max_file_mb * 2**20)))


if __name__ == "__main__":
    script(main, __file__)
