"""The models module, a face of the package: build any classifier in a mode (scratch, finetune, transfer).

It only re-exports the names a user of the card needs; the code lives in imgcls/networks/ (names.py: the
names --model takes; build.py: building a network for its weights and from a checkpoint; heads.py: heads
and freezing; weights.py: ImageNet weights and weights files; timm_models.py: timm's models) and
imgcls/preprocess.py (the preprocessing a network was trained with). See docs/architecture.md.

Freezing rule (transfer mode): every parameter outside the new head has requires_grad=False AND the
backbone stays in eval mode while training, so BatchNorm running statistics and dropout are frozen
too. The backbone is then a fixed function, which is what lets train.py cache its features.
"""

from __future__ import annotations

from imgcls.data.loaders import Normalize
from imgcls.networks.build import (
    build_model,
    check_input_size,
    classifier_names,
    family,
    from_checkpoint,
    network,
    preprocessing,
    size_options,
)
from imgcls.networks.heads import count_parameters, freeze_backbone, head_of, set_train_mode
from imgcls.networks.names import matching as list_models  # what --model takes, as train.py --list-models shows it
from imgcls.preprocess import Preprocess

__all__ = [
    "Normalize",
    "Preprocess",
    "build_model",
    "check_input_size",
    "classifier_names",
    "count_parameters",
    "family",
    "freeze_backbone",
    "from_checkpoint",
    "head_of",
    "list_models",
    "network",
    "preprocessing",
    "set_train_mode",
    "size_options",
]
