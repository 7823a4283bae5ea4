"""test.py's job: predictions for image files (predictions.csv, probabilities, explanations), with the unknown label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from imgcls import files, plots
from imgcls.data import check, folders
from imgcls.errors import UsageError
from imgcls.evaluation import calibration, explain, multilabel
from imgcls.evaluation.predictor import Explainer, Loaded, input_images, load_model, run_model, thumbnail

NONE_FOUND = " (none found)"  # Grad-CAM's map is all negative: no region raises the class's score


def overlay_for(explainer: Explainer, image: torch.Tensor, c: int) -> tuple[np.ndarray, bool]:
    """The heatmap of the evidence for class `c` over the image, and whether there is any."""
    heat = explainer(image[None], torch.tensor([c]))[0]
    return explain.overlay(image.permute(1, 2, 0).numpy(), heat.numpy()), bool(heat.max() > 0)


def label(ckpt_path: Path, paths: list[str], out: Path, device: str, amp: bool, batch_size: int,
          workers: int | None, max_bytes: int, topk: int, grid: int, reject_below: float | None = None,
          tta: bool = False, explain_them: bool = False) -> int:
    """test.py's work: the top-k labels of each image (or "unknown" below --reject-below), printed and
    written with a picture; with `explain_them`, a heatmap per image."""
    loaded = load_model(ckpt_path, device, amp)
    if loaded.multilabel and reject_below is not None:
        raise UsageError(f"{ckpt_path} is a multi-label model: each label has its own threshold (tuned when training), "
                         "so --reject-below does not apply; drop it")
    if loaded.temperature is None and not loaded.multilabel:
        print("note: this model has no fitted temperature (trained before calibration): probabilities are the "
              "raw softmax")
    logits, _, idx = run_model(loaded, [(p, -1) for p in paths], batch_size, workers, max_bytes=max_bytes,
                               show=len(paths) > 256, tta=tta)
    k = min(topk, len(loaded.classes))
    results: dict[int, list[tuple[str, float]]] = {}
    present: dict[int, list[tuple[str, float]]] | None = {} if loaded.multilabel else None
    if len(idx):
        probs = loaded.probabilities(logits)
        top_p, top_i = probs.topk(k, dim=1)
        for row, i in enumerate(idx.tolist()):
            results[i] = [(loaded.classes[c], float(p)) for p, c in zip(top_p[row].tolist(), top_i[row].tolist())]
            if present is not None:  # every label at or above its threshold, the most probable first
                said = np.flatnonzero(multilabel.decide(probs[row:row + 1], loaded.thresholds)[0])
                present[i] = sorted(((loaded.classes[c], float(probs[row, c])) for c in said), key=lambda t: -t[1])
    write_predictions(out, paths, results, k, grid, max_bytes, reject_below, present, loaded.label_sep)
    if explain_them and results:
        write_explanations(out, loaded, paths, results, grid, max_bytes)
    elif explain_them:
        print("no readable image to explain")
    return 0


UNKNOWN = "unknown"


def write_predictions(out: Path, paths: list[str], results: dict[int, list[tuple[str, float]]], k: int, grid: int,
                      max_bytes: int, reject_below: float | None = None,
                      present: dict[int, list[tuple[str, float]]] | None = None, sep: str = " ") -> None:
    """predictions.csv and .png: each image's top-k labels (a multi-label model's: the labels at or above
    their thresholds, `present`), or why it could not be read."""
    rows, pictures, captions, colours = [], [], [], []
    for i, path in enumerate(paths):
        if present is not None and i in results:
            found = present[i]
            guesses = ", ".join(f"{lb} ({100 * p:.1f}%)" for lb, p in found)
            best = results[i][0]
            print(f"{folders.shown(path)}: " + (guesses or f"no label above its threshold (most likely: {best[0]}, "
                                                          f"{100 * best[1]:.1f}%)"))
            rows.append([path, sep.join(lb for lb, _ in found), probabilities_json(found), *top_cells(results[i], k),
                         "ok"])
            captions.append(", ".join(lb for lb, _ in found) or "(none)")
            colours.append("black" if found else "darkorange")
        elif i in results:
            top = results[i]
            rejected = reject_below is not None and not calibration.kept(top[0][1], reject_below)
            name = UNKNOWN if rejected else top[0][0]
            digits = 1 if reject_below is None else calibration.SHOWN_DIGITS - 2  # as decided: 81.63% for 0.8163
            guesses = ", ".join(f"{lb} ({100 * p:.{digits}f}%)" for lb, p in top)
            print(f"{folders.shown(path)}: " +
                  (f"{UNKNOWN} (below {reject_below:g}; best guesses: {guesses})" if rejected else guesses))
            rows.append([path, name, calibration.shown(top[0][1]), *top_cells(top, k),
                         f"{UNKNOWN}: below --reject-below {reject_below:g}" if rejected else "ok"])
            captions.append(f"{UNKNOWN} ({top[0][0]}? {100 * top[0][1]:.{digits}f}%)" if rejected
                            else f"{top[0][0]} ({100 * top[0][1]:.{digits}f}%)")
            colours.append("darkorange" if rejected else "black")
        else:
            reason = check.inspect_file(path, max_bytes=max_bytes)[0] or "unreadable"
            said = reason if reason.startswith("unreadable") else f"unreadable ({reason})"
            print(f"{folders.shown(path)}: {said}")
            rows.append([path, "", "", *top_cells([], k), f"unreadable: {reason}"])
            captions.append("unreadable")
            colours.append("red")
        if len(pictures) < grid:
            pictures.append(thumbnail(path) if i in results else None)
    top = [f"{what}_{j}" for j in range(1, k + 1) for what in ("label", "probability")]
    files.write_csv(out / "predictions.csv", ["path", "labels", "probabilities", *top, "status"] if present is not None
                    else ["path", "label", "probability", *top, "status"], rows)
    plots.save(plots.image_grid(pictures, captions[: len(pictures)], colours[: len(pictures)]),
               out / "predictions.png")
    print(f"wrote {out / 'predictions.csv'} and {out / 'predictions.png'}")


def top_cells(top: list[tuple[str, float]], k: int) -> list[str]:
    """The top-k columns of predictions.csv: label_1, probability_1, ... (empty for an unreadable image)."""
    cells = [cell for name, p in top for cell in (name, calibration.shown(p))]
    return cells + [""] * (2 * k - len(cells))


def probabilities_json(found: list[tuple[str, float]]) -> str:
    """Labels and their probabilities as one JSON object ({"sea": 0.93, "sky": 0.81}): a parser reads it
    whatever the labels hold (a `:` or `;` split the old `label:p;label:p`)."""
    return json.dumps({name: round(p, calibration.SHOWN_DIGITS) for name, p in found}, ensure_ascii=False)


def write_explanations(out: Path, loaded: Loaded, paths: list[str], results: dict[int, list[tuple[str, float]]],
                       grid: int, max_bytes: int) -> None:
    """explanations/NNNN-<name>.png per image: the image, the evidence for the predicted class, and for
    the true class when known (the image's folder is named after a class); explanations.png, a grid."""
    explainer = Explainer(loaded)
    print(explainer.note)
    folder = out / "explanations"
    folder.mkdir()
    cells, captions = [], []
    readable = sorted(results)
    for i, image in zip(readable, input_images(loaded, [paths[i] for i in readable], max_bytes)):
        if image is None:  # changed since it was predicted
            continue
        predicted = loaded.classes.index(results[i][0][0])
        true = folders.class_of(paths[i], loaded.classes)
        picture, found = overlay_for(explainer, image, predicted)
        pictures = [image.permute(1, 2, 0).numpy(), picture]
        names = [folders.shown(Path(paths[i]).name), f"evidence for {results[i][0][0]} ({100 * results[i][0][1]:.0f}%)"
                 + ("" if found else NONE_FOUND)]
        if true is not None and true != predicted:
            picture, found = overlay_for(explainer, image, true)
            pictures.append(picture)
            names.append(f"evidence for {loaded.classes[true]} (its folder)" + ("" if found else NONE_FOUND))
        plots.save(plots.image_grid(pictures, names, columns=3), folder / f"{i:04d}-{safe_stem(paths[i])}.png")
        if len(cells) < grid:
            cells.append(pictures[1])
            captions.append(names[1])
    plots.save(plots.image_grid(cells, captions), out / "explanations.png")
    print(f"wrote {folder}/ ({len(readable)} heatmaps, {explainer.method}) and {out / 'explanations.png'}")


def safe_stem(path: str) -> str:
    """A file name part that any file system takes."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)[:60] or "image"
