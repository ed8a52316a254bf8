"""Reproducible train/validation/test splits that keep every user and item in training."""

from __future__ import annotations

import random
from typing import Sequence


def split_indices(
    users: Sequence[str],
    items: Sequence[str],
    seed: int,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, list[int]]:
    """Split records ``0..n-1`` into train/validation/test.

    First one random record per user and one per item go to training (so no
    user or item is unseen at test time), then training is filled at random to
    ``ratios[0]``, validation takes ``ratios[1]`` and test the rest. The same
    seed always gives the same split.
    """
    if len(users) != len(items):
        raise ValueError("users and items must have the same length")
    if abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
    n = len(users)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    train: set[int] = set()
    seen_users: set[str] = set()
    seen_items: set[str] = set()
    for i in order:
        if users[i] not in seen_users:
            seen_users.add(users[i])
            seen_items.add(items[i])
            train.add(i)
    for i in order:
        if items[i] not in seen_items:
            seen_items.add(items[i])
            train.add(i)
    n_train = max(len(train), round(ratios[0] * n))
    n_valid = round(ratios[1] * n)
    rest = [i for i in order if i not in train]
    fill = n_train - len(train)
    train.update(rest[:fill])
    rest = rest[fill:]
    return {
        "train": sorted(train),
        "validation": sorted(rest[:n_valid]),
        "test": sorted(rest[n_valid:]),
    }
