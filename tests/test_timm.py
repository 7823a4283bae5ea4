"""--model timm/NAME: timm's models in the three modes, with timm's weights files, preprocessing and head,
through eval, test and export like a torchvision model (timm's tiny test_* models, offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import call, train_args

import eval as evaluate
import export
import test as predict
import train
from imgcls import checkpoint
from imgcls.errors import UsageError
from imgcls.networks import build
from imgcls.preprocess import Preprocess

timm = pytest.importorskip("timm", reason="timm is not installed (requirements-timm.txt)")
ROOT = Path(__file__).resolve().parent.parent
NAME = "timm/test_convnext"  # a 1.1 MB ConvNeXt; its weights' data config: 160 px, crop 0.95, mean/std 0.5


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    """A stand-in for timm's published weights of test_convnext: its state_dict as a .safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("timm-weights") / "model.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(path))
    return path


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("mode", ["scratch", "finetune", "transfer"])
def test_a_timm_model_trains_in_each_mode_and_its_checkpoint_rebuilds(mode, timm_weights, colours, tmp_path):
    out = tmp_path / "run"
    extra = [] if mode == "scratch" else ["--weights", str(timm_weights)]
    assert call(train.main, train_args(colours, out, "--model", NAME, "--mode", mode, *extra)) == 0
    ckpt = checkpoint.load(out / "best.pt")
    assert (ckpt["arch"], ckpt["mode"]) == (NAME, mode)
    assert Preprocess.from_dict(ckpt["preprocess"]) == Preprocess(32, 34, (0.5,) * 3, (0.5,) * 3, "bicubic")  # at 32
    model = build.from_checkpoint(ckpt)
    assert model.get_classifier().out_features == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    if mode == "transfer":  # the backbone came from the file and stayed as it was
        assert torch.equal(model.stem[0].weight, weights_of(timm_weights)["stem.0.weight"])


