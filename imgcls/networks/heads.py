"""A network's head: found, replaced, frozen around (transfer mode), and the parameters counted."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from imgcls.errors import UsageError
from imgcls.networks import weights as networks_weights


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The last layer that maps to ImageNet's 1000 classes: the classifier head to replace."""
    head = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == 1000) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == 1000):
            head = (name, m)
    if head is None:
        raise UsageError(f"cannot find a 1000-class head in {type(model).__name__}: not a classifier")
    return head


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The ImageNet head (find_head) replaced by one for `num_classes`; its name is kept on the model,
    so head_of() finds it again by the same rule."""
    name, old = find_head(model)
    if isinstance(old, nn.Linear):  # with a bias where the published head has one (MaxViT's has none)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    set_module(model, name, new)
    model.head_name = name
    return new


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the head that replace_head() put in (for timm: timm_models.head_name)."""
    return model.head_name, model.get_submodule(model.head_name)


def snapshot(model: nn.Module) -> OrderedDict:
    """The model's state_dict as it is now, on the CPU; frozen parameters never change, so they are
    shared instead of copied (a transfer-mode snapshot costs the head only)."""
    state = model.state_dict(keep_vars=True)
    return networks_weights.with_metadata({k: v.detach() if isinstance(v, nn.Parameter) and not v.requires_grad
                          else v.detach().to("cpu", copy=True) for k, v in state.items()}, state)


def freeze_backbone(model: nn.Module) -> None:
    _, head = head_of(model)
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params


def set_train_mode(model: nn.Module, training: bool, mode: str) -> None:
    """model.train(training), except that a frozen backbone always stays in eval mode."""
    model.train(training)
    if training and mode == "transfer":
        model.eval()
        head_of(model)[1].train()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable
