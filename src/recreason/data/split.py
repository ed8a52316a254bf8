"""Reproducible train/validation/test splits that keep every user and item in training.

Two orders: ``random`` (the field's usual 8:1:1 split, PETER/NETE style) and ``temporal`` (training on the
past, validation on the later reviews, test on the latest: how a deployed recommender meets its data).
"""

from __future__ import annotations

import random
from typing import Sequence

SPLIT_METHODS = ("random", "temporal")


def split_indices(
    users: Sequence[str],
    items: Sequence[str],
    seed: int,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    timestamps: Sequence[int] | None = None,
    cold_users: bool = False,
) -> dict[str, list[int]]:
    """Split records ``0..n-1`` into train/validation/test.

    The records are put in an order: random (seeded) or, with ``timestamps``, by
    time (the seed only breaks ties between equal timestamps). The first record
    of each user and of each item in that order goes to training, so no user or
    item is unseen at test time; training is then filled in order to
    ``ratios[0]``, validation takes the next ``ratios[1]`` and test the rest.
    By time, that makes test the latest reviews and validation the ones just
    before them, while training keeps each user's and item's earliest review.
    The same seed always gives the same split.

    With ``cold_users`` only items are kept in training: a user may meet the
    model first at test time (cold start). A sparse log, where most users
    wrote one review, has no test split otherwise.
    """
    if len(users) != len(items):
        raise ValueError("users and items must have the same length")
    if timestamps is not None and len(timestamps) != len(users):
        raise ValueError("timestamps must have one value per record")
    if abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
    n = len(users)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if timestamps is not None:
        order.sort(key=lambda i: timestamps[i])  # stable: ties keep the seeded order
    train: set[int] = set()
    seen_users: set[str] = set()
    seen_items: set[str] = set()
    for i in order:
        if not cold_users and users[i] not in seen_users:
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
