"""ImageNet weights and weights files: fetched once, loaded safely (legacy keys, resized embeddings), identified."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from imgcls import checkpoint, files
from imgcls.errors import UsageError, WeightsUnavailable, first_line
from imgcls.networks import statekeys, timm_models


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
            raise UsageError(f"{path} is not a readable .safetensors file ({first_line(e)})") from None
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
        raise UsageError(f"weights in {source} don't fit {arch} ({statekeys.mismatch(e)}): use weights saved "
                         f"from {arch}") from None
    missing = sorted(k for k in result.missing_keys if not k.startswith(prefix))
    if missing or result.unexpected_keys:
        detail = statekeys.keys_named({"missing": missing, "unexpected": sorted(result.unexpected_keys)})
        raise UsageError(f"weights in {source} don't fit {arch} ({detail}): use weights saved from {arch}")


AUX_HEADS = ("googlenet", "inception_v3")  # their auxiliary classifiers are disabled


def default_weights(name: str) -> Any:
    """The torchvision weights enum entry used for 'finetune' and 'transfer' (None if it has none)."""
    if timm_models.is_timm(name):
        return None
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return None
