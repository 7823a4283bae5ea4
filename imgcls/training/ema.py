"""The exponential moving average of a model's weights (--ema)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Ema:
    """An exponential moving average of a module's weights and buffers (torch's AveragedModel), updated
    after every step. The decay warms up ((1 + n) / (10 + n) after n updates) and is capped so that the
    average spans about the last tenth of the run: a short run is not averaged over its random start."""

    def __init__(self, source: nn.Module, decay: float, total_steps: int):
        from torch.optim.swa_utils import AveragedModel

        self.source = source
        self.decay = min(decay, 1 - 10 / max(20, total_steps))
        self.model = AveragedModel(source, use_buffers=True).eval()  # the container: its state dict as before
        pairs = list(zip([*self.model.module.parameters(), *self.model.module.buffers()],
                         [*source.parameters(), *source.buffers()]))
        floats = [(a, c) for a, c in pairs if torch.is_floating_point(a)]
        self.averaged, self.current = [a for a, _ in floats], [c for _, c in floats]
        self.counters = [(a, c) for a, c in pairs if not torch.is_floating_point(a)]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """AveragedModel.update_parameters' arithmetic without its host syncs: it moves its CPU step
        counter to the GPU once per dtype each step, a blocking copy that drains the GPU's queue. The
        first update copies; then floats move towards the source, counters (BatchNorm's
        num_batches_tracked) take its value."""
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        if self.averaged and self.steps == 0:
            torch._foreach_copy_(self.averaged, self.current)
        elif self.averaged:
            torch._foreach_lerp_(self.averaged, self.current, 1 - decay)
        for a, c in self.counters:
            a.copy_(c)
        self.model.n_averaged += 1  # (a CPU tensor: kept for the state dict, as AveragedModel keeps it)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = state["steps"]
