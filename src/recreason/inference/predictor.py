"""The one way to turn (user, item) into a reason with a trained run.

``recreason generate``, ``evaluate``, ``recommend``, ``explain``, ``serve`` and the benchmarks all call a
:class:`Predictor`; it owns the device and dtype, which prompt a pair gets (discrete text, or learned
user/item vectors for continuous-prompt runs), the rating and interest heads, batched generation, and
the safety and grounding checks.

:meth:`Predictor.explain` is the staged call every caller shares: prompt -> generate -> rate -> finish
(checks). Callers differ only in how texts are generated, so that stage is a hook (``generate=``): the
server puts its cache and micro-batcher there, the batch job calls once per chunk, everyone else takes
:meth:`Predictor.generate`. :meth:`Predictor.recommend_many` is rank -> :meth:`explain` for a group of users.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from recreason.config import GenerateConfig
from recreason.data.records import Explained
from recreason.errors import ConfigError, UnknownId
from recreason.generation.generate import (SHAPING_KEYS, Candidate, generate_candidates, generate_texts,
                                          weighs_likelihood)
from recreason.inference.safety import ReasonChecker
from recreason.inference.selection import choose, generic_table
from recreason.models.personalized import INTEREST_LABELS, interest_class
from recreason.models.registry import (compiled_norms, packed_products, resolve_precision, reuse_freed_memory,
                                       transposed_small_products, use_grouped_attention, use_kernels)
from recreason.prompts.discrete import DiscretePrompter, render, uses_soft_prompt
from recreason.ranking import Ranker
from recreason.rundir import Run, checkpoint_stamp
from recreason.text import FeatureMatcher, tokenize

SYSTEMS = ("fine-tuned", "zero-shot")
# What a caller may send about users and items the run does not know, wherever the request comes from (the HTTP
# API and the batch jobs hold requests to these): a prompt's size, and so a decode's memory, stays bounded.
MAX_ID_CHARS = 200
MAX_ITEM_FEATURES = 20  # caller-given features of an unknown item
MAX_FEATURE_CHARS = 60  # characters of one such feature
MAX_HISTORY = 50  # texts describing an unknown user
MAX_HISTORY_CHARS = 4000  # characters of one such text


@dataclass
class Request:
    """One (user, item) to explain. ``history`` (texts) describes a user the run does not know;
    ``item_features`` describe an item it does not know. ``record``: the dataset record, when the pair is
    one (its own review is then kept out of its prompt's profiles)."""

    user: str
    item: str
    history: Sequence[str] = ()
    item_features: Sequence[str] = ()
    record: Explained | None = None


@dataclass
class Prompted:
    """A request with the prompt it gets and what the checks need afterwards."""

    request: Request
    prompt: str
    flags: list[str]
    item_features: list[str]  # the item's features as listed in the prompt (a replacement template names these)
    known_features: list[str]  # every feature the item is known to have (grounding)
    history_version: int  # changes whenever the user's history does (cache keys)
    user_features: set[str] = field(default_factory=set)  # the user's own features (candidate selection)


@dataclass
class Explanation:
    user_id: str
    item_id: str
    reason: str  # what a user is shown: the generated text, or a template when the safety check replaced it
    generated: str  # the model's text before the checks (what the PETER metrics score)
    predicted_rating: float | None
    interest: str | None
    features: list[str]
    flags: list[str] = field(default_factory=list)
    score: float | None = None  # ranking score, for recommendations

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if out["score"] is None:
            out.pop("score")
        return out


GenerateHook = Callable[[Sequence["Prompted"], "dict | None"], list[str]]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _base_lm(lm):
    """The transformers model under a peft wrapper (or ``lm`` itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class Predictor:
    """Explain, rate and recommend with one trained run (``system="zero-shot"``: its base model, untrained)."""

    def __init__(self, run: Run | str | Path, gen_cfg: GenerateConfig | None = None, system: str = "fine-tuned",
                 device: str | None = None, cold_start: str = "item-only", dataset=None, checkpoint: str = "best"):
        if system not in SYSTEMS:
            raise ConfigError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
        if cold_start not in ("item-only", "error"):
            raise ConfigError(f"cold_start must be item-only or error, got {cold_start!r}")
        self.run = run if isinstance(run, Run) else Run(run)
        self.gen_cfg = gen_cfg or GenerateConfig()
        self.system = system
        self.checkpoint = checkpoint
        self.cold_start = cold_start
        self.device = device or default_device()
        self.dtype = "bf16" if resolve_precision(self.gen_cfg.precision, self.device) == "bf16" else "fp32"
        self.model, self.tokenizer = self._load()
        if str(self.device).startswith("cpu"):  # decoding's few-row products and attention, faster on CPU
            transposed_small_products(self.model)
            packed_products(self.model)
            reuse_freed_memory()
            use_grouped_attention(_base_lm(self.model.lm))
            compiled_norms(self.model)
            use_kernels(self.gen_cfg.kernels)
        self.dataset = dataset or self.run.dataset()
        self.train = self.dataset.subset(self.run.split_seed, "train")
        self.prompter = DiscretePrompter(self.train, self.run.prompt_config)
        self.vocabulary = list(self.dataset.features)
        self.matcher = FeatureMatcher(self.vocabulary)
        self.checker = ReasonChecker(self.vocabulary)
        self._generic: tuple[str, collections.Counter] | None = None
        self.decoded_tokens = 0  # tokens :meth:`generate` has written, every candidate's (a server's cost count)
        self._model_tag: str | None = None
        ranker_dir = self.run.paths.ranker
        self.ranker = Ranker.load(ranker_dir) if Ranker.exists(ranker_dir) else None
        self.item_ratings: dict[str, list[float]] = collections.defaultdict(list)
        for r in self.train:
            self.item_ratings[r.item].append(r.rating)
        self._rating_sum = sum(r.rating for r in self.train)
        self._rating_count = len(self.train)
        # held while profiles are read or changed: a server folds new interactions in from other threads
        self.lock = threading.RLock()

    def _load(self):
        if self.system == "fine-tuned":
            return self.run.load_model(dtype=self.dtype, device=self.device, checkpoint=self.checkpoint)
        from recreason.models.personalized import RecReasonModel
        from recreason.models.registry import load_model

        lm, tokenizer, _ = load_model(self.run.info["base_model_path"], dtype=self.dtype, device=self.device)
        return RecReasonModel(lm).eval(), tokenizer

    @property
    def model_tag(self) -> str:
        """Which model writes this predictor's reasons (:meth:`Run.fingerprint`; ``zero-shot:`` + base model)."""
        if self._model_tag is None:
            self._model_tag = (self.run.fingerprint(self.checkpoint) if self.system == "fine-tuned"
                               else f"zero-shot:{self.run.info['base_model_path']}")
        return self._model_tag

    # ----- what the predictor knows -------------------------------------------------------------
    def known_user(self, user: str) -> bool:
        return user in self.prompter.user_profiles

    def known_item(self, item: str) -> bool:
        return item in self.prompter.item_profiles

    def forget_history(self) -> None:
        """Drop every profile and rating (serving refills them from its store)."""
        with self.lock:
            self._forget_history()

    def _forget_history(self) -> None:
        for table in (self.prompter.user_profiles, self.prompter.item_profiles, self.prompter.user_history,
                      self.prompter.item_records, self.item_ratings):
            table.clear()
        self.prompter.train_indices.clear()
        self._rating_sum, self._rating_count = 0.0, 0

    def add(self, record: Explained) -> None:
        """Fold a new interaction into the profiles and rating statistics (a cold user becomes warm)."""
        with self.lock:
            self.prompter.add(record)
            self.item_ratings[record.item].append(record.rating)
            self._rating_sum += record.rating
            self._rating_count += 1

    def seen(self, user: str) -> set[str]:
        return {r.item for r in self.prompter.user_history.get(user, ())}

    # ----- prompts ------------------------------------------------------------------------------
    def prompt(self, request: Request, position: int = 0) -> Prompted:
        """The prompt ``request`` gets. Unknown ids raise :class:`UnknownId` naming ``items[position]``."""
        user, item = request.user, request.item
        flags: list[str] = []
        if not self.known_item(item) and not request.item_features:
            raise UnknownId(f"items[{position}].item_id: unknown item {item!r}; send item_features for new items")
        if self.known_item(item):
            item_feats = self.prompter.features(user, item, request.record)[1]
            shown = item_feats
        else:  # a caller's words enter the prompt as quoted data, never as instructions
            item_feats = list(request.item_features)
            shown = [json.dumps(f, ensure_ascii=False) for f in item_feats]
        known_feats = sorted(set(self.prompter.item_profiles.get(item, {})) | set(request.item_features))
        user_features: set[str] = set()
        if self.known_user(user):
            user_features = self.prompter.user_features(user, request.record)
            if self.known_item(item):
                messages = self.prompter.messages(user, item, request.record)
            else:  # a new item described by the caller
                messages = self.prompter.compose(self.prompter.features(user, item, request.record)[0], shown, item)
        elif request.history:
            counts = collections.Counter(f for text in request.history for f in self.matcher.find(tokenize(text)))
            user_feats = [f for f, _ in counts.most_common(self.prompter.config.user_features)]
            user_features = set(counts)
            messages = self.prompter.compose(user_feats, shown, item,
                                             evidence=self.prompter.evidence(item, user_feats, user=user))
            flags.append("cold_start_history")
        elif self.cold_start == "error":
            raise UnknownId(f"items[{position}].user_id: unknown user {user!r}; send its history")
        else:
            messages = self.prompter.compose([], shown, item, evidence=self.prompter.evidence(item, [], user=user))
            flags.append("cold_start_item_only")
        soft = self.system == "fine-tuned" and uses_soft_prompt(
            self.run.prompt_mode, user in getattr(self.model, "user_index", {}))
        text = render(self.tokenizer, self.prompter.bare_messages() if soft else messages,
                      self.prompter.config.answer_cue)
        return Prompted(request, text, flags, item_feats, known_feats,
                        len(self.prompter.user_history.get(user, ())), user_features)

    # ----- generation and checks ----------------------------------------------------------------
    def generation_config(self, options: dict | None = None) -> GenerateConfig:
        return replace(self.gen_cfg, **{k: v for k, v in (options or {}).items() if v is not None})

    def generate(self, prompted: Sequence[Prompted], options: dict | None = None, progress: bool = False,
                 desc: str = "generating") -> list[str]:
        """The model's raw texts for prompted requests, generated in batches. With ``generate.candidates`` > 1
        (fine-tuned runs) each text is chosen among that many candidates (:mod:`recreason.inference.selection`)."""
        cfg = self.generation_config(options)
        args = dict(progress=progress, desc=desc, users=[p.request.user for p in prompted],
                    items=[p.request.item for p in prompted])
        prompts = [p.prompt for p in prompted]
        if cfg.candidates <= 1 or self.system != "fine-tuned":
            texts = generate_texts(self.model, self.tokenizer, prompts, cfg, **args)
            self.decoded_tokens += self._tokens(texts)
            return texts
        return self.choose_among(prompted, generate_candidates(self.model, self.tokenizer, prompts, cfg, **args,
                                                               likelihood=weighs_likelihood(cfg)), cfg)

    def choose_among(self, prompted: Sequence[Prompted], candidates: Sequence[Sequence[Candidate]],
               cfg: GenerateConfig) -> list[str]:
        """The text ``cfg``'s selection score chooses among each request's candidates (however they were decoded:
        in whole batches here, or in a server's running batch); their tokens are counted in :attr:`decoded_tokens`."""
        generic = self.generic_table(cfg)
        drawn = [c for cands in candidates for c in cands]
        self.decoded_tokens += self._tokens([c.text for c in drawn], [c.count for c in drawn])
        return [choose(c, set(p.known_features), p.user_features, generic, cfg, self.matcher).text
                for p, c in zip(prompted, candidates)]

    def _tokens(self, texts: list[str], counts: list[int] | None = None) -> int:
        """How many tokens generated texts took (end-of-text tokens left out), each ``counts`` times; one batched
        tokenizer call."""
        if not texts:
            return 0
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return sum(len(row) * n for row, n in zip(ids, counts or [1] * len(ids)))

    def generic_table(self, cfg: GenerateConfig) -> collections.Counter:
        """How often the run's greedy reason is each sentence, on ``cfg.generic_records`` validation records:
        what the run says for many pairs. Measured once per run and settings, kept in RUN/generated/."""
        settings = {"max_new_tokens": cfg.max_new_tokens, "precision": cfg.precision, "records": cfg.generic_records,
                    "prompt": asdict(self.run.prompt_config)}
        settings.update({k: getattr(cfg, k) for k in SHAPING_KEYS if getattr(cfg, k)})
        key = json.dumps({"settings": settings, "weights": checkpoint_stamp(self.run, self.checkpoint)}, sort_keys=True)
        if self._generic is not None and self._generic[0] == key:
            return self._generic[1]
        path = self.run.paths.generic_table
        table = None
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                table = collections.Counter(saved["counts"]) if saved.get("key") == key else None
            except (json.JSONDecodeError, KeyError, TypeError):
                table = None
        if table is None:
            records = self.dataset.subset(self.run.split_seed, "validation")[: cfg.generic_records]
            prompted = [self.prompt(Request(r.user, r.item, record=r), n) for n, r in enumerate(records)]
            texts = generate_texts(self.model, self.tokenizer, [p.prompt for p in prompted], replace(cfg, candidates=1),
                                   progress=False, users=[r.user for r in records], items=[r.item for r in records])
            table = generic_table(texts)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "counts": dict(table)}, ensure_ascii=False))
            tmp.replace(path)
        self._generic = (key, table)
        return table

    def finish(self, prompted: Prompted, text: str, rating: tuple[float, str, list[str]] | None = None) -> Explanation:
        """Run the safety and grounding checks on a generated text and attach the predicted rating
        (``rating``: this pair's entry of :meth:`rate`, when the caller rated a whole batch at once)."""
        checked = self.checker.check(text, prompted.known_features, prompted.prompt, highlight=prompted.item_features)
        req = prompted.request
        rating_value, level, rating_flags = rating or self.rate([(req.user, req.item)])[0]
        return Explanation(req.user, req.item, checked.text, text, rating_value, level, checked.features,
                           prompted.flags + rating_flags + checked.flags)

    def explain(self, requests: Iterable[Request | tuple[str, str]], options: dict | None = None,
                progress: bool = False, generate: GenerateHook | None = None,
                on_unknown: Callable[[int, UnknownId], None] | None = None) -> list[Explanation | None]:
        """Reasons for (user, item) pairs or :class:`Request` objects, in order: the staged call.

        1. prompt each request (:meth:`prompt`, under :attr:`lock`); an unknown id raises :class:`UnknownId`,
           or, with ``on_unknown``, is reported to it as ``(position, error)`` and answered with None;
        2. generate the texts: ``generate(prompted, options)`` (the server's cache and micro-batcher), else
           :meth:`generate` (batched, candidates chosen when ``generate.candidates`` > 1);
        3. rate every pair in one head pass (:meth:`rate`);
        4. finish each: safety and grounding checks (:meth:`finish`)."""
        reqs = [r if isinstance(r, Request) else Request(*r) for r in requests]
        prompted: list[Prompted | None] = []
        with self.lock:
            for n, request in enumerate(reqs):
                try:
                    prompted.append(self.prompt(request, n))
                except UnknownId as exc:
                    if on_unknown is None:
                        raise
                    on_unknown(n, exc)
                    prompted.append(None)
        ready = [p for p in prompted if p is not None]
        texts = (generate(ready, options) if generate is not None else
                 self.generate(ready, options, progress)) if ready else []
        ratings = self.rate([(p.request.user, p.request.item) for p in ready])  # one head pass for the batch
        finished = iter([self.finish(p, t, r) for p, t, r in zip(ready, texts, ratings)])
        return [None if p is None else next(finished) for p in prompted]

    def explain_records(self, records: Sequence[Explained], options: dict | None = None,
                        progress: bool = False) -> list[str]:
        """Raw generated texts for dataset records (evaluation scores these)."""
        prompted = [self.prompt(Request(r.user, r.item, record=r), n) for n, r in enumerate(records)]
        return self.generate(prompted, options, progress, desc=f"generating ({self.system})")

    # ----- ratings and ranking ------------------------------------------------------------------
    def head_ratings(self, users: Sequence[str], items: Sequence[str]) -> list[float] | None:
        """The rating head's predictions, or None when the run has no rating head."""
        import torch

        if not getattr(self.model, "rating_head_kind", None):
            return None
        u, i = self.model.ids(users, items)
        with torch.no_grad():
            return self.model.predict_rating(u.to(self.device), i.to(self.device)).float().cpu().tolist()

    def rate(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, str, list[str]]]:
        """(predicted rating, interest level, flags) per pair: the rating head where the run knows both ids,
        else the item's mean rating (or the overall mean), flagged ``rating_fallback``."""
        model = self.model
        known = [getattr(model, "rating_head_kind", None) and u in model.user_index and i in model.item_index
                 for u, i in pairs]
        head = self.head_ratings([u for (u, _), k in zip(pairs, known) if k], [i for (_, i), k in zip(pairs, known) if k])
        head = iter(head or [])
        overall = self._mean_rating()
        out = []
        for (user, item), k in zip(pairs, known):
            if k:
                value, flags = next(head), []
            else:
                ratings = self.item_ratings.get(item)
                value, flags = (sum(ratings) / len(ratings) if ratings else overall), ["rating_fallback"]
            out.append((value, INTEREST_LABELS[interest_class(value)], flags))
        return out

    def _mean_rating(self) -> float:
        return self._rating_sum / max(1, self._rating_count)

    def rank(self, user: str, k: int, exclude_seen: bool = True) -> list[tuple[str, float]]:
        """The top ``k`` items for ``user``: by the run's ranker (RUN/ranker, an implicit-feedback model fitted
        by ``recreason train`` or ``recreason rank``; popularity for users it has not seen), or, for runs
        without one, by the rating head or popularity. Unknown users raise with ``cold_start: error``."""
        if not self.known_user(user) and self.cold_start == "error":
            raise UnknownId(f"user_id: unknown user {user!r}; no history, and cold_start is 'error'")
        seen = self.seen(user) if exclude_seen else set()
        if self.ranker is not None:
            return self.ranker.recommend(user, k, exclude=seen)
        candidates = sorted(i for i in self.prompter.item_profiles if i not in seen)
        model = self.model
        if getattr(model, "rating_head_kind", None) and user in getattr(model, "user_index", {}):
            candidates = [c for c in candidates if c in model.item_index]
            scores = self.head_ratings([user] * len(candidates), candidates) or []
        else:
            scores = [float(len(self.item_ratings.get(c, ()))) for c in candidates]
        return sorted(zip(candidates, scores), key=lambda x: (-x[1], x[0]))[:k]

    def recommend_many(self, users: Sequence[str], k: int = 10, exclude_seen: bool = True,
                       options: dict | None = None, generate: GenerateHook | None = None) -> list[list[Explanation]]:
        """Each user's top ``k`` items (:meth:`rank`), each with its reason and ranking score: one
        :meth:`explain` call for all of them (a batch job passes a chunk of users, the server one)."""
        with self.lock:
            ranked = [self.rank(user, k, exclude_seen) for user in users]
        explained = iter(self.explain([Request(user, item) for user, items in zip(users, ranked) for item, _ in items],
                                      options, generate=generate))
        out = []
        for items in ranked:
            mine = [next(explained) for _ in items]
            for e, (_, score) in zip(mine, items):
                e.score = score
            out.append(mine)
        return out

    def recommend(self, user: str, k: int = 10, exclude_seen: bool = True, options: dict | None = None,
                  generate: GenerateHook | None = None) -> list[Explanation]:
        """The top ``k`` items for ``user``, each with its reason and ranking score."""
        return self.recommend_many([user], k, exclude_seen, options, generate)[0]
