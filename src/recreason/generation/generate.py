"""Batched generation with left padding and the KV cache.

Prompts are sorted by length so each batch pads little, generated in batches,
and returned in the caller's order. Greedy decoding is the default; beam
search and sampling are options. :func:`generate_candidates` returns several
candidates per prompt (the greedy one plus samples) with their mean token
log-likelihood under the model, for a caller that chooses among them.
"""

from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from recreason.config import GenerateConfig
from recreason.models.registry import GROUPED_ATTENTION, SHARED_PREFIX, SharedPrefix


@dataclass
class Candidate:
    text: str
    logprob: float  # mean log-probability of its tokens under the model (raw logits, no temperature); NaN: not computed
    greedy: bool
    count: int = 1  # how many of the prompt's draws (greedy + samples) produced this text


def clean_output(text: str) -> str:
    """First line of the answer, stripped: explanations are one sentence. A character cut in half by the token
    limit (byte-level vocabularies spend several tokens on one Chinese character) decodes as U+FFFD: dropped."""
    text = text.strip()
    return text.split("\n", 1)[0].strip().rstrip("\ufffd").strip()


def _decode_kwargs(cfg: GenerateConfig, tokenizer) -> dict:
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    processors = reason_processors(cfg, tokenizer)
    if processors:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(processors)
    return kwargs


SHAPING_KEYS = ("min_new_tokens", "no_repeat_ngram")  # settings that change what greedy decoding writes


def weighs_likelihood(cfg: GenerateConfig) -> bool:
    """Whether ``cfg``'s choice among candidates weighs their likelihood: where it does not, a decode that only
    serves that choice can skip the likelihood's log-normaliser over the vocabulary (a pass a step)."""
    return cfg.weight_likelihood != 0


def reason_processors(cfg: GenerateConfig, tokenizer) -> list:
    """The logits processors ``cfg`` asks for that shape the reason itself (fresh instances: one per decode)."""
    out: list = []
    if cfg.min_new_tokens:
        out.append(MinReasonLength(cfg.min_new_tokens, stop_token_ids(tokenizer)))
    if cfg.no_repeat_ngram:
        out.append(NoRepeatInReason(cfg.no_repeat_ngram))
    return out


_STOPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its stop ids


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reason: the end-of-text token, the other special tokens (``<|im_start|>`` in a reason
    is never content, and decoding would drop it silently) and every token holding a line break (a reason is the
    answer's first line, :func:`clean_output`). Computed once per tokenizer."""
    key = tokenizer
    if key not in _STOPS:
        vocab = tokenizer.get_vocab()
        ids = tokenizer.convert_ids_to_tokens(list(vocab.values()))
        text = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in ids]
        stops = {i for i, t in zip(vocab.values(), text) if "\n" in t}
        stops.update(tokenizer.all_special_ids)
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        _STOPS[key] = sorted(stops)
    return _STOPS[key]


class MinReasonLength:
    """A logits processor that keeps a reason from ending before ``n`` tokens: the stop tokens (end of text, other
    special tokens, line breaks) are banned until then. A fine-tuned model's likeliest reason is its shortest
    generic one ("This is a great album."); corpus BLEU's brevity penalty, and readers, ask for the length reviews
    have. Like :class:`NoRepeatInReason` it counts only the generated tokens (its first call marks where they
    start)."""

    def __init__(self, n: int, stop_ids: Sequence[int]):
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n, self.stops, self.start = n, list(stop_ids), None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] - self.start < self.n:
            scores[:, self.stops] = float("-inf")
        return scores


class NoRepeatInReason:
    """A logits processor that bans any token completing an ``n``-token sequence the reason already holds: a
    small model's loops ("看看看看，看看看看…", "the sound, the sound, …") end where they would begin.
    Unlike ``generate(no_repeat_ngram_size=)`` it reads only the generated tokens (its first call marks where
    they start), so a reason may still repeat the prompt's features and words. One instance per decode."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError("n must be at least 1")
        self.n, self.start = n, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        for row, tokens in enumerate(input_ids[:, self.start:].tolist()):
            banned = repeated_ngram_bans(tokens, self.n)
            if banned:
                scores[row, banned] = float("-inf")
        return scores


def repeated_ngram_bans(tokens: Sequence[int], n: int) -> list[int]:
    """The tokens that would complete an ``n``-token sequence ``tokens`` already holds, as their next token."""
    if len(tokens) < n:  # no whole n-gram written yet
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return sorted({tokens[k + n - 1] for k in range(len(tokens) - n + 1) if tuple(tokens[k:k + n - 1]) == prefix})


def _batches(model, tokenizer, prompts, cfg, users, items, progress, desc):
    """Yield (caller indices, input batch, extra generate kwargs) in length-sorted batches."""
    personal = hasattr(model, "user_index")
    if personal and model.soft and (users is None or items is None):
        raise ValueError("this model has user/item prompt vectors: pass users and items")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    bar = tqdm(total=len(prompts), desc=desc, unit="text", disable=not progress)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        extra = {}
        if personal and model.uses_ids and users is not None:
            u, i = model.ids([users[j] for j in idx], [items[j] for j in idx])
            extra.update(user_idx=u.to(device), item_idx=i.to(device))
        yield idx, batch, extra
        bar.update(len(idx))
    bar.close()


def _generate(model, batch, **kwargs):
    """New tokens (and, with ``output_logits``, the raw logits of each step) for a RecReasonModel or plain LM."""
    if hasattr(model, "user_index"):
        return model.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
    out = model.generate(**batch, **kwargs)
    if kwargs.get("return_dict_in_generate"):
        out.sequences = out.sequences[:, batch["input_ids"].shape[1]:]
        return out
    return out[:, batch["input_ids"].shape[1]:]


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: Sequence[str], cfg: GenerateConfig | None = None, progress: bool = True,
    desc: str = "generating", users: Sequence[str] | None = None, items: Sequence[str] | None = None,
    own_loop: bool = True, shared_prefix: bool = True,
) -> list[str]:
    """Decode one explanation per prompt. ``model`` is a RecReasonModel (soft prompts use ``users`` and
    ``items``) or a plain Hugging Face causal LM. Greedy decoding of plain token-id prompts runs
    :func:`greedy_decode`; ``own_loop=False`` hands it to ``generate`` instead (with the shared header still
    computed once), the baseline ``benchmarks/greedy_loop.py`` measures it against."""
    cfg = cfg or GenerateConfig()
    outputs: list[str] = [""] * len(prompts)
    torch.manual_seed(cfg.seed)
    for idx, batch, extra in _batches(model, tokenizer, prompts, cfg, users, items, progress, desc):
        lm = _shared_prefill_lm(model, extra) if cfg.num_beams == 1 and not cfg.do_sample else None
        if lm is not None and own_loop and batch["input_ids"].shape[1] > 1:  # the header once, rows leave when done
            new = greedy_decode(lm, batch, cfg.max_new_tokens, _eos_ids(tokenizer), reason_processors(cfg, tokenizer),
                                shared_prefix=shared_prefix)
        else:
            if lm is not None and shared_header(batch) >= MIN_SHARED_HEADER:  # the shared header computed once
                extra["cache"], batch = prefill(lm, batch, 1)
            new = _generate(model, batch, **_decode_kwargs(cfg, tokenizer), **extra)
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = clean_output(text)
    return outputs


def _eos_ids(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


@torch.no_grad()
def greedy_decode(lm, batch: dict, max_new_tokens: int, eos_ids: Sequence[int], processors: Sequence = (),
                  draws: int = 1, scores: bool = False, shared_prefix: bool = True, merge_draws: bool = True):
    """Greedy new tokens for a left-padded batch of plain token-id prompts: what ``generate`` writes (the same
    argmax of the same logits, each row ending with its end-of-text token or at ``max_new_tokens``), without its
    waste. The prompts are prefilled with their shared header once (:func:`prefill`); a row that has ended
    leaves the batch and its KV cache (``generate`` decodes finished rows as padding until the longest is done,
    about half of all decoding steps for reasons of 11 tokens under a limit of 24); only the last position's
    logits are computed. ``processors`` are logits processors called as ``generate`` calls them, with the rows
    still decoding; one with a ``select(rows)`` method is told which of its rows stay when some leave.

    ``draws`` rows decode per prompt (prompt-major, as ``repeat_interleave``), from one prefill of the prompt: with
    a :class:`SeededSampler` last among the processors they are its samples. ``scores=True`` also returns each
    row's mean log-likelihood of its tokens under the model's raw logits (the end-of-text token included), as
    :func:`_mean_logprobs` reads it off ``generate``'s logits.

    ``merge_draws`` (default; with several draws): draws of a prompt that have written the same tokens so far
    share one row of the model's batch, whose logits each of them samples from with its own stream; a row splits
    when its draws choose different tokens. A step's first token is the prompt's last for all of its draws, and
    a sharpened model's samples often agree for many tokens: over 64 validation prompts x 12 draws of the distilled
    run, 58% of the rows a step held were distinct (``benchmarks/merged_draws.py``). The processors before the
    sampler see each row once (with one of its draws' tokens, which are all of theirs), and the sampler's ``pick``
    is told each draw's row, so a row's nucleus is read once. The draws' tokens are the same as unmerged (in fp32,
    tested: a row's logits do not depend on its batch companions). False: a row per draw, the baseline that
    benchmark measures against.

    ``shared_prefix`` (default; with several draws, where the model runs
    :func:`~recreason.models.registry.grouped_attention`): the prompts' KV cache is kept once and every draw attends
    to its prompt's (:class:`SharedPrefix`) instead of a copy per draw growing by concatenation each step; False
    keeps the copies, the baseline ``benchmarks/greedy_loop.py`` measures it against. One draw a prompt keeps the
    plain cache: there is nothing to share, and the shared layout's extra steps cost more than they save."""
    shared = shared_prefix and draws > 1 and getattr(lm.config, "_attn_implementation", None) == GROUPED_ATTENTION
    merge = merge_draws and draws > 1
    cache, batch = prefill(lm, batch, 1 if shared or merge else draws)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompts = ids.shape[0]
    draw_prompt = torch.arange(prompts).repeat_interleave(draws)
    # the model's rows: one per prompt to begin with where draws merge (node_of: each draw's row), else one per draw
    node_of = draw_prompt if merge else None
    nodes = torch.arange(prompts) if merge else draw_prompt
    if shared:  # the prompts' cache kept once (SharedPrefix); the model's cache holds each row's own tokens
        prefix = SharedPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                              mask[:, :-1], nodes)
        from transformers import DynamicCache

        cache = DynamicCache()
    if not merge and draws > 1:
        mask = mask.repeat_interleave(draws, 0)
    position = (mask.long().sum(-1, keepdim=True) - 1)
    if draws > 1:
        ids = ids.repeat_interleave(draws, 0)
    token = SHARED_PREFIX.set(prefix) if shared else None
    try:
        return _decode_loop(lm, ids, mask, position, cache, prefix if shared else None, max_new_tokens, eos_ids,
                            processors, scores, node_of)
    finally:
        if token is not None:
            SHARED_PREFIX.reset(token)


