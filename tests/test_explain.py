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

import test as predict
from imgcls.evaluation import explain, predictor

PATCH = {"redpatch": (230, 30, 30), "bluepatch": (30, 30, 230)}
SIDE = 16  # the patch's side in a 64 px image


def patch_image(colour: tuple[int, int, int], seed: int, size: int = 64) -> Image.Image:
    """Grey noise with a coloured square at a random place: the square's colour is the class."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 30, (size, size, 3))
    top, left = rng.integers(0, size - SIDE, 2)
    pixels[top:top + SIDE, left:left + SIDE] = colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory) -> tuple[Path, Path]:
    """A resnet18 trained on the patch set, and unseen images of it."""
    import train

    root = tmp_path_factory.mktemp("patches")
    for split, n, offset in (("train", 40, 0), ("unseen", 10, 10_000)):
        for c, (name, colour) in enumerate(PATCH.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                patch_image(colour, offset + 1000 * c + i).save(root / split / name / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("runs") / "patch-run"
    args = train_args(root / "train", out, "--mode", "scratch", "--model", "resnet18", "--optimizer", "adam",
                      "--lr", "0.0005", "--hflip", "0", "--recipe", "seed")
    args[args.index("--img-size") + 1], args[args.index("--epochs") + 1] = "64", "4"
    assert train.main(args) == 0
    return out / "best.pt", root / "unseen"


def patch_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """Where the coloured square is in the model's view of the image (uint8 3 x H x W): top, bottom,
    left, right."""
    x = image.float()
    ys, xs = torch.nonzero((x.max(0).values - x.min(0).values) > 120, as_tuple=True)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def peak_on(heat: torch.Tensor, box: tuple[int, int, int, int], margin: float) -> bool:
    y, x = divmod(int(heat.argmax()), heat.shape[1])
    top, bottom, left, right = box
    return top - margin <= y <= bottom + margin and left - margin <= x <= right + margin


@pytest.mark.parametrize("method", ["grad-cam", "occlusion"])
def test_the_heatmap_peak_falls_on_the_patch_that_decides_the_class(method, patch_run):
    ckpt, unseen = patch_run
    loaded = predictor.load_model(ckpt, "cpu")
    explainer = predictor.Explainer(loaded)
    assert explainer.method == "grad-cam" and explainer.target.name == "layer3"  # 4 x 4 at 64 px
    # Grad-CAM sees the image in 16 px cells: its peak is a cell's centre, up to half a cell off the patch;
    # occlusion slides a 16 px square in 8 px steps
    margin = 64 / explainer.target.shape[-1] / 2 if method == "grad-cam" else 4
    if method == "occlusion":
        explainer.target = None  # the method used for .onnx files and transformers
    paths = sorted(str(p) for p in unseen.rglob("*.png"))
    images = torch.stack(list(predictor.input_images(loaded, paths)))
    predicted = loaded(images).argmax(1)
    on_patch = [peak_on(h, patch_box(img), margin) for img, h in zip(images, explainer(images, predicted))]
    assert sum(on_patch) >= 0.8 * len(paths), f"{sum(on_patch)}/{len(paths)} heatmap peaks on the patch"


@pytest.mark.parametrize("name, stage", [("resnet18", "layer4"), ("vgg11", "features"), ("mobilenet_v2", "features"),
                                         ("densenet121", "features"), ("efficientnet_b0", "features"),
                                         ("convnext_tiny", "features")])
def test_grad_cam_picks_the_last_convolutional_stage(name, stage):
    net = torchvision.models.get_model(name, num_classes=3).eval()
    target = explain.find_target(net, torch.zeros(1, 3, 224, 224))
    assert target.name == stage and target.shape[1:] in ((512, 7, 7), (1280, 7, 7), (1024, 7, 7), (768, 7, 7))


@pytest.mark.parametrize("name, stage", [("resnet50", "layer3"), ("mobilenet_v2", "features.13"),
                                         ("inception_v3", "Mixed_6e")])
def test_on_a_small_input_the_stage_before_a_tiny_last_one_is_taken_whole(name, stage):
    net = torchvision.models.get_model(name, num_classes=3, init_weights=False) if name == "inception_v3" else \
        torchvision.models.get_model(name, num_classes=3)
    target = explain.find_target(net.eval(), torch.zeros(1, 3, 96, 96))  # the last stage is 3 x 3 or less
    assert target.name == stage and target.shape[-1] >= explain.MIN_SIDE


def test_channels_last_stages_are_not_taken_for_feature_maps():
    net = torchvision.models.get_model("swin_t", num_classes=3).eval()  # N x H x W x C inside
    assert explain.find_target(net, torch.zeros(1, 3, 64, 64)).name == "permute"  # its one N x C x H x W map
    with pytest.raises(explain.NoFeatureMap, match="channels-last"):
        explain.find_target(net, torch.zeros(1, 3, 32, 32))  # the permuted map is 1 x 1


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
    assert "Grad-CAM on resnet18's layer3" in capsys.readouterr().out
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
