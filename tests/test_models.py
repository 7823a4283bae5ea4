"""models.py: every torchvision classifier built as torchvision builds it with its weights, and loading
the weights files torchvision's own loader accepts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import call, train_args
from torch import nn

import train
from imgcls import checkpoint
from imgcls.errors import UsageError
from imgcls.networks import build, weights

# regnets cannot be built on the meta device (their widths are computed with tensors); their builders
# set nothing when loading weights, so the smallest two are compared on the CPU
CPU_BUILT = ("regnet_x_400mf", "regnet_y_400mf")
# one per family (the smallest), for the test that loads stand-in weights files
FAMILIES = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11",
            "vit_b_32", "wide_resnet50_2")


def settings(model: nn.Module) -> dict[str, object]:
    """Every plain setting of every module (transform_input, aux_logits, image_size, eps, stride...)."""
    return {f"{name}.{k}": v for name, m in model.named_modules() for k, v in vars(m).items()
            if not k.startswith("_") and k not in ("head_name", "net_options", "training")
            and isinstance(v, (bool, int, float, str, tuple, list))}


def structure(model: nn.Module) -> tuple[dict, dict, str]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layout = "\n".join(line for line in repr(model).splitlines() if not line.strip().endswith(": None"))
    return settings(model), shapes, layout


def as_torchvision_builds_it(name: str, device: str, monkeypatch) -> nn.Module:
    """torchvision's builder with its ImageNet weights, the loading itself skipped: the network exactly as
    its builder configures it for those weights."""
    with monkeypatch.context() as m:
        m.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", lambda self, *a, **k: {})
        m.setattr(nn.Module, "load_state_dict", lambda self, *a, **k: None)
        with torch.device(device):
            return without_aux(torchvision.models.get_model(name, weights="DEFAULT"))


def without_aux(model: nn.Module) -> nn.Module:
    """What torchvision's builder does after loading when asked for no auxiliary classifiers (googlenet's
    default; Inception v3 keeps them unless aux_logits=False): we train without them."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)
    return model


def ours_for_finetuning(name: str, device: str) -> nn.Module:
    """What build_model builds for 'finetune' before loading: our network for the published weights."""
    size = build.preprocessing(name).img_size
    with torch.device(device):
        return build.network(name, 1000, options={**build.size_options(name, size), **build.published_options(name)})


@pytest.mark.parametrize("name", [n for n in build.classifier_names()
                                  if not n.startswith("regnet") or n in CPU_BUILT])
def test_every_torchvision_classifier_is_configured_as_torchvision_configures_it_for_its_weights(name, monkeypatch):
    device = "cpu" if name in CPU_BUILT else "meta"
    theirs = structure(as_torchvision_builds_it(name, device, monkeypatch))
    ours = structure(ours_for_finetuning(name, device))
    assert ours[0] == theirs[0], "constructor settings differ"
    assert ours[1] == theirs[1], "tensors differ"
    assert ours[2] == theirs[2], "layers differ"


