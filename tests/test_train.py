"""train.py, models.py, dataset.py: the three models in the three modes, weights, data layouts, run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import THREE, cached_weights, make_folder, train_args

import train
from imgcls import checkpoint
from imgcls.data import check, demo, folders
from imgcls.data import split as data_split
from imgcls.networks import build, heads


def run_train(args: list[str]) -> int:
    try:
        return train.run(args)
    except SystemExit as e:
        return int(e.code)


# ----------------------------------------------------------------------------- data

def test_demo_export_writes_the_digits_as_train_and_held_out_test_folders(tmp_path):
    dest = demo.export_demo(tmp_path / "digits")
    digits = [str(d) for d in range(10)]
    assert check.class_folders(dest / "train") == digits == check.class_folders(dest / "test")
    n_train, n_test = (sum(len(check.list_files(dest / s / d)) for d in digits) for s in ("train", "test"))
    assert (n_train, n_test) == (1438, 359)
    assert folders.find_layout(dest) == (dest / "train", None, dest / "test")


def test_flat_folder_is_split_per_class_with_the_same_seed_giving_the_same_split(colours):
    a = data_split.prepare_data(str(colours), val_split=0.25, seed=1)
    b = data_split.prepare_data(str(colours), val_split=0.25, seed=1)
    c = data_split.prepare_data(str(colours), val_split=0.25, seed=2)
    assert a.classes == ["blue", "green", "red"]
    assert a.counts(a.val) == [3, 3, 3] and a.counts(a.train) == [9, 9, 9]
    assert (a.train, a.val) == (b.train, b.val)
    assert a.val != c.val
    assert not set(a.train) & set(a.val)


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_train_and_val_folders_are_used_as_given(tmp_path, val_name):
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / val_name, per_class=2, offset=77)
    split = data_split.prepare_data(str(tmp_path))
    assert len(split.train) == 12 and len(split.val) == 6
    assert all(f"/{val_name}/" in p for p, _ in split.val)


def test_split_is_written_to_the_run_folder_and_reloads(colours, tmp_path):
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch")) == 0
    split = data_split.DataSplit.load(tmp_path / "run" / "split.json")
    assert split.classes == ["blue", "green", "red"] and len(split.train) + len(split.val) == 36


# ----------------------------------------------------------------------------- models and modes

@pytest.mark.parametrize("name", ["vgg11_bn", "resnet50", "efficientnet_b0", "squeezenet1_0", "vit_b_16"])
def test_any_torchvision_classifier_gets_a_head_for_the_dataset_classes(name):
    model = build.build_model(name, num_classes=5)
    size = 224 if name == "vit_b_16" else 64
    assert model.eval()(torch.rand(1, 3, size, size)).shape == (1, 5)


def test_unknown_model_is_refused_with_the_closest_names(colours, tmp_path, capsys):
    assert run_train(train_args(colours, tmp_path / "r", "--model", "resnet19", "--mode", "scratch")) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet19': did you mean resnet18, " in err and len(err.strip().splitlines()) == 1
    assert "mobilenet_v2" not in err  # the three closest names, not all 80


def test_preprocessing_comes_from_the_weights_metadata():
    t = torchvision.models.get_model_weights("efficientnet_b1").DEFAULT.transforms()
    pre = build.preprocessing("efficientnet_b1")
    assert (pre.img_size, pre.resize_size) == (t.crop_size[0], t.resize_size[0])
    assert pre.mean == pytest.approx(t.mean) and pre.std == pytest.approx(t.std)
    assert build.preprocessing("resnet18", img_size=112).resize_size == 128  # same 224/256 ratio


def test_transfer_mode_trains_only_the_head_and_keeps_batchnorm_statistics(with_weights):
    model = build.build_model("resnet18", 3, "transfer")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    before = model.layer1[0].bn1.running_mean.clone()
    heads.set_train_mode(model, True, "transfer")
    model(torch.rand(4, 3, 32, 32) * 5)
    assert torch.equal(model.layer1[0].bn1.running_mean, before)
    assert model.fc.training and not model.layer1.training


@pytest.mark.parametrize("mode", ["scratch", "finetune"])
def test_scratch_and_finetune_train_every_parameter(mode, with_weights):
    _, frozen = heads.count_parameters(build.build_model("mobilenet_v2", 3, mode))
    assert frozen == 0


def test_finetune_starts_from_the_torch_home_cache_weights(with_weights):
    model = build.build_model("resnet18", 3, "finetune")
    saved = cached_weights(with_weights, "resnet18")
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert not torch.equal(build.build_model("resnet18", 3, "scratch").conv1.weight, saved["conv1.weight"])


def test_weights_file_is_loaded_instead_of_imagenet(tmp_path):
    torch.manual_seed(7)
    state = torchvision.models.mobilenet_v2().state_dict()
    torch.save(state, tmp_path / "mine.pth")
    model = build.build_model("mobilenet_v2", 3, "transfer", weights_file=str(tmp_path / "mine.pth"))
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_missing_imagenet_weights_stop_at_once_naming_the_file_to_download(colours, tmp_path, capsys):
    assert run_train(train_args(colours, tmp_path / "r", "--mode", "finetune")) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "--weights" in err and "--mode scratch" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_without_internet_the_error_gives_the_exact_command_that_trains_offline_before_the_data_is_checked(
        colours, tmp_path, capsys, monkeypatch):
    import shlex

    checked = []
    monkeypatch.setattr(data_split, "prepare_data", lambda *a, **k: checked.append(a) or [][0])  # (not reached)
    assert run_train(train_args(colours, tmp_path / "r", "--model", "mobilenet_v2")) == 2  # finetune: the default
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not checked and not (tmp_path / "r").exists()
    command = err.split("Without internet, train from scratch: ")[1].split(";")[0]
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"] and words[words.index("--mode") + 1] == "scratch"
    assert words[words.index("--data") + 1] == str(colours) and "--model" in words
    monkeypatch.undo()
    assert run_train(words[2:]) == 0  # that very command trains, offline


def test_weights_that_do_not_fit_the_model_are_refused(colours, tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    args = train_args(colours, tmp_path / "r", "--model", "mobilenet_v2", "--weights", str(tmp_path / "r18.pth"))
    assert run_train(args) == 2
    assert "don't fit mobilenet_v2" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["scratch", "finetune", "transfer"])
@pytest.mark.parametrize("name", THREE)
def test_each_model_trains_in_each_mode_and_its_checkpoint_rebuilds(name, mode, colours, tmp_path, with_weights):
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--model", name, "--mode", mode)) == 0
    ckpt = checkpoint.load(out / "best.pt")
    assert (ckpt["arch"], ckpt["mode"], ckpt["classes"]) == (name, mode, ["blue", "green", "red"])
    model = build.from_checkpoint(ckpt)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    if mode == "transfer":  # the frozen backbone is exactly the loaded weights after training
        saved = cached_weights(with_weights, name)
        first = next(k for k in saved if k.endswith("weight"))
        assert torch.equal(ckpt["model"][first], saved[first])


# ----------------------------------------------------------------------------- runs

def test_scratch_run_learns_and_leaves_a_complete_run_folder(colours, trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"last.pt", "best.pt", "config.json", "metrics.csv", "summary.json", "curves.png", "split.json",
            "skipped.txt"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["classes"] == ["blue", "green", "red"]
    assert summary["best_val_acc"] > 60  # chance is 33%; with 6 validation images, 4 right (66.67%) passes
    assert summary["train_img_per_s"] > 0
    assert len((trained_run / "metrics.csv").read_text().strip().splitlines()) == 1 + 3
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == "resnet18" and config["epochs"] == 3
    assert config["workers"] is None  # not pinned: a resume on another machine sizes it again


def test_checkpoints_load_with_weights_only_and_carry_preprocessing(trained_run):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert ckpt["preprocess"]["img_size"] == 32 and len(ckpt["preprocess"]["mean"]) == 3
    assert "optimizer" not in ckpt  # best.pt is for using the model
    assert "optimizer" in torch.load(trained_run / "last.pt", weights_only=True)


def test_resume_continues_at_the_next_epoch(colours, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--mode", "scratch")) == 0
    assert train.main(["--resume", str(out), "--epochs", "2", "--no-summary"]) == 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_resume_refuses_to_change_what_the_run_is(colours, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(train_args(colours, out, "--mode", "scratch")) == 0
    assert run_train(["--resume", str(out), "--model", "vgg11"]) == 2
    assert "cannot change --model" in capsys.readouterr().err


def test_an_existing_run_folder_is_not_overwritten(colours, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert run_train(train_args(colours, out, "--mode", "scratch")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep" and len(list(out.iterdir())) == 1


def test_a_command_we_print_quotes_a_path_a_shell_would_split_or_expand(colours, tmp_path, capsys):
    out = tmp_path / "my $run"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert run_train(train_args(colours, out, "--mode", "scratch")) == 2
    assert f"pass --resume '{out}' to continue it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

def bad_folders(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (data argument, words the one-line error must contain)."""
    make_folder(root / "ok", per_class=3)
    (root / "empty").mkdir()
    make_folder(root / "one", per_class=3, classes={"cat": (1, 2, 3)})
    make_folder(root / "hollow", per_class=3)
    (root / "hollow" / "nothing").mkdir()
    make_folder(root / "differ" / "train", per_class=3)
    make_folder(root / "differ" / "val", per_class=2, classes={"blue": (0, 0, 255), "pink": (250, 150, 150)})
    return {"missing": (str(root / "nope"), "does not exist"), "empty": (str(root / "empty"), "no class folders"),
            "single class": (str(root / "one"), "only one class"),
            "class without images": (str(root / "hollow"), "nothing"),
            "val classes differ": (str(root / "differ"), "classes differ")}


