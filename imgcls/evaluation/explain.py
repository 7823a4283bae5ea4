"""Why the model said what it said: heatmaps of the evidence for a class, over the image.

Grad-CAM (Selvaraju et al., 2017) for networks that end in a convolutional feature map (the three
documented models and torchvision's other CNNs): the last stage's activations weighted by the
gradient of the class score, found automatically. For what has no such map (a vision transformer)
or no gradients (an exported .onnx), occlusion (Zeiler & Fergus, 2014): how much the class's
probability drops when each part of the image is covered. A short hook-based implementation: the
`grad-cam` package would add a dependency for ~40 lines, and would not cover .onnx files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class NoFeatureMap(Exception):
    """The network does not end in a convolutional feature map: Grad-CAM does not apply."""


@dataclass
class Target:
    """The module whose output Grad-CAM weighs: the network's last spatial feature map."""
    name: str
    module: nn.Module
    shape: tuple[int, ...]


MIN_SIDE = 4  # a stage whose map is smaller can only say "this quadrant": an earlier one localises better


def find_target(net: nn.Module, example: torch.Tensor) -> Target:
    """The network's last convolutional stage with a spatial map: the last module output of the forward
    pass that is an N x C x H x W map of at least MIN_SIDE x MIN_SIDE (else the last larger than 1 x 1),
    taken whole (ResNet's `layer4`, VGG's and MobileNetV2's `features`), never from inside a block that
    shrinks it further (a ResNet bottleneck's first ReLU bypasses its shortcut). Refused when the last
    spatial output is no such map: a transformer's tokens, or channels-last features (Swin)."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _, out, name=name: seen.append((name, mod, out)))
             for name, m in net.named_modules() if name and "Pool" not in type(m).__name__]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    outputs = {n: o for n, _, o in seen}
    modules = dict(net.named_modules())
    spatial = [(n, m, o) for n, m, o in seen
               if isinstance(o, torch.Tensor) and area(o) > 1 and whole(n, o, outputs, modules)]
    if not spatial:
        raise NoFeatureMap("no module gives a spatial feature map")
    name, _, out = spatial[-1]
    if not is_map(out):
        shape = " x ".join(map(str, out.shape))
        raise NoFeatureMap(f"its last stage ({name}) gives {shape} tokens, not a convolutional feature map"
                           if out.dim() == 3 else f"its last stage ({name}) gives channels-last {shape} "
                           "features, not a convolutional feature map")
    # the maps after the last stage that is not one (Swin's channels-last stages, then one permuted map)
    start = max((k + 1 for k, (_, _, o) in enumerate(spatial) if not is_map(o)), default=0)
    stages = spatial[start:]
    big = [c for c in stages if min(c[2].shape[2:]) >= MIN_SIDE]
    name, module, out = (big or stages)[-1]
    return Target(name, module, tuple(out.shape))


def is_map(t: torch.Tensor) -> bool:
    """N x C x H x W. Inputs are square, so a 4-d tensor whose last two sizes differ is channels-last."""
    return t.dim() == 4 and t.shape[2] == t.shape[3]


def area(t: torch.Tensor) -> int:
    """The spatial size of a map, channels-last or not; a token sequence's length; 1 for a vector."""
    if t.dim() == 4:
        return int(t.shape[2] * t.shape[3]) if is_map(t) else int(t.shape[1] * t.shape[2])
    return int(t.shape[1]) if t.dim() == 3 else 1


def whole(name: str, out: torch.Tensor, outputs: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> bool:
    """Whether `name`'s output leaves every block around it at its size: a plain nn.Sequential only
    chains stages, any other module around it (a residual block, an inverted residual) that ends at
    another size would be cut through."""
    parts = name.split(".")
    for k in range(1, len(parts)):
        parent = ".".join(parts[:k])
        if type(modules[parent]) is nn.Sequential:
            continue
        up = outputs.get(parent)
        if isinstance(up, torch.Tensor) and up.shape[2:] != out.shape[2:]:
            return False
    return True


def grad_cam(net: nn.Module, x: torch.Tensor, classes: torch.Tensor, target: Target) -> torch.Tensor:
    """Heatmaps (N x H x W, each scaled to [0, 1]) of the evidence for `classes[i]` in image i, at the
    input's resolution. `x` is the network's (normalised) input."""
    held: list[torch.Tensor] = []

    def keep(_: nn.Module, __: tuple, out: torch.Tensor) -> torch.Tensor:
        held.append(out)
        return out.clone()  # later in-place ops (DenseNet's final ReLU) change the copy, not what we keep

    hook = target.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # frozen backbones (transfer mode) still give gradients
            logits = net(x)
            score = logits.gather(1, classes.to(logits.device)[:, None]).sum()
            grads = torch.autograd.grad(score, held[0])[0]
    finally:
        hook.remove()
    acts = held[0].detach()
    cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return scaled(cam)


def occlusion(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, cls: int,
              temperature: float = 1.0, steps: int = 7, multilabel: bool = False) -> torch.Tensor:
    """Heatmap (H x W, in [0, 1]) of how much covering each part of `image` (uint8 3 x H x W, as the
    model takes it) lowers the evidence for class `cls`: a square of the image's mean colour, a quarter
    of its side, slid in `steps` x `steps` overlapping positions, all in one batch. The evidence is the
    log-odds of the class, which, unlike its probability, does not saturate near 100% (for a multi-label
    model, whose labels are independent sigmoids, that is the label's logit itself)."""
    _, h, w = image.shape
    ph, pw = max(1, h // 4), max(1, w // 4)
    ys = np.linspace(0, h - ph, steps).round().astype(int)
    xs = np.linspace(0, w - pw, steps).round().astype(int)
    batch = image.unsqueeze(0).repeat(steps * steps + 1, 1, 1, 1)
    fill = image.float().mean((1, 2)).round().to(image.dtype)[:, None, None]
    for k, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
        batch[k + 1, :, y0:y0 + ph, x0:x0 + pw] = fill
    with torch.no_grad():
        logits = model(batch).float().cpu()
    if multilabel:
        log_odds = logits[:, cls]
    else:
        log_p = (logits / temperature).log_softmax(1)
        others = torch.cat([log_p[:, :cls], log_p[:, cls + 1:]], 1).logsumexp(1)
        log_odds = log_p[:, cls] - others
    drop = (log_odds[0] - log_odds[1:]).clamp(min=0)
    heat, cover = torch.zeros(h, w), torch.zeros(h, w)
    for k, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
        heat[y0:y0 + ph, x0:x0 + pw] += drop[k]
        cover[y0:y0 + ph, x0:x0 + pw] += 1
    return scaled((heat / cover.clamp(min=1))[None])[0]


def scaled(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum (a map with no evidence stays zero)."""
    top = maps.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    return (maps / top).clamp(0, 1)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (jet colours) over the photo, as uint8 RGB at the photo's size."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    heat_img = Image.fromarray((255 * heat).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    colours = colormaps["jet"](np.asarray(heat_img) / 255.0)[..., :3] * 255
    return (alpha * colours + (1 - alpha) * image.astype(np.float64)).clip(0, 255).astype(np.uint8)