def published_file(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """A stand-in for torchvision's weights file: the network as published (aux classifiers included,
    DenseNet's legacy key names), random values; returns what torchvision's loader makes of it."""
    torch.manual_seed(0)
    extra = {"aux_logits": True, "init_weights": False} if name in weights.AUX_HEADS else {}
    model = torchvision.models.get_model(name, **extra)
    state = model.state_dict()
    if name.startswith("densenet"):  # saved before module versions and BatchNorm's batch count existed
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert any(".norm.1." in k for k in state)
    url = weights.default_weights(name).url
    torch.save(state, folder / os.path.basename(url))
    return state


@pytest.mark.parametrize("name", FAMILIES)
def test_published_weights_load_whole_as_torchvisions_own_loader_loads_them(name, tmp_path, monkeypatch):
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    published_file(name, folder)
    theirs = without_aux(torchvision.models.get_model(name, weights="DEFAULT")).state_dict()  # its own loader
    ours = build.build_model(name, 3, "finetune", img_size=build.preprocessing(name).img_size)
    head = ours.head_name + "."
    mine = {k: v for k, v in ours.state_dict().items() if not k.startswith(head)}
    assert set(mine) == {k for k in theirs if not k.startswith(head)}
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    if name in weights.AUX_HEADS:
        assert ours.transform_input and not ours.aux_logits


def test_googlenet_from_imagenet_weights_transforms_its_input_and_keeps_it_through_checkpoints(colours, tmp_path,
                                                                                              monkeypatch):
    folder = tmp_path / "home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    published_file("googlenet", folder)
    assert not build.build_model("googlenet", 3, "scratch").transform_input  # torchvision's default
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--model", "googlenet", "--mode", "finetune")) == 0
    for name in ("best.pt", "last.pt"):
        ckpt = checkpoint.load(out / name)
        assert ckpt["net_options"] == {"transform_input": True}
        assert build.from_checkpoint(ckpt).transform_input
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0
    assert build.from_checkpoint(checkpoint.load(out / "last.pt")).transform_input


def test_our_checkpoint_as_starting_weights_keeps_its_settings(tmp_path):
    net = build.network("googlenet", 4)  # trained without transform_input
    torch.save(checkpoint.of_model("googlenet", list("abcd"), net.state_dict(), build.preprocessing("googlenet")),
               tmp_path / "mine.pt")
    assert not build.build_model("googlenet", 3, "finetune", str(tmp_path / "mine.pt")).transform_input


@pytest.mark.parametrize("name", ["mnasnet0_5", "mnasnet1_3"])
def test_mnasnet_checkpoints_load_and_resume(name, colours, tmp_path):
    """MNASNet's loader reads the module version a state_dict carries; our checkpoints lost it, so a
    trained MNASNet could not be evaluated, exported or resumed."""
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--model", name, "--mode", "scratch")) == 0
    for file in ("best.pt", "last.pt"):
        build.from_checkpoint(checkpoint.load(out / file))
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0


def test_a_checkpoint_saved_without_module_versions_still_loads():
    net = build.network("mnasnet0_5", 3)
    state = dict(net.state_dict())  # a plain dict: no _metadata (as checkpoints written before)
    ckpt = checkpoint.of_model("mnasnet0_5", ["a", "b", "c"], state, build.preprocessing("mnasnet0_5"))
    assert torch.equal(build.from_checkpoint(ckpt).layers[0].weight, state["layers.0.weight"])


def test_vit_trains_at_another_size_with_its_position_embeddings_interpolated(tmp_path, monkeypatch):
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    published = published_file("vit_b_32", folder)
    model = build.build_model("vit_b_32", 3, "transfer", img_size=64)
    assert model.net_options == {"image_size": 64} and model.encoder.pos_embedding.shape[1] == 1 + 2 * 2
    expected = torchvision.models.vision_transformer.interpolate_embeddings(64, 32, dict(published))
    assert torch.equal(model.encoder.pos_embedding, expected["encoder.pos_embedding"])
    assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_an_input_size_the_network_cannot_take_is_refused_before_anything_starts(colours, tmp_path, capsys):
    args = train_args(colours, tmp_path / "r", "--model", "alexnet", "--mode", "scratch", "--img-size", "32")
    assert call(train.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert "alexnet cannot take 32-pixel images" in err and "--img-size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_input_size_check_passes_what_the_networks_take():
    for name, size in (("resnet18", 32), ("vit_b_16", 32), ("maxvit_t", 224), ("inception_v3", 75)):
        build.check_input_size(name, size)
    with pytest.raises(UsageError, match="maxvit_t cannot take 100-pixel"):
        build.check_input_size("maxvit_t", 100)


def test_a_head_without_bias_is_replaced_by_one_without():
    model = build.build_model("maxvit_t", 3, "scratch", img_size=224)
    assert model.classifier[-1].bias is None and model.classifier[-1].out_features == 3  # as published


def test_a_network_torchsummary_cannot_trace_trains_without_the_table(colours, tmp_path, capsys):
    """torchsummary fails on layers that return lists (DenseNet) or None (ViTs): the run goes on."""
    out = tmp_path / "run"
    args = [a for a in train_args(colours, out, "--model", "densenet121", "--mode", "scratch") if a != "--no-summary"]
    assert call(train.main, args) == 0
    assert "no model_summary.txt: torchsummary cannot trace densenet121" in capsys.readouterr().err
    assert (out / "best.pt").is_file() and not (out / "model_summary.txt").exists()  # (its hooks were removed)
