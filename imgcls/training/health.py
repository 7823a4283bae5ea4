"""Run health: what a failing run says while it runs, one line each, with what to try.

Read from the history of epochs (metrics.csv's rows) after each one. Each kind is said once per run, and
kept with the run (last.pt, summary.json's `warnings`, TensorBoard's text tab), so a resumed run neither
forgets nor repeats it. A healthy run says nothing: the thresholds keep a margin (bench/bench_recipes.py
prints every warning of its runs, seed recipe and defaults, on every model and data set).

- chance: validation accuracy at chance after a few epochs while training accuracy rose (a network that
  learned, but answers one class in evaluation: BatchNorm statistics that do not fit the weights, or
  validation images unlike the training ones; the caller compares with batch statistics to tell).
- stuck: training accuracy at chance after a few epochs (no learning: an lr far off, or labels that do
  not match the images).
- rising: a training loss that rises over the first epochs (lr too high).
- overfit: training accuracy far above validation's (above chance) while the validation loss climbs.
- diverged: a loss that became NaN or infinite (the run stops at once; said by the loop, kept here).
Multi-label runs have no accuracies: there only the loss-based kinds apply. With --progressive the checks
read the epochs at the final crop size only (a smaller crop changes the loss and the accuracy by itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DIVERGED_LOSS = 1000  # a mean validation loss this many times a uniform guess's: diverged, not a bad model
FEW_EPOCHS = 3  # the accuracy kinds wait at least this long: a first epoch (with its warm-up) proves little
WAIT_SHARE = 0.3  # and this share of the run: VGG11 on the digits trains at chance for 3 of 15 epochs, then learns


def largest_share(counts: list[int]) -> float:
    """The largest class's share of the images, %: the accuracy of answering that class for every image."""
    return 100 * max(counts, default=0) / max(1, sum(counts))


def chance_limit(share: float) -> float:
    """The accuracy (%) up to which a network is at chance, given the largest class's share (%): what
    answering that class for every image gets, plus half of it, at most 5 points (2 classes: 55%;
    11: 13.6%; 100: 1.5%)."""
    return share + min(5.0, 0.5 * share)


@dataclass
class Health:
    """The run's warnings so far (kind -> line), and what the checks compare with."""
    chance_val: float  # the largest class's share of the validation images, %
    chance_train: float  # and of the training images
    classes: int = 2
    multilabel: bool = False
    precise_bn: bool = False  # BatchNorm's statistics are recomputed before each validation
    said: dict[str, str] = field(default_factory=dict)
    epochs: int = 0  # the run's length: a long run's slow start is not a failure

    def waited(self, history: list[dict[str, Any]]) -> bool:
        """Enough epochs to judge accuracy by: FEW_EPOCHS, and WAIT_SHARE of the run."""
        return len(history) >= max(FEW_EPOCHS, math.ceil(WAIT_SHARE * self.epochs))

    def check(self, history: list[dict[str, Any]], batch_statistics: Callable[[], float | None]
              ) -> list[str]:
        """The new warnings after the last epoch of `history`; `batch_statistics()` is the validation accuracy
        with each batch's own BatchNorm statistics (None: the network has no BatchNorm), asked only when
        validation is at chance."""
        new = {}
        for kind, test in (("rising", self.rising), ("stuck", self.stuck), ("chance", self.at_chance),
                           ("overfit", self.overfit)):
            if kind not in self.said:
                line = test(history) if kind != "chance" else test(history, batch_statistics)
                if line:
                    new[kind] = line
        self.said.update(new)
        return list(new.values())

    def diverged_loss(self, loss: float) -> bool:
        """A validation loss no trained model reaches: NaN or infinite (outputs that overflowed), or over
        DIVERGED_LOSS times a uniform guess's (weights the last steps blew up: precise BN keeps such outputs
        finite, where the running statistics let them overflow)."""
        return not math.isfinite(loss) or loss > DIVERGED_LOSS * self.guess_loss()

    def guess_loss(self) -> float:
        """The loss of a uniform guess: ln(classes) for cross-entropy; ln 2 per label for a multi-label loss."""
        return math.log(2) if self.multilabel else math.log(max(2, self.classes))

    def add(self, kind: str, line: str) -> None:
        self.said.setdefault(kind, line)

    def lines(self) -> list[str]:
        return list(self.said.values())

    def rising(self, history: list[dict[str, Any]]) -> str | None:
        """Within the first five epochs: a training loss over twice a uniform guess's (it rose above where it
        started, within the epoch), or two epochs in a row whose training loss rose by over 5%."""
        losses = [h["train_loss"] for h in history[:5]]
        guess = self.guess_loss()
        for k, loss in enumerate(losses):
            if loss > 2 * guess:
                return (f"the training loss rose above where it started: {loss:.3f} in epoch {k + 1}, where a uniform "
                        f"guess scores {guess:.3f}; the lr is probably too high: find one with --lr-find, or try a "
                        "third of this one")
        for k in range(2, len(losses)):
            if losses[k] > 1.05 * losses[k - 1] and losses[k - 1] > 1.05 * losses[k - 2]:
                return (f"the training loss rose over epochs {k - 1}-{k + 1} ({losses[k - 2]:.3f} -> {losses[k]:.3f}): "
                        "the lr is probably too high; find one with --lr-find, or try a third of this one")
        return None

    def stuck(self, history: list[dict[str, Any]]) -> str | None:
        last = history[-1]
        if self.multilabel or not self.waited(history) or last["train_acc"] > chance_limit(self.chance_train):
            return None
        return (f"training accuracy is still at chance ({last['train_acc']:.1f}%; the largest class is "
                f"{self.chance_train:.1f}% of the images) after {len(history)} epochs: the network is not learning; "
                "try another --lr (--lr-find), and check that each class folder holds its class "
                "(python dataset.py check DATA)")

    def at_chance(self, history: list[dict[str, Any]], batch_statistics: Callable[[], float | None]) -> str | None:
        last = history[-1]
        if self.multilabel or not self.waited(history) or last["val_acc"] > chance_limit(self.chance_val) or \
                last["train_acc"] < chance_limit(self.chance_train) + 10:  # (not learning at all: `stuck`)
            return None
        line = (f"validation accuracy is at chance ({last['val_acc']:.1f}%, as if one class were answered for every "
                f"image) after {len(history)} epochs while training accuracy rose to {last['train_acc']:.1f}%")
        batch = batch_statistics()
        if batch is None or batch <= chance_limit(self.chance_val) + 10:
            return line + ("; are the validation images of another kind than the training ones (source, size, "
                           "colour)? compare a few; a lower --lr may help")
        line += f"; with each batch's own BatchNorm statistics validation reaches {batch:.1f}%: "
        if self.precise_bn:  # recomputed from training images: those and the validation images differ
            return line + ("the statistics of the training images do not fit the validation images: are these of "
                           "another kind (source, size, colour)? compare a few")
        return line + ("the running statistics trail the weights: recompute them (drop --no-precise-bn), or try a "
                       "lower --lr")

    def overfit(self, history: list[dict[str, Any]]) -> str | None:
        """Training accuracy 25 points above validation's (which is above chance) while the validation loss rose
        in each of the last two epochs, to 25% above its lowest."""
        if self.multilabel or len(history) < FEW_EPOCHS:
            return None
        losses = [h["val_loss"] for h in history]
        last = history[-1]
        if not (losses[-1] > losses[-2] > losses[-3] and losses[-1] > 1.25 * min(losses)
                and last["train_acc"] - last["val_acc"] >= 25 and last["val_acc"] > chance_limit(self.chance_val)):
            return None
        best = 1 + losses.index(min(losses))
        return (f"over-fitting: training accuracy {last['train_acc']:.1f}% against {last['val_acc']:.1f}% on "
                f"validation, whose loss has risen since epoch {best} ({min(losses):.3f} -> {losses[-1]:.3f}); "
                "best.pt keeps the best epoch; try more augmentation (--augment trivialaugment, --mixup 0.2), "
                "--patience 3, or fewer --epochs")
