"""Discrete text prompts built from training behaviour.

The prompt for (user, item) lists the features the user mentioned in their
training reviews and the features other users mentioned for the item (shared
ones first). With ``prompt.evidence: N`` it also quotes the N sentences other
buyers wrote about the item that best match this user's features (evidence, as
in retrieval-augmented explainers such as PRAG and ERRA). Only training records
feed profiles and evidence, and a training record's own review is subtracted
from its profiles and never quoted, so the model never sees its target in its
input and validation/test metrics stay honest.
"""

from __future__ import annotations

import collections
import json
from typing import Iterable, Sequence

from recreason.config import PromptConfig
from recreason.data.records import Explained



class DiscretePrompter:
    """Builds chat prompts from user and item feature profiles of the training split."""

    def __init__(self, train: Iterable[Explained], config: PromptConfig | None = None):
        self.config = config or PromptConfig()
        self.user_profiles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.item_profiles: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.train_indices: set[int] = set()
        self.user_history: dict[str, list[Explained]] = collections.defaultdict(list)
        self.item_info: dict[str, tuple[str, dict]] = {}
        self.item_records: dict[str, list[Explained]] = collections.defaultdict(list)  # evidence pool
        for record in train:
            self.user_history[record.user].append(record)
            self.item_records[record.item].append(record)
            if record.title or record.attributes:
                self.item_info[record.item] = (record.title, record.attributes)
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

    def user_features(self, user: str, record: Explained | None = None) -> set[str]:
        """Every feature of the user's training reviews (the record's own review excluded)."""
        return {f for f, c in self._profile(self.user_profiles, user, record).items() if c > 0}

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

    def history(self, user: str, record: Explained | None = None) -> list[Explained]:
        """The user's latest training reviews (the record itself excluded), newest first."""
        own = record.index if record is not None else None
        past = [r for r in self.user_history.get(user, []) if r.index != own]
        return sorted(past, key=lambda r: -r.timestamp)[: self.config.history]

    def evidence(self, item: str, user_features: Iterable[str], record: Explained | None = None,
                 user: str | None = None) -> list[str]:
        """The quoted sentences of :meth:`evidence_records`."""
        return [r.sentence for r in self.evidence_records(item, user_features, record, user)]

    def evidence_records(self, item: str, user_features: Iterable[str], record: Explained | None = None,
                         user: str | None = None) -> list[Explained]:
        """Up to ``config.evidence`` sentences other buyers wrote about ``item`` in training, most relevant
        first: the most features in common with ``user_features``, then the most of the item's frequent
        features, then the newest. Never the record's own review, never the user's own reviews, never text
        outside the training split (or what serving recorded since)."""
        if not self.config.evidence:
            return []
        wanted = set(user_features)
        common = self.item_profiles.get(item, {})
        own = record.index if record is not None else None
        scored = []
        for r in self.item_records.get(item, ()):
            if r.index == own or r.user == user or not r.sentence:
                continue
            feats = set(self._record_features(r))
            scored.append((-len(feats & wanted), -sum(common.get(f, 0) > 1 for f in feats), -r.timestamp, r.index, r))
        chosen: list[Explained] = []
        for *_, r in sorted(scored, key=lambda x: x[:4]):
            if all(r.sentence != c.sentence for c in chosen):
                chosen.append(r)
            if len(chosen) == self.config.evidence:
                break
        return chosen

    def messages(self, user: str, item: str, record: Explained | None = None) -> list[dict[str, str]]:
        """Chat messages for (user, item). Review text appears only as quoted data, never as instructions."""
        user_feats, item_feats = self.features(user, item, record)
        past = self.history(user, record) if self.config.history else []
        evidence = self.evidence(item, self._profile(self.user_profiles, user, record), record, user)
        return self.compose(user_feats, item_feats, item, past, evidence)

    def compose(self, user_feats: list[str], item_feats: list[str], item: str = "", past=(),
                evidence: Sequence[str] = ()) -> list[dict[str, str]]:
        """Messages from explicit feature lists (also used for callers' own history of cold users)."""
        lines = []
        title, attributes = self.item_info.get(item, ("", {}))
        if title:
            lines.append(f"Item: {json.dumps(title, ensure_ascii=False)}.")
        if attributes and self.config.attributes:
            shown = list(attributes.items())[: self.config.attributes]
            lines.append("Item attributes: " + "; ".join(f"{k}: {v}" for k, v in shown) + ".")
        lines += [
            f"Features this user often mentions: {', '.join(user_feats) or 'none yet'}.",
            f"Features other buyers mention for this item: {', '.join(item_feats) or 'none yet'}.",
        ]
        if past:
            quoted = "; ".join(f"{r.rating:g} stars, {json.dumps(r.summary or r.feature, ensure_ascii=False)}"
                               for r in past)
            lines.append(f"This user's latest reviews: {quoted}.")
        if evidence:
            quoted = "; ".join(json.dumps(e, ensure_ascii=False) for e in evidence)
            lines.append(f"Other buyers wrote about this item: {quoted}.")
        lines.append(self.config.instruction)
        return [{"role": "system", "content": self.config.system}, {"role": "user", "content": "\n".join(lines)}]

    def add(self, record: Explained) -> None:
        """Fold a new interaction into the profiles (serving: a cold user becomes warm without retraining)."""
        self.user_history[record.user].append(record)
        self.item_records[record.item].append(record)
        self.user_profiles[record.user].update(self._record_features(record))
        self.item_profiles[record.item].update(self._record_features(record))

    def bare_messages(self) -> list[dict[str, str]]:
        """The instruction alone, for continuous prompts where learned vectors carry the user and item."""
        return [{"role": "system", "content": self.config.system}, {"role": "user", "content": self.config.instruction}]

    def for_record(self, record: Explained) -> list[dict[str, str]]:
        return self.messages(record.user, record.item, record)


def uses_soft_prompt(prompt_mode: str, known_to_model: bool) -> bool:
    """The one rule for which prompt a run gets: a continuous-prompt run whose model has learned vectors for
    the user gets the instruction alone (the vectors carry user and item); everything else gets the text."""
    return prompt_mode == "continuous" and known_to_model


def render(tokenizer, messages: list[dict[str, str]], cue: str = "Reason:") -> str:
    """Render chat messages into the model's prompt text, ending where the answer starts: the model's chat
    template, or for a model without one (a pretrained base such as Gemma 3 270M) the messages' text and
    ``cue`` (``prompt.answer_cue``) on a line of its own."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = "\n\n".join(m["content"] for m in messages)
    return f"{text}\n{cue}"