@pytest.mark.parametrize("case", ["missing", "empty", "single class", "class without images", "val classes differ"])
def test_bad_data_gets_one_line_and_exit_status_2_before_training(case, tmp_path, capsys):
    data, words = bad_folders(tmp_path)[case]
    assert run_train(train_args(Path(data), tmp_path / "run", "--mode", "scratch")) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("option, value", [("--val-split", "1.5"), ("--save-interval", "-1"), ("--step-size", "0"),
                                           ("--gamma", "0"), ("--label-smoothing", "1")])
def test_bad_settings_are_refused(colours, tmp_path, capsys, option, value):
    assert run_train(train_args(colours, tmp_path / "r", option, value)) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_class_names_are_the_folder_names_sorted_and_stored_in_checkpoints(tmp_path):
    data = make_folder(tmp_path / "d", per_class=4, classes={"zebra": (0, 0, 0), "apple": (250, 0, 0)})
    assert train.main(train_args(data, tmp_path / "run", "--mode", "scratch")) == 0
    assert checkpoint.load(tmp_path / "run" / "best.pt")["classes"] == ["apple", "zebra"]


def test_asking_for_a_gpu_that_is_not_there_is_a_usage_error(colours, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run_train(train_args(colours, tmp_path / "r", "--mode", "scratch", "--device", "cuda")) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_resume_auto_without_any_run_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_train(["--resume", "auto"]) == 2
    assert "no runs/*/last.pt to resume" in capsys.readouterr().err


def test_a_gpu_too_old_for_the_installed_pytorch_is_reported_before_training(monkeypatch):
    from imgcls import machine
    from imgcls.errors import UsageError

    # what torch reports for a Tesla K80 (sm_37) under a current wheel; no GPU is needed for the rule
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (3, 7))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_50", "sm_80", "sm_90a", "compute_90"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla K80")
    with pytest.raises(UsageError, match=r"Tesla K80 \(sm_37\) is not supported .* --device cpu"):
        machine.check_gpu_supported(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    machine.check_gpu_supported(torch.device("cuda:0"))  # an H100 is fine


def test_the_layer_table_goes_to_the_run_folder_not_the_screen(colours, tmp_path, capsys):
    args = [a for a in train_args(colours, tmp_path / "run", "--mode", "scratch") if a != "--no-summary"]
    assert train.main(args) == 0
    assert "Total params" in (tmp_path / "run" / "model_summary.txt").read_text()
    out = capsys.readouterr().out
    assert "Total params" not in out and "trainable and 0 frozen parameters" in out


def test_a_last_batch_of_one_image_does_not_stop_training(tmp_path):
    """BatchNorm cannot train on one image: with 9 training images and batches of 8, the ninth waits
    for the next epoch's shuffle instead of ending the run with a ValueError."""
    make_folder(tmp_path / "data" / "train", per_class=3)
    make_folder(tmp_path / "data" / "val", per_class=1, offset=300)
    assert train.main(train_args(tmp_path / "data", tmp_path / "run", "--mode", "scratch", "--epochs", "2")) == 0


def test_a_batch_size_of_one_is_refused_for_a_network_with_batchnorm(tmp_path, capsys):
    make_folder(tmp_path / "data", per_class=3)
    args = train_args(tmp_path / "data", tmp_path / "run", "--mode", "scratch", "--batch-size", "1")
    try:
        code = train.run(args)
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--batch-size 1 cannot train" in capsys.readouterr().err
