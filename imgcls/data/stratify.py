"""Splitting a data set: a seeded, stratified share held out (validation, test) and k folds.

One class per image: each class is shuffled and the same share of it held out. Several labels per
image (multi-label): iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011), which deals
the images of the rarest label first, each to the part that most lacks that label, so every label is
spread over the parts as evenly as its images allow and each part gets its share of the images.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any

import numpy as np

Item = tuple[str, Any]  # (path, class index), or (path, tuple of label indices)


def derived_seed(*parts: int) -> int:
    """A seed for one (seed, epoch, position...) combination, independent of every other one."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def label_set(y: Any) -> tuple[int, ...]:
    """An item's labels: its class, or a multi-label item's labels."""
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def is_multilabel(items: list[Item]) -> bool:
    """Whether (path, label) items carry label tuples (multi-label) rather than class indices."""
    return bool(items) and isinstance(items[0][1], (tuple, list))


def class_counts(items: list[Item], num_classes: int) -> list[int]:
    """Images per class (per label: the images that have it)."""
    c = Counter(label for _, y in items for label in label_set(y))
    return [c[i] for i in range(num_classes)]


def stratified_split(items: list[Item], share: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out `share` of every class (at least one image when a class has two or more); the rest
    trains. Multi-label items: iterative stratification, every label with two images or more keeping
    one for training."""
    if is_multilabel(items):
        parts = iterative_stratification(items, [1 - share, share], random.Random(seed))
        keep_one_for_training(parts, Counter(c for _, y in items for c in label_set(y)))
        train, held = parts
        return sorted(train), sorted(held)
    by_class: dict[int, list] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        n_val = min(len(group) - 1, max(1, round(len(group) * share)))
        val += group[:n_val]
        train += group[n_val:]
    return sorted(train), sorted(val)


def fold_split(items: list[Item], folds: int, fold: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Stratified k-fold: each class shuffled (seeded) and dealt round the folds; fold `fold` (1..K)
    validates, the others train. The K runs of one seed validate on every image exactly once."""
    rng = random.Random(derived_seed(seed, 2))
    if is_multilabel(items):
        parts = iterative_stratification(items, [1 / folds] * folds, rng)
        spread_labels(parts)
        return sorted(x for k, part in enumerate(parts) if k != fold - 1 for x in part), sorted(parts[fold - 1])
    by_class: dict[int, list] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    train, val, dealt = [], [], 0
    for label in sorted(by_class):
        group = sorted(by_class[label])
        rng.shuffle(group)
        for item in group:  # dealing goes on where the last class stopped: folds differ by one image at most
            (val if dealt % folds == fold - 1 else train).append(item)
            dealt += 1
    return sorted(train), sorted(val)


def iterative_stratification(items: list[Item], shares: list[float], rng: random.Random) -> list[list[Item]]:
    """Multi-label items dealt into len(shares) parts of about those shares of the images and of each
    label. The rarest label remaining first: each of its images goes to the part that lacks the label
    most (then the part that lacks images most; ties at random), among the parts not yet full, so each
    part gets its share of the images. Images of no label fill the parts that lack images."""
    order = sorted(items)
    rng.shuffle(order)
    totals = Counter(c for _, y in order for c in label_set(y))
    want = [{c: s * n for c, n in totals.items()} for s in shares]  # what each part still lacks, per label
    room = [s * len(order) for s in shares]  # and in images
    parts: list[list[Item]] = [[] for _ in shares]
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, (_, y) in enumerate(order):
        for c in label_set(y):
            by_label[c].append(i)
    left, placed = Counter(totals), [False] * len(order)

    def place(i: int, key: Any) -> None:
        k = max(range(len(parts)), key=key)
        parts[k].append(order[i])
        placed[i], room[k] = True, room[k] - 1
        for c in label_set(order[i][1]):
            want[k][c] -= 1
            left[c] -= 1

    while +left:
        c = min(+left, key=lambda c: (left[c], c))
        for i in by_label[c]:
            if not placed[i]:
                place(i, lambda k, c=c: (room[k] > 0, want[k][c], room[k], rng.random()))
    for i in range(len(order)):
        if not placed[i]:
            place(i, lambda k: (room[k], rng.random()))
    return parts


def keep_one_for_training(parts: list[list[Item]], totals: Counter) -> None:
    """A label of two images or more with none in the first (training) part: one of its held-out
    images, the one of fewest labels, moves there; and, to keep the shares, a training image whose
    labels all have another training image moves the other way, when there is one."""
    train, held = parts
    in_train = Counter(c for _, y in train for c in label_set(y))
    for c in sorted(totals):
        if totals[c] < 2 or in_train[c]:
            continue
        item = min((x for x in held if c in label_set(x[1])), key=lambda x: (len(label_set(x[1])), x))
        held.remove(item)
        train.append(item)
        in_train.update(label_set(item[1]))
        spare = next((x for x in train if x is not item and all(in_train[d] >= 2 for d in label_set(x[1]))), None)
        if spare is not None:
            train.remove(spare)
            held.append(spare)
            in_train.subtract(label_set(spare[1]))


def spread_labels(parts: list[list[Item]]) -> None:
    """k folds: each fold trains on all the others, so no part may hold every image of a label of two images
    or more. While one is found, a change that lowers the number of such labels is made: an image of such a
    label exchanged with one of another part (the sizes stay), else moved alone (a part one image bigger).
    Some cannot be spread at all (three images that pair off three labels, over two parts)."""
    totals = Counter(c for part in parts for _, y in part for c in label_set(y))
    counts = [Counter(c for _, y in part for c in label_set(y)) for part in parts]
    where = {x: k for k, part in enumerate(parts) for x in part}
    ranked = sorted(where, key=lambda x: (len(label_set(x[1])), x))  # the images of fewest labels first
    images_of: dict[int, list[Item]] = defaultdict(list)
    for x in ranked:
        for c in label_set(x[1]):
            images_of[c].append(x)

    def alone(labels: set[int]) -> int:  # how many of these labels have every image in one part
        return sum(totals[c] >= 2 and any(n[c] == totals[c] for n in counts) for c in labels)

    def shift(moves: list[tuple[Item, int, int]]) -> None:
        for x, a, b in moves:
            counts[a].subtract(label_set(x[1]))
            counts[b].update(label_set(x[1]))
            where[x] = b

    def gain(moves: list[tuple[Item, int, int]]) -> int:
        touched = {c for x, _, _ in moves for c in label_set(x[1])}
        before = alone(touched)
        shift(moves)
        after = alone(touched)
        shift([(x, b, a) for x, a, b in reversed(moves)])
        return before - after

    def better() -> list[tuple[Item, int, int]] | None:
        for c in sorted(c for c in totals if alone({c})):
            for x in images_of[c]:
                for j in sorted(set(range(len(parts))) - {where[x]}, key=lambda j: (len(parts[j]), j)):
                    move = [(x, where[x], j)]
                    least = max(1, gain(move))
                    swap = next((m for y in ranked if where[y] == j
                                 for m in [[*move, (y, j, where[x])]] if gain(m) >= least), None)
                    if swap is not None or least == gain(move):
                        return swap or move
        return None

    while (change := better()) is not None:
        for x, a, b in change:
            parts[a].remove(x)
            parts[b].append(x)
        shift(change)
