"""A run that is failing says so while it runs (health.py), and BatchNorm statistics that fit the weights
(precise BN): each warning provoked, healthy runs quiet, the statistics exactly those of the images."""

from __future__ import annotations

import json
import multiprocessing
import os
import types
from pathlib import Path

import pytest
import torch
from conftest import call, make_folder, train_args
from torch import nn

import train
from imgcls.data.loaders import make_loader, shard
from imgcls.networks import build as networks_build
from imgcls.training import batchnorm, step
from imgcls.training.health import Health, chance_limit
from imgcls.training.loop import Validation

# ----------------------------------------------------------------------------- the checks, on histories


def epochs(*rows: tuple[float, float, float, float]) -> list[dict]:
    """History rows from (train_loss, train_acc, val_loss, val_acc)."""
    return [dict(epoch=i + 1, train_loss=a, train_acc=b, val_loss=c, val_acc=d) for i, (a, b, c, d) in enumerate(rows)]


HEALTHY = epochs((2.2, 20, 2.0, 30), (1.8, 40, 1.6, 45), (1.5, 55, 1.3, 58), (1.3, 62, 1.2, 63), (1.2, 66, 1.15, 65))


def no_batchnorm() -> None:
    return None


def test_a_healthy_history_gives_no_warning():
    health = Health(chance_val=10.0, chance_train=10.0, classes=10)
    assert [health.check(HEALTHY[:k], no_batchnorm) for k in range(1, 6)] == [[]] * 5


def test_validation_at_chance_while_training_learns_is_said_once_with_batch_statistics_as_the_cause():
    history = epochs((2.3, 15, 2.4, 9.1), (2.0, 33, 3.0, 9.1), (1.7, 45, 3.2, 9.1), (1.4, 56, 3.2, 9.1))
    health = Health(chance_val=9.1, chance_train=9.1, classes=11)
    assert health.check(history[:2], lambda: 50.0) == []  # too early to tell
    (line,) = health.check(history[:3], lambda: 46.6)
    assert "validation accuracy is at chance (9.1%" in line and "training accuracy rose to 45.0%" in line
    assert "each batch's own BatchNorm statistics validation reaches 46.6%" in line and "drop --no-precise-bn" in line
    assert health.check(history, lambda: 46.6) == []  # said once


def test_validation_at_chance_without_a_batchnorm_cause_points_to_the_validation_images():
    history = epochs((2.3, 15, 2.4, 9.1), (2.0, 33, 2.5, 9.1), (1.7, 45, 2.6, 9.1))
    (line,) = Health(chance_val=9.1, chance_train=9.1, classes=11).check(history, no_batchnorm)
    assert "another kind" in line and "BatchNorm" not in line


def test_training_accuracy_at_chance_after_a_few_epochs_says_the_network_is_not_learning():
    history = epochs((1.10, 34, 1.10, 33), (1.10, 33, 1.10, 33), (1.10, 35, 1.10, 33))
    (line,) = Health(chance_val=33.3, chance_train=34.0, classes=3).check(history, no_batchnorm)
    assert "training accuracy is still at chance (35.0%" in line and "--lr-find" in line


def test_a_long_run_starting_slowly_is_judged_after_a_share_of_its_epochs():
    """VGG11 on the digits, 15 epochs: training at chance for 3 epochs, then it learns (77.5% at the end)."""
    slow = epochs((2.32, 7.7, 2.30, 10.0), (2.31, 10.6, 2.30, 16.7), (2.30, 10.6, 2.28, 20.0), (2.29, 10.8, 2.2, 20.8))
    health = Health(chance_val=10.0, chance_train=10.0, classes=10, epochs=15)
    assert health.check(slow, no_batchnorm) == []  # 4 epochs of 15: too early to say
    stuck = epochs(*[(2.3, 10.5, 2.3, 10.0)] * 5)
    (line,) = health.check(stuck, no_batchnorm)  # 5 of 15 (30%) at chance: not learning
    assert line.startswith("training accuracy is still at chance")


def test_a_training_loss_above_a_uniform_guess_or_rising_twice_points_to_lr_find():
    blown = Health(chance_val=10, chance_train=10, classes=10).check(epochs((10.9, 9, 2.4, 10)), no_batchnorm)
    assert len(blown) == 1 and "rose above where it started" in blown[0] and "--lr-find" in blown[0]
    history = epochs((1.5, 50, 1.4, 50), (1.7, 45, 1.6, 45), (1.9, 40, 1.8, 40))
    (line,) = Health(chance_val=10, chance_train=10, classes=10).check(history, no_batchnorm)
    assert "rose over epochs 1-3 (1.500 -> 1.900)" in line


