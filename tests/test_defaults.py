"""Defaults that reach accuracy: the recipe per mode, the demo's own settings, EMA of the weights, an lr
finder whose suggestion is inside the stable region, curves and a runs table a person can read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import Killed, kill_after_saving, make_folder, train_args
from torch import nn

import runs
import train
from imgcls import checkpoint, plots
from imgcls.networks import build
from imgcls.recipes import MODERN_LR, RECIPES, with_recipe
from imgcls.training import ema as training_ema
from imgcls.training import lrfind
from imgcls.training.resume import resolve_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("defaults-data"), per_class=16)


def test_every_mode_takes_the_modern_recipe_and_fine_tuning_a_quarter_of_its_lr():
    for mode, lr in (("scratch", 2e-3), ("transfer", 2e-3), ("finetune", 5e-4)):  # (bench_recipes.py --finetune)
        settings = with_recipe({"data": "photos", "mode": mode})
        assert settings["recipe"] == "modern"
        assert {k: settings[k] for k in RECIPES["modern"]} == {**RECIPES["modern"], "lr": lr}


def test_any_option_given_overrides_the_recipe_and_recipe_seed_is_the_seeds_settings_exactly():
    given = with_recipe({"data": "photos", "mode": "scratch", "lr": 0.01, "scheduler": "step"})
    assert (given["lr"], given["scheduler"], given["optimizer"]) == (0.01, "step", "adamw")
    seed = with_recipe({"data": "photos", "mode": "scratch", "recipe": "seed"})
    assert {k: seed[k] for k in RECIPES["seed"]} == RECIPES["seed"] == {
        "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "step", "step_size": 7,
        "gamma": 0.1, "warmup_epochs": 0, "label_smoothing": 0.0}


def test_another_optimizer_given_under_the_modern_recipe_does_not_take_adamws_weight_decay():
    assert with_recipe({"data": "x", "mode": "scratch", "optimizer": "sgd"})["weight_decay"] == 0.0
    assert with_recipe({"data": "x", "mode": "scratch", "optimizer": "adamw"})["weight_decay"] == 0.05
    given = {"data": "x", "mode": "scratch", "optimizer": "adam", "weight_decay": 0.01}
    assert with_recipe(given)["weight_decay"] == 0.01


def test_the_modern_lr_scales_with_the_images_per_step():
    assert with_recipe({"data": "x", "mode": "scratch", "batch_size": 256})["lr"] == pytest.approx(0.004)
    assert with_recipe({"data": "x", "mode": "scratch", "batch_size": 64}, world=4)["lr"] == pytest.approx(0.004)


def test_the_demo_chooses_its_own_mode_size_epochs_and_no_flips_unless_told():
    demo = with_recipe({})
    assert (demo["mode"], demo["img_size"], demo["epochs"], demo["hflip"], demo["recipe"]) == \
        ("scratch", 32, 10, 0.0, "modern")
    assert with_recipe({"epochs": 3, "mode": "finetune"})["epochs"] == 3
    assert with_recipe({"mode": "finetune"})["recipe"] == "modern"
    assert "mode" not in with_recipe({"data": "photos"})  # a real folder keeps the usual defaults


def test_the_recipe_is_printed_at_the_start_and_stored_in_config_json(data, tmp_path, capsys):
    assert train.main(train_args(data, tmp_path / "run", "--mode", "scratch", "--lr", "0.003")) == 0
    out = capsys.readouterr().out
    assert "recipe modern: adamw lr 0.003" in out and "(given: --lr 0.003)" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["recipe"], saved["optimizer"], saved["lr"], saved["label_smoothing"]) == \
        ("modern", "adamw", 0.003, 0.1)


def test_a_resume_with_another_recipe_takes_its_settings_but_not_over_options_given(data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--recipe", "seed", "--lr", "0.02"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["recipe"], saved["optimizer"], saved["scheduler"], saved["lr"]) == ("seed", "sgd", "step", 0.02)


def test_ema_decay_warms_up_and_spans_about_a_tenth_of_a_short_run():
    net = nn.Linear(2, 2)
    assert training_ema.Ema(net, 0.9998, total_steps=100).decay == pytest.approx(0.9)
    assert training_ema.Ema(net, 0.9998, total_steps=10**7).decay == pytest.approx(0.9998)
    ema = training_ema.Ema(net, 0.9998, total_steps=10**7)
    ema.update()  # the first update copies
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.module.weight.clone()
    ema.update()  # second update: decay (1 + 1) / (10 + 1), far below 0.9998
    assert torch.allclose(ema.model.module.weight, before + 9 / 11, atol=1e-6)


def test_ema_is_validated_kept_when_better_and_a_resume_continues_it_exactly(data, tmp_path, monkeypatch):
    args = ("--mode", "scratch", "--ema", "--epochs", "3", "--save-interval", "0")
    assert train.main(train_args(data, tmp_path / "whole", *args)) == 0
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt")  # after the first epoch
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train.main(train_args(data, run, *args))
    monkeypatch.undo()
    assert train.main(["--resume", str(run)]) == 0
    rows = [line.split(",")[:7] for line in (run / "metrics.csv").read_text().splitlines()]
    assert rows[0][5:] == ["ema_val_loss", "ema_val_acc"] and len(rows) == 4
    assert rows == [line.split(",")[:7] for line in (tmp_path / "whole" / "metrics.csv").read_text().splitlines()]
    best = checkpoint.load(run / "best.pt")
    row = best["history"][best["best_epoch"] - 1]
    assert best["averaged"] == (row["ema_val_acc"] > row["val_acc"])
    assert best["best_acc"] == max(row["val_acc"], row["ema_val_acc"])
    assert "ema" in checkpoint.load(run / "last.pt") and "ema" not in best


def test_ema_on_the_feature_cache_averages_the_head_and_best_pt_loads(with_weights, data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "transfer", "--ema", "--epochs", "2")) == 0
    state = checkpoint.load(run / "last.pt")["ema"]["model"]
    assert {k for k in state if k != "n_averaged"} == {"module.weight", "module.bias"}  # the head alone
    from imgcls.networks import build

    build.from_checkpoint(checkpoint.load(run / "best.pt"))  # a complete network


def test_the_lr_suggestion_is_inside_the_stable_region():
    lrs = [10 ** (-6 + 0.1 * i) for i in range(60)]  # 1e-6 .. 1e-0.1
    losses = [2.3 - 2.0 / (1 + math.exp(-(math.log10(lr) + 3) * 3)) + (50 * lr) ** 2 for lr in lrs]
    found = lrfind.suggest_lr(lrs, losses)
    minimum = lrs[losses.index(min(losses))]
    assert found["minimum"] == minimum and found["lr"] <= minimum / 10 and found["lr"] <= found["steepest"]


def test_the_lr_range_test_scales_fp16_losses_so_small_gradients_still_train():
    """Under fp16 (GPUs without bf16) gradients below ~6e-8 round to zero unless the loss is scaled, as
    training scales it: here every gradient is that small, so an unscaled range test sees a flat curve."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    batch = (torch.ones(8, 4), torch.tensor([0, 1] * 4), None, None)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu")
    _, losses = lrfind.find_lr(net, [batch] * 40, optimizer,
                                 lambda logits, y: 1e-7 * nn.functional.cross_entropy(logits, y), lambda x: x,
                                 lambda: torch.autocast("cpu", dtype=torch.float16), torch.device("cpu"), scaler,
                                 start=1e2, end=1e9)
    assert max(losses) - min(losses) > 0.1 * min(losses)  # the weights moved: the loss fell, then blew up
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # and were put back
    assert scaler.get_scale() == 2.0 ** 16  # as was the scaler