def _decode_loop(lm, ids, mask, position, cache, prefix, max_new_tokens: int, eos_ids, processors, scores: bool,
                 node_of=None):
    """:func:`greedy_decode`'s steps, from the prefilled cache (``prefix``: the shared prompt cache, or None).
    ``ids`` holds each draw's tokens; ``mask``, ``position`` and the caches one row of the model's batch each.
    ``node_of`` [draws]: each draw's row, where draws with the same tokens so far share one (None: a row each)."""
    draws = list(range(ids.shape[0]))  # the draws still decoding, by their index in the batch
    out: list[list[int]] = [[] for _ in draws]
    logprob = [0.0 for _ in draws]
    ends = torch.tensor(list(eos_ids), dtype=torch.long)
    seq = ids
    step = ids[:, -1:] if node_of is None else _first_of_each(ids[:, -1:], node_of)
    picker = bool(processors) and hasattr(processors[-1], "pick")  # a sampler that chooses without full scores
    for n in range(max_new_tokens):
        logits = lm(input_ids=step, attention_mask=None if prefix is not None else mask, position_ids=position,
                    cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        norm = logits.logsumexp(-1) if scores else None  # before processors change the scores in place
        merged = node_of is not None and not _in_order(node_of, len(logits))
        if merged and not picker:  # each draw's copy of its row's scores
            logits, norm, merged = logits[node_of], None if norm is None else norm[node_of], False
        shaped = logits
        rules = processors[:-1] if picker else processors
        if rules:  # the reason rules read a row's own tokens: one draw's stand for its row's (they are the same)
            rows_seq = _first_of_each(seq, node_of) if merged else seq
            for processor in rules:
                shaped = processor(rows_seq, shaped)
        token = processors[-1].pick(seq, shaped, node_of if merged else None) if picker else shaped.argmax(-1)
        if scores:  # the chosen token's raw score: processors only ban tokens, and a banned token is never chosen
            raw = logits[node_of, token] if merged else logits.gather(-1, token[:, None]).squeeze(-1)
            own = raw - (norm[node_of] if merged else norm)
            for row, lp in zip(draws, own.tolist()):
                logprob[row] += lp
        for row, t in zip(draws, token.tolist()):
            out[row].append(t)
        if n == max_new_tokens - 1:
            break
        going = ~torch.isin(token, ends)
        if not bool(going.any()):
            break
        seq = torch.cat([seq, token[:, None]], 1)
        keep = None if bool(going.all()) else going.nonzero().squeeze(-1)
        if keep is not None:  # ended draws leave
            for processor in processors:
                if hasattr(processor, "select"):
                    processor.select(keep.tolist())
            draws = [draws[k] for k in keep.tolist()]
            seq, token = seq[keep], token[keep]
            if node_of is not None:
                node_of = node_of[keep]
        if node_of is None:  # a row per draw: the rows are the draws still decoding
            rows, step = keep, token[:, None]
        else:  # a row per distinct (row, token): draws that chose alike stay together, the others split off
            pair, node_of = torch.unique(node_of * logits.shape[-1] + token, return_inverse=True)
            rows, step = pair // logits.shape[-1], (pair % logits.shape[-1])[:, None]
            if _in_order(rows, len(position)):
                rows = None
        if rows is not None:
            cache.batch_select_indices(rows)
            if prefix is not None:
                prefix.select(rows)
            mask, position = mask[rows], position[rows]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        position = position + 1
    if scores:
        return out, [lp / max(1, len(tokens)) for lp, tokens in zip(logprob, out)]
    return out


def _in_order(index: torch.Tensor, n: int) -> bool:
    """Whether ``index`` is 0, 1, ..., n-1: selecting by it would copy everything for nothing."""
    return len(index) == n and bool((index == torch.arange(n)).all())


def _first_of_each(values: torch.Tensor, node_of: torch.Tensor) -> torch.Tensor:
    """``values`` [draws, ...] at each row's first draw (``node_of``: each draw's row, rows 0..n-1 in order)."""
    first = torch.full((int(node_of.max()) + 1,), len(node_of), dtype=torch.long)
    first.scatter_reduce_(0, node_of, torch.arange(len(node_of)), reduce="amin")
    return values[first]


def _mean_logprobs(sequences: torch.Tensor, logits: Sequence[torch.Tensor], eos_id: int | None, pad_id: int | None):
    """Mean log-probability of each row's tokens up to and including its first end-of-sequence token."""
    tokens = sequences[:, : len(logits)]
    # one step at a time: the chosen token's log-probability, never a rows x steps x vocabulary tensor
    chosen = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, tokens[:, k : k + 1]).squeeze(-1)
                          for k, step in enumerate(logits)], 1)
    ended = torch.zeros_like(tokens, dtype=torch.bool)
    if eos_id is not None:
        is_end = tokens == eos_id
        ended = torch.cumsum(is_end.int(), 1) - is_end.int() > 0  # strictly after the first end token
    keep = ~ended
    if pad_id is not None and pad_id != eos_id:
        keep &= tokens != pad_id
    return (chosen * keep).sum(1) / keep.sum(1).clamp(min=1)


