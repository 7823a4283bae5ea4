"""Probabilities a user can threshold: temperature scaling, ECE, "unknown", risk-coverage, TTA, top-k."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import call

import eval as evaluate
import test as predict
from imgcls import checkpoint
from imgcls.evaluation import calibration, predictor

needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")



def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def models_of_both_kinds(trained_run, tmp_path_factory) -> dict[str, Path]:
    """The trained run's best.pt with a temperature of 0.6 (what a few validation images made of it on this
    machine does not matter here), and (when onnxruntime is installed) its ONNX export."""
    ckpt = checkpoint.load(trained_run / "best.pt")
    ckpt["calibration"] |= {"temperature": 0.6, "fitted": 0.6, "kept": True}
    kinds = {"pt": tmp_path_factory.mktemp("calibrated") / "best.pt"}
    checkpoint.save(ckpt, kinds["pt"])
    if importlib.util.find_spec("onnxruntime") is not None:
        import export

        kinds["onnx"] = tmp_path_factory.mktemp("onnx") / "model.onnx"
        assert export.main(["--checkpoint", str(kinds["pt"]), "--format", "onnx", "--out", str(kinds["onnx"])]) == 0
    return kinds


def kind_param() -> list:
    return ["pt", pytest.param("onnx", marks=needs_onnx)]


# ----------------------------------------------------------------------------- the measures

def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 5, generator=g)
    labels = torch.multinomial((logits / 2).softmax(1), 1, generator=g)[:, 0]
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_a_validation_set_without_mistakes_does_not_drive_the_temperature_to_an_extreme():
    logits, labels = 4 * torch.eye(3), torch.arange(3)
    assert 0.5 < calibration.fit_temperature(logits, labels) < 1.0  # sharper, but not the 0.05 bound


def test_processes_holding_shards_of_the_validation_set_fit_the_same_temperature_as_one_holding_all():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3000, 4, generator=g)
    labels = torch.multinomial((logits * 0.7).softmax(1), 1, generator=g)[:, 0]
    shards, found = (slice(0, 1000), slice(1000, 3000)), [0.0, 0.0]
    barrier, values = threading.Barrier(2), [None, None]

    def all_reduce(rank: int, t: torch.Tensor) -> torch.Tensor:  # what torch.distributed does between processes
        values[rank] = t.clone()
        barrier.wait()
        total = values[0] + values[1]
        barrier.wait()
        return total

    def process(rank: int) -> None:
        found[rank] = calibration.fit_temperature(logits[shards[rank]], labels[shards[rank]],
                                                  lambda t: all_reduce(rank, t))

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found[0] == found[1] == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-6)


def test_the_calibration_error_is_measured_on_validation_images_the_temperature_was_not_fitted_on():
    """Each half of the validation images (every other image of each class) calibrated by the temperature
    fitted on the other half: the error a new image can expect, not the fit's own."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(400, 5, generator=g)
    labels = torch.multinomial((logits / 2).softmax(1), 1, generator=g)[:, 0]
    c = calibration.calibrate(logits, labels)
    first = calibration.halves(labels)
    assert first.sum() in (200, 201) and all(abs(2 * int(first[labels == k].sum()) - int((labels == k).sum())) <= 1
                                             for k in range(5))  # every other image of each class
    t_first, t_second = (calibration.fit_temperature(logits[m], labels[m]) for m in (first, ~first))
    held = torch.cat([calibration.probabilities(logits[first], t_second),
                      calibration.probabilities(logits[~first], t_first)])
    assert c["ece"] == pytest.approx(calibration.ece(held, torch.cat([labels[first], labels[~first]])))
    assert c["ece_raw"] == pytest.approx(calibration.ece(calibration.probabilities(logits), labels))
    assert c["fitted"] == pytest.approx(calibration.fit_temperature(logits, labels))
    assert c["kept"] and c["temperature"] == c["fitted"] and c["ece"] < 0.5 * c["ece_raw"] and c["images"] == 400


