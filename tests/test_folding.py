"""Batch norms folded into convolutions for inference (networks/folding.py): the same answers, the same layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from imgcls import checkpoint
from imgcls.evaluation.predictor import load_model
from imgcls.networks import build
from imgcls.networks.folding import fold_batch_norms


def with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from a fresh network's identity, as training leaves them:
    a folding that got the scale or shift wrong would then change the answers."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def folded_answers(model: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(the batch norms folded, the answers before, the answers after) on a small random batch."""
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        folded = fold_batch_norms(model)
        return folded, before, model(x)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "densenet121", "googlenet", "regnet_x_400mf", "shufflenet_v2_x0_5"])
def test_folding_keeps_the_networks_answers(name):
    torch.manual_seed(0)
    model = with_trained_statistics(build.build_model(name, 10))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        had = batch_norms(model)
        folded = fold_batch_norms(model)
        after = model(x)
    assert folded > 0
    assert batch_norms(model) == had - folded
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_a_network_without_batch_norms_is_left_as_it_is():
    model = build.build_model("squeezenet1_0", 10).eval()
    assert fold_batch_norms(model) == 0


class Scaled(nn.BatchNorm2d):
    """A batch norm subclass that does more than normalise (as timm's BatchNormAct2d adds an activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Shared(nn.Module):
    """A convolution whose output also goes elsewhere, one called twice, one before a batch norm subclass: none
    folds; and one before a plain batch norm, which does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.b_bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c, self.c_bn = nn.Conv2d(4, 4, 1), Scaled(4)
        self.d, self.d_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.a_bn(y) + y  # a's output is used twice
        y = self.b_bn(self.b(y)) + self.b(y)  # b called twice
        return self.d_bn(self.d(self.c_bn(self.c(y))))


def test_only_a_batch_norm_that_alone_takes_a_convolution_called_once_is_folded():
    model = with_trained_statistics(Shared())
    folded, before, after = folded_answers(model)
    assert folded == 1
    assert isinstance(model.d_bn, nn.Identity)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


def test_a_network_fx_cannot_trace_is_left_as_it_is():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # depends on the data: fx cannot trace it

    model = with_trained_statistics(Branching())
    assert fold_batch_norms(model) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(build.build_model("resnet18", 10).train())


def test_load_model_on_the_cpu_folds_batch_norms_and_keeps_the_layers_and_answers(tmp_path):
    torch.manual_seed(0)
    net = with_trained_statistics(build.build_model("resnet18", 3))
    path = tmp_path / "m.pt"
    checkpoint.save(checkpoint.of_model("resnet18", ["a", "b", "c"], net.state_dict(),
                                        build.preprocessing("resnet18", 32)), path)
    loaded = load_model(path, "cpu")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(loaded.to_input(x))
    assert batch_norms(loaded.model) == 0
    assert isinstance(loaded.model.layer4, nn.Sequential)  # the layers Grad-CAM and clean.py hook stay
    assert torch.allclose(loaded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class Aliased(nn.Module):
    """One pair whose convolution, one whose batch norm, is registered under a second name first (fx names a module
    by its first name), and called by the other."""

    def __init__(self) -> None:
        super().__init__()
        conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.stem, self.last_norm = conv, bn
        self.features = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_a_pair_registered_under_two_names_keeps_the_answers():
    folded, before, after = folded_answers(with_trained_statistics(Aliased()))
    assert folded == 2
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


class Listed(nn.Module):
    """A convolution also held in a plain list (outside the module tree, as a model may keep its stages) and called
    from there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.stages = [self.conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.stages[0](x))


def test_a_convolution_held_outside_the_module_tree_is_folded_where_it_is_called():
    folded, before, after = folded_answers(with_trained_statistics(Listed()))
    assert folded == 1
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


class ReadsWeights(nn.Module):
    """Forward code that reads a convolution's weight (a second, functional use of it) and a batch norm's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.b_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a_bn(self.a(x)) + nn.functional.conv2d(x, self.a.weight, padding=1)
        return self.b_bn(self.b(y)) * self.b_bn.weight[:, None, None]


def test_a_pair_whose_weights_the_forward_also_reads_is_left_as_it_is():
    folded, before, after = folded_answers(with_trained_statistics(ReadsWeights()))
    assert folded == 0
    assert torch.allclose(after, before)


class Hooked(nn.Module):
    """A convolution whose output a forward hook changes, and one whose weight a pre-hook makes (weight norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a.register_forward_hook(lambda _, __, out: out + 1)
        with warnings.catch_warnings():  # (deprecated for parametrizations, whose convolutions are of another type)
            warnings.simplefilter("ignore", FutureWarning)
            self.b = nn.utils.weight_norm(nn.Conv2d(4, 4, 1))
        self.b_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b_bn(self.b(self.a_bn(self.a(x))))


def test_a_pair_with_hooks_is_left_as_it_is():
    folded, before, after = folded_answers(with_trained_statistics(Hooked()))
    assert folded == 0
    assert torch.allclose(after, before)


def test_a_batch_norm_left_in_training_mode_is_left_as_it_is():
    model = with_trained_statistics(Shared())
    model.d_bn.train()  # (in a model in eval mode: it normalises with each batch's own statistics)
    folded, before, after = folded_answers(model)
    assert folded == 0
    assert torch.allclose(after, before)