def test_a_timm_run_evaluates_predicts_explains_and_exports_with_the_same_commands(timm_weights, colours,
                                                                                    colours_eval, tmp_path, capsys):
    run = tmp_path / "run"
    assert call(train.main, train_args(colours, run, "--model", NAME, "--mode", "finetune", "--weights",
                                       str(timm_weights))) == 0
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(run), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["images"] == 18
    assert call(predict.main, [str(colours_eval / "red"), "--checkpoint", str(run), "--explain",
                               "--out", str(tmp_path / "pr")]) == 0
    assert (tmp_path / "pr" / "predictions.csv").read_text().count("\n") == 7
    assert len(list((tmp_path / "pr" / "explanations").glob("*.png"))) == 6
    assert "Grad-CAM on timm/test_convnext" in capsys.readouterr().out
    onnx = tmp_path / "m.onnx"
    assert call(export.main, ["--checkpoint", str(run), "--format", "onnx", "--data", str(colours),
                              "--out", str(onnx), "--images", "8"]) == 0
    report = json.loads(Path(str(onnx) + ".json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_scaled_diff"] <= 1e-3
    assert call(evaluate.main, [str(colours_eval), "--checkpoint", str(onnx), "--out", str(tmp_path / "ev2")]) == 0
    if importlib.util.find_spec("executorch"):  # (requirements-export.txt)
        pte = tmp_path / "m.pte"
        assert call(export.main, ["--checkpoint", str(run), "--format", "executorch", "--data", str(colours),
                                  "--out", str(pte), "--images", "4"]) == 0
        assert json.loads(Path(str(pte) + ".json").read_text())["top1_agreement"] == 1.0


def test_preprocessing_comes_from_timms_data_config():
    assert build.preprocessing(NAME) == Preprocess(160, 168, (0.5,) * 3, (0.5,) * 3, "bicubic")  # 160 / 0.95
    pre = build.preprocessing("timm/efficientnet_b0")
    assert (pre.img_size, pre.resize_size, pre.mean) == (224, 256, (0.485, 0.456, 0.406))


@pytest.mark.parametrize("arch, mode", [(NAME, "center"), ("timm/convnext_tiny.fb_in22k_ft_in1k_384", "squash"),
                                        ("timm/deepseek_vit_412m.deepseek_v4_flash_vision_exp", "border")])
def test_a_timm_model_sees_an_image_as_timms_own_eval_transform_makes_it(arch, mode, tmp_path):
    """crop_mode: the shorter side resized and the centre cropped, the whole image squashed to a square, or
    its longer side resized and the rest padded with the mean colour. A wide photo shows the difference."""
    import types

    from PIL import Image, ImageDraw
    from timm.data import create_transform, resolve_data_config

    from imgcls.evaluation import predictor
    from imgcls.networks import timm_models

    img = Image.new("RGB", (150, 75), (40, 90, 200))
    ImageDraw.Draw(img).ellipse((10, 10, 60, 60), fill=(230, 200, 20))
    ImageDraw.Draw(img).rectangle((100, 5, 140, 70), fill=(200, 30, 30))
    img.save(tmp_path / "wide.png")
    pre = build.preprocessing(arch, 64)
    assert pre.crop_mode == mode
    ours = next(predictor.input_images(types.SimpleNamespace(preprocess=pre), [str(tmp_path / "wide.png")]))
    config = {**resolve_data_config(pretrained_cfg=timm_models.pretrained_cfg(arch)), "input_size": (3, 64, 64)}
    theirs = create_transform(**config)(img)  # normalised
    theirs = (theirs * torch.tensor(config["std"])[:, None, None] + torch.tensor(config["mean"])[:, None, None]) * 255
    assert (ours.float() - theirs).abs().mean() < 3


def test_the_crop_mode_travels_with_the_checkpoint_into_its_export_and_older_files_read_as_center(colours, tmp_path):
    from imgcls.evaluation.predictor import OnnxModel

    pre = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash")
    net = build.build_model(NAME, 3, "scratch", img_size=32)
    (tmp_path / "run").mkdir()
    torch.save(checkpoint.of_model(NAME, ["blue", "green", "red"], net.state_dict(), pre), tmp_path / "run" / "best.pt")
    assert Preprocess.from_dict(checkpoint.load(tmp_path / "run" / "best.pt")["preprocess"]) == pre
    onnx = tmp_path / "m.onnx"
    assert call(export.main, ["--checkpoint", str(tmp_path / "run"), "--format", "onnx", "--data", str(colours),
                              "--out", str(onnx), "--images", "8"]) == 0
    assert OnnxModel(onnx).preprocess == pre
    older = {k: v for k, v in pre.to_dict().items() if k != "crop_mode"}
    assert Preprocess.from_dict(older).crop_mode == "center"
    assert Preprocess.from_metadata({k: v for k, v in pre.metadata().items() if k != "crop_mode"}).crop_mode == "center"


def test_timm_weights_file_goes_through_timms_loader_whole_and_the_head_is_new(timm_weights, tmp_path):
    state = weights_of(timm_weights)
    model = build.build_model(NAME, 4, "finetune", str(timm_weights))
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("head.fc."))
    assert model.head_name == "head.fc" and mine["head.fc.weight"].shape[0] == 4
    torch.save(state, tmp_path / "w.pth")  # the same as a torch file
    assert torch.equal(build.build_model(NAME, 4, "transfer", str(tmp_path / "w.pth")).stem[0].weight,
                       state["stem.0.weight"])


def test_transfer_mode_trains_only_timms_classifier(timm_weights):
    model = build.build_model(NAME, 3, "transfer", str(timm_weights))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.fc.weight", "head.fc.bias"]


