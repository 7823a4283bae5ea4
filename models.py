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
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import checkpoint
import model_names
import timm_models
from checkpoint import Preprocess
from imgcls import files
from imgcls.errors import UsageError, WeightsUnavailable

AUX_HEADS = ("googlenet", "inception_v3")  # their auxiliary classifiers are disabled
DEFAULT_PREPROCESS = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def classifier_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_name(name: str) -> None:
    """A name --model takes (from the installed packages themselves), or the three closest names."""
    if timm_models.is_timm(name):
        return timm_models.check_name(name)
    if name not in classifier_names():
        raise UsageError(model_names.unknown_torchvision(name, classifier_names()))


def default_weights(name: str) -> Any:
    """The torchvision weights enum entry used for 'finetune' and 'transfer' (None if it has none)."""
    if timm_models.is_timm(name):
        return None
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return None


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
                         tuple(map(float, t.std)), checkpoint.interpolation(t.interpolation.value))
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
        raise UsageError(f"{arch} cannot take {img_size}-pixel images ({checkpoint.first_line(e)}): "
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
    if isinstance(old, nn.Linear):  # with a bias where the published head has one (MaxViT's has none)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    set_module(model, name, new)
    model.head_name = name
    return new


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the head that replace_head() put in (for timm: timm_models.head_name)."""
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
        raise unavailable(name, e) from None


def unavailable(name: str, e: Exception) -> WeightsUnavailable:
    weights = default_weights(name)
    reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return WeightsUnavailable(f"ImageNet weights for {name} could not be downloaded ({reason})",
                              f"put {weights.url} at {cached}, or pass --weights FILE")


def fetch_weights(name: str) -> None:
    """torchvision's ImageNet weights for `name` into the torch hub cache, unless they are there (timm's come
    when the model is built): a run that cannot have them says so before its data is checked."""
    weights = default_weights(name)
    if weights is None or timm_models.is_timm(name):
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(cached), progress=True)
    except Exception as e:
        raise unavailable(name, e) from None


def weights_identity(arch: str, weights_file: str | None) -> list:
    """What identifies the starting weights, for cache keys: the file's identity (path, size, times)
    or, for torchvision's, the URL and the hub cache file. Recorded when a run starts, so a resume
    needs neither file."""
    if weights_file:
        return ["file", *files.identity(Path(weights_file).absolute())]
    if timm_models.is_timm(arch):
        return timm_models.weights_identity(arch)
    weights = default_weights(arch)
    if weights is None:
        return ["none"]
    return ["torchvision", weights.url, *files.identity(Path(torch.hub.get_dir()) / "checkpoints" /
                                                         os.path.basename(weights.url))[1:]]


def read_weights(path: str | Path) -> Any:
    """A weights file as saved by torch (never running code from it) or as .safetensors (timm's hub files)."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError(f"{path} is a .safetensors file: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # damaged or not safetensors
            raise UsageError(f"{path} is not a readable .safetensors file ({checkpoint.first_line(e)})") from None
    return checkpoint.read(path)


def state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or one of our checkpoints."""
    if isinstance(obj, dict) and obj.get("kind") == checkpoint.KIND:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict (a dict of tensors)")
    return obj


def with_metadata(state: dict[str, torch.Tensor], like: dict | None) -> OrderedDict:
    """`state` keeping the module versions a saved state_dict carries (`_metadata`), which custom
    loaders read (MNASNet's stem, ViT's legacy key names): from `like` when `state` has none."""
    out = OrderedDict(state)
    meta = getattr(state, "_metadata", None)
    if meta is None:
        meta = getattr(like, "_metadata", None)
    if meta is not None:
        out._metadata = meta
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole state_dict saved from this network; one saved without versions is taken as this code's."""
    model.load_state_dict(with_metadata(state, model.state_dict()))


DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\."
                             r"(?:weight|bias|running_mean|running_var))$")


def renamed_legacy_keys(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """DenseNet's published weights name layers 'norm.1' where the module is 'norm1': renamed the way
    torchvision's own loader does (densenet._load_state_dict). Other families' old names are renamed
    by their modules' own _load_from_state_dict while loading."""
    if not arch.startswith("densenet"):
        return state
    out = OrderedDict((DENSENET_LEGACY.sub(r"\1\2", k), v) for k, v in state.items())
    return with_metadata(out, state)


def resized_embeddings(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A torchvision ViT's position embeddings interpolated to the network's input size (torchvision's
    interpolate_embeddings) when the weights were made for another size."""
    key = "encoder.pos_embedding"
    if not arch.startswith("vit_") or key not in state or state[key].shape == model.state_dict()[key].shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return with_metadata(interpolate_embeddings(model.image_size, model.patch_size, state), state)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str, ours: bool = False
                  ) -> None:
    """Load everything but the classifier head; any other mismatch means the file is for another model.
    Loading goes through the modules' own loaders, so old layouts they know are converted as torchvision
    converts them: a file without module versions is an old one to them (BatchNorm's batch count added,
    as in DenseNet's published file), except one of our checkpoints (`ours`), always in today's layout."""
    prefix = model.head_name + "."
    if ours:
        state = with_metadata(state, model.state_dict())
    dropped = (prefix, "AuxLogits.", "aux1.", "aux2.") if arch in AUX_HEADS else (prefix,)
    state = with_metadata({k.removeprefix("module."): v for k, v in state.items()
                           if not k.removeprefix("module.").startswith(dropped)}, state)
    state = resized_embeddings(model, renamed_legacy_keys(state, arch), arch)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise UsageError(f"weights in {source} don't fit {arch} ({checkpoint.mismatch(e)}): use weights saved "
                         f"from {arch}") from None
    missing = sorted(k for k in result.missing_keys if not k.startswith(prefix))
    if missing or result.unexpected_keys:
        detail = checkpoint.keys_named({"missing": missing, "unexpected": sorted(result.unexpected_keys)})
        raise UsageError(f"weights in {source} don't fit {arch} ({detail}): use weights saved from {arch}")


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
        replace_head(model, num_classes)
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
            obj, source = read_weights(weights_file), weights_file
            if isinstance(obj, dict) and obj.get("kind") == checkpoint.KIND:
                saved = {**obj.get("net_options", {}), **options}
            state = state_dict_from(obj, Path(weights_file))
        if timm_models.is_timm(arch):  # (timm's networks have no settings but their size to keep)
            model = timm_models.create(arch, num_classes, options, state, pretrained=True, source=source)
            model.net_options = options
        else:
            options = saved if saved is not None else {**options, **published_options(arch)}
            model = network(arch, num_classes, options=options)
            load_backbone(model, state if state is not None else imagenet_state_dict(arch), source, arch,
                          ours=saved is not None)
    if mode == "transfer":
        freeze_backbone(model)
    return model


def snapshot(model: nn.Module) -> OrderedDict:
    """The model's state_dict as it is now, on the CPU; frozen parameters never change, so they are
    shared instead of copied (a transfer-mode snapshot costs the head only)."""
    state = model.state_dict(keep_vars=True)
    return with_metadata({k: v.detach() if isinstance(v, nn.Parameter) and not v.requires_grad
                          else v.detach().to("cpu", copy=True) for k, v in state.items()}, state)


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
    model = network(ckpt["arch"], len(ckpt["classes"]), options=ckpt.get("net_options"))
    load_weights(model, ckpt["model"])
    return model.eval()
