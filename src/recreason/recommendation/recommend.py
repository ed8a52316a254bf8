"""``recreason recommend``: score unseen items with the run's rating head, explain the top K.

Cold start: a user unknown to the model is handled by ``cold_start``:
``item-only`` ranks items by training popularity and writes item-only reasons
(the prompt lists no user features); ``error`` refuses with a clear message.
Nothing ever falls back to an untrained vector.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from recreason.data.records import DataError
from recreason.generation.generate import GenerateConfig, generate_texts
from recreason.models.personalized import INTEREST_LABELS, interest_class
from recreason.prompts.discrete import render
from recreason.training.run import Run


@dataclass
class Recommendation:
    item: str
    score: float
    predicted_rating: float | None
    interest: str | None
    reason: str
    item_features: list[str]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class Recommender:
    def __init__(self, run_dir, gen_cfg: GenerateConfig | None = None, device: str | None = None):
        self.run = Run(run_dir)
        self.gen_cfg = gen_cfg or GenerateConfig()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "bf16" if self.gen_cfg.precision == "bf16" else "fp32"
        self.model, self.tokenizer = self.run.load_model(dtype=dtype, device=self.device)
        self.dataset = self.run.dataset()
        self.prompter = self.run.prompter(self.dataset)
        train = self.dataset.subset(self.run.info["split_seed"], "train")
        self.popularity = Counter(r.item for r in train)
        self.seen: dict[str, set[str]] = {}
        for r in self.dataset.records:
            self.seen.setdefault(r.user, set()).add(r.item)

    def _prompt(self, user: str, item: str, known: bool) -> str:
        if self.run.train_config.prompt_mode == "continuous" and known:
            return render(self.tokenizer, self.prompter.bare_messages())
        return render(self.tokenizer, self.prompter.messages(user, item))

    def recommend(self, user: str, k: int = 10, exclude_seen: bool = True, cold_start: str = "item-only"):
        known = user in getattr(self.model, "user_index", {})
        if not known and cold_start == "error":
            raise DataError(f"unknown user {user!r}: no training history, and cold_start is 'error'")
        seen = self.seen.get(user, set()) if exclude_seen else set()
        candidates = [i for i in sorted(self.popularity) if i not in seen]
        if not candidates:
            return []
        rating = interest = None
        if known and self.model.rating_head_kind is not None:
            u, i = self.model.ids([user] * len(candidates), candidates)
            with torch.no_grad():
                rating = self.model.predict_rating(u.to(self.device), i.to(self.device)).float().cpu()
                logits = self.model.predict_interest(u.to(self.device), i.to(self.device))
            interest = None if logits is None else logits.argmax(-1).cpu().tolist()
            scores = rating.tolist()
        elif known:
            raise DataError("this run has no rating head to rank items; train with train.rating_head: mf or mlp")
        else:
            scores = [float(self.popularity[i]) for i in candidates]
        top = sorted(range(len(candidates)), key=lambda n: -scores[n])[:k]
        items = [candidates[n] for n in top]
        prompts = [self._prompt(user, item, known) for item in items]
        reasons = generate_texts(self.model, self.tokenizer, prompts, self.gen_cfg, progress=False,
                                 users=[user] * len(items), items=items)
        out = []
        for n, item, reason in zip(top, items, reasons):
            predicted = None if rating is None else float(rating[n])
            if interest is not None:
                level = INTEREST_LABELS[interest[n]]
            else:
                level = None if predicted is None else INTEREST_LABELS[interest_class(predicted)]
            out.append(Recommendation(item, scores[n], predicted, level, reason,
                                      self.prompter.features(user, item)[1]))
        return out