def test_lr_find_without_out_gets_a_folder_named_for_it_with_its_numbers(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(data), "--img-size", "32", "--batch-size", "8", "--no-summary", "--mode", "scratch"]
    assert train.main([*args, "--lr-find"]) == 0
    [folder] = (tmp_path / "runs").iterdir()
    assert "-lr-find-" in folder.name and not (folder / "last.pt").exists()
    found = json.loads((folder / "lr_find.json").read_text())
    assert found["lr"] <= found["minimum"] / 10 and f"suggested --lr {found['lr']:.2g}" in capsys.readouterr().out


def test_curves_show_the_loss_on_a_log_scale_the_best_epoch_and_the_lr():
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 400.0 if e == 2 else 1 / e, "train_acc": 10 * e,
                "val_acc": [20, 10, 60, 50][e - 1], "lr": 0.1 / e} for e in range(1, 5)]
    fig = plots.curves_figure(history)
    loss, acc, lr = fig.axes
    assert loss.get_yscale() == "log" and "learning rate" in lr.get_ylabel()
    assert any(line.get_label() == "best epoch (3)" for line in acc.get_lines())


def test_runs_table_shows_data_size_recipe_and_time_across_resumes(data, tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    assert train.main(train_args(data, run, "--mode", "scratch")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    total = json.loads((run / "summary.json").read_text())["train_time_s"]
    capsys.readouterr()
    assert runs.main([str(tmp_path / "runs")]) == 0
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:6] == ["run", "data", "model", "mode", "size", "recipe"]
    assert line.split()[:6] == ["r", data.name, "resnet18", "scratch", "32", "modern"]
    assert line.split()[-1] == f"{total / 60:.1f}"


def test_the_lr_suggestion_never_comes_from_the_unsmoothed_start_of_a_flat_curve():
    lrs = [10 ** (-7 + 0.08 * i) for i in range(100)]
    losses = [1.40] + [1.46 + 0.02 * (i % 2) for i in range(1, 60)] + [1.45 - 0.001 * i for i in range(40)]
    found = lrfind.suggest_lr(lrs, losses)
    assert found["lr"] > lrs[5] and found["minimum"] > lrs[5]


def test_an_lr_find_folder_is_not_a_run_to_resume(data, tmp_path, capsys):
    out = tmp_path / "lf"
    assert train.main(train_args(data, out, "--mode", "scratch", "--lr-find")) == 0
    with pytest.raises(SystemExit) as stop:
        train.run(["--resume", str(out)])
    assert stop.value.code == 2 and "holds an lr range test, not a run" in capsys.readouterr().err


def test_a_resumed_run_is_listed_by_its_newest_epochs_not_its_old_summary(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "r"
    assert train.main(train_args(data, run, "--mode", "scratch", "--save-interval", "0")) == 0
    kill_after_saving(monkeypatch, lambda state, path: path.name == "last.pt")
    with pytest.raises(Killed):
        train.main(["--resume", str(run), "--epochs", "3"])
    monkeypatch.undo()
    capsys.readouterr()
    assert runs.main([str(tmp_path / "runs")]) == 0
    assert "2/3 (unfinished)" in capsys.readouterr().out


def test_the_accuracy_a_run_prints_is_what_eval_py_computes_for_its_best_pt(tmp_path):
    import numpy as np
    from PIL import Image

    import eval as evaluate

    rng = np.random.default_rng(0)
    root = tmp_path / "hard"
    for c in range(4):  # noise with a faint stripe per class: near ties, where reduced precision flips answers
        for split, n in (("train", 32), ("val", 8)):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.normal(128, 40, (36, 36, 3))
                pixels[:, 8 * c:8 * c + 4] += 12
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    run = tmp_path / "run"
    assert train.main(["--data", str(root), "--out", str(run), "--img-size", "32", "--epochs", "3", "--batch-size",
                       "16", "--seed", "1", "--mode", "scratch", "--ema", "--hflip", "0", "--no-summary"]) == 0
    assert evaluate.main([str(root / "val"), "--checkpoint", str(run), "--out", str(tmp_path / "e")]) == 0
    reported = json.loads((run / "summary.json").read_text())["best_val_acc"]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["accuracy"] == pytest.approx(reported)


def test_curves_keep_the_ema_line_when_ema_was_on_for_some_epochs_only():
    history = [{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 50, "val_acc": 50, "lr": 0.1}
               for e in range(1, 4)]
    history[2] |= {"ema_val_loss": 0.9, "ema_val_acc": 60}
    _, acc, _ = plots.curves_figure(history).axes
    assert "val, EMA weights" in [line.get_label() for line in acc.get_lines()]


def test_a_run_from_before_the_recipes_resumes_as_the_seed_recipe(data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--recipe", "seed")) == 0
    state = checkpoint.load(run / "last.pt")
    del state["config"]["recipe"]  # as written before recipes existed
    checkpoint.save(state, run / "last.pt")
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["recipe"] == "seed"


def test_resuming_a_seed_run_with_the_modern_recipe_takes_all_of_it(data, tmp_path):
    run = tmp_path / "run"
    assert train.main(train_args(data, run, "--mode", "scratch", "--recipe", "seed")) == 0
    assert train.main(["--resume", str(run), "--epochs", "2", "--recipe", "modern"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["optimizer"], saved["weight_decay"], saved["lr"]) == ("adamw", 0.05, 0.000707)  # batch 8


@pytest.mark.parametrize("recorded", [True, False], ids=["settings-given-recorded", "run-from-before-the-record"])
def test_a_resume_with_another_optimizer_has_the_settings_a_new_run_with_those_flags_has(data, tmp_path, recorded):
    run, new = tmp_path / "run", tmp_path / "new"
    assert train.main(train_args(data, run, "--mode", "scratch", "--lr", "0.003")) == 0
    if not recorded:  # as saved before the given settings were recorded: inferred from what differs
        state = checkpoint.load(run / "last.pt")
        del state["config"]["given"]
        checkpoint.save(state, run / "last.pt")
    # the settings each would train with (training them proves nothing more: resolve_config decides)
    resumed, _ = resolve_config(train.read_command_line(["--resume", str(run), "--epochs", "2",
                                                                  "--optimizer", "sgd"]))
    fresh, _ = resolve_config(train.read_command_line(
        train_args(data, new, "--mode", "scratch", "--lr", "0.003", "--optimizer", "sgd")))
    assert resumed.weight_decay == fresh.weight_decay == 0.0  # not the modern recipe's AdamW 0.05
    assert resumed.lr == fresh.lr == 0.003  # given at the start: kept


def test_the_modern_recipe_takes_the_lr_of_the_networks_family():
    for family, lr in MODERN_LR.items():
        assert with_recipe({"data": "x", "mode": "scratch", "model": "m"}, family=family)["lr"] == lr
    assert (build.family("vgg11"), build.family("resnet18"), build.family("convnext_tiny")) == \
        ("plain", "batchnorm", "layernorm")


def test_the_lr_the_recipe_chose_for_the_family_is_said_at_the_start(data, tmp_path, capsys):
    assert train.main(train_args(data, tmp_path / "run", "--mode", "scratch", "--model", "squeezenet1_1")) == 0
    lr = round(MODERN_LR["plain"] * math.sqrt(8 / 64), 6)  # (batch 8)
    assert f"recipe modern: adamw lr {lr:g} (for networks without normalisation layers)" in capsys.readouterr().out
