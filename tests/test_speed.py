"""Speed-ups change nothing but speed: the same seed and settings give the same results without them.

Speed itself is measured by bench/bench_train.py (ratios against a baseline in one run), not here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, train_args
from PIL import Image

import train
from imgcls.data import images, loaders
from imgcls.errors import TrainingError
from imgcls.training import ema as training_ema
from imgcls.training import features, step


def history(run: Path) -> list[float]:
    """train loss, train acc, val loss, val acc of every epoch, in one flat list."""
    rows = (run / "metrics.csv").read_text().strip().splitlines()[1:]
    return [float(v) for r in rows for v in r.split(",")[1:5]]


def test_the_decoded_image_cache_gives_exactly_the_same_run(colours, tmp_path):
    args = ("--mode", "scratch", "--epochs", "2", "--optimizer", "adam")
    assert train.main(train_args(colours, tmp_path / "cached", *args)) == 0
    assert train.main(train_args(colours, tmp_path / "plain", *args, "--no-image-cache")) == 0
    assert history(tmp_path / "cached") == pytest.approx(history(tmp_path / "plain"), abs=1e-5)


def test_a_first_run_decodes_each_image_once_for_the_check_and_the_cache(colours, tmp_path, monkeypatch):
    decoded = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    args = ("--mode", "scratch", "--epochs", "2", "--cache-dir", str(tmp_path / "cache"))
    assert train.main(train_args(colours, tmp_path / "run", *args)) == 0
    assert len(decoded) == 36  # 3 classes x 12 images, then every epoch reads the cache


def test_a_run_with_a_test_split_decodes_each_image_once_into_one_cache(colours, tmp_path, monkeypatch):
    """The check caches what it decodes, test images included (it must check them): training uses that cache."""
    decoded = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    args = ("--mode", "scratch", "--cache-dir", str(tmp_path / "cache"), "--test-split", "0.25")
    assert train.main(train_args(colours, tmp_path / "run", *args)) == 0
    assert len(decoded) == 36
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 2  # pixels and readable flags


def test_the_image_cache_deleted_before_a_resume_is_rebuilt(colours, tmp_path):
    args = ("--mode", "scratch", "--optimizer", "adam", "--cache-dir", str(tmp_path / "cache"))
    assert train.main(train_args(colours, tmp_path / "whole", *args, "--epochs", "2")) == 0
    assert train.main(train_args(colours, tmp_path / "run", *args)) == 0
    for f in (tmp_path / "cache" / "images").iterdir():
        f.unlink()
    assert train.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--no-summary"]) == 0
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 2  # pixels and readable flags
    assert history(tmp_path / "run") == pytest.approx(history(tmp_path / "whole"), abs=1e-5)


def test_dataloader_workers_give_exactly_the_same_run(colours, tmp_path):
    args = ("--mode", "scratch", "--epochs", "1", "--augment", "none")
    assert train.main(train_args(colours, tmp_path / "w0", *args, "--workers", "0")) == 0
    assert train.main(train_args(colours, tmp_path / "w2", *args, "--workers", "2")) == 0
    assert history(tmp_path / "w0") == pytest.approx(history(tmp_path / "w2"), abs=1e-5)


def test_the_transfer_feature_cache_matches_the_exact_path(colours, tmp_path, with_weights):
    # without augmentation the two paths compute the same function: same accuracy, near-same loss
    args = ("--mode", "transfer", "--model", "mobilenet_v2", "--epochs", "3", "--augment", "none",
            "--optimizer", "adam", "--lr", "0.01")
    assert train.main(train_args(colours, tmp_path / "feat", *args)) == 0
    assert train.main(train_args(colours, tmp_path / "exact", *args, "--no-feature-cache")) == 0
    fast, exact = history(tmp_path / "feat"), history(tmp_path / "exact")
    assert fast[3::4] == exact[3::4]  # val accuracy, epoch by epoch
    assert fast[0::4] == pytest.approx(exact[0::4], rel=1e-3)  # train loss


def test_large_jpegs_are_decoded_at_reduced_scale_to_the_same_picture(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((3000, 2000), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=90)
    fast = images.load_image(tmp_path / "big.jpg", 256).astype(float)
    full = Image.open(tmp_path / "big.jpg").convert("RGB")
    s = 2000
    reference = np.asarray(full.resize((256, 256), Image.BILINEAR, box=(500, 0, 500 + s, s)), dtype=float)
    assert np.abs(fast - reference).mean() < 3  # of 255: the same picture
    assert Image.open(tmp_path / "big.jpg").size == (3000, 2000)


def test_mixed_precision_learns_as_well_as_full_precision(colours, tmp_path):
    # bf16 autocast is on where the CPU has native bf16 (and on CUDA); elsewhere both runs are fp32
    args = ("--mode", "scratch", "--epochs", "3", "--optimizer", "adam", "--hflip", "0")
    assert train.main(train_args(colours, tmp_path / "amp", *args, "--amp")) == 0
    assert train.main(train_args(colours, tmp_path / "fp32", *args, "--no-amp")) == 0
    amp, fp32 = history(tmp_path / "amp"), history(tmp_path / "fp32")
    assert max(amp[3::4]) >= 66.6 and max(fp32[3::4]) >= 66.6
    assert abs(max(amp[3::4]) - max(fp32[3::4])) <= 100 / 6 + 1e-6  # at most one of six val images


def test_a_non_finite_loss_is_caught_before_the_step_changes_the_weights():
    """The loss is read after the backward pass is queued (one host sync per step, the GPU kept busy),
    but before the optimizer step: a NaN batch stops the run with the weights and the optimizer as they were."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    learner = step.Learner(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(),
                             lambda x: x.float(), contextlib.nullcontext, torch.device("cpu"), lambda a, b: 1.0)
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    loss, correct = step.train_step(learner, x, y, "batch 1")
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(net(x), y).item(), abs=1.0) and 0 <= correct <= 4
    before = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[net[1].weight].items()}
    with pytest.raises(TrainingError, match="loss became nan at batch 2"):
        step.train_step(learner, torch.full_like(x, float("nan")), y, "batch 2")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.equal(v, optimizer.state[net[1].weight][k]) for k, v in state.items())
    assert all(p.grad is None for p in net.parameters())


