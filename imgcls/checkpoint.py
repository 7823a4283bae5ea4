"""The trained model as a file: what best.pt and last.pt hold, how they are saved, loaded and found,
and the preprocessing that travels with them (into ONNX and ExecuTorch metadata too).

A checkpoint is a dict of tensors and plain data, loaded with weights_only=True (never runs code):

    kind, version        KIND and VERSION: what the file is, and which layout
    arch, mode, classes  the model's name (torchvision's, or timm/NAME), the training mode, the class names in
                         output order
    preprocess           Preprocess.to_dict(): how images are resized, cropped and normalised
    model                the network's state_dict (head included)
    net_options          constructor settings the network was built with (models.network: a ViT's
                         image_size, GoogLeNet's transform_input; absent in older runs: the defaults)
    config               the run's settings (config.TrainConfig as a dict)
    epoch, history, best_acc, best_epoch, finished, train_time_s, weights_id, world
    optimizer, scaler, progress, ema   last.pt only (RESUME_ONLY): what a resume needs to continue exactly
    averaged             best.pt: True when its model is the weights' moving average (--ema)
    calibration          {temperature, fitted, kept, ece_raw, ece, ece_in_sample, images}: temperature
                         scaling of the best model on the validation set, its error measured on images it was not
                         fitted on (calibration.calibrate; temperature 1 when the fit did not lower it); runs of
                         before that hold {temperature, ece_raw, ece, images}; absent in runs trained before
                         calibration (temperature 1)
    best_confusion       the best model's validation confusion matrix (cross-validation's per-class accuracy)
    multilabel           True for a multi-label model (sigmoid per label; best_acc is then the best val mAP)
    thresholds           multi-label: each label's threshold, tuned on validation (max F1); best_ap, its APs

    warnings             the run-health warnings said so far (kind -> line: training/health.py)

best.pt is the best epoch's model without RESUME_ONLY (a third of the size); eval.py, test.py and
export.py need nothing else. Readers take the dict through `view`: `Saved`, each field typed, with the value
a file without it gets (the defaults are there and nowhere else); the loop writes one with `Saved.to_dict`.
A new field: a line here, a field of `Saved` with its default, and its name in WRITTEN. torch is imported
only to save and load, so finding a checkpoint (and checking a command line) is answered before torch is
imported.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any

from imgcls import files
from imgcls import preprocess as imgcls_preprocess
from imgcls.cli import typed
from imgcls.errors import UsageError

KIND = "imgcls-checkpoint"
VERSION = 2  # 2: position in samples and epoch statistics ("progress"); the schedule is derived
RESUME_ONLY = ("optimizer", "scaler", "progress", "ema")
EXPORT_SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "torchscript": ".ptl"}  # export.py --format


def of_model(arch: str, classes: list[str], model: dict[str, Any], preprocess: imgcls_preprocess.Preprocess,
             mode: str = "scratch",
             **training: Any) -> dict[str, Any]:
    """A checkpoint in this layout: the model and what describes it, plus any training fields."""
    return {"kind": KIND, "version": VERSION, "arch": arch, "mode": mode, "classes": list(classes),
            "preprocess": preprocess.to_dict(), "model": model, **training}


@dataclasses.dataclass(frozen=True)
class Saved:
    """A checkpoint as its readers see it (the layout above). The defaults are what a file without the
    field means: it was written before the field, or by `of_model` alone (no training). A file from
    train.py holds the first four; they default only so that part of one (a test's dict) can be viewed."""
    arch: str = ""
    classes: list[str] = dataclasses.field(default_factory=list)
    preprocess: imgcls_preprocess.Preprocess | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # (tensors: not shown)
    mode: str = "scratch"
    net_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # older runs: the defaults
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    epoch: int = 0
    progress: dict[str, Any] | None = None  # before version 2: at the start of the epoch after `epoch`
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finished: bool = False  # absent (before version 2): whether it trained all the epochs of its config
    train_time_s: float = 0.0  # absent: the sum of its epochs' times
    weights_id: list[Any] | None = None  # None: not recorded
    optimizer: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    scaler: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    world: int = 1
    calibration: dict[str, Any] | None = None  # None: trained before calibration (temperature 1)
    best_confusion: list[list[int]] | None = None
    multilabel: bool = False
    thresholds: list[float] | None = None
    best_ap: list[float | None] | None = None
    ema: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    warnings: dict[str, str] = dataclasses.field(default_factory=dict)
    averaged: bool | None = None  # best.pt's; None in last.pt
    version: int = 1  # of the file read (1: before versions); a file written is VERSION
    held: frozenset[str] = frozenset()  # the fields the file holds (what was absent got its default)

    @property
    def seen(self) -> int:
        """Saved mid-epoch: the images of the epoch after `epoch` already trained on (0 at an epoch's end)."""
        return (self.progress or {}).get("seen") or 0

    def to_dict(self) -> dict[str, Any]:
        """The file's dict (a training checkpoint: best.pt or last.pt). What is unset is left out, as in
        files from before it: None, an empty calibration, confusion or warnings, and a single-label
        model's multi-label fields."""
        return of_model(self.arch, self.classes, self.model, self.preprocess, self.mode,
                        **{name: getattr(self, name) for name in WRITTEN if self._written(name)})

    def _written(self, name: str) -> bool:
        value = getattr(self, name)
        if name in MULTILABEL_ONLY:
            return self.multilabel
        return bool(value) if name in SPARSE else value is not None


WRITTEN = ("net_options", "config", "epoch", "progress", "best_acc", "best_epoch", "history", "finished",
           "train_time_s", "weights_id", "optimizer", "scaler", "world", "calibration", "best_confusion",
           "multilabel", "thresholds", "best_ap", "ema", "warnings", "averaged")  # after the model's, in order
SPARSE = ("calibration", "best_confusion", "multilabel", "warnings")  # left out when empty
MULTILABEL_ONLY = ("thresholds", "best_ap")  # with multilabel, None included


def view(ckpt: dict[str, Any] | Saved) -> Saved:
    """The typed view of a checkpoint's dict (one already viewed as it is): each field the file holds,
    the default of the others (None stored counts as absent)."""
    if isinstance(ckpt, Saved):
        return ckpt
    names = {f.name for f in dataclasses.fields(Saved)} - {"held"}
    given = {k: v for k, v in ckpt.items() if k in names and v is not None}
    if "preprocess" in given:
        given["preprocess"] = imgcls_preprocess.Preprocess.from_dict(given["preprocess"])
    if "finished" not in given:  # (before version 2: all its epochs)
        given["finished"] = given.get("epoch", 0) >= (given.get("config") or {}).get("epochs", 0)
    if "train_time_s" not in given:
        given["train_time_s"] = sum(h.get("time_s", 0.0) for h in given.get("history", []))
    return Saved(**given, held=frozenset(k for k, v in ckpt.items() if v is not None))


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is one of our checkpoints (its KIND marker), not a bare state dict."""
    return isinstance(obj, dict) and obj.get("kind") == KIND


def temperature(ckpt: dict[str, Any] | Saved, source: str | Path = "the checkpoint") -> float | None:
    """The fitted temperature, or None for a model trained before calibration (use 1)."""
    calibrated = view(ckpt).calibration
    if not calibrated:
        return None
    return checked_temperature(calibrated.get("temperature"), source)


def temperature_not_kept(ckpt: dict[str, Any] | Saved) -> str | None:
    """A note when training fitted a temperature and did not keep it (calibration.calibrate): temperature 1
    is then no fit of 1, but the raw softmax, chosen."""
    c = view(ckpt).calibration or {}
    if c.get("kept") is not False:
        return None
    return (f"note: the temperature fitted when training ({c.get('fitted', float('nan')):.3f}) was not kept: it "
            "raised the calibration error on validation images it was not fitted on, so probabilities are the raw "
            "softmax (temperature 1)")


def fitted_elsewhere(ckpt: dict[str, Any] | Saved, source: str | Path) -> str | None:
    """A note when the temperature (a multi-label model's thresholds) a checkpoint carries was fitted for
    another epoch's weights: last.pt keeps the best epoch's, which its resume goes on with."""
    saved = view(ckpt)
    epoch, best, seen = saved.epoch, saved.best_epoch, saved.seen
    what = ("thresholds were", "they fit") if saved.multilabel else \
        ("temperature was", "it fits") if saved.calibration else None
    if what is None or (epoch == best and not seen):
        return None
    held = f"epoch {epoch}" + (f" and {seen} images of epoch {epoch + 1}" if seen else "")
    return (f"note: {Path(source).name} holds {held}; its {what[0]} fitted for the best epoch ({best}), for "
            f"other weights (best.pt holds the model {what[1]})")


def checked_temperature(value: Any, source: str | Path) -> float:
    """A temperature read from a file: a finite number above 0, or the file is refused in one line."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0 < t < float("inf"):
        raise UsageError(f"{source} has an invalid temperature ({value!r}): it must be a number above 0; "
                         "export or train it again")
    return t


def thresholds(ckpt: dict[str, Any] | Saved, source: str | Path = "the checkpoint") -> list[float] | None:
    """A multi-label model's per-label thresholds; None for a single-label model."""
    saved = view(ckpt)
    if not saved.multilabel:
        return None
    return checked_thresholds(saved.thresholds, len(saved.classes), source)


def checked_thresholds(value: Any, n: int, source: str | Path) -> list[float]:
    """Thresholds read from a file: one probability per label, or the file is refused in one line."""
    try:
        out = [float(t) for t in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != n or not all(0 <= t <= 1 for t in out):
        raise UsageError(f"{source} is a multi-label model without a threshold in [0, 1] for each of its {n} labels: "
                         "export or train it again")
    return out


def label_sep(ckpt: dict[str, Any] | Saved) -> str:
    """What separated the labels of the run's label file (a space unless --label-sep said otherwise)."""
    return str(view(ckpt).config.get("label_sep") or " ")


def trained_with_flips(ckpt: dict[str, Any] | Saved) -> bool:
    """Whether the model saw mirror images in training (then test-time augmentation may flip): not with
    --hflip 0, --augment none, or transfer mode's feature cache (no augmentation at all)."""
    cfg = view(ckpt).config  # (the run's settings: a TrainConfig as a dict)
    augmented = cfg.get("augment", "basic") != "none" and not (cfg.get("mode") == "transfer" and
                                                               cfg.get("feature_cache", True))
    return augmented and float(cfg.get("hflip", 0.5)) > 0


def export_metadata(ckpt: dict[str, Any] | Saved) -> dict[str, str]:
    """What an exported model carries: class names, architecture, the input contract, and what turns
    its logits into probabilities (softmax(logits / temperature); a multi-label model's sigmoid and
    per-label thresholds) and allows test-time flips."""
    saved = view(ckpt)
    t, cuts = temperature(saved), thresholds(saved)
    return {"classes": json.dumps(saved.classes), "arch": saved.arch, **saved.preprocess.metadata(),
            **({"temperature": repr(t)} if t is not None else {}), "hflip": json.dumps(trained_with_flips(saved)),
            **({"multilabel": "true", "thresholds": json.dumps(cuts), "label_sep": label_sep(saved)}
               if cuts is not None else {})}


def for_inference(state: Saved) -> Saved:
    """best.pt's content: the model and what describes it, without the training state."""
    return dataclasses.replace(state, **dict.fromkeys(RESUME_ONLY))


def save(obj: dict[str, Any], path: Path) -> None:
    """Atomic: a kill at any moment leaves the old file or the new one (see files.py). Every tensor is
    written from the CPU, so a plain torch.load of a GPU run's checkpoint works on a machine without one."""
    import torch

    files.atomic_write(Path(path), lambda f: torch.save(on_cpu(obj), f))


def on_cpu(obj: Any) -> Any:
    """`obj` with its tensors on the CPU (those already there as they are); module versions (state dicts'
    `_metadata`) kept."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def read(path: str | Path) -> Any:
    """torch.load that never runs code from the file: weights_only, with people-sized errors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"(?i)unsupported GLOBAL:? (?:GLOBAL )?(\S+)", str(e))  # (torch's wordings vary)
        if code is None:  # bytes the unpickler has no operand for: not a PyTorch file at all
            raise UsageError(f"{path} is not a PyTorch file (.pt): give a checkpoint saved by train.py") from None
        raise UsageError(f"{path} needs pickled code to load ({code[1]}) and was refused (weights_only=True): only "
                         "tensors and plain data are accepted") from None
    except Exception as e:  # the weights-only unpickler fails in many ways on files that are not ours
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UsageError(f"{path} is not a readable PyTorch file ({reason})") from None


def load(path: str | Path) -> dict[str, Any]:
    """One of our checkpoints, loaded without running code from it."""
    ckpt = read(path)
    if not is_checkpoint(ckpt):
        raise UsageError(f"{path} is not a checkpoint made by train.py (no '{KIND}' marker)")
    version = ckpt.get("version", Saved.version)  # (before the view: a newer layout may not fit it)
    if version > VERSION:
        raise UsageError(f"{path} was written by a newer version of this toolkit (checkpoint version "
                         f"{version}, this one reads up to {VERSION}): update the code")
    return ckpt


def load_for_resume(path: Path) -> dict[str, Any]:
    """last.pt: a checkpoint with its training state."""
    ckpt = load(path)
    if "optimizer" not in ckpt:
        raise UsageError(f"{path} holds a model without its training state: resume with "
                         f"--resume {typed(path.parent)} (its last.pt)")
    return ckpt


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"
