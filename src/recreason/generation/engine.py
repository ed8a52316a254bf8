"""Greedy decoding with iteration-level batching, for a server.

:func:`recreason.generation.generate.greedy_decode` decodes one batch from start to end: a prompt that arrives
while it runs waits for the whole batch, and the last steps run a few rows. :class:`ContinuousDecoder` keeps one
running batch instead. Each :meth:`~ContinuousDecoder.step` first admits waiting prompts (prefilled together,
their shared header once, and joined to the running rows' KV cache; while rows run, only once ``admit_at`` of
them can join at a time, since a prefill of a few prompts runs far from the matrix peak), then decodes one
token for every row; a row
that has written its end-of-text token or its last allowed token leaves at once and its callback gets the tokens.
So the batch stays full while requests keep coming, and a short reason is not held back by a long one.

Each row gets the tokens :func:`greedy_decode` gives its prompt: the same argmax of the same logits, with the
reason-shaping rules (``min_new_tokens``, ``no_repeat_ngram``) applied per row, counting the row's own tokens.
Only plain token-id prompts of a causal LM (see ``_shared_prefill_lm``); one thread drives it.

:class:`CandidateDecoder` does the same for jobs of several draws each (the greedy text and seeded samples, a
choice among them made afterwards): a prompt's KV cache is kept once for its draws (:class:`SharedPrefix`), its
draws join together and leave one by one, and the job is answered when its last draw ends. With whole batches
the last steps of a batch of 16 prompts x 12 draws decode a handful of rows at the cost of many (a step's cost
barely falls below 40 ms however few its rows); here the rows of the next prompts fill them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from recreason.generation.generate import (SeededSampler, prefill, repeated_ngram_bans, stop_token_ids,
                                          weighs_likelihood)
from recreason.models.registry import SHARED_PREFIX, SharedPrefix


@dataclass
class _Row:
    prompt: list[int]
    max_new_tokens: int
    done: Callable[[list[int]], None]
    tokens: list[int] = field(default_factory=list)


class ContinuousDecoder:
    """One running batch of at most ``max_rows`` greedy decodes of ``lm`` (a plain causal LM), ending on
    ``eos_ids``; ``min_new_tokens`` and ``no_repeat_ngram`` as in ``generate`` (``stop_ids``: the tokens
    ``min_new_tokens`` holds back, :func:`~recreason.generation.generate.stop_token_ids`)."""

    def __init__(self, lm, pad_id: int, eos_ids: Sequence[int], max_rows: int = 16, min_new_tokens: int = 0,
                 no_repeat_ngram: int = 0, stop_ids: Sequence[int] = (), admit_at: int | None = None):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.lm, self.pad_id, self.max_rows = lm, pad_id, max_rows
        # while rows run, waiting prompts join only once this many can join together (rows leave within their
        # token limits, so a prompt waits at most that long); into an empty batch they join at once
        self.admit_at = max(1, max_rows // 2) if admit_at is None else max(1, admit_at)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.min_new_tokens, self.no_repeat_ngram = min_new_tokens, no_repeat_ngram
        self.stops = list(stop_ids)
        self.waiting: deque[_Row] = deque()
        self.rows: list[_Row] = []
        self.cache = self.mask = self.position = self.step_ids = None  # the running batch; mask = cache + 1 column

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def reset(self) -> None:
        """Forget every row, running or waiting, without calling back (after a failed step)."""
        self.waiting.clear()
        self.rows = []
        self.cache = self.mask = self.position = self.step_ids = None

    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, done: Callable[[list[int]], None]) -> None:
        """Queue one prompt (token ids, at least two: a chat prompt has many); ``done(tokens)`` is called from
        :meth:`step` when it ends (its end-of-text token included, as ``generate`` writes it). A prompt with no
        token to write gets ``[]`` at once."""
        if len(prompt_ids) < 2:
            raise ValueError("a prompt needs at least two tokens")
        if max_new_tokens < 1:
            done([])
            return
        self.waiting.append(_Row(list(prompt_ids), max_new_tokens, done))

    @torch.no_grad()
    def step(self) -> int:
        """Admit waiting prompts up to ``max_rows``, decode one token for every row, let ended rows go. Returns how
        many rows were decoded."""
        self._admit()
        if not self.rows:
            return 0
        logits = self.lm(input_ids=self.step_ids, attention_mask=self.mask, position_ids=self.position,
                         cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        for r, row in enumerate(self.rows):
            if len(row.tokens) < self.min_new_tokens and self.stops:
                logits[r, self.stops] = float("-inf")
            if self.no_repeat_ngram:
                banned = repeated_ngram_bans(row.tokens, self.no_repeat_ngram)
                if banned:
                    logits[r, banned] = float("-inf")
        token = logits.argmax(-1)
        ended = torch.isin(token, self.eos)
        keep = []
        for r, (row, t) in enumerate(zip(self.rows, token.tolist())):
            row.tokens.append(t)
            if bool(ended[r]) or len(row.tokens) >= row.max_new_tokens:
                row.done(row.tokens)
            else:
                keep.append(r)
        decoded = len(self.rows)
        if len(keep) < decoded:
            index = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[k] for k in keep]
            if not self.rows:
                self.cache = self.mask = self.position = self.step_ids = None
                return decoded
            self.cache.batch_select_indices(index)
            self.mask, self.position, token = self.mask[index], self.position[index], token[index]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        self.position, self.step_ids = self.position + 1, token[:, None]
        self._trim()
        return decoded

    def _admit(self) -> None:
        room = self.max_rows - len(self.rows)
        if room <= 0 or not self.waiting:
            return
        if self.rows and min(room, len(self.waiting)) < self.admit_at:
            return  # wait for company: one prefill of many prompts runs at near the matrix peak, one of a few does not
        new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        width = max(len(r.prompt) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for k, row in enumerate(new):
            ids[k, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[k, width - len(row.prompt):] = 1
        cache, laid = prefill(self.lm, {"input_ids": ids, "attention_mask": mask}, 1)
        ids, mask = laid["input_ids"], laid["attention_mask"]
        position = mask.long().sum(-1, keepdim=True) - 1
        if not self.rows:
            self.cache, self.mask, self.position, self.step_ids = cache, mask, position, ids[:, -1:]
        else:
            self._join(cache, mask, position, ids[:, -1:])
        self.rows.extend(new)

    def _join(self, cache, mask, position, step_ids) -> None:
        """Append admitted rows to the running batch: both caches left-padded (masked) to one length."""
        width = max(self.mask.shape[1], mask.shape[1])

        def widen(t: torch.Tensor, to: int, dim: int) -> torch.Tensor:
            missing = to - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim)

        for ours, theirs in zip(self.cache.layers, cache.layers):
            ours.keys = torch.cat([widen(ours.keys, width - 1, 2), widen(theirs.keys, width - 1, 2)], 0)
            ours.values = torch.cat([widen(ours.values, width - 1, 2), widen(theirs.values, width - 1, 2)], 0)
        self.mask = torch.cat([widen(self.mask, width, 1), widen(mask, width, 1)], 0)
        self.position = torch.cat([self.position, position], 0)
        self.step_ids = torch.cat([self.step_ids, step_ids], 0)

    def _trim(self) -> None:
        """Drop leading cache columns no row attends to (the running batch would otherwise only grow)."""
        self.mask = _trim_columns(self.cache, self.mask)


def _trim_columns(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns of ``cache`` (its layers' keys and values) in which ``mask`` [rows, columns] has no
    row's token; the mask without them."""
    used = mask.any(0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return mask[:, first:]


@dataclass
class _Job:
    prompt: list[int]
    max_new_tokens: int
    seeds: list[int | None]  # one per draw; None: the greedy draw
    done: Callable[[list[list[int]], list[float]], None]
    tokens: list[list[int]] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)
    left: int = 0  # draws still decoding


class CandidateDecoder:
    """One running batch of at most ``max_rows`` draws of ``lm`` (a plain causal LM whose attention is
    :func:`~recreason.models.registry.grouped_attention`), for jobs of one prompt and several draws each: the
    greedy text and samples at ``temperature`` and ``top_p``, each from its own seeded stream
    (:class:`~recreason.generation.generate.SeededSampler`), ending on ``eos_ids``; ``min_new_tokens`` and
    ``no_repeat_ngram`` per draw as in ``generate``. A job's draws get the tokens and mean log-likelihoods
    :func:`~recreason.generation.generate.greedy_decode` gives its prompt alone with the same seeds (tested).

    Waiting jobs join between steps, as many as there are rows free for all of their draws, once ``admit_at`` of
    them can join together (into an empty batch at once): their prompts are prefilled together and join the
    shared prompt cache; their draws' own tokens are left-padded (masked) to the running rows' own columns."""

    def __init__(self, lm, pad_id: int, eos_ids: Sequence[int], max_rows: int, temperature: float, top_p: float,
                 min_new_tokens: int = 0, no_repeat_ngram: int = 0, stop_ids: Sequence[int] = (), admit_at: int = 1,
                 likelihood: bool = True, stream: str = "counter"):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.lm, self.pad_id, self.max_rows, self.admit_at = lm, pad_id, max_rows, max(1, admit_at)
        self.likelihood = likelihood  # False: draws' log-likelihoods are NaN, their normaliser is never computed
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.min_new_tokens, self.no_repeat_ngram, self.stops = min_new_tokens, no_repeat_ngram, list(stop_ids)
        self.temperature, self.top_p, self.stream = temperature, top_p, stream
        self.waiting: deque[_Job] = deque()
        self.reset()

    @classmethod
    def for_config(cls, lm, tokenizer, cfg, requests: int, admit_at: int = 1) -> "CandidateDecoder":
        """The decoder a server runs for ``cfg`` (a ``GenerateConfig``): rows for ``requests`` requests of
        ``cfg.candidates`` draws each, its sampling and reason rules, ending on the tokenizer's end-of-text token;
        the draws' likelihood only where the choice weighs it."""
        stops = stop_token_ids(tokenizer) if cfg.min_new_tokens else ()
        return cls(lm, tokenizer.pad_token_id, [tokenizer.eos_token_id], requests * cfg.candidates,
                   cfg.sample_temperature, cfg.sample_top_p, cfg.min_new_tokens, cfg.no_repeat_ngram, stops, admit_at,
                   likelihood=weighs_likelihood(cfg), stream=cfg.sample_stream)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def reset(self) -> None:
        """Forget every job, running or waiting, without calling back (after a failed step)."""
        self.waiting.clear()
        self.rows: list[tuple[_Job, int]] = []  # (job, draw), grouped by prompt in the order they joined
        self.sampler = SeededSampler([], self.temperature, self.top_p, stream=self.stream)  # its streams follow self.rows
        self.sampler.started = True
        self.prefix = self.cache = self.own = self.position = self.step_ids = None

    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, seeds: Sequence[int | None],
            done: Callable[[list[list[int]], list[float]], None]) -> None:
        """Queue one prompt (token ids, at least two) with one draw per seed (None: greedy); ``done(tokens,
        logprobs)`` is called from :meth:`step` when its last draw ends, with each draw's tokens (its end-of-text
        token included) and mean log-likelihood."""
        if len(prompt_ids) < 2:
            raise ValueError("a prompt needs at least two tokens")
        if not 1 <= len(seeds) <= self.max_rows:
            raise ValueError(f"a job needs 1 to {self.max_rows} draws, got {len(seeds)}")
        if max_new_tokens < 1:
            done([[] for _ in seeds], [0.0 for _ in seeds])
            return
        self.waiting.append(_Job(list(prompt_ids), max_new_tokens, list(seeds), done,
                                 [[] for _ in seeds], [0.0 for _ in seeds], len(seeds)))

    @torch.no_grad()
    def step(self) -> int:
        """Admit waiting jobs, decode one token for every draw, let ended draws go and answer finished jobs.
        Returns how many rows were decoded."""
        self._admit()
        if not self.rows:
            return 0
        rows = len(self.rows)
        own = torch.cat([self.own, self.own.new_ones(rows, 1)], 1)  # the token fed now joins each row's own tokens
        self.prefix.own_bias = None if bool(own.all()) else (1.0 - own) * torch.finfo(torch.float32).min
        token = SHARED_PREFIX.set(self.prefix)
        try:
            logits = self.lm(input_ids=self.step_ids, position_ids=self.position, cache=self.cache, use_cache=True,
                             logits_to_keep=1).logits[:, -1].float()
        finally:
            SHARED_PREFIX.reset(token)
        self.own = own
        norm = logits.logsumexp(-1) if self.likelihood else None  # before the rules ban tokens in place
        for r, (job, draw) in enumerate(self.rows):
            written = job.tokens[draw]
            if len(written) < self.min_new_tokens and self.stops:
                logits[r, self.stops] = float("-inf")
            if self.no_repeat_ngram:
                banned = repeated_ngram_bans(written, self.no_repeat_ngram)
                if banned:
                    logits[r, banned] = float("-inf")
        chosen = self.sampler.pick(self.step_ids, logits)
        scores = ((logits.gather(-1, chosen[:, None]).squeeze(-1) - norm).tolist() if norm is not None
                  else [float("nan")] * rows)
        ended = torch.isin(chosen, self.eos).tolist()
        keep = []
        for r, ((job, draw), t, lp) in enumerate(zip(self.rows, chosen.tolist(), scores)):
            job.tokens[draw].append(t)
            job.logprob[draw] += lp
            if ended[r] or len(job.tokens[draw]) >= job.max_new_tokens:
                job.left -= 1
                if not job.left:
                    job.done(job.tokens, [lp / max(1, len(t)) for lp, t in zip(job.logprob, job.tokens)])
            else:
                keep.append(r)
        if len(keep) < rows:
            if not keep:
                self.rows, self.sampler.streams = [], []
                self.prefix = self.cache = self.own = self.position = self.step_ids = None
                return rows
            index = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(index)
            self.prefix.select(index)
            self.sampler.select(keep)
            self.rows = [self.rows[k] for k in keep]
            self.own, self.position, chosen = self.own[index], self.position[index], chosen[index]
            self._trim()
        self.position, self.step_ids = self.position + 1, chosen[:, None]
        return rows

    def _admit(self) -> None:
        room = self.max_rows - len(self.rows)
        count = used = 0
        for job in self.waiting:
            if used + len(job.seeds) > room:
                break
            count, used = count + 1, used + len(job.seeds)
        if not count or (self.rows and count < self.admit_at):
            return  # no room, or waiting for company: a prefill of several prompts runs nearer the matrix peak
        new = [self.waiting.popleft() for _ in range(count)]
        width = max(len(job.prompt) for job in new)
        ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((count, width), dtype=torch.long)
        for k, job in enumerate(new):
            ids[k, width - len(job.prompt):] = torch.tensor(job.prompt)
            mask[k, width - len(job.prompt):] = 1
        cache, laid = prefill(self.lm, {"input_ids": ids, "attention_mask": mask}, 1)
        ids, mask = laid["input_ids"], laid["attention_mask"]
        draws = torch.tensor([len(job.seeds) for job in new])
        owner = torch.arange(count).repeat_interleave(draws)
        keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        position = (mask.long().sum(-1, keepdim=True) - 1).repeat_interleave(draws, 0)
        step_ids = ids[:, -1].repeat_interleave(draws)[:, None]
        rows = [(job, draw) for job in new for draw in range(len(job.seeds))]
        if not self.rows:
            from transformers import DynamicCache

            self.prefix = SharedPrefix(keys, values, mask[:, :-1], owner)
            self.cache, self.own = DynamicCache(), torch.zeros(len(rows), 0)
            self.position, self.step_ids = position, step_ids
        else:
            self.prefix.join(keys, values, mask[:, :-1], owner)
            for layer in self.cache.layers:  # the new rows' own columns so far: masked padding
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(len(rows), *layer.keys.shape[1:])])
                layer.values = torch.cat([layer.values, layer.values.new_zeros(len(rows), *layer.values.shape[1:])])
            self.own = torch.cat([self.own, self.own.new_zeros(len(rows), self.own.shape[1])])
            self.position = torch.cat([self.position, position])
            self.step_ids = torch.cat([self.step_ids, step_ids])
        self.rows.extend(rows)
        self.sampler.extend([seed for job in new for seed in job.seeds])

    def _trim(self) -> None:
        """Drop leading own columns no row has a token in (the rows that had them have left)."""
        self.own = _trim_columns(self.cache, self.own)
