"""Networks: build any torchvision classifier as torchvision builds it for its weights (or a timm model,
timm_models.py), load its weights safely, fit its head, freeze it.

Settings a network is built with beyond its name (GoogLeNet's transform_input, a ViT's input size)
are kept on it as `net_options` and in its checkpoints, so it is rebuilt the same.

Freezing rule (transfer mode): every parameter outside the new head has requires_grad=False AND the
backbone stays in eval mode while training, so BatchNorm running statistics and dropout are frozen
too. The backbone is then a fixed function, which is what lets train.py cache its features.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from imgcls import checkpoint, preprocess
from imgcls.errors import UsageError, first_line
from imgcls.networks import heads, names, timm_models
from imgcls.networks import weights as networks_weights
from imgcls.networks.weights import AUX_HEADS, default_weights
from imgcls.preprocess import Preprocess

DEFAULT_PREPROCESS = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    """A name --model takes (from the installed packages themselves), or the three closest names."""
    if timm_models.is_timm(name):
        return timm_models.check_name(name)
    if name not in classifier_names():
        raise UsageError(names.unknown_torchvision(name, classifier_names()))


def preprocessing(name: str, img_size: int | None = None) -> Preprocess:
    """Resize (size and interpolation), crop and mean/std from the weights' own metadata; `img_size`
    keeps their crop ratio."""
    pre = DEFAULT_PREPROCESS
    weights = default_weights(name)
    if timm_models.is_timm(name):
        pre = timm_models.preprocessing(name)
    elif weights is not None:
        t = weights.transforms()
        pre = Preprocess(int(t.crop_size[0]), int(t.resize_size[0]), tuple(map(float, t.mean)),
                         tuple(map(float, t.std)), preprocess.interpolation(t.interpolation.value))
    if img_size is not None and img_size != pre.img_size:
        ratio = pre.resize_size / pre.img_size
        pre = dataclasses.replace(pre, img_size=img_size, resize_size=max(img_size, round(img_size * ratio)))
    return pre


def size_options(arch: str, img_size: int | None) -> dict[str, Any]:
    """Constructor settings for the input size, for networks built for one size: torchvision's ViTs
    (position embeddings; weights made for another size are interpolated) and MaxViT (its window grid)."""
    if timm_models.is_timm(arch):
        return timm_models.size_options(arch, img_size)
    if img_size is None:
        return {}
    if arch.startswith("vit_"):
        return {"image_size": img_size}
    if arch.startswith("maxvit_"):
        return {"input_size": (img_size, img_size)}
    return {}


def published_options(arch: str) -> dict[str, Any]:
    """What torchvision's builder sets when it loads its published weights and we must set too, as we
    build without weights and load them after: GoogLeNet and Inception v3 were trained on inputs
    normalised to [-1, 1], and `transform_input` converts ImageNet-normalised ones."""
    return {"transform_input": True} if arch in AUX_HEADS else {}


def check_input_size(arch: str, img_size: int) -> None:
    """Refuse, before any slow work, an input size the network cannot take (too small for its pooling,
    not a multiple of its window grid): a forward pass on the meta device, which computes shapes only."""
    try:
        with torch.device("meta"):
            net = network(arch, 2, options=size_options(arch, img_size)).eval()
            net(torch.empty(1, 3, img_size, img_size))
    except NotImplementedError:  # an operation without a meta kernel: the first batch will tell
        return
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UsageError(f"{arch} cannot take {img_size}-pixel images ({first_line(e)}): "
                         f"use another --img-size, e.g. its weights' {preprocessing(arch).img_size}") from None


@functools.cache
def family(arch: str) -> str:
    """What the recipe's lr depends on (config.MODERN_LR), read from the network's layers (built on the meta
    device: no memory, no weights): 'layernorm' with LayerNorm (transformers, ConvNeXt; MaxViT has BatchNorm
    too), else 'batchnorm' with BatchNorm, else 'plain' (no normalisation: VGG, AlexNet, SqueezeNet)."""
    try:
        with torch.device("meta"):
            layers = [type(m) for m in network(arch, 2).modules()]
    except NotImplementedError:  # a builder that computes with tensors (RegNet's widths): built for real
        layers = [type(m) for m in network(arch, 2).modules()]
    if any(issubclass(t, (nn.LayerNorm, nn.GroupNorm)) for t in layers):
        return "layernorm"
    if any(issubclass(t, nn.modules.batchnorm._NormBase) for t in layers):
        return "batchnorm"
    return "plain"


def network(arch: str, num_classes: int, init: bool = False, options: dict[str, Any] | None = None) -> nn.Module:
    """The architecture with a `num_classes` head, for a state dict to be loaded into (`init`: a
    network to train from torchvision's random initialisation). `options`: constructor settings
    (size_options, published_options), kept on the model as `net_options` for its checkpoints."""
    check_name(arch)
    options = dict(options or {})
    if timm_models.is_timm(arch):
        model = timm_models.create(arch, num_classes, options)
    else:
        kwargs = {"aux_logits": False, "init_weights": init} if arch in AUX_HEADS else {}
        model = torchvision.models.get_model(arch, weights=None, **kwargs, **options)
        heads.replace_head(model, num_classes)
    model.net_options = dict(options)
    return model


def build_model(arch: str, num_classes: int, mode: str = "scratch", weights_file: str | None = None,
                img_size: int | None = None) -> nn.Module:
    """The network a run starts from, for `img_size` inputs. scratch: random initialisation (or --weights
    FILE's backbone); finetune and transfer: ImageNet's backbone (or FILE's) and a fresh head; transfer
    freezes the backbone. A network that starts from published weights (torchvision's or timm's, or a
    bare state_dict FILE, taken to be in the published format) is built with the settings its
    publisher's builder uses; from one of our checkpoints, with that checkpoint's settings."""
    options = size_options(arch, img_size)
    if mode == "scratch" and not weights_file:
        model = network(arch, num_classes, init=True, options=options)
    else:
        state, source, saved = None, "the ImageNet weights", None
        if weights_file:
            obj, source = networks_weights.read_weights(weights_file), weights_file
            if checkpoint.is_checkpoint(obj):
                saved = {**checkpoint.view(obj).net_options, **options}
            state = networks_weights.state_dict_from(obj, Path(weights_file))
        if timm_models.is_timm(arch):  # (timm's networks have no settings but their size to keep)
            model = timm_models.create(arch, num_classes, options, state, pretrained=True, source=source)
            model.net_options = options
        else:
            options = saved if saved is not None else {**options, **published_options(arch)}
            model = network(arch, num_classes, options=options)
            weights = state if state is not None else networks_weights.imagenet_state_dict(arch)
            networks_weights.load_backbone(model, weights, source, arch, ours=saved is not None)
    if mode == "transfer":
        heads.freeze_backbone(model)
    return model


def from_checkpoint(ckpt: dict[str, Any] | checkpoint.Saved) -> nn.Module:
    """Rebuild the trained network from the checkpoint alone; returned in eval mode."""
    saved = checkpoint.view(ckpt)
    model = network(saved.arch, len(saved.classes), options=saved.net_options)
    networks_weights.load_weights(model, saved.model)
    return model.eval()