def test_a_vit_made_for_another_size_is_built_for_the_runs_size_its_embeddings_resampled(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file(timm.create_model("test_vit").state_dict(), str(tmp_path / "vit.safetensors"))  # 160 px
    model = build.build_model("timm/test_vit", 3, "finetune", str(tmp_path / "vit.safetensors"), img_size=32)
    assert model.net_options == {"img_size": 32}
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_weights_of_another_timm_model_are_refused_in_one_line(colours, tmp_path, capsys):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    args = train_args(colours, tmp_path / "r", "--model", NAME, "--mode", "finetune", "--weights",
                      str(tmp_path / "resnet.pth"))
    assert call(train.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert f"don't fit {NAME}" in err and len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_an_unknown_timm_name_gets_the_closest_names(colours, tmp_path, capsys):
    assert call(train.main, train_args(colours, tmp_path / "r", "--model", "timm/convnext_nanoo")) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'convnext_nanoo'" in err and "timm/convnext_nano" in err


def test_an_unknown_weights_tag_names_the_tags_there_are(colours, tmp_path, capsys):
    assert call(train.main, train_args(colours, tmp_path / "r", "--model", "timm/test_convnext.nope")) == 2
    assert "r160_in1k" in capsys.readouterr().err


def test_without_timm_a_timm_model_is_a_one_line_error_saying_how_to_install_it(colours, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert call(train.main, train_args(colours, tmp_path / "r", "--model", NAME)) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install timm" in err and len(err.splitlines()) == 1


def test_timms_imagenet_weights_out_of_reach_are_a_one_line_error(colours, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = train_args(colours, tmp_path / "r", "--model", NAME, "--mode", "finetune")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "could not be downloaded" in err[0] and "--weights FILE" in err[0]


def test_list_models_shows_torchvisions_and_timms_names(capsys):
    assert call(train.main, ["--list-models", "convnext_t*"]) == 0
    out = capsys.readouterr().out.split()
    assert "convnext_tiny" in out and "timm/convnext_tiny" in out
    assert call(train.main, ["--list-models", "nothing*"]) == 2


def test_images_are_resized_with_the_interpolation_of_the_weights_and_it_travels_with_the_model(
        timm_weights, colours, tmp_path):
    run = tmp_path / "run"
    assert call(train.main, train_args(colours, run, "--model", NAME, "--mode", "transfer", "--weights",
                                       str(timm_weights))) == 0
    assert checkpoint.load(run / "best.pt")["preprocess"]["interpolation"] == "bicubic"
    onnx = tmp_path / "m.onnx"
    assert call(export.main, ["--checkpoint", str(run), "--format", "onnx", "--out", str(onnx), "--images", "2"]) == 0
    from imgcls.evaluation.predictor import OnnxModel

    assert OnnxModel(onnx).preprocess.interpolation == "bicubic"


def test_our_checkpoint_of_a_fixed_size_model_starts_a_run_at_another_size(colours, tmp_path):
    """Its position embeddings made for 32 px are resampled by timm's loader for the new run's size."""
    run = tmp_path / "vit32"
    assert call(train.main, train_args(colours, run, "--model", "timm/test_vit", "--mode", "scratch")) == 0
    for size in (64, 160):
        model = build.build_model("timm/test_vit", 3, "finetune", str(run / "best.pt"), img_size=size)
        assert model.net_options == {"img_size": size}
        assert model.eval()(torch.rand(1, 3, size, size)).shape == (1, 3)


def test_a_timm_state_dict_with_another_head_loads_its_backbone(tmp_path):
    torch.manual_seed(2)
    state = timm.create_model("test_convnext", num_classes=10).state_dict()
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ten.pth")  # as saved from DDP
    model = build.build_model(NAME, 3, "finetune", str(tmp_path / "ten.pth"))
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"]) and model.get_classifier().out_features == 3


def test_a_timm_file_that_does_not_fit_names_the_mismatching_keys(tmp_path):
    state = timm.create_model("test_convnext").state_dict()
    del state["stem.0.weight"]
    torch.save(state, tmp_path / "less.pth")
    with pytest.raises(UsageError, match=r"don't fit timm/test_convnext \(missing: stem\.0\.weight\)"):
        build.build_model(NAME, 3, "finetune", str(tmp_path / "less.pth"))


@pytest.mark.parametrize("model", ["timm/deit_tiny_distilled_patch16_224", "timm/volo_d1_224"])
def test_a_model_with_two_classifier_heads_is_refused_for_what_it_is(model, colours, tmp_path, capsys):
    """A distilled model's second head, VOLO's auxiliary one: reset by timm, but trained, frozen and
    cached as one module here (VOLO's was left frozen and random in transfer mode)."""
    assert call(train.main, train_args(colours, tmp_path / "r", "--model", model, "--img-size", "32")) == 2
    err = capsys.readouterr().err
    assert "more than one classifier head" in err and "cannot take" not in err and not (tmp_path / "r").exists()


def test_another_models_weights_are_refused_naming_the_keys_a_converter_tripped_on(tmp_path):
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(UsageError, match=r"don't fit timm/test_convnext \(missing: .*; unexpected: .*\)"):
        build.build_model(NAME, 3, "finetune", str(tmp_path / "vit.pth"))


def test_weights_timm_cannot_convert_for_another_size_are_refused_naming_their_size():
    from imgcls.networks import timm_models

    error = RuntimeError('Error(s) in loading state_dict:\n\tsize mismatch for pos_embed: copying a param ...')
    message = timm_models.not_fitting("timm/test_vit", "w.pth", error, {}, {}, {"img_size": 64})
    assert "at 64 px (wrong shape: pos_embed)" in message and "use --img-size 160" in message


def test_a_timm_cross_validation_job_gets_a_folder_runs_py_lists(colours, tmp_path, monkeypatch, capsys):
    import runs

    monkeypatch.chdir(tmp_path)
    args = ["--data", str(colours), "--model", NAME, "--mode", "scratch", "--folds", "2", "--epochs", "1",
            "--img-size", "32", "--batch-size", "8", "--workers", "0"]
    assert call(train.main, args) == 0
    assert [p.name.startswith("timm-test_convnext-cv2-") for p in (tmp_path / "runs").iterdir()] == [True]
    assert call(runs.main, []) == 0 and "timm-test_convnext-cv2-" in capsys.readouterr().out


def test_list_models_lists_timms_named_weights_for_a_pattern_with_a_dot(capsys):
    assert call(train.main, ["--list-models", "timm/test_convnext.*"]) == 0
    assert "timm/test_convnext.r160_in1k" in capsys.readouterr().out.split()


def test_without_timm_listing_timms_models_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    assert call(train.main, ["--list-models", "timm/*"]) == 2
    assert "pip install timm" in capsys.readouterr().err


def test_pretrained_layers_inside_a_head_are_kept_and_only_the_classifier_is_new(tmp_path):
    """SHViT's head is a norm then the classifier timm names (head.l): the norm keeps its weights, as in
    timm's own fine-tuning, and is frozen in transfer mode."""
    torch.manual_seed(3)
    net = timm.create_model("shvit_s1")
    with torch.no_grad():
        net.head.bn.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "shvit.pth")
    model = build.build_model("timm/shvit_s1", 3, "transfer", str(tmp_path / "shvit.pth"))
    assert model.head_name == "head.l" and model.head.l.out_features == 3
    assert torch.equal(model.head.bn.running_var, net.head.bn.running_var)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.l.weight", "head.l.bias"]


@pytest.mark.parametrize("name", ["convnextv2_atto.fcmae", "eva02_tiny_patch14_224"])
def test_weights_published_without_a_classifier_and_our_checkpoints_of_them_both_start_a_run(name, tmp_path):
    """timm publishes some weights with no classifier at all (pre-training: FCMAE, MIM); one of our
    checkpoints of that model has one (it was refused: 'unexpected: head.weight')."""
    arch = "timm/" + name
    torch.manual_seed(4)
    published = timm.create_model(name).state_dict()
    torch.save(published, tmp_path / "published.pth")
    model = build.build_model(arch, 2, "finetune", str(tmp_path / "published.pth"), img_size=56)
    first = next(iter(published))
    assert torch.equal(model.state_dict()[first], published[first])
    ckpt = checkpoint.of_model(arch, ["a", "b"], model.state_dict(), build.preprocessing(arch, 56))
    torch.save(ckpt, tmp_path / "ours.pt")
    again = build.build_model(arch, 3, "transfer", str(tmp_path / "ours.pt"), img_size=56)
    assert torch.equal(again.state_dict()[first], published[first]) and again.get_classifier().out_features == 3
