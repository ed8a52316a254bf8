"""The explanation service behind the HTTP API: one model per worker, a store, batching, cache, checks."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from recreason.data.records import Explained
from recreason.evaluation.metrics import FeatureMatcher
from recreason.generation.generate import GenerateConfig, generate_texts
from recreason.models.personalized import INTEREST_LABELS, interest_class
from recreason.prompts.discrete import render
from recreason.serving.batching import MicroBatcher
from recreason.serving.safety import ReasonChecker
from recreason.serving.store import Interaction, open_store
from recreason.text import tokenize
from recreason.training.run import Run


class UnknownId(LookupError):
    """A user or item id the service knows nothing about (the message names the field)."""


@dataclass
class ServeConfig:
    max_batch_size: int = 16  # generations run together
    max_wait_ms: float = 50.0  # how long the first queued request waits for company (a batch takes 1-3 s on CPU)
    max_new_tokens_limit: int = 64  # upper bound on a request's max_new_tokens
    max_beams: int = 4
    cache_size: int = 10000  # cached reasons (model, user, item, options, history version)
    request_timeout_s: float = 60.0
    cold_start: str = "item-only"  # unknown user without history: item-only reason, or "error"


class ExplanationService:
    def __init__(self, run_dir: str | Path, store_url: str | None = None, gen_cfg: GenerateConfig | None = None,
                 serve_cfg: ServeConfig | None = None):
        self.run = Run(run_dir)
        self.cfg = serve_cfg or ServeConfig()
        self.gen_cfg = gen_cfg or GenerateConfig()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bf16" if self.gen_cfg.precision == "bf16" else "fp32"
        self.model, self.tokenizer = self.run.load_model(dtype=dtype, device=device)
        self.device = device
        dataset = self.run.dataset()
        self.vocabulary = list(dataset.features)
        self.matcher = FeatureMatcher(self.vocabulary)
        self.checker = ReasonChecker(self.vocabulary)
        self.store = open_store(store_url or str(self.run.dir / "serving.db"))
        if not self.store.seeded():
            self.store.seed(dataset.subset(self.run.info["split_seed"], "train"), str(dataset.root))
        self.prompter = self.run.prompter(dataset)
        self.prompter.user_profiles.clear()
        self.prompter.item_profiles.clear()
        self.prompter.user_history.clear()
        self.prompter.train_indices.clear()
        self._next_index = 0
        self._seq = 0  # the store's sequence number folded in so far
        self._lock = threading.Lock()
        self.ratings: dict[str, list[float]] = collections.defaultdict(list)
        self.sync()
        self.mean_rating = sum(sum(v) for v in self.ratings.values()) / max(1, sum(len(v) for v in self.ratings.values()))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.stats = collections.Counter()
        self.batch_sizes: list[int] = []
        self.batcher = MicroBatcher(self._generate_batch, self.cfg.max_batch_size, self.cfg.max_wait_ms / 1000,
                                    on_batch=self.batch_sizes.append)
        self.model_id = f"{self.run.dir.resolve()}"

    # ----- data --------------------------------------------------------------------------------
    def _as_record(self, inter: Interaction) -> Explained:
        self._next_index += 1
        feats = inter.features or sorted(self.matcher.find(tokenize(inter.text)))
        return Explained(index=-self._next_index, user=inter.user, item=inter.item, rating=inter.rating,
                         timestamp=inter.timestamp, feature=feats[0] if feats else "", opinion="",
                         sentence=inter.text, sentiment=1 if inter.rating >= 3 else -1, summary=inter.summary,
                         features=feats)

    def sync(self) -> int:
        """Fold in what was recorded since the last look, by this process or by any other sharing the store
        (uvicorn workers, replicas on PostgreSQL). Returns how many interactions were new."""
        new = self.store.interactions_after(self._seq)
        with self._lock:
            for inter in new:
                if inter.seq > self._seq:  # a concurrent sync may have folded it in already
                    self.prompter.add(self._as_record(inter))
                    self.ratings[inter.item].append(inter.rating)
                    self._seq = inter.seq
        return len(new)

    def known_user(self, user: str) -> bool:
        return user in self.prompter.user_profiles

    def known_item(self, item: str) -> bool:
        return item in self.prompter.item_profiles

    def record(self, user: str, item: str, rating: float, text: str, timestamp: int, summary: str = "") -> dict:
        features = sorted(self.matcher.find(tokenize(text)))
        inter = Interaction(user, item, rating, text, timestamp, features, summary)
        version = self.store.add_interaction(inter)  # durable before we acknowledge
        self.sync()
        return {"user_id": user, "item_id": item, "features": features, "history_version": version}

    # ----- generation --------------------------------------------------------------------------
    def _generate_batch(self, key, payloads):
        options = dict(key)
        cfg = replace(self.gen_cfg, **options)
        prompts = [p["prompt"] for p in payloads]
        texts = generate_texts(self.model, self.tokenizer, prompts, cfg, progress=False,
                               users=[p["user"] for p in payloads], items=[p["item"] for p in payloads])
        self.stats["generated_tokens"] += sum(len(self.tokenizer(t)["input_ids"]) for t in texts)
        return texts

    def options(self, requested: dict[str, Any] | None) -> dict[str, Any]:
        o = {"max_new_tokens": self.gen_cfg.max_new_tokens, "num_beams": 1, "do_sample": False,
             "temperature": 1.0, "top_p": 1.0}
        for k, v in (requested or {}).items():
            if v is not None:
                o[k] = v
        o["max_new_tokens"] = min(int(o["max_new_tokens"]), self.cfg.max_new_tokens_limit)
        o["num_beams"] = min(int(o["num_beams"]), self.cfg.max_beams)
        return o

    def _rating(self, user: str, item: str) -> tuple[float | None, str | None, list[str]]:
        flags = []
        idx = getattr(self.model, "user_index", {})
        if self.model.rating_head_kind and user in idx and item in self.model.item_index:
            u, i = self.model.ids([user], [item])
            with torch.no_grad():
                value = float(self.model.predict_rating(u.to(self.device), i.to(self.device))[0])
        else:
            known = self.ratings.get(item)
            value = sum(known) / len(known) if known else self.mean_rating
            flags.append("rating_fallback")
        return value, INTEREST_LABELS[interest_class(value)], flags

    def explain(self, requests: list[dict], options: dict | None = None) -> list[dict]:
        opts = self.options(options)
        key = tuple(sorted(opts.items()))
        self.sync()
        jobs = []
        for n, req in enumerate(requests):
            user, item = req["user_id"], req["item_id"]
            flags: list[str] = []
            extra_item = req.get("item_features") or []
            if not self.known_item(item) and not extra_item:
                raise UnknownId(f"items[{n}].item_id: unknown item {item!r}; send item_features for new items")
            history = req.get("history") or []
            with self._lock:
                # The item's listed features are computed once and serve the prompt, the template and grounding.
                item_feats = self.prompter.features(user, item)[1] if self.known_item(item) else list(extra_item)
                known_item_feats = sorted(set(self.prompter.item_profiles.get(item, {})) | set(extra_item))
                history_version = len(self.prompter.user_history.get(user, ()))  # changes with the history
                if self.known_user(user):
                    messages = self.prompter.messages(user, item)
                elif history:
                    feats = collections.Counter(f for h in history for f in self.matcher.find(tokenize(h["text"])))
                    user_feats = [f for f, _ in feats.most_common(self.prompter.config.user_features)]
                    messages = self.prompter.compose(user_feats, item_feats, item)
                    flags.append("cold_start_history")
                elif self.cfg.cold_start == "error":
                    raise UnknownId(f"items[{n}].user_id: unknown user {user!r}; send its history")
                else:
                    messages = self.prompter.compose([], item_feats, item)
                    flags.append("cold_start_item_only")
            soft_ok = self.run.train_config.prompt_mode == "continuous" and user in getattr(self.model, "user_index", {})
            prompt = render(self.tokenizer, self.prompter.bare_messages() if soft_ok else messages)
            cache_key = (self.model_id, user, item, key, history_version, tuple(extra_item),
                         tuple(h["text"] for h in history))
            jobs.append((req, prompt, flags, item_feats, known_item_feats, cache_key))
        futures = []
        for req, prompt, flags, _, _, cache_key in jobs:
            with self._lock:
                cached = self._cache.get(cache_key)
                if cached is not None:
                    self._cache.move_to_end(cache_key)
            if cached is not None:
                self.stats["cache_hits"] += 1
                futures.append(cached)
            else:
                futures.append(self.batcher.submit(key, {"prompt": prompt, "user": req["user_id"], "item": req["item_id"]}))
        out = []
        deadline = time.monotonic() + self.cfg.request_timeout_s
        for (req, prompt, flags, item_feats, known, cache_key), fut in zip(jobs, futures):
            text = fut if isinstance(fut, str) else fut.result(timeout=max(0.0, deadline - time.monotonic()))
            if not isinstance(fut, str):
                with self._lock:
                    self._cache[cache_key] = text
                    if len(self._cache) > self.cfg.cache_size:
                        self._cache.popitem(last=False)
            checked = self.checker.check(text, known, prompt, highlight=item_feats)
            rating, level, rflags = self._rating(req["user_id"], req["item_id"])
            self.stats["reasons"] += 1
            self.stats["filtered"] += int(checked.replaced)
            self.stats["ungrounded"] += int("ungrounded" in checked.flags)
            out.append({"user_id": req["user_id"], "item_id": req["item_id"], "reason": checked.text,
                        "predicted_rating": rating, "interest": level, "features": checked.features,
                        "flags": flags + rflags + checked.flags})
        return out

    def recommend(self, user: str, k: int, exclude_seen: bool = True, options: dict | None = None) -> list[dict]:
        self.sync()
        with self._lock:
            seen = {r.item for r in self.prompter.user_history.get(user, ())} if exclude_seen else set()
            candidates = [i for i in self.prompter.item_profiles if i not in seen]
        if not candidates:
            return []
        if self.model.rating_head_kind and user in getattr(self.model, "user_index", {}):
            known = [c for c in candidates if c in self.model.item_index]
            u, i = self.model.ids([user] * len(known), known)
            with torch.no_grad():
                scores = self.model.predict_rating(u.to(self.device), i.to(self.device)).float().cpu().tolist()
            ranked = sorted(zip(known, scores), key=lambda x: -x[1])[:k]
        else:
            if not self.known_user(user) and self.cfg.cold_start == "error":
                raise UnknownId(f"user_id: unknown user {user!r}")
            ranked = sorted(((c, float(len(self.ratings.get(c, [])))) for c in candidates), key=lambda x: -x[1])[:k]
        reasons = self.explain([{"user_id": user, "item_id": item} for item, _ in ranked], options)
        for r, (_, score) in zip(reasons, ranked):
            r["score"] = score
        return reasons

    def close(self) -> None:
        self.batcher.close()


def serve_config_dict(cfg: ServeConfig) -> dict:
    return asdict(cfg)
