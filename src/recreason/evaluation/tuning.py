"""``recreason tune``: choose the selection weights of a run on its validation records.

A run that decodes several candidates per reason (``generate.candidates`` > 1) keeps the one with the best
score (:mod:`recreason.inference.selection`); the score's weights are chosen here, on validation records only:

* **Records**: the run's validation records after the first ``generate.generic_records`` (those measure the
  generic table, so a record's own greedy reason never counts against it); ``--records N`` keeps the last N.
* **Candidates**: decoded once into the run (RUN/candidates/, :mod:`recreason.inference.candidates`);
  every weight setting is a choice among them (:class:`~recreason.inference.selection.TermTable`), scored
  from per-candidate figures (:class:`ChoiceScorer`): the :data:`GRID`'s 29,160 settings take seconds.
* **Objective** (:func:`objective`): points of ROUGE-L plus BLEU-4 gained over the run's greedy text.
* **Feasible** (:func:`feasible`): USR, FMR and FCR at least greedy's and the generic rate at most greedy's,
  so a setting cannot buy ROUGE-L/BLEU-4 by giving up what greedy already has.
* **Bar** (:func:`within_bar`): the generic and ungrounded rates at most :data:`BAR_FRACTION` (half) of a
  reference's, with 95% confidence (one-sided Wilson upper bounds on the validation records). The reference
  is a cheaper run on the same data (``--reference``, e.g. the demo configuration's run) decoded greedily, or
  the run's own greedy text when none is given. ``--also RUN2`` (with ``--also-reference``): a run trained on
  another split of the same log (by time, say); the bar must then hold on its validation records too
  (``within_later_bar``), so the choice does not rest on one split's records. No test record is read.
* **Match** (``--match RUN``, :func:`matches`): for a run that stands in for another, e.g. a distilled run for
  the full run that taught it: the other run's reasons as it serves them (its RUN/config.yaml: 32 candidates and
  its own weights) on the same records set what may not get worse: USR above theirs and generic and ungrounded
  rates under theirs, each by :data:`MATCH_MARGIN` (``--match-margin``; ``--also-match`` for ``--also``'s split,
  whose gain then adds to the objective). Without ``--reference`` it replaces the bar above. Why a distilled run
  needs weights of its own: its candidates are sharper, and the full run's weights (strong consensus) pick its
  most common sentence. The margin (0.01: about 2.5 of 256 records) guards against the best of 29,160 settings
  on a few hundred records being best by luck: weights chosen with none met the full run's rates on validation
  and fell 0.004 short on USR and 0.007 on the generic rate on seed 1's test split.
* **Choice**: the feasible setting with the highest objective within every bar (``best_within_bar``); the
  best without the bar (``best``) is recorded to show what the bar costs.

Writes RUN/tuned.yaml (a config file to layer last: ``--config RUN/tuned.yaml``) and every trial to
RUN/tuning/trials.json (:class:`~recreason.rundir.RunPaths`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from recreason.config import GenerateConfig, load_config
from recreason.data.records import target_text
from recreason.evaluation import metrics as M
from recreason.errors import ConfigError
from recreason.evaluation.evaluate import TextScorer, check_rates
from recreason.inference import Predictor
from recreason.inference import candidates as candidate_cache
from recreason.inference.safety import ReasonChecker
from recreason.rundir import Run
from recreason.text import tokenize

# The weight settings tried: 29,160. Each value list grew where an earlier tuning's choice sat at its edge.
GRID = {"weight_likelihood": [0.0, 1.0], "weight_grounded": [0.0, 0.5, 1.0], "weight_user": [0.0, 0.5, 1.0],
        "weight_generic": [0.0, 0.5, 1.0], "weight_ungrounded": [0.0, 1.0, 3.0],
        "weight_consensus": [0.0, 8.0, 16.0, 32.0, 64.0], "weight_consensus_bleu": [0.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        "weight_length": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]}
TARGETS = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR")
RATES = ("Generic", "Ungrounded")
KEEP = ("USR", "FMR", "FCR")
BAR_FRACTION = 0.5


def objective(row: dict, greedy: dict) -> float:
    """Points of ROUGE-L plus BLEU-4 gained over greedy decoding, on one scale, so that the noisier BLEU-4
    cannot outweigh ROUGE-L with a few 4-gram matches."""
    return (row["ROUGE-L"] - greedy["ROUGE-L"]) + (row["BLEU-4"] - greedy["BLEU-4"])


def feasible(row: dict, greedy: dict) -> bool:
    """USR, FMR and FCR at least greedy's, generic rate at most greedy's."""
    return all(row[m] >= greedy[m] for m in KEEP) and row["Generic"] <= greedy["Generic"]


def rate_upper_bound(rate: float, n: int, z: float = 1.645) -> float:
    """One-sided 95% Wilson upper bound of a share ``rate`` measured on ``n`` records."""
    centre = rate + z * z / (2 * n)
    spread = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def within_bar(rates: dict, bar: dict, n: int) -> bool:
    """Whether the generic and ungrounded rates' upper bounds on ``n`` records are under ``bar``: the setting
    should still meet it on records it was not chosen on."""
    return all(rate_upper_bound(rates[m], n) <= bar[m] for m in bar)


MATCH_MARGIN = 0.01


def matches(rates: dict, match: dict | None, margin: float = 0.0) -> bool:
    """Whether a choice is at least as good as ``match`` (the rates of the run it should stand in for, on the same
    records) by ``margin``: USR at least its plus the margin, generic and ungrounded rates at most its minus the
    margin. True where there is nothing to match."""
    return match is None or (rates["USR"] >= match["USR"] + margin
                             and all(rates[m] <= match[m] - margin for m in RATES))


def grounding_first(trials: list[dict], bar: dict, n: int) -> dict | None:
    """The best feasible trial within the bar (a recorded ``within_bar`` stands where the trial has one), within
    the second split's bar too where it was checked (``within_later_bar``), and matching the run it stands in for
    on each split where one was given (``matches``, ``later_matches``). Where a trial also matched on the second
    split its gain there counts too (``later_gain``): a stand-in has to hold on both, so neither split's records
    alone pick its weights."""
    within = [t for t in trials if t["feasible"] and t.get("within_bar", within_bar(t, bar, n))
              and t.get("within_later_bar", True) and t.get("matches", True) and t.get("later_matches", True)]
    return max(within, key=lambda t: t["gain"] + t.get("later_gain", 0.0)) if within else None


class ChoiceScorer:
    """:data:`TARGETS` and :data:`RATES` of any choice of one candidate per record, from per-candidate figures
    computed once with :mod:`~recreason.evaluation.metrics`' per-sentence functions: BLEU's clipped n-gram
    counts and lengths (corpus BLEU sums them), each candidate's ROUGE-L, features named and flags; only USR,
    FCR and the generic rate, which depend on the whole choice, are counted per choice. The same numbers
    :class:`TextScorer` gives the chosen texts (tested on every choice of a small set)."""

    def __init__(self, scorer: TextScorer, texts: list[list[str]]):
        checker = ReasonChecker(scorer.vocabulary)
        width = max(len(t) for t in texts)
        n = len(texts)
        self.stats = np.zeros((n, width, 10))
        self.rouge = np.zeros((n, width))
        self.match = np.zeros((n, width))
        self.ungrounded = np.zeros((n, width))
        self.hyps: list[list[tuple]] = []
        self.found: list[list[frozenset]] = []
        for r, (ref, truth, record, cands) in enumerate(zip(scorer.refs, scorer.truth, scorer.records, texts)):
            hyps = [tuple(tokenize(t)[:scorer.max_len]) for t in cands]
            found = [frozenset(scorer.matcher.find(h)) for h in hyps]
            for c, (text, hyp) in enumerate(zip(cands, hyps)):
                self.stats[r, c] = M.bleu_stats(ref, hyp, 4)
                self.rouge[r, c] = M.rouge_l_scores([ref], [hyp])[0]
                self.match[r, c] = truth in found[c]
                self.ungrounded[r, c] = check_rates([text], [record], scorer.item_features, scorer.vocabulary,
                                                    checker)["Ungrounded"]
            self.hyps.append(hyps)
            self.found.append(found)
        self.rows = np.arange(n)
        self.features = len(scorer.matcher.features)

    def score(self, chosen: Sequence[int]) -> dict:
        pick = (self.rows, np.asarray(chosen))
        totals = self.stats[pick].sum(0).tolist()
        hyps = [h[k] for h, k in zip(self.hyps, chosen)]
        n = len(chosen)
        return {"BLEU-1": M.bleu_from_stats([totals[0], totals[4], totals[8], totals[9]], 1),
                "BLEU-4": M.bleu_from_stats(totals, 4),
                "ROUGE-L": float(self.rouge[pick].sum()) / n,
                "USR": M.unique_sentence_ratio(hyps),
                "FMR": float(self.match[pick].sum()) / n,
                "FCR": M.feature_coverage_ratio([f[k] for f, k in zip(self.found, chosen)], self.features),
                "Generic": M.generic_rate(hyps),
                "Ungrounded": float(self.ungrounded[pick].sum()) / n}


def _rates(row: dict) -> dict:
    return {m: row[m] for m in (*TARGETS, *RATES)}


class ValidationSet:
    """One run's tuning records with its candidates' selection terms, its greedy text's rates and the bar
    (:data:`BAR_FRACTION` of the reference's generic and ungrounded rates on the same records)."""

    def __init__(self, run: str | Path, gen: GenerateConfig, reference: str | Path | None = None,
                 n_records: int | None = None, progress: bool = True, match: str | Path | None = None):
        predictor = Predictor(run, gen)
        self.run = predictor.run
        validation = predictor.dataset.subset(self.run.split_seed, "validation")
        self.records = validation[gen.generic_records:]
        if n_records:
            self.records = self.records[-n_records:]
        if not self.records:
            raise ConfigError(f"{run} has {len(validation)} validation records, none after the first "
                         f"generate.generic_records ({gen.generic_records}) that measure the generic table")
        self.first_record = len(validation) - len(self.records)
        refs = [target_text(r, self.run.info["target"]) for r in self.records]
        prompted, candidates, self.seconds = candidate_cache.decode(predictor, "validation", self.records, gen,
                                                                    progress)
        self.table, texts = candidate_cache.term_table(predictor, prompted, candidates, predictor.generic_table(gen))
        scorer = TextScorer(self.records, refs, predictor.train, predictor.dataset.features, 20, bootstrap=0,
                            semantic=False)
        self.texts = texts
        self.fast = ChoiceScorer(scorer, texts)
        self.greedy = _rates(scorer.score("greedy", [c[0].text for c in candidates]))
        if reference is None:
            self.reference = self.greedy
        else:
            texts = Predictor(reference, reference_config(reference)).explain_records(self.records, progress=progress)
            self.reference = _rates(scorer.score("reference", texts))
        # matching a run replaces the bar of half the run's own greedy rates (the match is the stricter, real one)
        self.bar = {} if reference is None and match is not None else {m: self.reference[m] * BAR_FRACTION
                                                                        for m in RATES}
        self.match = None
        if match is not None:  # the other run's reasons as it serves them, on the same records
            teacher = Predictor(match, served_config(match))
            texts = candidate_cache.chosen_texts(teacher, "validation", self.records, teacher.gen_cfg, progress)
            self.match = _rates(scorer.score("match", texts))
        self.scored: dict = {}

    def score(self, cfg: GenerateConfig) -> dict:
        """The metrics of the choice ``cfg``'s weights make; each distinct choice is scored once."""
        chosen = self.table.choose(cfg)
        if chosen not in self.scored:
            self.scored[chosen] = self.fast.score(chosen)
        return self.scored[chosen]

    def summary(self, run: str | Path, reference: str | Path | None) -> dict:
        return {"run": str(run), "reference": str(reference) if reference else "greedy text of the run",
                "records": len(self.records), "first_record": self.first_record,
                "candidate_seconds": self.seconds, "greedy": self.greedy, "reference_rates": self.reference,
                "bar": self.bar, **({"match": self.match} if self.match else {})}


def served_config(run: str | Path) -> GenerateConfig:
    """How a run serves reasons: the generate settings it was trained with (RUN/config.yaml), its candidate count
    and selection weights included, over the whole split."""
    paths = Run(run).paths
    gen = load_config([paths.config])["generate"] if paths.config.exists() else GenerateConfig()
    return replace(gen, max_records=None)


def reference_config(run: str | Path) -> GenerateConfig:
    """How a reference run decodes: greedily, with the generate settings it was trained with (RUN/config.yaml;
    the batch size matters: bf16 rounds differently in other batch shapes)."""
    return replace(served_config(run), candidates=1)


def settings(grid: dict | None = None) -> list[dict]:
    grid = grid or GRID
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def tune(run: str | Path, gen: GenerateConfig, reference: str | Path | None = None,
         also: str | Path | None = None, also_reference: str | Path | None = None, n_records: int | None = None,
         grid: dict | None = None, progress: bool = True, match: str | Path | None = None,
         also_match: str | Path | None = None, match_margin: float = MATCH_MARGIN) -> dict:
    """Score every setting of ``grid`` on ``run``'s validation records (and check the bar on ``also``'s), write
    RUN/tuning/trials.json and RUN/tuned.yaml, and return the tuning's record (without its trials).

    ``match``: a run ``run`` should stand in for (the full run a distilled run was taught by), served as it was
    configured (:func:`served_config`); a setting is then chosen only where its USR, generic and ungrounded rates
    are better than that run's reasons on the same records by ``match_margin`` (:func:`matches`); ``also_match``
    likewise for ``also``'s split."""
    if gen.candidates < 2:
        raise ConfigError(f"generate.candidates is {gen.candidates}: tuning chooses among candidates; layer a config "
                     "with generate.candidates > 1 (configs/full.yaml decodes 32)")
    grid = grid or GRID
    first = ValidationSet(run, gen, reference, n_records, progress, match)
    second = ValidationSet(also, gen, also_reference, n_records, progress, also_match) if also else None
    start = time.time()
    trials = []
    for weights in tqdm(settings(grid), desc="scoring weight settings", unit="setting", disable=not progress):
        row = first.score(replace(gen, **weights))
        trial = {"weights": weights, "gain": objective(row, first.greedy), "feasible": feasible(row, first.greedy),
                 **row}
        trial["within_bar"] = within_bar(row, first.bar, len(first.records))
        if first.match is not None:
            trial["matches"] = matches(row, first.match, match_margin)
        if second is not None and trial["feasible"] and trial["within_bar"] and trial.get("matches", True):
            rates = second.score(replace(gen, **weights))
            trial["later"] = {m: rates[m] for m in (*RATES, "USR", "BLEU-4", "ROUGE-L")}
            trial["within_later_bar"] = within_bar(rates, second.bar, len(second.records))
            if second.match is not None:  # standing in on both splits: both splits' gains count
                trial["later_matches"] = matches(rates, second.match, match_margin)
                trial["later_gain"] = objective(rates, second.greedy)
        trials.append(trial)
    trials.sort(key=lambda t: (not t["feasible"], -t["gain"]))
    result = {"split": "validation", "candidates": gen.candidates, "grid": grid, "settings": len(trials),
              "distinct_selections": len(first.scored), "grid_seconds": time.time() - start,
              **first.summary(run, reference),
              **({"later": second.summary(also, also_reference)} if second else {}),
              **({"match_run": str(match), "match_margin": match_margin} if match else {}),
              "best_within_bar": grounding_first(trials, first.bar, len(first.records)), "best": trials[0]}
    paths = first.run.paths
    paths.trials.parent.mkdir(parents=True, exist_ok=True)
    paths.trials.write_text(json.dumps({**result, "trials": trials}) + "\n")
    write_tuned(paths.tuned_config, result, paths.trials)
    return result


def chosen_weights(result: dict) -> dict | None:
    """The setting a tuning chose: the best within every bar, else the best feasible one, else None (no
    setting keeps what greedy decoding has: decode greedily)."""
    best = result["best_within_bar"] or (result["best"] if result["best"]["feasible"] else None)
    return None if best is None else best["weights"]


def write_tuned(path: Path, result: dict, trials: Path) -> None:
    """The tuned config file: the chosen weights and the candidate count they were chosen for, with comments
    that say how they were chosen."""
    weights = chosen_weights(result)
    best = result["best_within_bar"] or result["best"]
    if weights is None:
        why = "no setting kept greedy decoding's USR, FMR, FCR and generic rate: greedy decoding"
    elif result["best_within_bar"] is None:
        why = (f"no setting met the grounding bar; the best feasible one: ROUGE-L + BLEU-4 {best['gain']:+.2f} "
               "over greedy")
    else:
        why = (f"ROUGE-L + BLEU-4 {best['gain']:+.2f} over greedy, within the grounding bar"
               + (f", as good as {result['match_run']} on USR, generic and ungrounded" if "match_run" in result else "")
               + (" on both runs' validation records" if "later" in result else ""))
    lines = [f"# Chosen by `recreason tune` on {result['records']} validation records of {result['run']}",
             f"# ({result['settings']} settings, {result['candidates']} candidates): {why}.",
             f"# Every trial: {trials}. Layer this file last:",
             "#   recreason evaluate --run RUN --config ... --config RUN/tuned.yaml",
             "generate:",
             f"  candidates: {result['candidates'] if weights is not None else 1}"]
    lines += [f"  {k}: {float(v)!r}" for k, v in (weights or {}).items()]
    path.write_text("\n".join(lines) + "\n")
