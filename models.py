"""Networks: build any torchvision classifier, load its weights safely, fit its head, freeze it.

Freezing rule (transfer mode): every parameter outside the new head has requires_grad=False AND the
backbone stays in eval mode while training, so BatchNorm running statistics and dropout are frozen
too. The backbone is then a fixed function, which is what lets train.py cache its features.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import checkpoint
import files
from checkpoint import Preprocess
from config import UsageError

AUX_HEADS = ("googlenet", "inception_v3")  # their auxiliary classifiers are disabled
DEFAULT_PREPROCESS = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    if name not in classifier_names():
        close = difflib.get_close_matches(name, classifier_names(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UsageError(f"unknown model '{name}': {hint}choose one of: {', '.join(classifier_names())}")


def default_weights(name: str) -> Any:
    """The torchvision weights enum entry used for 'finetune' and 'transfer' (None if it has none)."""
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return None


def preprocessing(name: str, img_size: int | None = None) -> Preprocess:
    """Resize, crop and mean/std from the weights' own metadata; `img_size` keeps their crop ratio."""
    pre = DEFAULT_PREPROCESS
    weights = default_weights(name)
    if weights is not None:
        t = weights.transforms()
        pre = Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(map(float, t.mean)),
                         tuple(map(float, t.std)))
    if img_size is not None and img_size != pre.img_size:
        ratio = pre.resize_size / pre.img_size
        pre = dataclasses.replace(pre, img_size=img_size, resize_size=max(img_size, round(img_size * ratio)))
    return pre


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The last layer that maps to ImageNet's 1000 classes: the classifier head to replace."""
    head = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == 1000) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == 1000):
            head = (name, m)
    if head is None:
        raise UsageError(f"cannot find a 1000-class head in {type(model).__name__}: not a classifier")
    return head


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The ImageNet head (find_head) replaced by one for `num_classes`; its name is kept on the model,
    so head_of() finds it again by the same rule."""
    name, old = find_head(model)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    set_module(model, name, new)
    model.head_name = name
    return new


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the head that replace_head() put in (one rule: find_head's 1000-class layer)."""
    return model.head_name, model.get_submodule(model.head_name)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights via torchvision's weights API: torch hub cache first, then download."""
    weights = default_weights(name)
    if weights is None:
        raise UsageError(f"torchvision has no pretrained weights for {name}: use --mode scratch or --weights FILE")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return state_dict_from(checkpoint.read(cached), cached)
    try:
        return weights.get_state_dict(progress=True, weights_only=True)
    except Exception as e:  # no network, proxy, DNS, HTTP error: all end in the same advice
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise UsageError(f"ImageNet weights for {name} could not be downloaded ({reason}): put {weights.url} "
                         f"at {cached}, or pass --weights FILE, or use --mode scratch") from None


def weights_identity(arch: str, weights_file: str | None) -> list:
    """What identifies the starting weights, for cache keys: the file's identity (path, size, times)
    or, for torchvision's, the URL and the hub cache file. Recorded when a run starts, so a resume
    needs neither file."""
    if weights_file:
        return ["file", *files.identity(Path(weights_file).absolute())]
    weights = default_weights(arch)
    if weights is None:
        return ["none"]
    return ["torchvision", weights.url, *files.identity(Path(torch.hub.get_dir()) / "checkpoints" /
                                                         os.path.basename(weights.url))[1:]]


def state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or one of our checkpoints."""
    if isinstance(obj, dict) and obj.get("kind") == checkpoint.KIND:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (a dict of tensors)")
    return obj


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load everything but the 1000-class head; any other mismatch means the file is for another model."""
    head_name, _ = head_of(model)
    prefix = head_name + "."
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if arch in AUX_HEADS:
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise UsageError(f"weights in {source} don't fit {arch} ({detail}): use weights saved from {arch}")
    model.load_state_dict(state, strict=False)


def network(arch: str, num_classes: int, init: bool = False) -> nn.Module:
    """The architecture with a `num_classes` head, for a state dict to be loaded into (`init`: a
    network to train from torchvision's random initialisation)."""
    check_name(arch)
    kwargs = {"aux_logits": False, "init_weights": init} if arch in AUX_HEADS else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    replace_head(model, num_classes)
    return model


def build_model(arch: str, num_classes: int, mode: str = "scratch", weights_file: str | None = None
                ) -> nn.Module:
    """The network a run starts from. scratch: random initialisation (or --weights FILE's backbone);
    finetune and transfer: ImageNet's backbone (or FILE's) and a fresh head; transfer freezes the
    backbone."""
    model = network(arch, num_classes, init=mode == "scratch")
    if mode != "scratch" or weights_file:
        if weights_file:
            state, source = state_dict_from(checkpoint.read(weights_file), Path(weights_file)), weights_file
        else:
            state, source = imagenet_state_dict(arch), "the ImageNet weights"
        load_backbone(model, state, source, arch)
    if mode == "transfer":
        freeze_backbone(model)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as it is now, on the CPU; frozen parameters never change, so they are
    shared instead of copied (a transfer-mode snapshot costs the head only)."""
    return {k: v.detach() if isinstance(v, nn.Parameter) and not v.requires_grad else v.detach().to("cpu", copy=True)
            for k, v in model.state_dict(keep_vars=True).items()}


def freeze_backbone(model: nn.Module) -> None:
    _, head = head_of(model)
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params


def set_train_mode(model: nn.Module, training: bool, mode: str) -> None:
    """model.train(training), except that a frozen backbone always stays in eval mode."""
    model.train(training)
    if training and mode == "transfer":
        model.eval()
        head_of(model)[1].train()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


class Normalize(nn.Module):
    """uint8 (or 0..1 float) NCHW images -> normalised float; done on the device, batched."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = x * 255
        return (x.float() - self.mean) / self.std


def from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the trained network from the checkpoint alone; returned in eval mode."""
    model = network(ckpt["arch"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
