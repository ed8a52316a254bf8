"""Decoded candidates kept in the run, so every weight setting is scored from one decode.

A split's candidates depend on the checkpoint and the decoding settings (count, temperature, top-p, seed,
length, precision), never on the selection weights or on which other records were decoded beside them (each
sample is seeded by its prompt and draw). So ``recreason tune`` decodes a split's candidates once into
RUN/candidates/SPLIT-DIGEST.jsonl (one line per record, by its index; :class:`~recreason.rundir.RunPaths`),
appends them chunk by chunk (a stopped decode keeps what it finished and a rerun decodes only what is
missing), and a larger candidate count reuses the draws a smaller cache of the same settings holds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from recreason.config import GenerateConfig
from recreason.generation import generate as decoding
from recreason.generation.generate import SHAPING_KEYS, Candidate, merge_candidates
from recreason.inference.predictor import Predictor, Prompted, Request
from recreason.inference.selection import TermTable, agreements, candidate_terms
from recreason.rundir import checkpoint_stamp

CHUNK = 96  # records decoded between two appends to the cache
DECODING_KEYS = ("candidates", "sample_temperature", "sample_top_p", "seed", "max_new_tokens", "precision")


def cache_path(predictor: Predictor, split: str, gen: GenerateConfig) -> Path:
    """Where ``split``'s candidates under ``gen``'s decoding settings are kept for the predictor's run."""
    key = {k: getattr(gen, k) for k in DECODING_KEYS}
    key.update({k: getattr(gen, k) for k in SHAPING_KEYS if getattr(gen, k)})  # off: the keys caches had before
    if gen.sample_stream != "mt19937":  # the stream of the caches made before the setting existed keeps their digest
        key["sample_stream"] = gen.sample_stream
    if gen.kernels != "torch" and gen.precision != "fp32":  # the compiled kernels' last bits: caches of their own
        key["kernels"] = gen.kernels
    digest = hashlib.sha256(json.dumps([key, checkpoint_stamp(predictor.run), predictor.run.info],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    return predictor.run.paths.candidates(split, digest)


def read_cache(path: Path) -> dict[int, list[Candidate]]:
    """Candidates by record index; a torn last line (a decode killed while appending) is left out."""
    rows: dict[int, list[Candidate]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[row["index"]] = [Candidate(**c) for c in row["candidates"]]
    return rows


def _smaller_cache(predictor: Predictor, split: str, gen: GenerateConfig) -> tuple[int, dict]:
    """(draws, candidates) of the largest cache with fewer candidates per record and the same settings."""
    for k in range(gen.candidates - 1, 1, -1):
        path = cache_path(predictor, split, replace(gen, candidates=k))
        if path.exists():
            return k, read_cache(path)
    return 0, {}


def decode(predictor: Predictor, split: str, records: Sequence, gen: GenerateConfig,
           progress: bool = True) -> tuple[list[Prompted], list[list[Candidate]], float]:
    """(prompted requests, candidates per record, seconds the decode of all of them took: measured, or
    extrapolated from the records decoded so far) for dataset ``records`` of ``split``."""
    prompted = [predictor.prompt(Request(r.user, r.item, record=r), n) for n, r in enumerate(records)]
    path = cache_path(predictor, split, gen)
    meta = path.with_suffix(".meta.json")
    kept = read_cache(path)
    smaller, fewer = _smaller_cache(predictor, split, gen)
    timing = json.loads(meta.read_text()) if meta.exists() else {"seconds": 0.0, "records": 0}
    missing = [n for n, r in enumerate(records) if r.index not in kept]
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(records), initial=len(records) - len(missing), desc=f"decoding {split} candidates",
               unit="record", disable=not progress)
    for chunk in range(0, len(missing), CHUNK):
        part = missing[chunk:chunk + CHUNK]
        start = time.time()
        for group, draws in (([n for n in part if records[n].index in fewer], range(smaller, gen.candidates)),
                             ([n for n in part if records[n].index not in fewer], None)):
            if not group:
                continue
            decoded = decoding.generate_candidates(predictor.model, predictor.tokenizer,
                                                   [prompted[n].prompt for n in group], gen,
                                                   users=[records[n].user for n in group],
                                                   items=[records[n].item for n in group], draws=draws)
            for n, cands in zip(group, decoded):
                index = records[n].index
                kept[index] = cands if draws is None else merge_candidates(fewer[index], cands)
        # the time of the draws decoded here only: a merged record's first draws were timed in their own cache
        timing = {"seconds": timing["seconds"] + time.time() - start, "records": timing["records"] + len(part)}
        with path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps({"index": records[n].index,
                                       "candidates": [asdict(c) for c in kept[records[n].index]]}) + "\n"
                           for n in part)
        meta.write_text(json.dumps(timing) + "\n")
        bar.update(len(part))
    bar.close()
    seconds = timing["seconds"] / timing["records"] * len(records) if timing["records"] else float("nan")
    return prompted, [kept[r.index] for r in records], seconds


def term_table(predictor: Predictor, prompted: Sequence[Prompted], candidates: Sequence[Sequence[Candidate]],
               generic) -> tuple[TermTable, list[list[str]]]:
    """Every candidate's selection terms, computed once (the choice of any weight setting is then
    :meth:`TermTable.choose`), and the candidates' texts."""
    terms = [[candidate_terms(c, set(p.known_features), p.user_features, generic, predictor.matcher, a)
              for c, a in zip(cands, agreements(cands))] for p, cands in zip(prompted, candidates)]
    texts = [[c.text for c in cands] for cands in candidates]
    return TermTable(terms, texts), texts


def chosen_texts(predictor: Predictor, split: str, records: Sequence, gen: GenerateConfig,
                 progress: bool = True) -> list[str]:
    """The reason ``gen`` serves for each of ``records``: the greedy text at one candidate, else the choice of
    ``gen``'s weights among its candidates (decoded through the cache)."""
    prompted, candidates, _ = decode(predictor, split, records, gen, progress)
    if gen.candidates <= 1:
        return [c[0].text for c in candidates]
    table, texts = term_table(predictor, prompted, candidates, predictor.generic_table(gen))
    return [words[k] for words, k in zip(texts, table.choose(gen))]
