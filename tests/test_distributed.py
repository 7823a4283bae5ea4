"""torchrun: the same train.py in several processes (CPU, gloo), exact metrics, one writer, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, make_folder, make_labelled_set, train_args

import eval as evaluate
from imgcls import checkpoint


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_folder(root / "train", per_class=8)
    make_folder(root / "val", per_class=3, offset=300)  # 9 images: 5 on one rank, 4 on the other
    return root


@pytest.fixture(scope="module")
def ddp_run(split_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    result = torchrun(train_args(split_data, out, "--mode", "scratch", "--optimizer", "adam"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_processes_train_and_state_the_effective_batch_size(ddp_run):
    _, result = ddp_run
    assert "distributed: 2 processes x 8 = 16 images per step" in result.stdout
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 reports


def test_the_run_folder_is_written_once(ddp_run):
    out, _ = ddp_run
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 2
    events = [p for p in out.glob("events.out.tfevents.*")]
    assert len(events) == 2  # the scalars and the hparams summary, from rank 0 only
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_validation_accuracy_equals_what_eval_py_computes_for_the_checkpoint(ddp_run, split_data, tmp_path):
    out, _ = ddp_run
    assert evaluate.main([str(split_data / "val"), "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 9
    assert metrics["accuracy"] == pytest.approx(json.loads((out / "summary.json").read_text())["best_val_acc"])


def test_the_temperature_is_fitted_on_the_validation_images_of_every_process(ddp_run, split_data):
    from imgcls.evaluation import calibration, predictor

    out, _ = ddp_run
    loaded = predictor.load_model(out / "best.pt", "cpu")
    items = [(str(p), loaded.classes.index(p.parent.name)) for p in sorted((split_data / "val").rglob("*.png"))]
    logits, labels, _ = predictor.run_model(loaded, items, 4, 0, show=False)
    assert len(labels) == 9
    c = checkpoint.load(out / "best.pt")["calibration"]
    assert c["fitted"] == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-4) and c["images"] == 9
    assert loaded.temperature == (c["fitted"] if c["kept"] else 1.0)


def test_resuming_under_torchrun_continues_at_the_next_epoch(ddp_run):
    out, _ = ddp_run
    result = torchrun(["--resume", str(out), "--epochs", "2", "--no-summary"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and result.stdout.count("epoch 2/2") == 1
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]


def test_resuming_with_another_number_of_processes_is_refused(ddp_run):
    out, _ = ddp_run
    config = (out / "config.json").read_text()
    result = subprocess.run([sys.executable, "train.py", "--resume", str(out), "--epochs", "3"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "saved by 2 process(es), this run has 1" in result.stderr
    assert (out / "config.json").read_text() == config  # refused before anything was written


def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path):
    result = torchrun(train_args(tmp_path / "no-such-folder", tmp_path / "run", "--mode", "scratch"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr


def test_ema_under_torchrun_is_validated_on_every_shard_and_saved_once(split_data, tmp_path):
    out = tmp_path / "run"
    result = torchrun(train_args(split_data, out, "--mode", "scratch", "--ema", "--epochs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ema_val_acc", "ema_val_loss"} <= set(header) and result.stdout.count("EMA") == 2
    assert "ema" in checkpoint.load(out / "last.pt") and "averaged" in checkpoint.load(out / "best.pt")


def test_a_multilabel_run_validates_and_tunes_thresholds_on_every_processs_images(tmp_path):
    """mAP and thresholds need all the validation images at once: each rank gathers the others' outputs."""
    from imgcls.evaluation import multilabel, predictor
    data = make_labelled_set(tmp_path / "data", 40, seed=4, split=True)  # 8 val rows: 4 on each rank
    out = tmp_path / "run"
    result = torchrun(train_args(data, out, "--mode", "scratch", "--optimizer", "adam"))
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((out / "split.json").read_text())
    loaded = predictor.load_model(out / "best.pt", "cpu")
    logits, y, _ = predictor.run_model(loaded, [(p, tuple(t)) for p, t in split["val"]], 4, 0, show=False)
    truth, probs = y.numpy().astype(int), loaded.probabilities(logits).numpy()
    assert len(truth) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_map"] == pytest.approx(multilabel.mean_ap(multilabel.average_precision(truth, probs)))
    assert loaded.thresholds == pytest.approx(multilabel.tune_thresholds(truth, probs), abs=1e-5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["scratch", "transfer"])
