"""The precision of a run not told --amp or --no-amp: on a CPU with native bf16, the faster for its network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import train_args

import train
from imgcls import machine

native = pytest.mark.skipif(not machine.cpu_has_bf16(), reason="this CPU has no native bf16: fp32 either way")


def settings(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def known_figures(cache: Path, figures: dict[str, float]) -> None:
    """Figures as if measured on this machine for the runs below (resnet18, scratch, 32 px, batch 8)."""
    entry = machine.key("resnet18", "scratch", 32, 8, True)
    (cache / "precision.json").write_text(json.dumps({entry: figures}))


def test_measuring_leaves_the_model_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    figures = machine.measure(model, 32, 4, torch.channels_last)
    assert figures["bf16"] > 0 and figures["fp32"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_bf16_is_chosen_only_when_clearly_faster():
    assert machine.faster_is_bf16({"bf16": 0.5, "fp32": 1.0})
    assert not machine.faster_is_bf16({"bf16": 0.98, "fp32": 1.0})  # a tie goes to the exact one
    assert not machine.faster_is_bf16({"bf16": 1.4, "fp32": 1.0})


@native
@pytest.mark.parametrize(("figures", "amp"), [({"bf16": 0.01, "fp32": 0.02}, True),
                                              ({"bf16": 0.03, "fp32": 0.02}, False)])
def test_a_run_not_told_trains_in_the_precision_measured_faster(colours, tmp_path, monkeypatch, capsys,
                                                                figures, amp):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    known_figures(tmp_path / "cache", figures)
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch", precision=None)) == 0
    assert settings(tmp_path / "run")["amp"] is amp
    assert f"precision: {'bf16' if amp else 'fp32'}, the faster for resnet18" in capsys.readouterr().out


@native
def test_a_new_machine_measures_once_and_keeps_the_figures(colours, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    assert train.main(train_args(colours, tmp_path / "one", "--mode", "scratch", precision=None)) == 0
    kept = json.loads((tmp_path / "cache" / "precision.json").read_text())
    entry = machine.key("resnet18", "scratch", 32, 8, True)
    assert set(kept[entry]) == {"bf16", "fp32"}
    os.utime(tmp_path / "cache" / "precision.json", (1, 1))
    assert train.main(train_args(colours, tmp_path / "two", "--mode", "scratch", precision=None)) == 0
    assert (tmp_path / "cache" / "precision.json").stat().st_mtime == 1  # read, not measured again
    assert settings(tmp_path / "one")["amp"] == settings(tmp_path / "two")["amp"] == \
        machine.faster_is_bf16(kept[entry])


@native
@pytest.mark.parametrize("flag", ["--amp", "--no-amp"])
def test_a_precision_given_is_taken_without_measuring(colours, tmp_path, monkeypatch, flag):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch", flag, precision=None)) == 0
    assert settings(tmp_path / "run")["amp"] is (flag == "--amp")
    assert not (tmp_path / "cache" / "precision.json").exists()


@native
def test_a_resume_keeps_the_precision_chosen_at_the_start(colours, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    known_figures(tmp_path / "cache", {"bf16": 0.03, "fp32": 0.02})
    assert train.main(train_args(colours, tmp_path / "run", "--mode", "scratch", precision=None)) == 0
    known_figures(tmp_path / "cache", {"bf16": 0.01, "fp32": 0.02})  # the machine now says otherwise
    assert train.main(["--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert settings(tmp_path / "run")["amp"] is False
