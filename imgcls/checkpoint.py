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

best.pt is the best epoch's model without RESUME_ONLY (a third of the size); eval.py, test.py and
export.py need nothing else. torch is imported only to save and load, so finding a checkpoint (and
checking a command line) is answered before torch is imported.
"""

from __future__ import annotations

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


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def mismatched_keys(e: BaseException) -> dict[str, list[str]]:
    """The keys a failed load_state_dict names: missing, unexpected, of the wrong shape."""
    text = str(e)
    found = {what: re.findall(r'"([^"]+)"', m.group(1)) for what in ("missing", "unexpected")
             if (m := re.search(what.capitalize() + r" key\(s\) in state_dict: (.*)", text))}
    return {**found, "wrong shape": re.findall(r"size mismatch for ([^:\s]+):", text)}


def mismatch(e: BaseException) -> str:
    """What a failed load_state_dict names (three keys of each kind), or the error's first line."""
    return keys_named(mismatched_keys(e)) or f"{type(e).__name__}: {first_line(e)}"


def keys_named(found: dict[str, list[str]]) -> str:
    """'missing: a, b; unexpected: c...': the first three keys of each kind of mismatch."""
    return "; ".join(f"{what}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}"
                     for what, keys in found.items() if keys)


def of_model(arch: str, classes: list[str], model: dict[str, Any], preprocess: imgcls_preprocess.Preprocess,
             mode: str = "scratch",
             **training: Any) -> dict[str, Any]:
    """A checkpoint in this layout: the model and what describes it, plus any training fields."""
    return {"kind": KIND, "version": VERSION, "arch": arch, "mode": mode, "classes": list(classes),
            "preprocess": preprocess.to_dict(), "model": model, **training}


def temperature(ckpt: dict[str, Any], source: str | Path = "the checkpoint") -> float | None:
    """The fitted temperature, or None for a model trained before calibration (use 1)."""
    if not ckpt.get("calibration"):
        return None
    return checked_temperature(ckpt["calibration"].get("temperature"), source)


def temperature_not_kept(ckpt: dict[str, Any]) -> str | None:
    """A note when training fitted a temperature and did not keep it (calibration.calibrate): temperature 1
    is then no fit of 1, but the raw softmax, chosen."""
    c = ckpt.get("calibration") or {}
    if c.get("kept") is not False:
        return None
    return (f"note: the temperature fitted when training ({c.get('fitted', float('nan')):.3f}) was not kept: it "
            "raised the calibration error on validation images it was not fitted on, so probabilities are the raw "
            "softmax (temperature 1)")


def fitted_elsewhere(ckpt: dict[str, Any], source: str | Path) -> str | None:
    """A note when the temperature (a multi-label model's thresholds) a checkpoint carries was fitted for
    another epoch's weights: last.pt keeps the best epoch's, which its resume goes on with."""
    epoch, best = ckpt.get("epoch"), ckpt.get("best_epoch")
    seen = (ckpt.get("progress") or {}).get("seen") or 0  # saved mid-epoch: steps past the epoch's end
    what = ("thresholds were", "they fit") if ckpt.get("multilabel") else \
        ("temperature was", "it fits") if ckpt.get("calibration") else None
    if what is None or epoch is None or best is None or (epoch == best and not seen):
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


def thresholds(ckpt: dict[str, Any], source: str | Path = "the checkpoint") -> list[float] | None:
    """A multi-label model's per-label thresholds; None for a single-label model."""
    if not ckpt.get("multilabel"):
        return None
    return checked_thresholds(ckpt.get("thresholds"), len(ckpt["classes"]), source)


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


def label_sep(ckpt: dict[str, Any]) -> str:
    """What separated the labels of the run's label file (a space unless --label-sep said otherwise)."""
    return str(ckpt.get("config", {}).get("label_sep") or " ")


def trained_with_flips(ckpt: dict[str, Any]) -> bool:
    """Whether the model saw mirror images in training (then test-time augmentation may flip): not with
    --hflip 0, --augment none, or transfer mode's feature cache (no augmentation at all)."""
    cfg = ckpt.get("config", {})
    augmented = cfg.get("augment", "basic") != "none" and not (cfg.get("mode") == "transfer" and
                                                               cfg.get("feature_cache", True))
    return augmented and float(cfg.get("hflip", 0.5)) > 0


def export_metadata(ckpt: dict[str, Any]) -> dict[str, str]:
    """What an exported model carries: class names, architecture, the input contract, and what turns
    its logits into probabilities (softmax(logits / temperature); a multi-label model's sigmoid and
    per-label thresholds) and allows test-time flips."""
    t, cuts = temperature(ckpt), thresholds(ckpt)
    return {"classes": json.dumps(ckpt["classes"]), "arch": ckpt["arch"],
            **imgcls_preprocess.Preprocess.from_dict(ckpt["preprocess"]).metadata(),
            **({"temperature": repr(t)} if t is not None else {}), "hflip": json.dumps(trained_with_flips(ckpt)),
            **({"multilabel": "true", "thresholds": json.dumps(cuts), "label_sep": label_sep(ckpt)}
               if cuts is not None else {})}


def for_inference(state: dict[str, Any]) -> dict[str, Any]:
    """best.pt's content: the model and what describes it, without the training state."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY}


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
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise UsageError(f"{path} is not a checkpoint made by train.py (no '{KIND}' marker)")
    if ckpt.get("version", 1) > VERSION:
        raise UsageError(f"{path} was written by a newer version of this toolkit (checkpoint version "
                         f"{ckpt['version']}, this one reads up to {VERSION}): update the code")
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
