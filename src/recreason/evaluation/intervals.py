"""Bootstrap intervals for the text metrics, and paired bootstrap differences between two systems.

Records are resampled with replacement (the same resamples for every system, so differences are paired).
Corpus BLEU is recomputed from summed per-sentence statistics on each resample; ROUGE and the semantic
similarity are means of per-sentence scores. Intervals are the 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from recreason.evaluation.metrics import Tokens, bleu_from_stats, bleu_stats, rouge_l_scores, rouge_n_scores

INTERVAL_METRICS = ("BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L")


class SentenceScores:
    """Per-record pieces of each corpus metric for one system, so any resample can be scored quickly."""

    def __init__(self, references: Sequence[Tokens], hypotheses: Sequence[Tokens], extra: dict | None = None):
        self.bleu4 = np.array([bleu_stats(r, h, 4) for r, h in zip(references, hypotheses)], dtype=np.float64)
        self.bleu1 = np.array([bleu_stats(r, h, 1) for r, h in zip(references, hypotheses)], dtype=np.float64)
        self.means = {"ROUGE-1": np.array(rouge_n_scores(references, hypotheses, 1)),
                      "ROUGE-2": np.array(rouge_n_scores(references, hypotheses, 2)),
                      "ROUGE-L": np.array(rouge_l_scores(references, hypotheses))}
        for name, values in (extra or {}).items():  # any other per-record mean, e.g. semantic similarity
            self.means[name] = np.asarray(values, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.bleu4)

    def on(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric on each resample (``samples``: resamples x records, record indices)."""
        out = {"BLEU-1": np.array([bleu_from_stats(t, 1) for t in self.bleu1[samples].sum(1)]),
               "BLEU-4": np.array([bleu_from_stats(t, 4) for t in self.bleu4[samples].sum(1)])}
        for name, values in self.means.items():
            out[name] = values[samples].mean(1)
        return out


def resamples(n_records: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_records, size=(n_resamples, n_records))


def intervals(scores: SentenceScores, samples: np.ndarray) -> dict[str, list[float]]:
    """95% percentile interval of each metric."""
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in scores.on(samples).items()}


def paired_difference(a: SentenceScores, b: SentenceScores, samples: np.ndarray) -> dict[str, dict[str, float]]:
    """a - b on each metric: the point difference on all records, its 95% interval over the same resamples,
    and the share of resamples where a is not better (a one-sided bootstrap p-value)."""
    everything = np.arange(len(a))[None, :]
    full_a, full_b = a.on(everything), b.on(everything)
    on_a, on_b = a.on(samples), b.on(samples)
    out = {}
    for name in on_a:
        if name not in on_b:
            continue
        diff = on_a[name] - on_b[name]
        out[name] = {"diff": float(full_a[name][0] - full_b[name][0]), "low": float(np.percentile(diff, 2.5)),
                     "high": float(np.percentile(diff, 97.5)), "p_not_better": float(np.mean(diff <= 0))}
    return out
