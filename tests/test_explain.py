"""Heatmaps that point at the evidence: Grad-CAM on the last convolutional stage, occlusion for the rest."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import train_args
from PIL import Image

import explain
import predictor
import test as predict

PATCH = {"redpatch": (230, 30, 30), "bluepatch": (30, 30, 230)}


def patch_image(colour: tuple[int, int, int], quadrant: int, seed: int, size: int = 64) -> Image.Image:
    """Grey noise with a coloured square in one quadrant: the square's colour is the class, its place is random."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 30, (size, size, 3))
    half, side = size // 2, size // 2 - 8
    top, left = (quadrant // 2) * half + 4, (quadrant % 2) * half + 4
    pixels[top:top + side, left:left + side] = colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory) -> tuple[Path, Path]:
    """A resnet18 trained on the patch set (the colour of a square in a random quadrant decides the
    class), and unseen images of it."""
    import train

    root = tmp_path_factory.mktemp("patches")
    for split, n, offset in (("train", 40, 0), ("unseen", 8, 10_000)):
        for c, (name, colour) in enumerate(PATCH.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                patch_image(colour, i % 4, offset + 1000 * c + i).save(root / split / name / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("runs") / "patch-run"
    args = train_args(root / "train", out, "--mode", "scratch", "--model", "resnet18", "--optimizer", "adam",
                      "--lr", "0.002", "--hflip", "0", "--recipe", "seed")
    args[args.index("--img-size") + 1], args[args.index("--epochs") + 1] = "64", "4"
    assert train.main(args) == 0
    return out / "best.pt", root / "unseen"


def quadrant_of(image: torch.Tensor) -> int:
    """Where the coloured square is in the model's view of the image (uint8 3 x H x W)."""
    x = image.float()
    colourful = (x.max(0).values - x.min(0).values) > 120
    ys, xs = torch.nonzero(colourful, as_tuple=True)
    h, w = image.shape[1:]
    return int(ys.float().mean() >= h / 2) * 2 + int(xs.float().mean() >= w / 2)


def peak_quadrant(heat: torch.Tensor) -> int:
    h, w = heat.shape
    y, x = divmod(int(heat.argmax()), w)
    return int(y >= h / 2) * 2 + int(x >= w / 2)


@pytest.mark.parametrize("method", ["grad-cam", "occlusion"])
def test_the_heatmap_peak_falls_on_the_patch_that_decides_the_class(method, patch_run):
    ckpt, unseen = patch_run
    loaded = predictor.load_model(ckpt, "cpu")
    explainer = predictor.Explainer(loaded)
    assert explainer.method == "grad-cam" and explainer.target.name == "layer4"
    if method == "occlusion":
        explainer.target = None  # the method used for .onnx files and transformers
    paths = sorted(str(p) for p in unseen.rglob("*.png"))
    images = torch.stack(predictor.input_images(loaded, paths))
    predicted = loaded(images).argmax(1)
    on_patch = [peak_quadrant(h) == quadrant_of(img) for img, h in zip(images, explainer(images, predicted))]
    assert sum(on_patch) >= 0.8 * len(paths), f"{sum(on_patch)}/{len(paths)} heatmap peaks on the patch"


@pytest.mark.parametrize("name, stage", [("resnet18", "layer4"), ("vgg11", "features"), ("mobilenet_v2", "features"),
                                         ("densenet121", "features"), ("efficientnet_b0", "features")])
def test_grad_cam_picks_the_last_convolutional_stage(name, stage):
    net = torchvision.models.get_model(name, num_classes=3).eval()
    target = explain.find_target(net, torch.zeros(1, 3, 96, 96))
    assert target.name == stage and len(target.shape) == 4 and target.shape[2] > 1


def test_grad_cam_survives_an_in_place_op_after_the_stage():
    net = torchvision.models.get_model("densenet121", num_classes=3).eval()  # F.relu(features, inplace=True)
    x = torch.rand(2, 3, 64, 64)
    heat = explain.grad_cam(net, x, torch.tensor([0, 2]), explain.find_target(net, x[:1]))
    assert heat.shape == (2, 64, 64) and torch.isfinite(heat).all() and heat.max() <= 1


def test_grad_cam_works_through_a_frozen_backbone():
    net = torchvision.models.get_model("resnet18", num_classes=3).eval()
    for p in net.parameters():
        p.requires_grad_(False)  # transfer mode's backbone
    x = torch.rand(1, 3, 64, 64)
    heat = explain.grad_cam(net, x, torch.tensor([1]), explain.find_target(net, x))
    assert heat.max() > 0


def test_a_vision_transformer_is_refused_with_the_reason():
    net = torchvision.models.get_model("vit_b_16", num_classes=3).eval()
    with pytest.raises(explain.NoFeatureMap, match="tokens, not a convolutional feature map"):
        explain.find_target(net, torch.zeros(1, 3, 224, 224))


def test_test_py_explain_writes_a_heatmap_per_image_and_a_grid(patch_run, tmp_path, capsys):
    ckpt, unseen = patch_run
    out = tmp_path / "preds"
    assert predict.main([str(unseen), "--checkpoint", str(ckpt), "--explain", "--out", str(out)]) == 0
    assert "Grad-CAM on resnet18's layer4" in capsys.readouterr().out
    pictures = sorted((out / "explanations").glob("*.png"))
    assert len(pictures) == len(list(unseen.rglob("*.png"))) and (out / "explanations.png").is_file()
    assert Image.open(pictures[0]).size[0] > 300  # the image, the evidence for its label (and its folder's)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_an_onnx_model_is_explained_by_occlusion(patch_run, tmp_path, capsys):
    import export

    ckpt, unseen = patch_run
    onnx_path = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(onnx_path)]) == 0
    out = tmp_path / "preds"
    assert predict.main([str(unseen / "redpatch"), "--checkpoint", str(onnx_path), "--explain", "--out",
                         str(out)]) == 0
    assert "occlusion maps" in capsys.readouterr().out
    with open(out / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == len(list((out / "explanations").glob("*.png")))