def nucleus_drop(logits: torch.Tensor, top_p: float, k: int = 1024) -> torch.Tensor:
    """The tokens top-p sampling leaves out, per row: all but the smallest set of most probable tokens whose
    probability reaches ``top_p`` (a token is kept while the mass before it is at most ``top_p``). The nucleus
    is read off the 64 most probable tokens, then, for rows whose nucleus is larger, off the ``k`` most probable,
    not a sort of the whole vocabulary (a quarter of a 16-candidate decode's time went to sorting 49,152 scores
    per row and step; the top 1,024 of 512 rows took 82 ms a step, the top 64 30 ms). Where the nucleus ends
    inside a run of equal probabilities (frequent with bf16 scores), the run's first tokens in vocabulary order are
    kept, as a stable sort orders them (sorting those rows in full instead took a fifth of a 32-candidate decode in
    bf16); a row whose nucleus is not within the ``k`` is sorted in full (stably), so the kept tokens are exactly
    the sort's."""
    probs = torch.softmax(logits, -1)
    drop = torch.zeros_like(probs, dtype=torch.bool)
    rows = torch.arange(probs.shape[0])
    for size in sorted({min(64, k), k}):
        part = probs if len(rows) == probs.shape[0] else probs[rows]
        inside, part_drop = _nucleus_within(part, top_p, min(size, probs.shape[-1]))
        drop[rows[inside]] = part_drop[inside]
        rows = rows[~inside]
        if not len(rows):
            return drop
    full, order = probs[rows].sort(dim=-1, descending=True, stable=True)
    drop[rows] = torch.zeros_like(full, dtype=torch.bool).scatter(-1, order, full.cumsum(-1) - full > top_p)
    return drop


