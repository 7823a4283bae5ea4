"""A run's parts as the loop receives them: the run (its folder, ranks, start) and its inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from imgcls import runfolder
from imgcls.data import split as data_split
from imgcls.preprocess import Preprocess
from imgcls.settings import TrainConfig


@dataclasses.dataclass
class Run:
    """What this process trains: the settings, where the run is, its data, and the machine."""
    cfg: TrainConfig
    start: runfolder.Start
    run_dir: Path
    split: data_split.DataSplit
    preprocess: Preprocess
    weights_id: list
    device: torch.device
    rank: int
    world: int
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def local_lead(self) -> bool:
        """The first process of its machine: it builds the machine's caches."""
        return self.local_rank == 0

    notes: list[str] = dataclasses.field(default_factory=list)  # about class imbalance, for TensorBoard too

    def say(self, message: str) -> None:
        if self.lead:
            print(message)

    def note(self, message: str) -> None:
        self.say(message)
        self.notes.append(message)


@dataclasses.dataclass
class Inputs:
    """What the loop trains on: the datasets and the network they feed, with the function that turns
    a loaded batch into the network's input (images; or, on the feature path, cached features)."""
    train: Dataset
    val: Dataset
    net: nn.Module
    to_input: Callable
    use_features: bool = False