def test_a_temperature_that_raises_the_held_out_calibration_error_is_not_kept():
    """Mostly right at 88%, and two mistakes at 98%: the likelihood wants a softer model (T 1.4), which makes
    the right answers less sure than they are; on the images it was not fitted on the error rises."""
    logits, labels = torch.zeros(20, 2), torch.zeros(20, dtype=torch.long)
    logits[:18, 0], logits[18:, 1] = 2.0, 4.0
    c = calibration.calibrate(logits, labels)
    assert c["fitted"] > 1.2 and c["ece"] > c["ece_raw"]
    assert not c["kept"] and c["temperature"] == 1.0


def test_ece_is_the_gap_between_confidence_and_accuracy():
    probs = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4)  # 90% sure, right 60% of the time
    assert calibration.ece(probs, labels) == pytest.approx(0.3)


def test_risk_coverage_keeps_the_images_at_or_above_each_threshold():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    rows = {r["threshold"]: r for r in calibration.risk_coverage(probs, labels, [0.0, 0.6, 0.7, 0.99])}
    assert rows[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 75.0}
    assert rows[0.6] == {"threshold": 0.6, "coverage": 0.75, "accuracy": pytest.approx(200 / 3)}
    assert rows[0.7]["coverage"] == 0.5 and rows[0.7]["accuracy"] == 100.0
    assert rows[0.99] == {"threshold": 0.99, "coverage": 0.0, "accuracy": None}


def test_top_k_accuracy_counts_the_true_class_among_the_k_most_probable():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    labels = torch.tensor([0, 1, 2])
    assert [calibration.topk_accuracy(probs, labels, k) for k in (1, 2, 3, 5)] == \
        pytest.approx([100 / 3, 200 / 3, 100, 100])


def test_tta_mirrors_only_models_trained_with_flips():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert len(predictor.tta_views(x, flips=False)) == 4
    views = predictor.tta_views(x, flips=True)
    assert len(views) == 6 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[4], x.flip(-1))


# ----------------------------------------------------------------------------- training and the scripts

def test_training_stores_the_temperature_that_minimises_the_validation_loss_when_it_carries(trained_run, capsys):
    ckpt = checkpoint.load(trained_run / "best.pt")
    c = ckpt["calibration"]
    assert set(c) == {"temperature", "fitted", "kept", "ece_raw", "ece", "ece_in_sample", "images"}
    loaded = predictor.load_model(trained_run / "best.pt", "cpu")
    val = json.loads((trained_run / "split.json").read_text())["val"]
    logits, labels, _ = predictor.run_model(loaded, [(p, y) for p, y in val], 8, 0, show=False)
    assert c["fitted"] == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-4)
    assert c["kept"] == (c["ece"] <= c["ece_raw"]) and c["temperature"] == (c["fitted"] if c["kept"] else 1.0)
    assert json.loads((trained_run / "summary.json").read_text())["calibration"] == c


@pytest.mark.parametrize("kind", kind_param())
def test_test_py_writes_the_softmax_of_the_logits_divided_by_the_temperature(kind, models_of_both_kinds,
                                                                           colours_eval, tmp_path):
    model = models_of_both_kinds[kind]
    assert call(predict.main, [str(colours_eval), "--checkpoint", str(model), "--out", str(tmp_path / "p")]) == 0
    temperature = checkpoint.load(models_of_both_kinds["pt"])["calibration"]["temperature"]
    loaded = predictor.load_model(models_of_both_kinds["pt"], "cpu")
    assert loaded.temperature == temperature and temperature != 1
    for row in read_csv(tmp_path / "p" / "predictions.csv"):
        logits = loaded(torch.stack(list(predictor.input_images(loaded, [row["path"]]))))[0]
        expected = (logits / temperature).softmax(0).max()
        assert float(row["probability"]) == pytest.approx(float(expected), abs=2e-4)


@needs_onnx
def test_the_onnx_export_carries_the_temperature_and_the_flip_setting(models_of_both_kinds):
    onnx = predictor.OnnxModel(models_of_both_kinds["onnx"])
    assert onnx.temperature == checkpoint.load(models_of_both_kinds["pt"])["calibration"]["temperature"]
    assert onnx.flips is False  # the run was trained with --hflip 0