def test_each_machine_builds_its_caches_on_its_own_disk(mode, split_data, with_weights, tmp_path):
    """Two machines simulated on this one: two torchrun launchers, one process each, each with its own
    cache folder (a machine's local disk). Both caches are built; the run trains."""
    port, launchers = free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
               *train_args(split_data, tmp_path / "run", "--mode", mode)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "IMGCLS_CACHE": str(tmp_path / f"cache-{node}")}
        launchers.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outputs = [p.communicate(timeout=600) for p in launchers]
    assert all(p.returncode == 0 for p in launchers), outputs[1][1][-3000:] + outputs[0][1][-3000:]
    kind = "features/*.pt" if mode == "transfer" else "images/*px.npy"
    for node in (0, 1):
        assert list((tmp_path / f"cache-{node}").glob(kind)), f"machine {node} has no cache"


def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_quiet_on_the_other_machine(tmp_path):
    """Two simulated machines: the second one's process is not stopped by the first one's launcher, so
    it must learn from rank 0 that the run is off (before: a broken connection's traceback)."""
    make_folder(tmp_path / "one", per_class=4, classes={"only": (10, 20, 30)})
    port, launchers = free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
               *train_args(tmp_path / "one", tmp_path / "run", "--mode", "scratch")]
        launchers.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (_, first), (_, second) = (p.communicate(timeout=600) for p in launchers)
    assert first.count("error: only one class") == 1 and "error:" not in second
    # (torchrun itself reports a child that exited with an error; the child says nothing of its own)
    assert "RuntimeError" not in second and "broadcast_object_list" not in second, second[-3000:]
    assert launchers[1].returncode != 0 and not (tmp_path / "run").exists()


def check_as_a_machine(node: int, data: str, out: str, fault: str, dirs: bool) -> None:
    """Rank `node` of a two-machine job (gloo), the first process of its machine, with its own cache folder:
    rank 0 checks the data as training does (its sharer hands the other machine a share); what each
    machine inspected, the result (or error and what it printed) and its cache go to out/node-N.json.
    `fault`, planted on machine 1: "share" (bad input while checking its share), "finish" (while completing
    its cache), "die" (the process gone while checking). With `dirs`, each machine's cache folder is a
    --cache-dir of its own instead ($SLURM_TMPDIR, say)."""
    os.environ["IMGCLS_CACHE"] = os.path.join(out, f"cache-{node}")
    import contextlib
    import dataclasses
    import io

    import torch.distributed

    from imgcls.data import check, imagecache
    from imgcls.data import split as data_split
    from imgcls.errors import UsageError
    from imgcls.training import distributed

    inspected: list[str] = []
    real_inspect, real_finish = check.inspect_file, check.finish_cache

    def inspect_file(path, *args, **kwargs):
        if node == 1 and fault == "share":
            raise UsageError("planted: machine 1 cannot read its share")
        if node == 1 and fault == "die":
            os._exit(3)
        inspected.append(path)
        return real_inspect(path, *args, **kwargs)

    def finish_cache(*args, **kwargs):
        if node == 1 and fault == "finish":
            raise UsageError("planted: no space left on machine 1")
        return real_finish(*args, **kwargs)

    check.inspect_file, check.finish_cache = inspect_file, finish_cache
    rank, _, _ = distributed.init_distributed()
    report: dict = {"node": node}
    said = io.StringIO()
    own = os.path.join(out, f"cache-dir-{node}") if dirs else None
    try:
        with contextlib.redirect_stderr(said):
            split = data_split.DataSplit(**distributed.from_lead(lambda: dataclasses.asdict(data_split.prepare_data(
                data, cache_dir=own, cache_size=32, progress=False, share=distributed.share_check)), rank == 0,
                mine={"cache_dir": own}))
        report |= {"train": split.train, "val": split.val, "skipped": split.skipped,
                   "cache_ready": imagecache.ImageCache(split.files(), 32, cache_dir=own).ready}
    except BaseException as e:  # reported to the test
        report["error"] = f"{type(e).__name__}: {e}"
    report |= {"inspected": inspected, "stderr": said.getvalue()}
    Path(out, f"node-{node}.json").write_text(json.dumps(report))
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()