def test_rising_validation_loss_with_training_far_ahead_is_over_fitting():
    history = epochs((1.0, 70, 1.0, 60), (0.5, 85, 0.9, 62), (0.3, 93, 1.05, 61), (0.1, 99, 1.2, 60))
    health = Health(chance_val=25, chance_train=25, classes=4)
    assert health.check(history[:3], no_batchnorm) == []  # one rise is not a trend
    (line,) = health.check(history, no_batchnorm)
    assert line.startswith("over-fitting: training accuracy 99.0% against 60.0%") and "--patience" in line


def test_chance_level_allows_half_the_largest_share_at_most_five_points():
    assert (chance_limit(50.0), chance_limit(9.0), chance_limit(1.0)) == (55.0, 13.5, 1.5)


# ----------------------------------------------------------------------------- precise BN


def test_recomputed_batchnorm_statistics_are_those_of_the_images_with_dropout_off():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.9), nn.BatchNorm2d(4, momentum=0.1))
    net.train()
    images = [torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8) for _ in range(3)]
    loader = [(x, torch.zeros(8, dtype=torch.long), None, 0) for x in images]
    to_input = lambda x: x.float() / 255
    assert batchnorm.recompute_batchnorm(net, ["2"], loader, to_input, torch.no_grad) == 24
    with torch.no_grad():
        out = [net[0](to_input(x)) for x in images]  # no dropout: evaluation's features
    mean = torch.stack([o.mean((0, 2, 3)) for o in out]).mean(0)
    var = torch.stack([o.var((0, 2, 3)) for o in out]).mean(0)  # (BatchNorm keeps the unbiased variance)
    assert torch.allclose(net[2].running_mean, mean, atol=1e-6) and torch.allclose(net[2].running_var, var, atol=1e-6)
    assert net.training and net[1].training and net[2].momentum == 0.1  # modes and momentum as they were


def test_batchnorm_statistics_are_kept_when_no_image_could_be_read():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(0.5)
    unreadable = [(None, torch.empty(0, dtype=torch.long), None, 8)]
    assert batchnorm.recompute_batchnorm(net, ["1"], unreadable, lambda x: x, torch.no_grad) == 0
    assert torch.all(net[1].running_mean == 0.5) and torch.all(net[1].running_var == 1)


def frozen_statistics(monkeypatch) -> None:
    """A network whose BatchNorm layers never update their running statistics (momentum 0): they stay at
    their start (mean 0, variance 1), which fits no trained weights: the mismatch made certain."""
    real = networks_build.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
        return model

    monkeypatch.setattr(networks_build, "build_model", build)


MISMATCH = ("--model", "mobilenet_v2", "--mode", "scratch", "--epochs", "3", "--hflip", "0", "--lr", "0.003")


@pytest.fixture(scope="module")
def many_colours(tmp_path_factory) -> Path:
    """3 colours x 80: enough steps that training accuracy is far above chance by epoch 3 on any CPU (36
    images left it at chance with one thread and not with two)."""
    return make_folder(tmp_path_factory.mktemp("many"), per_class=80)


