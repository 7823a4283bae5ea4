"""Training recipes: optimizers, schedules, imbalance, early stopping, the LR finder, comparing runs."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch
from conftest import make_folder, train_args

import runs
import train
from imgcls.data import loaders
from imgcls.settings import TrainConfig
from imgcls.training import losses, optim


def lrs(cfg: TrainConfig, steps_per_epoch: int = 10) -> list[float]:
    """The learning rate at every step of a run with these settings."""
    schedule = optim.Schedule(cfg)
    return [cfg.lr * schedule(s / steps_per_epoch, (s + 1) / steps_per_epoch)
            for s in range(cfg.epochs * steps_per_epoch)]


def test_step_schedule_drops_by_gamma_every_step_size_epochs():
    curve = lrs(TrainConfig(lr=0.1, epochs=15, scheduler="step", step_size=7, gamma=0.1))
    assert curve[0] == curve[69] == pytest.approx(0.1)
    assert curve[70] == curve[139] == pytest.approx(0.01)
    assert curve[140] == pytest.approx(0.001)


def test_cosine_schedule_falls_from_lr_to_zero_after_warmup():
    curve = lrs(TrainConfig(lr=0.1, epochs=10, scheduler="cosine", warmup_epochs=2))
    assert curve[0] == pytest.approx(0.1 / 20)  # warm-up starts small
    assert curve[19] == pytest.approx(0.1)  # ... and reaches lr
    assert curve[60] == pytest.approx(0.05, rel=0.05)  # half-way through the cosine
    assert curve[-1] < 0.001 and all(a >= b for a, b in itertools.pairwise(curve[20:]))


def test_onecycle_rises_to_lr_then_anneals():
    curve = lrs(TrainConfig(lr=0.1, epochs=10, scheduler="onecycle"))
    peak = max(range(len(curve)), key=curve.__getitem__)
    assert curve[0] == pytest.approx(0.004) and curve[peak] == pytest.approx(0.1, rel=1e-3)
    assert 25 <= peak <= 35 and curve[-1] < 0.001


def test_plateau_schedule_cuts_the_lr_after_epochs_without_improvement():
    schedule = optim.Schedule(TrainConfig(scheduler="plateau", gamma=0.5))
    for acc in (50, 60, 60, 60, 60):
        schedule.end_epoch(acc)
    assert schedule(5, 5.1) == pytest.approx(0.5)


def test_no_schedule_keeps_the_lr():
    assert set(lrs(TrainConfig(lr=0.02, epochs=3, scheduler="none"))) == {0.02}


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_choice_and_weight_decay_reach_the_optimizer(name, cls):
    from imgcls.networks import build

    model = build.build_model("resnet18", 3)
    opt = optim.make_optimizer(TrainConfig(optimizer=name, weight_decay=0.01, lr=0.1), model)
    assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 0.01


def test_backbone_lr_multiplier_gives_pretrained_layers_a_smaller_lr():
    from imgcls.networks import build

    model = build.build_model("resnet18", 3)
    opt = optim.make_optimizer(TrainConfig(lr=0.1, backbone_lr_mult=0.1), model)
    head, backbone = opt.param_groups
    assert head["lr"] == 0.1 and backbone["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}


def test_auto_class_weights_are_inverse_frequency():
    w = losses.class_weights([90, 10])
    assert w[1] / w[0] == pytest.approx(9.0)
    assert (w * torch.tensor([90.0, 10.0])).sum() == pytest.approx(100.0)  # one per image on average


def test_balanced_sampler_draws_each_class_about_equally():
    labels = [0] * 90 + [1] * 10
    weights = torch.tensor([1 / 90 if y == 0 else 1 / 10 for y in labels], dtype=torch.double)
    sampler = loaders.ResumableSampler(len(labels), seed=0, weights=weights)
    drawn = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn.update(labels[i] for i, *_ in sampler)
    assert drawn[1] / sum(drawn.values()) == pytest.approx(0.5, abs=0.05)


def test_each_draw_of_an_image_in_an_epoch_is_augmented_on_its_own_and_reproducibly(colours):
    """A rare image drawn many times by the balanced sampler is as many views of it, not copies of one; the
    same views on a second pass and when the epoch is resumed part-way."""
    from imgcls.data import datasets

    items = [(str(p), 0) for p in sorted(colours.glob("*/*.png"))[:16]]
    ds = datasets.ImageDataset(items, 32, datasets.train_transform(28), seed=5)
    weights = torch.tensor([100.0] + [1.0] * 15, dtype=torch.double)  # image 0 drawn about 14 times of 16
    sampler = loaders.ResumableSampler(16, seed=0, weights=weights)
    sampler.set_epoch(3)
    keys = list(sampler)
    views = [ds[key][0] for key in keys if key[0] == 0]
    assert len(views) >= 8 and len({v.numpy().tobytes() for v in views}) == len(views)
    assert all(torch.equal(v, ds[key][0]) for v, key in zip(views, [k for k in keys if k[0] == 0]))
    sampler.set_epoch(3, start=10)
    assert list(sampler) == keys[10:]


def test_balanced_sampler_draws_only_the_cached_features_that_exist(colours, tmp_path, with_weights, monkeypatch):
    from imgcls.data import images
    from imgcls.data import split as data_split

    split = data_split.prepare_data(str(colours))
    lost, real = split.train[0][0], images.load_image  # passed the check, unreadable when features are made

    def load(path, size, *rest):
        if path == lost:
            raise images.BadImage("gone")
        return real(path, size, *rest)

    monkeypatch.setattr(images, "load_image", load)
    assert train.main(train_args(colours, tmp_path / "r", "--mode", "transfer", "--balanced-sampler",
                                 "--no-image-cache", "--epochs", "2")) == 0


def test_sampler_resumes_mid_epoch_with_the_rest_of_the_same_order():
    sampler = loaders.ResumableSampler(20, seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=8)
    assert list(sampler) == whole[8:] and sorted(i for i, *_ in whole) == list(range(20))


def test_sampler_splits_an_epoch_across_ranks_without_overlap():
    parts = []
    for rank in range(3):
        s = loaders.ResumableSampler(10, seed=1, rank=rank, world=3)
        s.set_epoch(0)
        parts.append([i for i, *_ in s])
    assert all(len(p) == 4 for p in parts)
    assert set().union(*parts) == set(range(10))


def test_early_stopping_stops_after_patience_epochs_without_improvement(colours, tmp_path):
    # lr 0 can never improve on epoch 1
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--mode", "scratch", "--epochs", "10", "--lr", "1e-12",
                                 "--patience", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["best_epoch"] == 1


@pytest.mark.parametrize("extra", [["--augment", "randaugment", "--mixup", "0.2", "--cutmix", "1.0"],
                                   ["--augment", "trivialaugment", "--label-smoothing", "0.1",
                                    "--class-weights", "auto", "--balanced-sampler"]])
def test_augmentation_and_imbalance_options_train(extra, colours, tmp_path, capsys):
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch", *extra)) == 0
    if "--class-weights" in extra:
        out = capsys.readouterr().out
        assert "class weights: blue=1.00" in out and "balanced sampler" in out


def test_lr_find_writes_a_plot_suggests_an_lr_and_leaves_no_checkpoint(colours, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--mode", "scratch", "--lr-find")) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("suggested --lr"))
    assert 1e-7 <= float(line.split()[2]) <= 10
    assert (out / "lr_find.png").exists() and not (out / "last.pt").exists()


def test_runs_table_lists_runs_best_first(colours, tmp_path, capsys):
    for name, acc in (("weak", 40.0), ("strong", 90.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model": "resnet18", "mode": "scratch", "optimizer": "sgd", "lr": 0.001, "epochs": 3}))
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"best_val_acc": acc, "epochs": 3, "train_time_s": 60}))
    assert runs.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("strong") and lines[2].startswith("weak") and "90.00" in lines[1]


def test_hyper_parameters_and_final_metrics_go_to_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run))
    acc.Reload()
    assert {"train/loss", "val/acc", "lr", "train/img_per_s"} <= set(acc.Tags()["scalars"])
    assert "train/augmented" in acc.Tags()["images"]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert not math.isnan(acc.Scalars("val/acc")[-1].value)


def test_imbalanced_data_is_reported_by_the_check(tmp_path, capsys):
    from imgcls.data import report
    from imgcls.data import split as data_split

    make_folder(tmp_path, per_class=10, classes={"many": (0, 0, 0)})
    make_folder(tmp_path, per_class=2, classes={"few": (255, 255, 255)}, offset=9)
    report.report(data_split.prepare_data(str(tmp_path)))
    assert "imbalance (largest/smallest class): 5.0x" in capsys.readouterr().out


def test_label_smoothing_keeps_a_loss_for_confident_correct_predictions():
    logits, target = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])
    plain = losses.make_criterion(TrainConfig(), [5, 5, 5])(logits, target)
    smooth = losses.make_criterion(TrainConfig(label_smoothing=0.1), [5, 5, 5])(logits, target)
    assert plain < 1e-6 < 0.5 < smooth


def test_mixup_and_cutmix_blend_images_and_labels():
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)] * 4)
    y = torch.tensor([0, 1] * 4)
    torch.manual_seed(0)
    mixed_x, soft = losses.make_mix(TrainConfig(mixup=1.0, cutmix=1.0), 2)(x, y)
    assert soft.shape == (8, 2) and torch.allclose(soft.sum(1), torch.ones(8))
    assert ((soft > 0) & (soft < 1)).any()  # soft labels, not one-hot
    assert not torch.equal(mixed_x, x)  # images blended or pasted
    assert losses.make_mix(TrainConfig(), 2) is None


@pytest.mark.parametrize("preset,op", [("randaugment", "RandAugment"), ("trivialaugment", "TrivialAugmentWide")])
def test_augmentation_presets_use_torchvision_policies(preset, op):
    from imgcls.data import datasets

    tf = datasets.train_transform(32, preset)
    assert op in [type(t).__name__ for t in tf.transforms]
    assert tf(torch.zeros(3, 40, 40, dtype=torch.uint8)).shape == (3, 32, 32)


def test_the_backbone_lr_multiplier_applies_to_pretrained_layers_only():
    from imgcls.networks import build

    model = build.build_model("resnet18", 3)
    opt = optim.make_optimizer(TrainConfig(lr=0.1, backbone_lr_mult=0.1, mode="scratch"), model)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]  # nothing is pretrained from scratch


def test_the_head_is_found_by_one_rule_before_and_after_it_is_replaced():
    import torchvision

    from imgcls.networks import build, heads

    for name in ("vgg11", "resnet18", "mobilenet_v2", "squeezenet1_0"):
        before, _ = heads.find_head(torchvision.models.get_model(name))
        model = build.build_model(name, 3)
        assert heads.head_of(model)[0] == before
        assert heads.head_of(build.from_checkpoint(
            {"arch": name, "classes": ["a", "b", "c"], "model": model.state_dict()}))[0] == before


def test_class_names_in_tensorboard_notes_are_shown_as_written_not_as_markdown(tmp_path):
    """TensorBoard renders text as Markdown: __background__ would be a bold 'background'."""
    from tensorboard import plugin_util
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = {"__background__": (0, 0, 0), "*star*": (255, 255, 255), "[link](x)": (255, 0, 0)}
    data = make_folder(tmp_path / "d", per_class=4, classes=names)
    assert train.main(train_args(data, tmp_path / "run", "--mode", "scratch", "--class-weights", "auto")) == 0
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("imbalance/text_summary")[0].tensor_proto.string_val[0].decode()
    page = plugin_util.markdown_to_safe_html(text)
    assert all(f"{name}=" in page for name in names), page