def test_eval_reports_ece_before_and_after_the_temperature_and_draws_the_reliability_diagram(
        trained_run, colours_eval, tmp_path, capsys):
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["calibrated"] is True
    assert m["temperature"] == checkpoint.temperature(checkpoint.load(trained_run / "best.pt"))
    assert set(m["ece"]) == {"raw", "calibrated"} and len(m["reliability"]["calibrated"]["count"]) == 15
    assert sum(m["reliability"]["raw"]["count"]) == m["images"]
    assert "expected calibration error" in capsys.readouterr().out
    assert (tmp_path / "e" / "reliability.png").stat().st_size > 10_000


def test_eval_of_a_model_trained_before_calibration_says_its_temperature_is_1(trained_run, colours_eval, tmp_path,
                                                                              capsys):
    old = checkpoint.load(trained_run / "best.pt")
    del old["calibration"]
    checkpoint.save(old, tmp_path / "old.pt")
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "old.pt"), "--out",
                                str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["calibrated"] is False and m["temperature"] == 1.0 and m["ece"]["raw"] == m["ece"]["calibrated"]
    assert "no fitted temperature" in capsys.readouterr().out


@pytest.mark.parametrize("kind", kind_param())
def test_reject_below_labels_the_images_under_the_threshold_unknown(kind, models_of_both_kinds, colours_eval,
                                                                   tmp_path):
    model = str(models_of_both_kinds[kind])
    assert call(predict.main, [str(colours_eval), "--checkpoint", model, "--out", str(tmp_path / "all")]) == 0
    plain = read_csv(tmp_path / "all" / "predictions.csv")
    threshold = sorted(float(r["probability"]) for r in plain)[len(plain) // 2]  # half of them below
    assert call(predict.main, [str(colours_eval), "--checkpoint", model, "--reject-below", str(threshold),
                               "--out", str(tmp_path / "some")]) == 0
    for before, after in zip(plain, read_csv(tmp_path / "some" / "predictions.csv"), strict=True):
        below = float(before["probability"]) < threshold
        assert after["label"] == ("unknown" if below else before["label"])
        assert after["probability"] == before["probability"]


@pytest.mark.parametrize("value", ["1.0000001", "-0.1", "nan"])
def test_reject_below_must_be_a_probability(value, capsys):
    assert call(predict.main, ["somewhere", "--reject-below", value]) == 2
    assert f"--reject-below {value} is not a probability" in capsys.readouterr().err


@pytest.mark.parametrize("kind", kind_param())
def test_eval_with_tta_reports_the_accuracy_with_and_without(kind, models_of_both_kinds, colours_eval, tmp_path,
                                                             capsys):
    model = str(models_of_both_kinds[kind])
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", model, "--out", str(tmp_path / "plain")]) == 0
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", model, "--tta", "--out", str(tmp_path / "tta")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    tta = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert tta["accuracy_without_tta"] == pytest.approx(plain["accuracy"])
    assert tta["tta_accuracy"] == pytest.approx(tta["accuracy"]) and "tta_accuracy" not in plain
    said = capsys.readouterr().out
    assert "With test-time augmentation" in said and "with test-time augmentation (averaged" in said
    assert "test.py --tta --reject-below P" in said


def test_test_py_with_tta_averages_the_probabilities_of_the_views(trained_run, colours_eval, tmp_path):
    path = str(next((colours_eval / "red").iterdir()))
    assert call(predict.main, [path, "--checkpoint", str(trained_run), "--tta", "--out", str(tmp_path / "p")]) == 0
    loaded = predictor.load_model(trained_run / "best.pt", "cpu")
    image = torch.stack(list(predictor.input_images(loaded, [path])))
    views = torch.stack([loaded(v)[0] for v in predictor.tta_views(image, loaded.flips)])
    expected = (views / loaded.temperature).softmax(1).mean(0).max()
    assert float(read_csv(tmp_path / "p" / "predictions.csv")[0]["probability"]) == pytest.approx(float(expected),
                                                                                                 abs=2e-4)


def test_eval_reports_top_k_accuracy_with_k_below_the_number_of_classes(trained_run, colours_eval, tmp_path):
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [k for k in m if k.startswith("top")] == ["top2_accuracy"]  # 3 classes: top-3 would always be 100%
    assert m["top2_accuracy"] >= m["accuracy"]


def test_a_phone_export_given_to_eval_or_test_is_refused_by_name(colours_eval, tmp_path, capsys):
    (tmp_path / "model.pte").write_bytes(b"not for eval")
    for entry in (evaluate.main, predict.main):
        assert call(entry, [str(colours_eval), "--checkpoint", str(tmp_path / "model.pte")]) == 2
        assert "executorch export for phones" in capsys.readouterr().err


def test_a_checkpoint_of_another_epoch_than_the_best_says_its_temperature_was_fitted_for_the_best(
        trained_run, colours_eval, tmp_path, capsys):
    """last.pt carries the best epoch's temperature (a resume needs it), fitted for other weights."""
    later = checkpoint.load(trained_run / "last.pt")
    later["epoch"], later["best_epoch"] = 3, 2
    checkpoint.save(later, tmp_path / "last.pt")
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "last.pt"), "--out",
                                str(tmp_path / "e")]) == 0
    assert "fitted for the best epoch (2)" in capsys.readouterr().out
    later["epoch"], later["progress"]["seen"] = 2, 4  # saved mid-epoch, four images after the best epoch
    checkpoint.save(later, tmp_path / "last.pt")
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "last.pt"), "--out",
                                str(tmp_path / "e3")]) == 0
    assert "holds epoch 2 and 4 images of epoch 3; its temperature was fitted" in capsys.readouterr().out
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(trained_run / "best.pt"), "--out",
                                str(tmp_path / "e2")]) == 0  # the best epoch's own model: nothing to say
    assert "fitted for the best epoch" not in capsys.readouterr().out


