"""The explanation service behind the HTTP API: one model per worker, a store, batching, cache, checks.

Reasons come from :meth:`Predictor.explain` (and :meth:`Predictor.recommend`), the staged call every command
shares; the service plugs its generation hook into it (:meth:`ExplanationService._texts`: the response cache,
then the micro-batcher) and keeps the store in step with the predictor's profiles.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from recreason.config import GenerateConfig, ServeConfig
from recreason.data.records import Explained
from recreason.inference import Predictor, Prompted, Request
from recreason.errors import ConfigError
from recreason.generation.engine import CandidateDecoder, ContinuousDecoder
from recreason.generation.generate import (candidate_list, clean_output, draw_seeds, plain_causal_lm,
                                           stop_token_ids)
from recreason.serving.batching import ContinuousBatcher, MicroBatcher
from recreason.serving.store import Interaction, open_store
from recreason.text import tokenize


class ExplanationService:
    def __init__(self, run_dir: str | Path, store_url: str | None = None, gen_cfg: GenerateConfig | None = None,
                 serve_cfg: ServeConfig | None = None):
        self.cfg = serve_cfg or ServeConfig()
        if self.cfg.batching not in ("whole", "continuous"):
            raise ConfigError(f"serve.batching must be whole or continuous, got {self.cfg.batching!r}")
        import torch

        # The model is loaded with one torch thread and computes with all of them on the batcher's thread: torch's
        # thread count is per thread, and each thread that runs a parallel product keeps a pool of its own (GNU
        # OpenMP). Two such pools on two cores made the worker threads sleep and wake around every parallel step
        # instead of spinning: one 16 x 12 batch of the distilled run took 8.1-9.9 s on a second thread against
        # 6.3-7.6 s on the thread that had loaded the model.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.predictor = Predictor(run_dir, gen_cfg, cold_start=self.cfg.cold_start)
        finally:
            torch.set_num_threads(self._threads)
        self.run = self.predictor.run
        self.gen_cfg = self.predictor.gen_cfg
        self.matcher = self.predictor.matcher
        self.store = open_store(store_url or str(self.run.paths.store))
        if not self.store.seeded():
            self.store.seed(self.predictor.train, str(self.predictor.dataset.root))
        self.predictor.forget_history()  # the store is the source of truth: refill from it
        self._next_index = 0
        self._seq = 0  # the store's sequence number folded in so far
        self._lock = self.predictor.lock  # one lock for the profiles, the sequence number and the cache
        self.sync()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.stats = collections.Counter()
        self.batch_sizes: list[int] = []
        self.batcher = self._batcher()
        self.model_id = f"{self.run.dir.resolve()}"
        self.model_tag = self.predictor.model_tag
        self.has_stored = self.store.has_reasons(self.model_tag)  # serve --reasons loaded rows of this run

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
                    self.predictor.add(self._as_record(inter))
                    self._seq = inter.seq
        return len(new)

    def known_user(self, user: str) -> bool:
        return self.predictor.known_user(user)

    def known_item(self, item: str) -> bool:
        return self.predictor.known_item(item)

    def record(self, user: str, item: str, rating: float, text: str, timestamp: int, summary: str = "") -> dict:
        features = sorted(self.matcher.find(tokenize(text)))
        inter = Interaction(user, item, rating, text, timestamp, features, summary)
        version = self.store.add_interaction(inter)  # durable before we acknowledge
        self.sync()
        return {"user_id": user, "item_id": item, "features": features, "history_version": version}

    def history(self, user: str, limit: int = 10) -> list[dict]:
        """The user's latest interactions, newest first."""
        self.sync()
        with self._lock:
            past = list(self.predictor.prompter.user_history.get(user, ()))
        past.sort(key=lambda r: (-r.timestamp, r.index))
        return [{"item_id": r.item, "title": self.title(r.item), "rating": r.rating, "text": r.sentence,
                 "timestamp": r.timestamp} for r in past[:limit]]

    def title(self, item: str) -> str:
        """The item's title from the data's item table ("" when it has none): how people know an item."""
        return self.predictor.prompter.item_info.get(item, ("", {}))[0]

    def active_users(self, limit: int = 100) -> list[str]:
        with self._lock:
            counts = [(len(h), u) for u, h in self.predictor.prompter.user_history.items()]
        return [u for _, u in sorted(counts, key=lambda x: (-x[0], x[1]))[:limit]]

    # ----- generation --------------------------------------------------------------------------
    def _batcher(self):
        """With ``serve.batching: continuous`` and a plain-prompt model, a running batch: of greedy reasons, or, where
        the configuration chooses among candidates, of every draw of every request (:class:`CandidateDecoder`,
        ``max_batch_size`` requests' draws at a time). Else whole micro-batches."""
        lm = plain_causal_lm(self.predictor.model)
        if self.cfg.batching == "whole" or lm is None:
            return MicroBatcher(self._generate_batch, self.cfg.max_batch_size, self.cfg.max_wait_ms / 1000,
                                on_batch=self.batch_sizes.append, max_queue=self.cfg.max_queue, threads=self._threads)
        tok, cfg = self.predictor.tokenizer, self.gen_cfg
        if self._chooses(cfg):
            decoder = CandidateDecoder.for_config(lm, tok, cfg, self.cfg.max_batch_size)
            return ContinuousBatcher(decoder, self._same_candidates, self._start_candidates, self._finish_candidates,
                                     self._generate_batch, self.cfg.max_batch_size, on_batch=self.batch_sizes.append,
                                     max_queue=self.cfg.max_queue, threads=self._threads)
        decoder = ContinuousDecoder(lm, tok.pad_token_id, [tok.eos_token_id], self.cfg.max_batch_size,
                                    cfg.min_new_tokens, cfg.no_repeat_ngram,
                                    stop_token_ids(tok) if cfg.min_new_tokens else ())
        return ContinuousBatcher(decoder, self._greedy, self._start, self._finish, self._generate_batch,
                                 self.cfg.max_batch_size, on_batch=self.batch_sizes.append, max_queue=self.cfg.max_queue,
                                 threads=self._threads)

    def _chooses(self, cfg: GenerateConfig) -> bool:
        """Whether ``cfg`` decodes candidates and chooses among them (a fine-tuned run's greedy decoding)."""
        return cfg.num_beams == 1 and not cfg.do_sample and cfg.candidates > 1 and self.predictor.system == "fine-tuned"

    def _greedy(self, key) -> bool:
        """Whether requests with these options decode as the continuous decoder does: one greedy text."""
        cfg = self.predictor.generation_config(dict(key))
        return cfg.num_beams == 1 and not cfg.do_sample and (cfg.candidates <= 1 or self.predictor.system != "fine-tuned")

    def _start(self, key, prompted: Prompted) -> tuple[list[int], int]:
        ids = self.predictor.tokenizer(prompted.prompt, add_special_tokens=False)["input_ids"]
        return ids, self.predictor.generation_config(dict(key)).max_new_tokens

    def _finish(self, prompted: Prompted, tokens: list[int]) -> str:
        self.stats["generated_tokens"] += len([t for t in tokens if t != self.predictor.tokenizer.eos_token_id])
        return clean_output(self.predictor.tokenizer.decode(tokens, skip_special_tokens=True))

    def _same_candidates(self, key) -> bool:
        """Whether requests with these options draw the candidates the running batch draws (count, temperature,
        top-p, random stream, length rules: the server's own); others are decoded in whole batches."""
        cfg, own = self.predictor.generation_config(dict(key)), self.gen_cfg
        same = ("candidates", "sample_temperature", "sample_top_p", "sample_stream", "min_new_tokens", "no_repeat_ngram")
        return self._chooses(cfg) and all(getattr(cfg, k) == getattr(own, k) for k in same)

    def _start_candidates(self, key, prompted: Prompted) -> tuple[list[int], int, list[int | None]]:
        ids, limit = self._start(key, prompted)
        cfg = self.predictor.generation_config(dict(key))
        return ids, limit, draw_seeds(cfg.seed, prompted.prompt, range(cfg.candidates))

    def _finish_candidates(self, prompted: Prompted, tokens: list[list[int]], logprobs: list[float]) -> str:
        cfg = self.gen_cfg
        candidates = candidate_list(self.predictor.tokenizer, tokens, logprobs, range(cfg.candidates))
        before = self.predictor.decoded_tokens  # the batcher's thread is the only caller
        text = self.predictor.choose_among([prompted], [candidates], cfg)[0]
        self.stats["generated_tokens"] += self.predictor.decoded_tokens - before  # every candidate's tokens
        return text

    def _generate_batch(self, key, prompted: list[Prompted]) -> list[str]:
        before = self.predictor.decoded_tokens  # one batch at a time: the batcher's thread is the only caller
        texts = self.predictor.generate(prompted, dict(key))
        self.stats["generated_tokens"] += self.predictor.decoded_tokens - before  # every candidate's tokens
        return texts

    def options(self, requested: dict[str, Any] | None) -> dict[str, Any]:
        """Generation options of a request, with the server's limits applied."""
        o = {"max_new_tokens": self.gen_cfg.max_new_tokens, "num_beams": 1, "do_sample": False,
             "temperature": 1.0, "top_p": 1.0}
        for k, v in (requested or {}).items():
            if v is not None:
                o[k] = v
        o["max_new_tokens"] = min(int(o["max_new_tokens"]), self.cfg.max_new_tokens_limit)
        o["num_beams"] = min(int(o["num_beams"]), self.cfg.max_beams)
        return o

    def _texts(self, prompted: list[Prompted], options: dict | None) -> list[str]:
        """The generation hook of :meth:`Predictor.explain`: cached texts where the same request was answered
        for the same history and options, the micro-batcher (shared by concurrent requests) for the rest."""
        key = tuple(sorted((options or {}).items()))
        pending = []
        for p in prompted:
            req = p.request
            cache_key = (self.model_id, req.user, req.item, key, p.history_version, tuple(req.item_features),
                         tuple(req.history))
            with self._lock:
                cached = self._cache.get(cache_key)
                if cached is not None:
                    self._cache.move_to_end(cache_key)
            if cached is not None:
                self.stats["cache_hits"] += 1
                pending.append((cache_key, cached))
            else:
                pending.append((cache_key, self.batcher.submit(key, p)))
        deadline = time.monotonic() + self.cfg.request_timeout_s
        texts = []
        for cache_key, fut in pending:
            if isinstance(fut, str):
                texts.append(fut)
                continue
            text = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._cache[cache_key] = text
                if len(self._cache) > self.cfg.cache_size:
                    self._cache.popitem(last=False)
            texts.append(text)
        return texts

    def _rows(self, explanations) -> list[dict]:
        out = []
        for explanation in explanations:
            self.stats["reasons"] += 1
            self.stats["filtered"] += int(explanation.reason != explanation.generated)
            self.stats["ungrounded"] += int("ungrounded" in explanation.flags)
            row = explanation.to_dict()
            row.pop("generated")
            out.append({**row, "precomputed": False})
        return out

    @staticmethod
    def _stored(row: dict) -> dict:
        keep = ("user_id", "item_id", "reason", "predicted_rating", "interest", "features", "flags", "score")
        return {**{k: row.get(k) for k in keep if k != "score" or row.get("score") is not None},
                "features": list(row.get("features") or []), "flags": list(row.get("flags") or []),
                "precomputed": True}

    def explain(self, requests: list[dict], options: dict | None = None) -> list[dict]:
        """Reasons in request order: stored ones (``serve --reasons``) for plain requests with default decoding,
        the rest generated live through :meth:`Predictor.explain`."""
        self.sync()
        plain = self.has_stored and not any(v is not None for v in (options or {}).values())
        stored = {}
        if plain:
            pairs = [(r["user_id"], r["item_id"]) for r in requests if not r.get("history") and not r.get("item_features")]
            stored = self.store.stored_reasons(self.model_tag, pairs) if pairs else {}
        is_live = [bool(r.get("history") or r.get("item_features")) or (r["user_id"], r["item_id"]) not in stored
                   for r in requests]
        live = [r for r, flag in zip(requests, is_live) if flag]
        reqs = [Request(r["user_id"], r["item_id"], [h["text"] for h in r.get("history") or []],
                        list(r.get("item_features") or [])) for r in live]
        generated = iter(self._rows(self.predictor.explain(reqs, self.options(options), generate=self._texts))
                         if reqs else [])
        self.stats["precomputed"] += len(requests) - len(live)
        return [next(generated) if flag else self._stored(stored[(r["user_id"], r["item_id"])])
                for r, flag in zip(requests, is_live)]

    def stored_only(self, requests: list[dict], options: dict | None = None) -> list[dict] | None:
        """The answers to ``requests`` when every one is a plain request of a stored pair (the server's fast path:
        no thread, no model), else None."""
        if not self.has_stored or any(v is not None for v in (options or {}).values()) or \
                any(r.get("history") or r.get("item_features") for r in requests):
            return None
        # no sync() here: stored_reasons compares each user's history version in the store itself
        pairs = [(r["user_id"], r["item_id"]) for r in requests]
        stored = self.store.stored_reasons(self.model_tag, pairs)
        if len(stored) < len(set(pairs)):
            return None
        self.stats["precomputed"] += len(requests)
        return [self._stored(stored[pair]) for pair in pairs]

    def recommend(self, user: str, k: int, exclude_seen: bool = True, options: dict | None = None) -> list[dict]:
        """The user's top ``k``: the stored list (``serve --reasons`` with a ``recommend --all-users`` output) when
        there is one of at least ``k`` for default decoding and unchanged history, without touching the model;
        else ranked and explained live."""
        self.sync()
        if self.has_stored and exclude_seen and not any(v is not None for v in (options or {}).values()):
            stored = self.store.stored_recommendations(self.model_tag, user, k)
            if len(stored) == k:
                self.stats["precomputed"] += k
                return [{**self._stored(r), "title": self.title(r["item_id"])} for r in stored]
        rows = self._rows(self.predictor.recommend(user, k, exclude_seen, self.options(options), generate=self._texts))
        return [{**row, "title": self.title(row["item_id"])} for row in rows]

    def close(self) -> None:
        self.batcher.close()
