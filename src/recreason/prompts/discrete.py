"""Discrete text prompts built from training behaviour.

The prompt for (user, item) lists the features the user mentioned in their
training reviews and the features other users mentioned for the item (shared
ones first). Only training records feed profiles, and a training record's own
review is subtracted from its profiles, so the model never sees its target in
its input and validation/test metrics stay honest.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable

from recreason.data.records import Explained

SYSTEM = "You explain product recommendations in one short sentence."


@dataclass
class PromptConfig:
    user_features: int = 5  # how many of the user's most frequent features to list
    item_features: int = 5  # how many of the item's most frequent features to list
    system: str = SYSTEM
    instruction: str = "Write one short sentence on why this user will like this item."


class DiscretePrompter:
    """Builds chat prompts from user and item feature profiles of the training split."""

    def __init__(self, train: Iterable[Explained], config: PromptConfig | None = None):
        self.config = config or PromptConfig()
        self.user_profiles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.item_profiles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.train_indices: set[int] = set()
        for record in train:
            self.train_indices.add(record.index)
            self.user_profiles[record.user].update(self._record_features(record))
            self.item_profiles[record.item].update(self._record_features(record))

    @staticmethod
    def _record_features(record: Explained) -> list[str]:
        return list(dict.fromkeys(record.features or [record.feature]))

    def _profile(self, profiles: dict, key: str, record: Explained | None) -> collections.Counter:
        counts = collections.Counter(profiles.get(key, {}))
        if record is not None and record.index in self.train_indices:
            counts.subtract(self._record_features(record))
        return counts

    @staticmethod
    def _top(counts: collections.Counter, k: int, first: set[str] = frozenset()) -> list[str]:
        ranked = sorted((f for f, c in counts.items() if c > 0), key=lambda f: (f not in first, -counts[f], f))
        return ranked[:k]

    def features(self, user: str, item: str, record: Explained | None = None) -> tuple[list[str], list[str]]:
        """The user's and the item's listed features for this pair (the record's own review excluded)."""
        u = self._profile(self.user_profiles, user, record)
        i = self._profile(self.item_profiles, item, record)
        shared = {f for f in u if u[f] > 0 and i.get(f, 0) > 0}
        return self._top(u, self.config.user_features, shared), self._top(i, self.config.item_features, shared)

    def messages(self, user: str, item: str, record: Explained | None = None) -> list[dict[str, str]]:
        user_feats, item_feats = self.features(user, item, record)
        lines = [
            f"Features this user often mentions: {', '.join(user_feats) or 'none yet'}.",
            f"Features other buyers mention for this item: {', '.join(item_feats) or 'none yet'}.",
            self.config.instruction,
        ]
        return [{"role": "system", "content": self.config.system}, {"role": "user", "content": "\n".join(lines)}]

    def bare_messages(self) -> list[dict[str, str]]:
        """The instruction alone, for continuous prompts where learned vectors carry the user and item."""
        return [{"role": "system", "content": self.config.system}, {"role": "user", "content": self.config.instruction}]

    def for_record(self, record: Explained) -> list[dict[str, str]]:
        return self.messages(record.user, record.item, record)


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """Render chat messages into the model's prompt text, ending where the answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = "\n\n".join(m["content"] for m in messages)
    return f"{text}\nReason:"