def test_the_risk_coverage_lines_say_when_no_threshold_keeps_an_image(capsys):
    from imgcls.evaluation import report
    from imgcls.evaluation.result import Confidence, Ece, EvalResult

    rows = [{"threshold": t, "coverage": 0.0, "accuracy": None} for t in (0.5, 0.8, 0.9, 0.95)]
    report.print_confidence(EvalResult(classes=["a", "b"], images=0, confidence=Confidence(
        temperature=1.0, calibrated=True, ece=Ece(raw=0.1, calibrated=0.1), risk_coverage=rows)))
    assert capsys.readouterr().out.splitlines()[-1].endswith("no P of 0.5 or more keeps any image")


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "warm"])
def test_an_invalid_temperature_in_a_checkpoint_is_refused_in_one_line(value, trained_run, colours_eval, tmp_path,
                                                                       capsys):
    bad = checkpoint.load(trained_run / "best.pt")
    bad["calibration"]["temperature"] = value
    checkpoint.save(bad, tmp_path / "bad.pt")
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "bad.pt"), "--out",
                                str(tmp_path / "e")]) == 2
    assert "invalid temperature" in capsys.readouterr().err


def test_tta_does_not_mirror_a_model_that_never_saw_a_mirror_image():
    def flips(**config) -> bool:
        return checkpoint.trained_with_flips({"config": {"mode": "scratch", "hflip": 0.5, "augment": "basic"} | config})

    assert flips()
    assert not flips(hflip=0.0)
    assert not flips(augment="none")
    assert not flips(mode="transfer", feature_cache=True)  # trained on cached features: no augmentation
    assert flips(mode="transfer", feature_cache=False)


def test_eval_writes_one_self_contained_report_with_the_images_of_each_confusion_cell(trained_run, colours_eval,
                                                                                     tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colours_eval, data)
    shutil.copy(next((data / "red").iterdir()), data / "blue" / "actually-red.png")  # one sure mistake
    assert call(evaluate.main, [str(data), "--checkpoint", str(trained_run), "--out", str(tmp_path / "e")]) == 0
    html = (tmp_path / "e" / "report.html").read_text()
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    page = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html).group(1))
    cm = m["confusion_matrix"]
    assert {key: cell["count"] for key, cell in page["cells"].items()} == \
        {f"{i},{j}": n for i, row in enumerate(cm) for j, n in enumerate(row) if n}
    assert all(len(cell["thumbs"]) == cell["count"] for cell in page["cells"].values())  # few images: all shown
    assert html.count("data:image/png;base64,") == 3  # reliability, risk-coverage, worst mistakes
    assert "actually-red.png" in html and "http://" not in html and "https://" not in html


