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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imgcls import files
from imgcls.cli import typed
from imgcls.errors import UsageError

KIND = "imgcls-checkpoint"
VERSION = 2  # 2: position in samples and epoch statistics ("progress"); the schedule is derived
RESUME_ONLY = ("optimizer", "scaler", "progress", "ema")
EXPORT_SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "torchscript": ".ptl"}  # export.py --format
INPUT_CONTRACT = ("float32 RGB in [0,1], N x 3 x img_size x img_size, resized (antialiased, with the interpolation "
                  "named) as crop_mode says, then centre-cropped: center, the shorter side to resize_size; squash, "
                  "the whole image to resize_size x resize_size; border, the longer side to resize_size, the rest "
                  "padded to a square with the mean colour; normalisation is inside the model; output: logits, "
                  "probabilities are "
                  "softmax(logits / temperature), or for a multilabel model sigmoid(logits), each label present "
                  "when its probability reaches its threshold")


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
        from dataset import eval_transform

        return eval_transform(self.img_size)


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


def interpolation(name: Any) -> str:
    """A saved interpolation name; bilinear for files from before it was saved (and for a name not known)."""
    return name if name in INTERPOLATIONS else "bilinear"


def crop_mode(name: Any) -> str:
    """A saved crop mode; center for files from before it was saved (and for a mode not known)."""
    return name if name in CROP_MODES else "center"


def of_model(arch: str, classes: list[str], model: dict[str, Any], preprocess: Preprocess, mode: str = "scratch",
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
            **Preprocess.from_dict(ckpt["preprocess"]).metadata(),
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


def find(given: str | None, name: str = "best.pt") -> Path:
    """--checkpoint as a file, a run folder (its best.pt), or absent: the newest runs/*/best.pt.
    A path that does not exist is refused here, before anything slow starts."""
    if given:
        path = Path(given)
        path = path / name if path.is_dir() else path
        if is_cv_folder(given):
            raise UsageError(k_fold_job(Path(given), name))
        if not path.is_file():
            folder = Path(given) if Path(given).is_dir() else Path(given).parent  # job/best.pt: the job's
            if fold_folders(folder, name):  # a job's folder without its cv.json (a copy, say)
                raise UsageError(k_fold_job(folder, name))
            raise UsageError(f"{missing(Path(given), name)}: give a run folder, a .pt from one, or an exported .onnx")
        return path
    found = newest_in_runs(name, folds=True)
    if found is None:
        raise UsageError(f"no runs/*/{name} found: train a model first (python train.py) or pass --checkpoint")
    if found.parent.parent != Path("runs"):  # a fold's: the newest in runs/ is a k-fold job, not one model
        raise UsageError(f"the newest model in runs/ is a k-fold job's: {k_fold_job(found.parent.parent, name)}; "
                         "or pass --checkpoint with another run")
    return found


CV_SETTINGS = "cv.json"  # in a k-fold job's folder (crossval.py): what marks it as one


def is_cv_folder(path: str | Path) -> bool:
    return (Path(path) / CV_SETTINGS).is_file()


def fold_folders(job: Path, name: str = "best.pt") -> list[Path]:
    """The `name` files of a k-fold job's folds (fold-1/, fold-2/, ...), in fold order."""
    folds = [p for p in job.glob(f"fold-*/{name}") if re.fullmatch(r"fold-\d+", p.parent.name)]
    return sorted(folds, key=lambda p: int(p.parent.name.split("-")[-1]))


def k_fold_job(job: Path, name: str) -> str:
    """A k-fold job holds a model per fold, each trained on other data: one is to be chosen."""
    folds = fold_folders(job, name)
    if not folds:
        return f"{job} is a k-fold job with no {name} yet: its folds have not finished an epoch"
    return (f"{job} is a k-fold job ({len(folds)} folds), a model per fold: give one fold's folder, e.g. "
            f"{folds[0].parent} (cv_summary.json compares them), or train on all the data without --folds")


def missing(given: Path, name: str) -> str:
    if not given.is_dir():
        return f"{given} does not exist"
    if (given / "config.json").is_file():
        return f"{given} has no {name} yet (the run has not finished an epoch)"
    return f"{given} is not a run folder (no {name}, no config.json)"


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def runnable(path: Path) -> Path:
    """A model eval.py and test.py can run: a .pt or an .onnx; the phone formats are refused by name."""
    fmt = {suffix: name for name, suffix in EXPORT_SUFFIX.items()}.get(path.suffix.lower())
    if fmt and fmt != "onnx":
        raise UsageError(f"{path} is a {fmt} export for phones: eval.py and test.py run a .pt (or its run folder) "
                         "or an .onnx")
    return path


def newest_in_runs(name: str, folds: bool = False) -> Path | None:
    """The most recently written runs/*/<name>, if any; with `folds`, k-fold jobs' folds (runs/*/fold-N/<name>)
    too."""
    found = [*Path("runs").glob(f"*/{name}"),
             *(p for job in (Path("runs").glob("*") if folds else ()) for p in fold_folders(job, name))]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# A run folder's marker of its first checkpoint: "saving" from its first best.pt until last.pt is written,
# "saved" from then on. A folder without last.pt whose marker says saved (or, made before the marker or
# copied without dot-files, that holds a best.pt) lost its last.pt; any other was stopped before its
# first checkpoint, and --resume starts it again.
CHECKPOINTED = ".checkpointed"


def marked(folder: Path) -> str | None:
    """The run folder's CHECKPOINTED marker: "saving", "saved", or None when there is none."""
    try:
        return (folder / CHECKPOINTED).read_text().strip()
    except OSError:
        return None


def lost_its_last_pt(folder: Path) -> bool:
    marker = marked(folder)
    if marker is not None:
        return marker != "saving"
    return (folder / "best.pt").is_file()  # (an older run, or a copy without its dot-files, that trained)


def resume_target(resume: str, out: str | None) -> tuple[Path, Path]:
    """(run folder, its last.pt) for --resume PATH (a run folder or a checkpoint in it) or 'auto'
    (--out's, else the newest run's). A folder with neither last.pt nor config.json is refused."""
    if resume == "auto" and not out:
        last = newest_in_runs("last.pt")
        if last is None:
            raise UsageError("--resume auto: no runs/*/last.pt to resume; start a run without --resume")
    elif resume == "auto" or Path(resume).is_dir():
        last = Path(out if resume == "auto" else resume) / "last.pt"
    else:
        last = Path(resume)
    folder = last.parent
    if not last.is_file() and (last.name != "last.pt" or not (folder / "config.json").is_file()):
        raise UsageError(f"nothing to resume: {last} does not exist")
    if not last.is_file() and lost_its_last_pt(folder):  # not a run stopped before its first checkpoint
        raise UsageError(f"{last}, the run's training state, is gone, so it cannot be resumed: start a new run "
                         f"(--weights {typed(folder / 'best.pt')} starts from its best model), or train it again from "
                         f"the start with its options and --out {typed(folder)} --overwrite")
    return folder, last