def as_rank(target: Callable, rank: int, machines: bool, port: int, *args: Any) -> None:
    """target(rank, *args) in a process set up as torchrun sets up rank `rank` of two (gloo on this
    machine's loopback); with `machines`, each the first process of its own machine."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0" if machines else str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    target(rank, *args)


def two_processes(target: Callable, *args: Any, machines: bool = False) -> list[int | None]:
    """target(rank, *args) in two fresh processes, as torchrun's two ranks; their exit codes."""
    import multiprocessing

    port, ctx = free_port(), multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=as_rank, args=(target, rank, machines, port, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return [p.exitcode for p in procs]


def two_machines(data: Path, out: Path, fault: str = "", dirs: bool = False) -> list[dict]:
    assert two_processes(check_as_a_machine, str(data), str(out), fault, dirs, machines=True) == \
        [0, 3 if fault == "die" else 0]
    return [json.loads((out / f"node-{node}.json").read_text()) if (out / f"node-{node}.json").exists() else {}
            for node in (0, 1)]


def test_the_file_check_is_shared_by_the_machines_and_each_fills_its_own_cache(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=6)
    make_folder(tmp_path / "data" / "val", per_class=2, offset=300)
    (tmp_path / "data" / "train" / "red" / "broken.jpg").write_bytes(b"not a picture")
    first, second = two_machines(tmp_path / "data", tmp_path)
    assert "error" not in first and "error" not in second, (first, second)
    everything = sorted(str(p) for p in (tmp_path / "data").rglob("*.*"))
    assert not set(first["inspected"]) & set(second["inspected"])  # each file checked once, on one machine
    assert sorted(first["inspected"] + second["inspected"]) == everything
    assert abs(len(first["inspected"]) - len(second["inspected"])) <= 1
    assert first["train"] == second["train"] and first["val"] == second["val"] and len(first["val"]) == 6
    assert [Path(p).name for p, _ in first["skipped"]] == ["broken.jpg"]  # found by whichever machine checked it
    assert first["cache_ready"] and second["cache_ready"]  # each machine's own cache folder, complete


def test_each_machine_fills_the_cache_dir_it_was_given(tmp_path):
    """--cache-dir differs per machine (a node-local $SLURM_TMPDIR): machine 1 fills its own, never a folder
    named after machine 0's."""
    make_folder(tmp_path / "data" / "train", per_class=4)
    make_folder(tmp_path / "data" / "val", per_class=2, offset=300)
    first, second = two_machines(tmp_path / "data", tmp_path, dirs=True)
    assert first["cache_ready"] and second["cache_ready"], (first, second)
    assert len(list((tmp_path / "cache-dir-0" / "images").glob("*.npy"))) == 2  # the pixels and their flags


@pytest.mark.parametrize("fault", ["share", "finish"])
def test_a_machine_failing_its_share_stops_every_machine_with_one_message(fault, tmp_path):
    """Bad input met by machine 1 while checking its share, or while completing its cache afterwards: its
    own one-line error there; rank 0 stops with the same status, saying which process failed and why."""
    make_folder(tmp_path / "data" / "train", per_class=4)
    make_folder(tmp_path / "data" / "val", per_class=2, offset=300)
    first, second = two_machines(tmp_path / "data", tmp_path, fault=fault)
    assert second["error"].startswith("UsageError: planted")
    assert first["error"] == "Stopped: 2"
    assert first["stderr"].strip() == f"error: process 1 stopped while the data was being prepared: " \
                                      f"{second['error'].removeprefix('UsageError: ')}"


def test_a_machine_gone_during_the_check_is_one_line_on_the_other(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=4)
    make_folder(tmp_path / "data" / "val", per_class=2, offset=300)
    first, _ = two_machines(tmp_path / "data", tmp_path, fault="die")
    assert first["error"].startswith("TrainingError: another process of this torchrun job stopped"), first["error"]
    assert "\n" not in first["error"]


def step_in_a_process(rank: int, out: str) -> None:
    """Rank `rank` of two (gloo) taking one DDP training step; rank 1's batch makes its loss NaN."""
    import contextlib

    import torch

    from imgcls.errors import TrainingError
    from imgcls.training import distributed, step

    distributed.init_distributed()
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    learner = step.Learner(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(),
                             lambda x: x, contextlib.nullcontext, torch.device("cpu"), lambda a, b: 1.0)
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.full((2, 4), float("nan")) if rank == 1 else torch.ones(2, 4)
    try:
        step.train_step(learner, x, torch.tensor([0, 1]), "batch 7")
        outcome = "stepped"
    except TrainingError as e:
        outcome = str(e)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"outcome": outcome, "unchanged": unchanged}))
    torch.distributed.destroy_process_group()


def test_a_loss_diverging_in_one_process_stops_every_process_before_the_step():
    """DDP averages the gradients: one rank's NaN would reach every rank's weights; every rank stops instead."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        two_processes(step_in_a_process, out)
        first, second = (json.loads(Path(out, f"rank-{r}.json").read_text()) for r in (0, 1))
    assert second["outcome"].startswith("loss became nan at batch 7") and second["unchanged"]
    assert first["outcome"].startswith("loss became non-finite in another process at batch 7"), first
    assert first["unchanged"]