def test_report_thumbnails_stay_within_their_budget_mistakes_first(colours_eval, monkeypatch):
    from imgcls.evaluation import report

    monkeypatch.setattr(report, "ALL_THUMBS", 10)
    monkeypatch.setattr(report, "CELL_THUMBS", 4)
    paths = sorted(str(p) for p in colours_eval.rglob("*.png"))  # 18 images
    results = [report.Result(p, k % 3, k % 3 if k < 12 else (k + 1) % 3, 0.5) for k, p in enumerate(paths)]
    cm = [[0] * 3 for _ in range(3)]
    for r in results:
        cm[r.true][r.predicted] += 1
    cells = report.confusion_cells(results, cm)
    assert sum(len(c.thumbs) for c in cells.values()) == 10
    assert {k: c.count for k, c in cells.items()} == {(t, q): n for t, row in enumerate(cm) for q, n in enumerate(row)
                                                      if n}
    assert all(len(c.thumbs) == c.count for (t, q), c in cells.items() if t != q)  # the mistakes are all shown


def test_a_report_of_many_classes_shows_the_most_confused_ones_in_its_matrix(tmp_path):
    from imgcls.evaluation import report_html
    from imgcls.evaluation.result import EvalResult

    n = 150
    cm = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    cm[7][9] = cm[140][3] = 2
    classes = [f"class{i}" for i in range(n)]
    shown = report_html.matrix_classes(cm, limit=100)
    assert len(shown) == 100 and {3, 7, 9, 140} <= set(shown)
    result = EvalResult(classes=classes, images=sum(map(sum, cm)), confusion_matrix=cm)
    report_html.write_html(tmp_path / "r.html", result, {}, [])
    page = (tmp_path / "r.html").read_text()
    assert page.count("<tr><th title=") == 100 and "100 of 150 classes most involved in mistakes" in page


def test_reject_below_decides_on_the_probability_as_shown(colours_eval, tmp_path, capsys):
    """An image shown at 0.8163 is kept at --reject-below 0.8163, whatever the digits beyond the shown four;
    one shown at 0.8162 is not: the file, the screen and the decision say the same."""
    from imgcls.evaluation import predictions

    paths = sorted(str(p) for p in (colours_eval / "red").iterdir())[:3]
    results = {0: [("red", 0.81629997), ("blue", 0.1)], 1: [("red", 0.81624), ("blue", 0.1)],
               2: [("red", 0.8164), ("blue", 0.1)]}
    predictions.write_predictions(tmp_path, paths, results, 2, 4, 2**20, reject_below=0.8163)
    rows = read_csv(tmp_path / "predictions.csv")
    assert [(r["label"], r["probability"]) for r in rows] == [("red", "0.8163"), ("unknown", "0.8162"),
                                                             ("red", "0.8164")]
    out = capsys.readouterr().out
    assert "red (81.63%)" in out and "unknown (below 0.8163; best guesses: red (81.62%)" in out


def test_risk_coverage_counts_an_image_as_test_py_decides_it():
    probs = torch.tensor([[0.79999, 0.20001], [0.7, 0.3]])
    rows = {r["threshold"]: r for r in calibration.risk_coverage(probs, torch.tensor([0, 0]), [0.8])}
    assert rows[0.8]["coverage"] == 0.5  # shown as 0.8000: kept by test.py --reject-below 0.8


def test_eval_says_when_the_temperature_fitted_in_training_was_not_kept(trained_run, colours_eval, tmp_path, capsys):
    ckpt = checkpoint.load(trained_run / "best.pt")
    ckpt["calibration"] |= {"temperature": 1.0, "fitted": 0.256, "kept": False}
    checkpoint.save(ckpt, tmp_path / "raw.pt")
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(tmp_path / "raw.pt"), "--out",
                                str(tmp_path / "e")]) == 0
    assert "temperature fitted when training (0.256) was not kept" in capsys.readouterr().out