def test_a_loader_starts_no_more_workers_than_an_epoch_has_batches():
    device = torch.device("cpu")
    assert loaders.make_loader(features.Features(torch.zeros(12, 2), [0] * 12), 8, 8, device).num_workers == 2
    sampler = loaders.ResumableSampler(40, seed=0)
    sampler.set_epoch(0, start=39)  # a resume near the end of an epoch: later epochs are whole again
    assert loaders.make_loader(features.Features(torch.zeros(40, 2), [0] * 40), 8, 8, device, sampler).num_workers == 5


def test_the_ema_update_is_averaged_models_arithmetic_without_its_host_syncs():
    """Our EMA update does what torch's AveragedModel.update_parameters did with our averaging function
    (first update a copy, then a lerp; counters copied), with no CPU counter moved to the device each step."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.rand(2, 3, 6, 6))
    ema = training_ema.Ema(net, 0.99, total_steps=1000)
    steps = []

    def average(averaged, current, _):
        decay = min(ema.decay, (1 + len(steps)) / (10 + len(steps)))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    reference = AveragedModel(net, multi_avg_fn=average, use_buffers=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        net.train()
        optimizer.zero_grad()
        net(torch.rand(4, 3, 6, 6)).sum().backward()
        optimizer.step()
        ema.update()
        reference.update_parameters(net)
        steps.append(1)
    ours, theirs = ema.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and int(ours["n_averaged"]) == 5
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_training_loss_is_torchs_cross_entropy(smoothing, weighted):
    """Class weights with label smoothing are computed without torch's masked_select (a host sync per
    step on a GPU), to the same value; soft targets (mixup) go through torch's own."""
    from imgcls.training import losses

    torch.manual_seed(0)
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weight = torch.rand(5) + 0.5 if weighted else None
    ours = losses.CrossEntropy(weight=weight, label_smoothing=smoothing)
    torchs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
    assert float(ours(logits, target)) == pytest.approx(float(torchs(logits, target)), rel=1e-6)
    soft = torch.softmax(torch.randn(16, 5), 1)
    assert float(ours(logits, soft)) == pytest.approx(float(torchs(logits, soft)), rel=1e-6)


FAULTS_PER_BATCH = """
import resource, sys, threading, torch
from imgcls import checkpoint
from imgcls.evaluation.predictor import load_model
from imgcls.networks import build
checkpoint.save(checkpoint.of_model("mobilenet_v2", list("ab"), build.build_model("mobilenet_v2", 2).state_dict(),
                                    build.preprocessing("mobilenet_v2", 224)), sys.argv[1])
loaded = load_model(sys.argv[1], "cpu")
x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
faults = []
def batches():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loaded(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
where = sys.argv[2]
if where == "thread":  # as serve.py's model thread
    t = threading.Thread(target=batches)
    t.start()
    t.join()
else:
    batches()
print(min(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuned is glibc's")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_loaded_model_on_the_cpu_keeps_its_freed_memory_between_batches(tmp_path, where):
    """glibc hands a batch's large activations back to the OS when they are freed and page-faults them in again
    for the next batch (MobileNetV2 in batches of 8 ran at half the speed): from the main heap past its trim
    threshold, and from a thread's own heaps whenever one is wholly free (a server's speed then changed from
    one start to the next). In a fresh process: the setting is the process's, and a test before may have made it."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_BATCH, str(tmp_path / "m.pt"), where], cwd=ROOT, text=True,
                         capture_output=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert int(out.split()[-1]) < 1000  # (9000-50000 without: a fault per 4 KB page of its activations)


THREADS_KEPT = """
import threading, torch
from imgcls.machine import set_thread_threads
set_thread_threads(1)
first_set, other_set, seen = threading.Event(), threading.Event(), []
def model_thread():
    set_thread_threads(2)
    first_set.set()
    other_set.wait()
    torch.ones(2**20).sum()  # a first parallel operation in this thread
    seen.append(torch.get_num_threads())
t = threading.Thread(target=model_thread)
t.start()
first_set.wait()
threading.Thread(target=set_thread_threads, args=(1,)).start()  # as a server's decoding threads, made after
other_set.set()
t.join()
print(seen[0])
"""


def test_a_threads_torch_thread_count_stays_when_a_later_thread_sets_its_own():
    """torch.set_num_threads alone also sets a default that a thread takes at its first parallel operation,
    over its own count: serve.py's model ran on one core when its decoding threads were set to one after it.
    In a fresh process: the count is per process, and the suite's own must not change."""
    out = subprocess.run([sys.executable, "-c", THREADS_KEPT], cwd=ROOT, text=True, capture_output=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "4"}).stdout
    assert out.split()[-1] == "2"