def test_a_batchnorm_mismatch_is_said_with_its_cause_and_kept_in_summary_and_tensorboard(many_colours, tmp_path,
                                                                                         monkeypatch, capsys):
    """The batch statistics are those of mixed batches: validation images come class by class, and batches of
    one class each gave chance too, so the cause was not named."""
    frozen_statistics(monkeypatch)
    run = tmp_path / "run"
    assert call(train.main, train_args(many_colours, run, *MISMATCH, "--no-precise-bn")) == 0
    err = capsys.readouterr().err
    assert "warning: validation accuracy is at chance" in err and "BatchNorm statistics" in err
    warnings = json.loads((run / "summary.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("validation accuracy is at chance")
    events = b"".join(p.read_bytes() for p in run.glob("events.out.tfevents.*"))
    assert b"validation accuracy is at chance" in events  # the text tab


def test_precise_bn_gives_the_same_network_statistics_that_fit_and_no_warning(many_colours, tmp_path, monkeypatch,
                                                                              capsys):
    frozen_statistics(monkeypatch)
    run = tmp_path / "run"
    assert call(train.main, train_args(many_colours, run, *MISMATCH)) == 0
    captured = capsys.readouterr()
    assert "BatchNorm statistics: recomputed from" in captured.out and "warning" not in captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["warnings"] == [] and summary["best_val_acc"] > 60  # 3 colours: chance is 33%


def test_random_labels_say_the_network_is_not_learning(tmp_path, capsys):
    from conftest import COLOURS, make_image

    # the same colour in every class: nothing to learn. 1200 images: training accuracy at chance then varies
    # by ~1.5 points between runs, well inside the 5 of chance_limit (with 36 it reached 43%)
    for i in range(1200):
        (tmp_path / "data" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        make_image(COLOURS["blue"], seed=i).save(tmp_path / "data" / f"c{i % 3}" / f"{i}.png")
    run = tmp_path / "run"
    assert call(train.main, train_args(tmp_path / "data", run, "--mode", "scratch", "--epochs", "3",
                                       "--batch-size", "32")) == 0
    assert "warning: training accuracy is still at chance" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["warnings"][0].startswith("training accuracy is still")


def test_a_diverged_run_stops_at_once_says_what_to_change_and_records_it(colours, tmp_path, capsys):
    run = tmp_path / "run"
    assert call(train.main, train_args(colours, run, "--mode", "scratch", "--epochs", "3", "--lr", "1e30",
                                       "--warmup-epochs", "0")) == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "the training diverged; try --lr 3.3e+29" in err and "--lr-find" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "diverged" and "the training diverged" in summary["warnings"][0]


def test_a_healthy_run_is_quiet(trained_run):
    assert json.loads((trained_run / "summary.json").read_text())["warnings"] == []


@pytest.mark.parametrize("precision,advice", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_the_advice_on_a_nan_names_fp16_only_where_it_ran(precision, advice):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    optimizer.param_groups[0]["base_lr"] = 0.3
    learner = step.Learner(nn.Identity(), optimizer, None, None, None, None, torch.device("cpu"), None,
                             precision=precision)
    said = str(learner.diverged("loss became nan at epoch 1, batch 2"))
    assert ("--no-amp" in said) == advice and "try --lr 0.1 (a third" in said


# ----------------------------------------------------------------------------- the batch-statistics comparison


class ClassByClass(torch.utils.data.Dataset):
    """`n` plain 8 px images of three classes (grey levels 0, 60, 120), class by class as validation's come."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        c = i * 3 // self.n
        return torch.full((3, 8, 8), 60 * c, dtype=torch.uint8), c, i


def grey_levels(n: int, batch: int, sync: bool = False, rank: int = 0, world: int = 1) -> Validation:
    """A Validation whose network tells the grey levels apart only with each batch's own BatchNorm statistics
    (those of mixed batches centre on the middle level): with its running statistics it answers the middle
    class for every image."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(3, affine=False), nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():
        net[3].weight.copy_(torch.tensor([[-1.0, 0, 0], [0, 0, 0], [1, 0, 0]]))
        net[3].bias.copy_(torch.tensor([-0.5, 0, -0.5]))
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync else net
    learner = types.SimpleNamespace(device=torch.device("cpu"), to_input=lambda x: x.float() / 255, ema=None)
    run = types.SimpleNamespace(split=types.SimpleNamespace(classes=["a", "b", "c"], multilabel=False), lead=rank == 0)
    loader = make_loader(shard(ClassByClass(n), rank, world), batch, 0, torch.device("cpu"))
    return Validation(net.eval(), learner, run, loader, ["1"], None)


@pytest.mark.parametrize("n", [16, 17, 33])
def test_batch_statistics_are_measured_when_the_last_batch_holds_one_image(n):
    """A lone last image has no batch statistics (BatchNorm refuses a batch of one on a 1x1 map: ResNet18 at
    32 px): it joins the batch before it, where it made the whole comparison None ('validation images of
    another kind' said for a BatchNorm mismatch)."""
    assert grey_levels(n, 16).batch_statistics() == 100.0


def batch_statistics_as_rank(rank: int, port: int, n: int, sync: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo")
    try:
        found = grey_levels(n, 16, sync, rank, 2).batch_statistics()
        Path(out, f"rank-{rank}.json").write_text(json.dumps(found))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("n,sync", [(33, False), (32, True)])
def test_batch_statistics_under_torchrun_agree_on_every_rank_and_never_wait_forever(n, sync, tmp_path):
    """Two ranks (gloo): 33 images are 17 on rank 0 (a last batch of one) and 16 on rank 1: rank 0 gave up
    before the all-reduce that rank 1 had joined (in a run, rank 0's next collective met it: mixed-up sums or a
    hang). With --sync-bn the copy's BatchNorm layers use each rank's own batches (SyncBatchNorm would wait on
    the other ranks' batches, whose counts differ, and refuses a CPU: None on every rank)."""
    from test_distributed import free_port

    port, ctx = free_port(), multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=batch_statistics_as_rank, args=(rank, port, n, sync, str(tmp_path))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0, 0]
    assert [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)] == [100.0, 100.0]
