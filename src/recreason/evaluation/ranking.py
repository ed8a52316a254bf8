"""Top-K ranking evaluation with sampled negatives, and the non-neural rating/ranking baselines.

Protocol: for every test record (user u, item i) the held-out item i is ranked
among ``n_negatives`` (default 99) items sampled uniformly, with a fixed seed,
from the items u never interacted with in any split. HR@K is the share of test
records whose item lands in the top K; NDCG@K adds 1/log2(rank + 1) for such a
hit (rank counted from 1). Ties are broken against the held-out item (it ranks
below every negative with an equal score), so a constant scorer gets no credit.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

from recreason.data.records import Explained

Scorer = Callable[[str, Sequence[str]], Sequence[float]]


def rank_of_target(target_score: float, negative_scores: Sequence[float]) -> int:
    """1-based rank of the target among the negatives; ties rank the target last."""
    return 1 + sum(1 for s in negative_scores if s >= target_score)


def hit_ratio(ranks: Sequence[int], k: int) -> float:
    return sum(1 for r in ranks if r <= k) / len(ranks) if ranks else 0.0


def ndcg(ranks: Sequence[int], k: int) -> float:
    return sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks) if ranks else 0.0


def sample_negatives(
    records: Sequence[Explained], test: Sequence[Explained], n_negatives: int = 99, seed: int = 0
) -> list[list[str]]:
    """Per test record, ``n_negatives`` items its user never interacted with (any split)."""
    items = sorted({r.item for r in records})
    seen: dict[str, set[str]] = defaultdict(set)
    for r in records:
        seen[r.user].add(r.item)
    rng = random.Random(seed)
    out = []
    for r in test:
        pool = [i for i in items if i not in seen[r.user]]
        out.append(rng.sample(pool, min(n_negatives, len(pool))))
    return out


def evaluate_ranking(
    scorer: Scorer, test: Sequence[Explained], negatives: Sequence[Sequence[str]], ks: Sequence[int] = (10,)
) -> dict[str, float]:
    ranks = []
    for r, negs in zip(test, negatives):
        scores = list(scorer(r.user, [r.item, *negs]))
        ranks.append(rank_of_target(scores[0], scores[1:]))
    result = {}
    for k in ks:
        result[f"HR@{k}"] = hit_ratio(ranks, k)
        result[f"NDCG@{k}"] = ndcg(ranks, k)
    return result


def full_ranking(
    scorer: Scorer, train: Sequence[Explained], test: Sequence[Explained], ks: Sequence[int] = (10, 20),
    n_resamples: int = 1000, seed: int = 0,
) -> dict:
    """Full-ranking metrics (Krichene & Rendle, KDD 2020): for every test user, every item of the training
    catalogue the user has not interacted with in training is ranked; the user's test items are relevant.
    Recall@K = |relevant in the top K| / |relevant| and NDCG@K with binary gains, averaged over users, with
    95% bootstrap intervals over users.
    Ties rank relevant items last."""
    catalogue = sorted({r.item for r in train})
    seen: dict[str, set[str]] = defaultdict(set)
    for r in train:
        seen[r.user].add(r.item)
    relevant: dict[str, set[str]] = defaultdict(set)
    for r in test:
        if r.item in set(catalogue) - seen[r.user]:
            relevant[r.user].add(r.item)
    per_user: dict[str, list[float]] = defaultdict(list)
    for user in sorted(relevant):
        candidates = [i for i in catalogue if i not in seen[user]]
        scores = np.asarray(scorer(user, candidates), dtype=np.float64)
        rel = np.array([i in relevant[user] for i in candidates])
        order = np.lexsort((rel, -scores))  # by score; among equal scores, relevant items last
        hits = rel[order]
        for k in ks:
            top = hits[:k]
            per_user[f"Recall@{k}"].append(float(top.sum() / rel.sum()))
            gains = (top / np.log2(np.arange(2, len(top) + 2))).sum()
            ideal = (1 / np.log2(np.arange(2, min(k, int(rel.sum())) + 2))).sum()
            per_user[f"full NDCG@{k}"].append(float(gains / ideal))
    out: dict = {"users": len(relevant)}
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(relevant), size=(n_resamples, len(relevant))) if relevant else None
    for name, values in per_user.items():
        values = np.asarray(values)
        out[name] = float(values.mean())
        if samples is not None:
            means = values[samples].mean(1)
            out[f"{name} CI"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


class PopularityBaseline:
    """Scores an item by its number of training interactions; predicts the global mean rating."""

    def __init__(self, train: Sequence[Explained]):
        self.counts = Counter(r.item for r in train)
        self.mean = float(np.mean([r.rating for r in train]))

    def score(self, user: str, items: Sequence[str]) -> list[float]:
        return [float(self.counts.get(i, 0)) for i in items]

    def predict(self, user: str, item: str) -> float:
        return self.mean


class MatrixFactorization:
    """Biased matrix factorization trained with SGD on the training ratings (a classic baseline).

    ``predict`` gives a rating; ``score`` ranks items for a user by predicted rating.
    """

    def __init__(self, train: Sequence[Explained], dim: int = 16, epochs: int = 30, lr: float = 0.01,
                 reg: float = 0.05, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.users = {u: n for n, u in enumerate(sorted({r.user for r in train}))}
        self.items = {i: n for n, i in enumerate(sorted({r.item for r in train}))}
        self.mean = float(np.mean([r.rating for r in train]))
        self.P = rng.normal(0, 0.1, (len(self.users), dim))
        self.Q = rng.normal(0, 0.1, (len(self.items), dim))
        self.bu = np.zeros(len(self.users))
        self.bi = np.zeros(len(self.items))
        data = [(self.users[r.user], self.items[r.item], r.rating) for r in train]
        order = list(range(len(data)))
        shuffle = random.Random(seed)
        for _ in range(epochs):
            shuffle.shuffle(order)
            for n in order:
                u, i, y = data[n]
                err = y - (self.mean + self.bu[u] + self.bi[i] + self.P[u] @ self.Q[i])
                self.bu[u] += lr * (err - reg * self.bu[u])
                self.bi[i] += lr * (err - reg * self.bi[i])
                pu = self.P[u].copy()
                self.P[u] += lr * (err * self.Q[i] - reg * self.P[u])
                self.Q[i] += lr * (err * pu - reg * self.Q[i])

    def predict(self, user: str, item: str) -> float:
        u, i = self.users.get(user), self.items.get(item)
        value = self.mean
        if u is not None:
            value += self.bu[u]
        if i is not None:
            value += self.bi[i]
        if u is not None and i is not None:
            value += float(self.P[u] @ self.Q[i])
        return value

    def score(self, user: str, items: Sequence[str]) -> list[float]:
        return [self.predict(user, i) for i in items]
