"""timm's models as an option: `--model timm/NAME` (or `timm/NAME.TAG` for one of its weights).

timm is not a requirement (`pip install -r requirements-timm.txt`); it is imported only for a timm/
name. What differs from a torchvision model: the network is built by `timm.create_model`, its head is
the module `get_classifier()` names and is replaced by `reset_classifier` (timm's own API), ImageNet
weights come through timm's loader (the Hugging Face hub, or a file given with --weights passed as
the loader's state_dict, so timm's own conversions apply), and the preprocessing is timm's data
config for those weights. Everything after building (freezing, the feature cache, checkpoints,
eval, test, export) treats it like any other network.
"""

from __future__ import annotations

import difflib
from typing import Any

from checkpoint import Preprocess, first_line, interpolation, keys_named, mismatched_keys
from config import UsageError

PREFIX = "timm/"


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def installed() -> bool:
    try:
        timm()
    except UsageError:
        return False
    return True


def timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError("timm models need the timm package: pip install timm "
                         "(or pip install -r requirements-timm.txt)") from None
    return timm


def names(tags: bool = False) -> list[str]:
    """timm's architectures as --model takes them; with `tags`, also each of their named weights."""
    t = timm()
    return [PREFIX + n for n in t.list_models()] + ([PREFIX + n for n in t.list_pretrained()] if tags else [])


def check_name(arch: str) -> None:
    """A timm architecture, with an existing weights tag when one is named; else the closest names."""
    t, name = timm(), arch[len(PREFIX):]
    base, tag = t.models.split_model_name_tag(name)
    if not t.is_model(base):
        close = difflib.get_close_matches(base, t.list_models(), n=3, cutoff=0.6)
        hint = f": did you mean {' or '.join(PREFIX + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model '{base}'{hint} (python train.py --list-models 'timm/*' lists them)")
    if tag:
        try:
            t.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = [p.partition(".")[2] for p in t.list_pretrained(base + ".*")]
            raise UsageError(f"timm has no weights '{tag}' for {base}: "
                             f"{'choose one of ' + ', '.join(tags) if tags else 'it has no pretrained weights'}"
                             ) from None


def pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm().models.get_pretrained_cfg(arch[len(PREFIX):])
    return cfg.to_dict() if cfg is not None else {}


def preprocessing(arch: str) -> Preprocess:
    """Size, interpolation, crop and mean/std from timm's data config for the weights (resize = crop /
    crop_pct)."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=pretrained_cfg(arch))
    size = int(data["input_size"][-1])
    return Preprocess(size, int(size / data["crop_pct"]), tuple(map(float, data["mean"])),
                      tuple(map(float, data["std"])), interpolation(data.get("interpolation")))


def size_options(arch: str, img_size: int | None) -> dict[str, Any]:
    """A network whose input size is fixed when built (a ViT's position embeddings) is built for the run's
    size; timm's loader resamples the embeddings of weights made for another size where it knows how
    (its ViTs), else they are refused naming the size they take (not_fitting)."""
    return {"img_size": img_size} if img_size is not None and pretrained_cfg(arch).get("fixed_input_size") else {}


def expected_state(arch: str, options: dict[str, Any]) -> dict:
    """The tensors (shapes only) of the network as built for its weights."""
    import torch

    with torch.device("meta"):
        return timm().create_model(arch[len(PREFIX):], **options).state_dict()


def with_any_head(arch: str, state: dict, expected: dict) -> dict:
    """`state` with the classifier tensors timm's strict loader expects for the weights' class count
    (placeholders where the file's head is for other classes, as one of our checkpoints is, or absent):
    the head is replaced after loading anyway, and everything else is still checked key by key."""
    import torch

    state = dict(state)
    heads = pretrained_cfg(arch).get("classifier") or ()
    for key, value in expected.items():
        if key.startswith(tuple(h + "." for h in ([heads] if isinstance(heads, str) else heads))) and (
                key not in state or state[key].shape != value.shape):
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def create(arch: str, num_classes: int, options: dict[str, Any], state: dict | None = None,
           pretrained: bool = False, source: str = "") -> Any:
    """The network with a fresh `num_classes` head; `pretrained`: timm's ImageNet weights, from `state`
    (a timm state_dict, or one of our checkpoints' models) when given, else downloaded by timm. Both go
    through timm's loader, which converts what it knows (another input size's position embeddings)."""
    t, name = timm(), arch[len(PREFIX):]
    kwargs: dict[str, Any] = dict(options)
    expected: dict = {}
    try:
        if pretrained and state is not None:
            state = {k.removeprefix("module."): v for k, v in state.items()}  # (saved from DDP)
            expected = expected_state(arch, options)
            kwargs["pretrained_cfg_overlay"] = {"state_dict": with_any_head(arch, state, expected)}
        model = t.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # a size option the architecture does not take
        raise UsageError(f"{arch} cannot be built for this input size ({e}): leave out --img-size") from None
    except Exception as e:
        if not pretrained:
            raise
        if state is not None:  # timm's strict load, or its converter meeting keys of another model
            raise UsageError(not_fitting(arch, source, e, state, expected, options)) from None
        # no network, unknown repository, proxy: all end in the same advice
        raise UsageError(f"timm's ImageNet weights for {name} could not be downloaded ({first_line(e)}): "
                         "pass --weights FILE (a timm state_dict, e.g. its model.safetensors from "
                         "huggingface.co), or use --mode scratch") from None
    model.head_name = new_head(model, num_classes, arch)
    return model


def not_fitting(arch: str, source: str, e: Exception, state: dict, expected: dict, options: dict[str, Any]) -> str:
    """Why a weights file was refused: the keys that differ (from the loader's error, else compared with
    the network's own), and for weights made for another input size that timm cannot convert, the size."""
    found = mismatched_keys(e)
    if not any(found.values()):  # a converter's KeyError: the keys compared here
        found = {"missing": sorted(set(expected) - set(state)), "unexpected": sorted(set(state) - set(expected))}
    detail = keys_named(found) or f"{type(e).__name__}: {first_line(e)}"
    default = (pretrained_cfg(arch).get("input_size") or (3, 224, 224))[-1]
    if options.get("img_size", default) != default:
        return (f"weights in {source} don't fit {arch} at {options['img_size']} px ({detail}): timm does not convert "
                f"them for another size; use --img-size {default}")
    return f"weights in {source} don't fit {arch} ({detail}): use weights saved from {arch[len(PREFIX):]}"


def new_head(model: Any, num_classes: int, arch: str) -> str:
    """reset_classifier's new head for `num_classes`, by name: the module holding every layer it made
    (timm's classifier, with the norm some put before it); a network whose classes come out of more
    than one head (distilled models, VOLO's auxiliary head) is refused: a head is trained, frozen and
    cached as one module here."""
    before = dict(model.named_modules())
    model.reset_classifier(num_classes)
    made = [name for name, m in model.named_modules()
            if before.get(name) is not m and next(m.parameters(recurse=False), None) is not None]
    common: list[str] = []
    for names in zip(*(name.split(".") for name in made)) if made else ():
        if len(set(names)) > 1:
            break
        common.append(names[0])
    if not common:
        raise UsageError(f"{arch} has more than one classifier head ({', '.join(made) or 'none found'}): not "
                         "supported; choose a model with one")
    return ".".join(common)


def weights_identity(arch: str) -> list:
    cfg = pretrained_cfg(arch)
    return ["timm", cfg.get("hf_hub_id") or cfg.get("url") or arch, timm().__version__]