def _nucleus_within(probs: torch.Tensor, top_p: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose nucleus ends within their ``k`` most probable tokens, the tokens those rows leave out)."""
    top = probs.topk(k, -1).values  # descending
    kept = (top.cumsum(-1) - top <= top_p).sum(-1, keepdim=True)  # tokens in each row's nucleus, if it ends in top
    last = top.gather(-1, kept - 1)  # the least probable kept token
    first_out = top.gather(-1, kept.clamp(max=top.shape[-1] - 1))  # the most probable one left out
    inside = (kept < top.shape[-1]).squeeze(-1) | (kept.squeeze(-1) == probs.shape[-1])
    drop = probs < last
    tied = (inside & (last == first_out).squeeze(-1) & (kept.squeeze(-1) < probs.shape[-1])).nonzero().squeeze(-1)
    if len(tied):  # keep as many of the run's tokens as the nucleus has room for, the first ones by index
        p, at = probs[tied], last[tied]
        run = p == at
        room = kept[tied] - (p > at).sum(-1, keepdim=True)
        drop[tied] |= run & (run.cumsum(-1) > room)
    return inside, drop


SAMPLE_STREAMS = ("counter", "mt19937")  # generate.sample_stream: where a sample's random numbers come from


class SeededSampler:
    """A logits processor that samples each row with its own seeded random stream (Gumbel-max with temperature
    and top-p), so a prompt's candidates do not depend on which other prompts share its batch. A row whose
    seed is None stays greedy. Used with greedy decoding: the argmax of the perturbed scores is the sample.
    A row that has written ``eos_token_id`` is finished (``generate`` pads it from then on, whatever the scores
    say), so it is no longer sampled.

    ``stream`` (:data:`SAMPLE_STREAMS`): ``counter`` (default) gives a row's number for token ``v`` at its ``n``-th
    sampled step as a hash of (seed, n, v) (:func:`counter_uniform`), so a step computes numbers only for the tokens
    it can choose (a row's nucleus, usually within its 64 most probable tokens); ``mt19937`` draws a number per
    vocabulary token and step from a seeded ``torch.Generator``, the stream of the quality tables recorded before
    2026-12-05: 12 ms a step at 192 rows, 0.3 s of a 5 s batch (``benchmarks/decode_anatomy.py``). Either way a
    row's numbers do not depend on its nucleus or on the other rows. The two give different samples of the same
    distribution; candidate caches keep them apart."""

    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float,
                 eos_token_id: int | Sequence[int] | None = None, stream: str = "counter"):
        if stream not in SAMPLE_STREAMS:
            raise ValueError(f"sample stream must be one of {', '.join(SAMPLE_STREAMS)}, got {stream!r}")
        self.stream = stream
        self.temperature, self.top_p = temperature, top_p
        self.eos = torch.tensor([] if eos_token_id is None else
                                [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.started = False  # the first call sees the prompts' last tokens, not a generated one
        self.streams: list = []
        self.extend(seeds)

    def extend(self, seeds: Sequence[int | None]) -> None:
        """Rows after the current ones, each with its seed's stream (None: greedy)."""
        self.streams = self.streams + [None if s is None else torch.Generator().manual_seed(s)
                                       if self.stream == "mt19937" else [_seed_key(s), 0] for s in seeds]

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows' streams, in this order (rows that ended left the batch: :func:`greedy_decode`)."""
        self.streams = [self.streams[k] for k in rows]

    def _sampled_rows(self, input_ids: torch.Tensor) -> list[int]:
        """The rows this step samples (the others stay greedy): a row that wrote an end token stops sampling."""
        if not self.started:
            self.started = True
        elif len(self.eos):
            ended = torch.isin(input_ids[:, -1].cpu(), self.eos).tolist()
            self.streams = [None if end else stream for stream, end in zip(self.streams, ended)]
        return [n for n, stream in enumerate(self.streams) if stream is not None]

    def _uniform(self, rows: list[int], vocab: int) -> "_StepNumbers":
        """This step's uniform numbers of ``rows`` (each row's stream advancing one step), over a vocabulary of
        ``vocab`` tokens; the counter stream computes them only where they are read."""
        if self.stream == "counter":
            keys = torch.tensor([self.streams[k][0] for k in rows], dtype=torch.long)
            steps = torch.tensor([self.streams[k][1] for k in rows], dtype=torch.long)
            for k in rows:
                self.streams[k][1] += 1
            return _StepNumbers(vocab, keys=_step_keys(keys, steps))
        out = torch.empty(len(rows), vocab)

        def draw(part: range) -> None:
            for k in part:
                torch.rand(vocab, generator=self.streams[rows[k]], out=out[k])

        # the rows' streams are independent, so they are drawn on the cores in parallel (one generator is only ever
        # advanced by one thread; 31 ms -> 14 ms for 192 rows on 2 cores)
        workers = min(torch.get_num_threads(), len(rows))
        if workers < 2:
            draw(range(len(rows)))
        else:
            list(_draw_pool(workers).map(draw, [range(w, len(rows), workers) for w in range(workers)]))
        return _StepNumbers(vocab, whole=out)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = self._sampled_rows(input_ids)
        if not rows:
            return scores
        out = scores.clone()
        logits = scores[rows].float() / max(self.temperature, 1e-5)
        uniform = self._uniform(rows, logits.shape[-1]).rows()
        if self.top_p < 1.0:  # the noise only where the nucleus keeps a token: the rest stays -inf either way
            out[rows] = _perturbed(logits, uniform, self.top_p).to(out.dtype)
        else:
            out[rows] = (logits - _log_log(uniform).to(logits.device)).to(out.dtype)
        return out

    def pick(self, input_ids: torch.Tensor, scores: torch.Tensor, node_of: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens ``self(input_ids, scores).argmax(-1)`` chooses, without writing the perturbed scores of the
        whole vocabulary: a row whose nucleus lies within its :data:`PICK_TOP` most probable tokens (all tokens of
        a tie at its edge included) is sampled among those alone, the same noise added the same way and a tie
        between two maxima going to the lower token id as ``argmax`` has it; the other rows take the whole-row
        path. Over a 16-prompt x 32-draw decode the whole-vocabulary masks, scatters and copies had cost a fifth
        of the time. ``node_of`` [rows]: the row of ``scores`` each row samples from, where rows that wrote the
        same tokens share one (:func:`greedy_decode`'s merged draws): its nucleus is read once for all of them,
        and each draws its own noise."""
        rows = self._sampled_rows(input_ids)
        if not rows:
            return scores.argmax(-1) if node_of is None else scores.argmax(-1)[node_of]
        token = torch.zeros(input_ids.shape[0], dtype=torch.long, device=scores.device)
        greedy = [n for n, stream in enumerate(self.streams) if stream is None]
        if greedy:  # the argmax of the greedy rows alone (over all 192 rows: 4 ms, benchmarks/sampler_parts.py)
            token[greedy] = scores[greedy if node_of is None else node_of[greedy]].argmax(-1)
        at = torch.tensor(rows, device=scores.device)
        source = at if node_of is None else node_of[at]  # each sampled row's row of the scores
        # every row's tempered scores and nucleus at once (a greedy row's are not needed, but copying the sampled
        # rows out of the whole-vocabulary scores cost more than computing them)
        tempered = scores.float() / max(self.temperature, 1e-5)
        numbers = self._uniform(rows, scores.shape[-1])
        if self.top_p >= 1.0:
            token[rows] = (tempered[source] - _log_log(numbers.rows())).argmax(-1).to(token.device)
            return token
        kept, index, resolved = _nucleus_in_top(tempered, self.top_p, min(PICK_TOP, scores.shape[-1]))
        kept, index, resolved = kept[source], index[source], resolved[source]
        values = tempered[source[:, None], index]
        sampled = torch.where(kept & (values > float("-inf")), values - _log_log(numbers.at(index)),
                              torch.full_like(values, float("-inf")))
        best = sampled.max(-1, keepdim=True).values
        choice = torch.where(sampled == best, index, scores.shape[-1]).min(-1).values
        resolved &= best.squeeze(-1) > float("-inf")
        rest = (~resolved).nonzero().squeeze(-1)
        if len(rest):  # nucleus beyond the top tokens, or a tie run crossing their edge: the whole row
            choice[rest] = _perturbed(tempered[source[rest]], numbers.rows(rest), self.top_p).argmax(-1)
        token[rows] = choice.to(token.device)
        return token


class _StepNumbers:
    """One step's uniform numbers of the sampled rows: a whole [rows, vocab] draw (``mt19937``), or each row's
    step key (``counter``), from which a number is computed where it is read."""

    def __init__(self, vocab: int, whole: torch.Tensor | None = None, keys: torch.Tensor | None = None):
        self.vocab, self.whole, self.keys = vocab, whole, keys

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """[rows, k]: each row's numbers for the token ids ``index`` [rows, k]."""
        if self.whole is not None:
            return self.whole.gather(-1, index)
        return _uniform_of(self.keys[:, None], _token_keys(self.vocab)[index])

    def rows(self, which: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, vocab]: the numbers of rows ``which`` (positions among the sampled rows; None: all) for every
        token."""
        if self.whole is not None:
            return self.whole if which is None else self.whole[which]
        keys = self.keys if which is None else self.keys[which]
        return _uniform_of(keys[:, None], _token_keys(self.vocab)[None, :])


_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``x * c`` modulo 2**32 for 32-bit values held in int64 (tensors or ints), without a product past 2**63."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32: xorshifts and two odd multipliers) of 32-bit values
    held in int64, tensors or ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_key(seed: int) -> int:
    """A stream's key: both 32-bit halves of its seed, hashed."""
    return _mix32((seed & _MASK32) ^ _mix32(((seed >> 32) & _MASK32) ^ 0x68E31DA4))


def _step_keys(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Each row's key for its ``steps``-th sampled step."""
    return _mix32(keys ^ _mix32((steps & _MASK32) ^ 0x1B56C4E9))


_TOKEN_KEYS: dict[int, torch.Tensor] = {}


def _token_keys(vocab: int) -> torch.Tensor:
    """Each token id's key (made once per vocabulary size)."""
    if vocab not in _TOKEN_KEYS:
        _TOKEN_KEYS[vocab] = _mix32(torch.arange(vocab, dtype=torch.long) ^ 0x2C1B3C6D)
    return _TOKEN_KEYS[vocab]


def _uniform_of(step_keys: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), 24 bits each, for (step key, token key) pairs as the two broadcast."""
    bits = _mix32(_mix32(step_keys ^ token_keys) ^ step_keys) >> 8
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def counter_uniform(seed: int, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """The counter stream's numbers of a row seeded ``seed`` at its ``step``-th sampled step, for token ids
    ``tokens``: what :class:`SeededSampler` adds as noise (a hash of the three; no state, so a step computes only
    the numbers it reads)."""
    keys = _step_keys(torch.tensor([_seed_key(seed)]), torch.tensor([step]))
    return _uniform_of(keys, _token_keys(int(tokens.max()) + 1)[tokens])


_POOLS: dict = {}


def _draw_pool(workers: int):
    """A thread pool of ``workers`` threads, made once per size (torch releases the GIL while it draws)."""
    if workers not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor

        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="recreason-draws")
    return _POOLS[workers]


PICK_TOP = 64  # tokens :meth:`SeededSampler.pick` samples among when a row's nucleus lies within them


def _perturbed(logits: torch.Tensor, uniform: torch.Tensor, top_p: float) -> torch.Tensor:
    """Gumbel-perturbed tempered scores on each row's nucleus, -inf elsewhere (and where a processor banned)."""
    keep = (~nucleus_drop(logits, top_p) & (logits > float("-inf"))).nonzero(as_tuple=True)
    sampled = torch.full_like(logits, float("-inf"))
    sampled[keep] = logits[keep] - _log_log(uniform[keep]).to(logits.device)
    return sampled


def _log_log(uniform: torch.Tensor) -> torch.Tensor:
    """log(-log(u)) of uniform numbers kept inside (0, 1) (in place): minus Gumbel noise."""
    return torch.log(-torch.log(uniform.clamp_(1e-10, 1 - 1e-10)))


def _nucleus_in_top(logits: torch.Tensor, top_p: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(which of each row's ``k`` most probable tokens its nucleus keeps, their token ids, the rows for which that
    is the whole nucleus). The nucleus is :func:`nucleus_drop`'s: every token more probable than its least
    probable kept one, and of the tokens tied with that one the first by id; it is resolved here when it ends
    before the ``k``-th token and the ``k``-th token is less probable than its edge (so the whole tie is in view)."""
    probs = torch.softmax(logits, -1)
    top, index = probs.topk(k, -1)  # descending
    count = (top.cumsum(-1) - top <= top_p).sum(-1, keepdim=True)  # tokens in the nucleus, if it ends in the top
    last = top.gather(-1, (count - 1).clamp(max=k - 1))
    resolved = ((count < k) & (top[:, -1:] < last)).squeeze(-1)
    above, run = top > last, top == last
    room = count - above.sum(-1, keepdim=True)
    ids = torch.where(run, index, logits.shape[-1])
    earlier = (ids[:, None, :] < ids[:, :, None]).sum(-1)  # tied tokens with a lower id than each
    return above | (run & (earlier < room)), index, resolved


def _shared_prefill_lm(model, extra: dict):
    """The causal LM whose KV cache one prefill per prompt can fill for all of the prompt's draws, or None where
    the prompt does not enter as plain token ids: learned user/item vectors go in as embeddings, and peft's
    prefix and prompt tuning build a cache of their own."""
    if hasattr(model, "user_index"):
        if not model.pass_position_ids or (model.soft and "user_idx" in extra):
            return None
        model = model.lm
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None
    return model


def plain_causal_lm(model):
    """The causal LM that reads ``model``'s prompts as plain token ids (what :func:`greedy_decode` and
    :class:`~recreason.generation.engine.ContinuousDecoder` drive), or None: prompts with learned user/item
    vectors and peft's prompt learning go through ``generate``."""
    if getattr(model, "soft", False):
        return None
    return _shared_prefill_lm(model, {})


MIN_SHARED_HEADER = 8  # tokens every prompt of a batch must share before their header is computed once


def shared_header(batch: dict) -> int:
    """How many leading tokens every prompt of a left-padded batch shares (the chat template's system turn, and the
    user's part when one user's items are explained together), leaving each prompt at least one token of its own."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    width = ids.shape[1]
    shortest = int(lengths.min())
    if ids.shape[0] < 2 or shortest < 2:
        return 0
    rows = torch.stack([ids[r, width - int(lengths[r]):width - int(lengths[r]) + shortest - 1]
                        for r in range(ids.shape[0])])
    differs = (rows != rows[:1]).any(0)
    return int(differs.float().argmax()) if bool(differs.any()) else shortest - 1


def prefill(lm, batch: dict, n: int) -> tuple:
    """(KV cache of every prompt token but the last, repeated for each prompt's ``n`` draws; the batch laid out as
    the cache was computed). ``generate`` then starts from the cache and runs only the last prompt token before
    decoding. The prompts' shared header (:func:`shared_header`, at least :data:`MIN_SHARED_HEADER` tokens) is
    computed once for the batch: the batch is laid out as the header, then each prompt's own tokens left-padded
    after it (a mask hides the padding, positions count real tokens only, so every token sees what a prefill of
    its prompt alone gives it); the own tokens are prefilled in groups of similar length (:func:`_prefill_own`:
    16 prompts padded to the longest were a fifth padding, in groups 6%; 0.90x the time,
    ``benchmarks/prefill_groups.py``). Without the cache every draw recomputed the whole prompt: with 16 draws of a
    150-token prompt that was most of the work (``benchmarks/candidate_speed.py``)."""
    header = shared_header(batch)
    if header >= MIN_SHARED_HEADER:
        batch = _after_header(batch, header)
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        ids = batch["input_ids"]
        cache = lm(input_ids=ids[:1, :header], attention_mask=mask[:1, :header], position_ids=positions[:1, :header],
                   use_cache=True, logits_to_keep=1).cache
        if ids.shape[1] - 1 > header:
            cache = _prefill_own(lm, cache, ids, mask, positions, header)
        else:
            cache.batch_repeat_interleave(ids.shape[0])
    else:
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = lm(input_ids=batch["input_ids"][:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   use_cache=True, logits_to_keep=1).cache
    if n > 1:
        cache.batch_repeat_interleave(n)
    return cache, batch


PREFILL_CALL_TOKENS = 96  # what one more prefill call costs, in prompt tokens' worth of time (length_groups)


def length_groups(lengths: Sequence[int], call_tokens: int | None = None) -> list[list[int]]:
    """The rows of a batch split into groups of similar length, each prefilled as one call padded to its longest
    row: of all splits of the rows sorted by length into runs, the one with the fewest padded tokens plus
    ``call_tokens`` a group (a call has a fixed cost, and a product of fewer rows runs further from the matrix
    peak; default :data:`PREFILL_CALL_TOKENS`). One group where the lengths are close."""
    call_tokens = PREFILL_CALL_TOKENS if call_tokens is None else call_tokens
    order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
    sizes = [lengths[r] for r in order]
    best, cut = [0] + [None] * len(sizes), [0] * (len(sizes) + 1)
    for end in range(1, len(sizes) + 1):  # best[end]: the cheapest split of the first `end` sorted rows
        for start in range(end):
            cost = best[start] + (end - start) * sizes[end - 1] + call_tokens
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(sizes)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _prefill_own(lm, header_cache, ids, mask, positions, header: int):
    """The prompts' own tokens (every one but the last) prefilled after their shared header's cache, in groups of
    similar length (:func:`length_groups`) so that a short prompt is not padded to the batch's longest; the cache
    comes back laid out as one call over the whole batch lays it (header, padding, each prompt's tokens at the
    right), its padding columns zero and masked."""
    from transformers import DynamicCache

    width = ids.shape[1] - 1  # the last prompt token is decoding's first step
    own = mask[:, header:width].sum(1).tolist()
    groups = length_groups(own)
    keys = [layer.keys for layer in header_cache.layers]
    values = [layer.values for layer in header_cache.layers]
    full_k = [k.new_zeros(ids.shape[0], k.shape[1], width, k.shape[3]) for k in keys]
    full_v = [v.new_zeros(ids.shape[0], v.shape[1], width, v.shape[3]) for v in values]
    for group in groups:
        rows = torch.tensor(sorted(group))
        start = width - max(1, max(own[r] for r in group))  # the group's columns: header, then its own part
        columns = torch.cat([torch.arange(header), torch.arange(start, width)])
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k.expand(len(group), -1, -1, -1).contiguous(), v.expand(len(group), -1, -1, -1).contiguous(),
                         layer)
        cache = lm(input_ids=ids[rows, start:width], attention_mask=mask[rows][:, columns],
                   position_ids=positions[rows, start:width], cache=cache, use_cache=True, logits_to_keep=1).cache
        if len(groups) == 1 and start == header:  # one call over every row and column: already the layout
            return cache
        for layer, part in enumerate(cache.layers):
            full_k[layer][rows[:, None], :, columns] = part.keys.transpose(1, 2)
            full_v[layer][rows[:, None], :, columns] = part.values.transpose(1, 2)
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(full_k, full_v)):
        cache.update(k, v, layer)
    return cache


def _after_header(batch: dict, header: int) -> dict:
    """The left-padded batch re-laid as: the shared header, padding, then each prompt's own tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    width = ids.shape[1]
    new_ids, new_mask = ids.clone(), torch.zeros_like(mask)
    for r in range(ids.shape[0]):
        start = width - int(lengths[r])
        new_ids[r, :header] = ids[r, start:start + header]
        new_mask[r, :header] = 1
        own = int(lengths[r]) - header
        new_ids[r, header:width - own] = ids[0, 0]  # padding: masked, any token
        new_ids[r, width - own:] = ids[r, start + header:]
        new_mask[r, width - own:] = 1
    return {**batch, "input_ids": new_ids, "attention_mask": new_mask}


def prompt_seed(seed: int, prompt: str, sample: int) -> int:
    return zlib.crc32(f"{seed}\x00{sample}\x00{prompt}".encode())


@torch.no_grad()
def generate_candidates(
    model, tokenizer, prompts: Sequence[str], cfg: GenerateConfig, progress: bool = True, desc: str = "generating",
    users: Sequence[str] | None = None, items: Sequence[str] | None = None, draws: Sequence[int] | None = None,
    shared_prefill: bool = True, own_loop: bool = True, shared_prefix: bool = True, likelihood: bool = True,
    merge_draws: bool = True,
) -> list[list[Candidate]]:
    """``cfg.candidates`` candidates per prompt: the greedy text first, then ``cfg.candidates - 1`` samples
    (``cfg.sample_temperature``, ``cfg.sample_top_p``), each with its mean token log-likelihood under the
    model. All of a batch's candidates decode in one pass. Each sample's random stream is seeded by
    ``cfg.seed``, the prompt and the sample number, so a prompt gets the same candidates in any batch (in fp32,
    tested; in bf16 the rounding of a prompt's sums moves with the padding its batch gives it, and a sample drawn
    after a rounding changed may differ: 18 of 28 prompts kept every candidate when their batch companions changed).
    Identical texts are kept once, with ``count`` saying how many draws produced them. ``draws`` picks
    which draws to make (0 = greedy, j = sample j; default ``range(cfg.candidates)``): draws 8-15 merged
    (:func:`merge_candidates`) into draws 0-7 are the 16 candidates of one decode, at half its cost.
    ``shared_prefill`` (default) computes each prompt's KV cache once for all of its draws (:func:`prefill`);
    False recomputes it per draw, the baseline ``benchmarks/candidate_speed.py`` measures it against. Plain
    token-id prompts decode in :func:`greedy_decode` (the samples as its seeded processor; a draw that has ended
    leaves the batch); ``own_loop=False`` hands them to ``generate`` (every row decodes until the longest ends),
    the baseline ``benchmarks/greedy_loop.py --candidates K`` measures it against; ``shared_prefix``, ``merge_draws``: as
    :func:`greedy_decode` takes them. ``likelihood=False`` (where the choice gives the likelihood no weight: a server's)
    leaves it out of the own loop (NaN): its log-normaliser over the vocabulary is 8 ms a step at 192 rows
    (``benchmarks/sampler_parts.py``)."""
    from transformers import LogitsProcessorList

    draws = list(range(max(1, cfg.candidates))) if draws is None else list(draws)
    n = len(draws)
    out: list[list[Candidate]] = [[] for _ in prompts]
    for idx, batch, extra in _batches(model, tokenizer, prompts, cfg, users, items, progress, desc):
        seeds = [s for i in idx for s in draw_seeds(cfg.seed, prompts[i], draws)]
        lm = _shared_prefill_lm(model, extra) if shared_prefill and batch["input_ids"].shape[1] > 1 else None
        sampler = SeededSampler(seeds, cfg.sample_temperature, cfg.sample_top_p, tokenizer.eos_token_id,
                                cfg.sample_stream)
        if lm is not None and own_loop:  # one prefill per prompt, rows leave as they end
            decoded = greedy_decode(lm, batch, cfg.max_new_tokens, _eos_ids(tokenizer),
                                    reason_processors(cfg, tokenizer) + [sampler], draws=n, scores=likelihood,
                                    shared_prefix=shared_prefix, merge_draws=merge_draws)
            tokens, logprobs = decoded if likelihood else (decoded, [float("nan")] * len(decoded))
        else:
            ids = {k: v.repeat_interleave(n, 0) for k, v in extra.items()}
            if lm is not None and n > 1:  # the prompt's cache is computed once and copied to each of its draws
                ids["cache"], batch = prefill(lm, batch, n)
            expanded = {k: v.repeat_interleave(n, 0) for k, v in batch.items()}
            result = _generate(model, expanded, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               return_dict_in_generate=True, output_logits=True,
                               logits_processor=LogitsProcessorList(reason_processors(cfg, tokenizer) + [sampler]),
                               **ids)
            tokens = result.sequences
            logprobs = _mean_logprobs(result.sequences, result.logits, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id).tolist()
        for k, i in enumerate(idx):
            out[i] = candidate_list(tokenizer, tokens[k * n:(k + 1) * n], logprobs[k * n:(k + 1) * n], draws)
    return out


def candidate_list(tokenizer, tokens: Sequence, logprobs: Sequence[float], draws: Sequence[int]) -> list[Candidate]:
    """One prompt's candidates from its draws' tokens and mean log-likelihoods (draw 0 is the greedy one): texts
    as :func:`clean_output` gives them, identical ones kept once with their counts."""
    out: list[Candidate] = []
    for text, lp, j in zip(tokenizer.batch_decode(tokens, skip_special_tokens=True), logprobs, draws):
        _add(out, Candidate(clean_output(text), float(lp), greedy=j == 0))
    return out


def draw_seeds(seed: int, prompt: str, draws: Sequence[int]) -> list[int | None]:
    """The random seed of each of a prompt's draws (None: draw 0, the greedy one): :func:`prompt_seed`."""
    return [None if j == 0 else prompt_seed(seed, prompt, j) for j in draws]


def _add(target: list[Candidate], candidate: Candidate) -> None:
    """Keep identical texts once: a repeated text adds its draws to the first one's count."""
    same = next((c for c in target if c.text == candidate.text), None)
    if same is None:
        target.append(candidate)
    else:
        same.count += candidate.count
        same.greedy = same.greedy or candidate.greedy


def merge_candidates(first: Sequence[Candidate], more: Sequence[Candidate]) -> list[Candidate]:
    """One prompt's candidates from two sets of draws (:func:`generate_candidates` ``draws``), as one decode of
    all of them would list them: first-seen order, identical texts kept once with their counts added."""
    out = [replace(c) for c in first]
    for c in more:
        _add(out, replace(c))
    return out
