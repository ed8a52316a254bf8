"""Non-neural baselines that run on the same split as the fine-tuned model."""

from __future__ import annotations

import collections
from typing import Sequence

from recreason.data.records import Explained


class RetrievalBaseline:
    """Return the training explanation whose context is most like the query's.

    Candidates are the item's training explanations (the user's own when the
    item has none). Each is scored by the Jaccard overlap between the features
    of its review and the user's training features; ties go to the candidate
    whose feature the user mentions most, then to the most recent.
    """

    def __init__(self, train: Sequence[Explained]):
        self.by_item: dict[str, list[Explained]] = collections.defaultdict(list)
        self.by_user: dict[str, list[Explained]] = collections.defaultdict(list)
        self.user_features: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in train:
            self.by_item[r.item].append(r)
            self.by_user[r.user].append(r)
            self.user_features[r.user].update(set(r.features or [r.feature]))

    def explain(self, user: str, item: str) -> str:
        candidates = [c for c in self.by_item.get(item, []) if c.user != user] or self.by_item.get(item, [])
        if not candidates:
            candidates = self.by_user.get(user, [])
        if not candidates:
            return ""
        profile = self.user_features.get(user, collections.Counter())
        wanted = set(profile)

        def score(c: Explained):
            feats = set(c.features or [c.feature])
            union = feats | wanted
            jaccard = len(feats & wanted) / len(union) if union else 0.0
            return (jaccard, profile.get(c.feature, 0), c.timestamp)

        return max(candidates, key=score).sentence
