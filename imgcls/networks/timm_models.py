"""timm's models as an option: `--model timm/NAME` (or `timm/NAME.TAG` for one of its weights).

timm is not a requirement (`pip install -r requirements-timm.txt`); it is imported only for a timm/
name. What differs from a torchvision model: the network is built by `timm.create_model` with the
run's number of classes, as timm's own train script builds it; its head is the module holding the
classifier timm names for the weights; ImageNet weights come through timm's loader (the Hugging Face
hub, or a file given with --weights passed as the loader's state_dict, so timm's own conversions
apply) and everything but the classifier is taken from them; the preprocessing is timm's data
config for those weights. Everything after building (freezing, the feature cache, checkpoints,
eval, test, export) treats it like any other network.
"""

from __future__ import annotations

from typing import Any

from imgcls.errors import UsageError, WeightsUnavailable, first_line
from imgcls.networks import names as networks_names
from imgcls.networks.statekeys import keys_named, mismatch, mismatched_keys
from imgcls.preprocess import Preprocess, crop_mode, interpolation

PREFIX = networks_names.PREFIX


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UsageError(networks_names.NO_TIMM) from None
    return timm


def check_name(arch: str) -> None:
    """A timm architecture, with an existing weights tag when one is named; else the closest names."""
    t, name = timm(), arch[len(PREFIX):]
    base, tag = t.models.split_model_name_tag(name)
    if not t.is_model(base):
        raise UsageError(networks_names.unknown_timm(base, t.list_models()))
    if tag:
        try:
            t.models.get_pretrained_cfg(name)
        except RuntimeError:
            raise UsageError(networks_names.unknown_tag(base, tag, t.list_pretrained(base + ".*"))) from None


def pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm().models.get_pretrained_cfg(arch[len(PREFIX):])
    return cfg.to_dict() if cfg is not None else {}


def preprocessing(arch: str) -> Preprocess:
    """Size, interpolation, crop (resize = crop / crop_pct, and crop_mode) and mean/std from timm's data
    config for the weights: the model sees an image as timm's own eval transform makes it."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=pretrained_cfg(arch))
    size = int(data["input_size"][-1])
    return Preprocess(size, int(size / data["crop_pct"]), tuple(map(float, data["mean"])),
                      tuple(map(float, data["std"])), interpolation(data.get("interpolation")),
                      crop_mode(data.get("crop_mode")))


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


def classifiers(arch: str, model: Any = None) -> tuple[str, ...]:
    """The modules timm names as the weights' classifier (a distilled model has two); else the one
    get_classifier() returns."""
    heads = pretrained_cfg(arch).get("classifier")
    if heads:
        return (heads,) if isinstance(heads, str) else tuple(heads)
    head = model.get_classifier() if model is not None else None
    return tuple(name for name, m in (model.named_modules() if model is not None else ()) if m is head)


def under(key: str, modules: tuple[str, ...]) -> bool:
    return key.startswith(tuple(m + "." for m in modules))


def with_any_head(arch: str, state: dict, expected: dict) -> dict:
    """`state` with the classifier tensors timm's strict loader expects for the weights' class count
    (placeholders where the file's classifier is for other classes, as one of our checkpoints is, or
    absent; dropped where the weights have none): the classifier is not taken from the weights anyway,
    and everything else is still checked key by key."""
    import torch

    heads = classifiers(arch)
    state = {k: v for k, v in state.items() if not under(k, heads) or (k in expected and v.shape == expected[k].shape)}
    for key, value in expected.items():
        if under(key, heads) and key not in state:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    return state


def create(arch: str, num_classes: int, options: dict[str, Any], state: dict | None = None,
           pretrained: bool = False, source: str = "") -> Any:
    """The network with a new `num_classes` classifier, built by timm as its train script builds one
    (`create_model(num_classes=N)`); `pretrained`: everything but the classifier from timm's ImageNet
    weights (pretrained layers inside a head, such as MetaFormer's MLP or a norm before the classifier,
    kept as timm keeps them), read strictly through timm's loader: from `state` (a timm state_dict, or
    one of our checkpoints' models) when given, else downloaded by timm."""
    try:
        model = timm().create_model(arch[len(PREFIX):], num_classes=num_classes, **options)
    except TypeError as e:  # a size option the architecture does not take
        raise UsageError(f"{arch} cannot be built for this input size ({e}): leave out --img-size") from None
    model.head_name = head_name(arch, model)
    if pretrained:
        heads = classifiers(arch, model)
        weights = {k: v for k, v in published(arch, options, state, source).state_dict().items() if not under(k, heads)}
        try:
            result = model.load_state_dict(weights, strict=False)
            wrong = [k for k in result.missing_keys if not under(k, heads)] + result.unexpected_keys
        except RuntimeError as e:
            wrong = [mismatch(e)]
        if wrong:
            raise UsageError(f"{arch} with {num_classes} classes differs from its weights' network beyond the "
                             f"classifier ({', '.join(wrong[:3])}): not supported")
    return model


def published(arch: str, options: dict[str, Any], state: dict | None, source: str) -> Any:
    """The network as its weights were published, loaded strictly by timm's loader, which converts what
    it knows (another input size's position embeddings, original layouts)."""
    t, name = timm(), arch[len(PREFIX):]
    kwargs: dict[str, Any] = dict(options)
    expected: dict = {}
    try:
        if state is not None:
            state = {k.removeprefix("module."): v for k, v in state.items()}  # (saved from DDP)
            expected = expected_state(arch, options)
            kwargs["pretrained_cfg_overlay"] = {"state_dict": with_any_head(arch, state, expected)}
        return t.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        if state is not None:  # timm's strict load, or its converter meeting keys of another model
            raise UsageError(not_fitting(arch, source, e, state, expected, options)) from None
        # no network, unknown repository, proxy: all end in the same advice
        raise WeightsUnavailable(f"timm's ImageNet weights for {name} could not be downloaded ({first_line(e)})",
                                 "pass --weights FILE (a timm state_dict, e.g. its model.safetensors from "
                                 "huggingface.co)") from None


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


def head_name(arch: str, model: Any) -> str:
    """The module holding the classifier(s): what trains in transfer mode and is cached around. A network
    whose classes come out of heads with no module in common (distilled DeiT and LeViT, VOLO's
    auxiliary head) is refused: a head is trained, frozen and cached as one module here."""
    heads = classifiers(arch, model)
    common: list[str] = []
    for names in zip(*(h.split(".") for h in heads)) if heads else ():
        if len(set(names)) > 1:
            break
        common.append(names[0])
    if not common:
        raise UsageError(f"{arch} has more than one classifier head ({', '.join(heads) or 'none found'}): not "
                         "supported; choose a model with one")
    return ".".join(common)


def weights_identity(arch: str) -> list:
    cfg = pretrained_cfg(arch)
    return ["timm", cfg.get("hf_hub_id") or cfg.get("url") or arch, timm().__version__]
