"""The one owner of the preprocessing: what a network was trained with (Preprocess: size, crop, interpolation,
mean and std), as checkpoints and exports record it. No torch here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # PIL's filters
CROP_MODES = ("center", "squash", "border")  # timm's data configs' crop_mode


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input: made a `resize_size` square (with `interpolation`,
    antialiased) as `crop_mode` says, and the centre `img_size` square cropped (evaluation; training crops
    at random), then normalised by mean/std. The crop modes are timm's, so a timm model sees what its
    weights were made with: center, the shorter side resized (torchvision's way, and most of timm's);
    squash, the whole image resized to the square; border, its longer side resized and the rest padded
    with the mean colour."""
    img_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(int(d["img_size"]), int(d["resize_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
                   interpolation(d.get("interpolation")), crop_mode(d.get("crop_mode")))

    def to_dict(self) -> dict[str, Any]:
        """As stored in checkpoints and written to JSON (lists, not tuples); crop_mode only when it is not
        center, so what was keyed by the preprocessing before (transfer feature caches) stays valid."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if k != "crop_mode" or v != "center"}

    def metadata(self) -> dict[str, str]:
        """String key/values for an exported model (ONNX metadata_props, the .pte/.ptl JSON)."""
        return {"mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "img_size": str(self.img_size), "resize_size": str(self.resize_size),
                "interpolation": self.interpolation, "crop_mode": self.crop_mode, "input": INPUT_CONTRACT}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Preprocess:
        return cls(int(meta["img_size"]), int(meta["resize_size"]), tuple(json.loads(meta["mean"])),
                   tuple(json.loads(meta["std"])), interpolation(meta.get("interpolation")),
                   crop_mode(meta.get("crop_mode")))

    @property
    def resample(self) -> str:
        """How dataset.square makes the square (and the image caches are keyed): the interpolation, then,
        unless center, the crop mode (border with its fill, the mean colour, as timm pads)."""
        if self.crop_mode == "squash":
            return f"{self.interpolation}/squash"
        if self.crop_mode == "border":
            return f"{self.interpolation}/border/" + ",".join(str(round(255 * m)) for m in self.mean)
        return self.interpolation

    def crop(self) -> Any:
        """The evaluation crop, applied to the uint8 `resize_size` square every dataset yields."""
        from imgcls.data.datasets import eval_transform

        return eval_transform(self.img_size)


def interpolation(name: Any) -> str:
    """A saved interpolation name; bilinear for files from before it was saved (and for a name not known)."""
    return name if name in INTERPOLATIONS else "bilinear"


def crop_mode(name: Any) -> str:
    """A saved crop mode; center for files from before it was saved (and for a mode not known)."""
    return name if name in CROP_MODES else "center"


INPUT_CONTRACT = ("float32 RGB in [0,1], N x 3 x img_size x img_size, resized (antialiased, with the interpolation "
                  "named) as crop_mode says, then centre-cropped: center, the shorter side to resize_size; squash, "
                  "the whole image to resize_size x resize_size; border, the longer side to resize_size, the rest "
                  "padded to a square with the mean colour; normalisation is inside the model; output: logits, "
                  "probabilities are "
                  "softmax(logits / temperature), or for a multilabel model sigmoid(logits), each label present "
                  "when its probability reaches its threshold")
