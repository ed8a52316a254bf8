"""Explanation and rating metrics, defined as the PETER/PEPLER/NRT code defines them.

All text metrics take token lists (see :func:`recreason.text.tokenize`) that
the caller has already cut to the same maximum length.
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

from recreason.text import FeatureMatcher, lcs_length, ngram_counts, ngram_matches

Tokens = Sequence[str]


def bleu_stats(reference: Tokens, hypothesis: Tokens, max_order: int = 4) -> list[int]:
    """One sentence's share of corpus BLEU: clipped n-gram matches and possible n-grams for each order, then
    the hypothesis and reference lengths. Corpus BLEU sums these over sentences (so it can be bootstrapped)."""
    matches = ngram_matches(ngram_counts(reference, max_order), ngram_counts(hypothesis, max_order), max_order)
    possible = [max(0, len(hypothesis) - order + 1) for order in range(1, max_order + 1)]
    return matches + possible + [len(hypothesis), len(reference)]


def bleu_from_stats(totals: Sequence[float], max_order: int = 4) -> float:
    """Corpus BLEU x100 from summed :func:`bleu_stats` (tensorflow/nmt ``compute_bleu``, no smoothing)."""
    matches, possible = totals[:max_order], totals[max_order : 2 * max_order]
    hyp_len, ref_len = totals[2 * max_order], totals[2 * max_order + 1]
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) <= 0 or hyp_len == 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = hyp_len / ref_len if ref_len else float("inf")
    brevity = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
    return 100.0 * geo_mean * brevity


def bleu(references: Sequence[Tokens], hypotheses: Sequence[Tokens], max_order: int = 4) -> float:
    """Corpus BLEU as tensorflow/nmt ``compute_bleu`` with one reference each, no smoothing, x100."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    totals = [0] * (2 * max_order + 2)
    for ref, hyp in zip(references, hypotheses):
        totals = [a + b for a, b in zip(totals, bleu_stats(ref, hyp, max_order))]
    return bleu_from_stats(totals, max_order)


def _f1(overlap: int, hyp_size: int, ref_size: int) -> float:
    if overlap == 0 or hyp_size == 0 or ref_size == 0:
        return 0.0
    p, r = overlap / hyp_size, overlap / ref_size
    return 2 * p * r / (p + r)


def rouge_n_scores(references: Sequence[Tokens], hypotheses: Sequence[Tokens], n: int) -> list[float]:
    """Per-sentence ROUGE-N F-scores with n-grams taken as sets, x100."""
    scores = []
    for ref, hyp in zip(references, hypotheses):
        ref_set = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
        hyp_set = {tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1)}
        scores.append(100.0 * _f1(len(ref_set & hyp_set), len(hyp_set), len(ref_set)))
    return scores


def rouge_n(references: Sequence[Tokens], hypotheses: Sequence[Tokens], n: int) -> float:
    """Mean per-sentence ROUGE-N F-score with n-grams taken as sets, x100."""
    return sum(rouge_n_scores(references, hypotheses, n)) / len(hypotheses) if hypotheses else 0.0


def rouge_l_scores(references: Sequence[Tokens], hypotheses: Sequence[Tokens]) -> list[float]:
    """Per-sentence ROUGE-L F with beta = P/R, x100."""
    scores = []
    for ref, hyp in zip(references, hypotheses):
        lcs = lcs_length(ref, hyp)
        if lcs == 0:
            scores.append(0.0)
            continue
        r, p = lcs / len(ref), lcs / len(hyp)
        beta = p / r
        scores.append(100.0 * (1 + beta**2) * r * p / (r + beta**2 * p))
    return scores


def rouge_l(references: Sequence[Tokens], hypotheses: Sequence[Tokens]) -> float:
    """Mean per-sentence ROUGE-L F with beta = P/R, x100."""
    return sum(rouge_l_scores(references, hypotheses)) / len(hypotheses) if hypotheses else 0.0


def unique_sentence_ratio(hypotheses: Sequence[Tokens]) -> float:
    """USR: distinct generated token sequences over the number of sentences."""
    if not hypotheses:
        return 0.0
    return len({tuple(h) for h in hypotheses}) / len(hypotheses)


def feature_matching_ratio(found: Sequence[set[str]], truth: Sequence[str]) -> float:
    """FMR: share of records whose ground-truth feature is among the generated features."""
    if not found:
        return 0.0
    return sum(1 for f, t in zip(found, truth) if t in f) / len(found)


def feature_coverage_ratio(found: Sequence[set[str]], vocabulary_size: int) -> float:
    """FCR: distinct features generated anywhere over the vocabulary size."""
    if vocabulary_size <= 0:
        return 0.0
    return len(set().union(*found)) / vocabulary_size if found else 0.0


def feature_diversity(found: Sequence[set[str]]) -> float:
    """DIV: mean |F_i & F_j| over all pairs i<j (lower is more diverse).

    Each feature in n_f sentences contributes C(n_f, 2) pair intersections, so
    the sum over pairs is computed in O(N * features) instead of O(N^2).
    """
    n = len(found)
    if n < 2:
        return 0.0
    counts = collections.Counter(f for s in found for f in s)
    pairs = sum(c * (c - 1) // 2 for c in counts.values())
    return pairs / (n * (n - 1) / 2)


def rmse(predicted: Sequence[float], actual: Sequence[float], low: float, high: float) -> float:
    """Root mean squared error with predictions clipped to [low, high]."""
    if not predicted:
        return float("nan")
    err = [(min(max(p, low), high) - a) ** 2 for p, a in zip(predicted, actual)]
    return math.sqrt(sum(err) / len(err))


def mae(predicted: Sequence[float], actual: Sequence[float], low: float, high: float) -> float:
    """Mean absolute error with predictions clipped to [low, high]."""
    if not predicted:
        return float("nan")
    err = [abs(min(max(p, low), high) - a) for p, a in zip(predicted, actual)]
    return sum(err) / len(err)


def distinct_n(hypotheses: Sequence[Tokens], n: int) -> float:
    """Distinct-n (Li et al., NAACL 2016): distinct n-grams over all n-grams of all outputs."""
    grams = [tuple(h[i : i + n]) for h in hypotheses for i in range(len(h) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generic_rate(hypotheses: Sequence[Tokens], top: int = 10) -> float:
    """Share of outputs that are one of the ``top`` most frequent outputs (1.0: ten sentences cover all)."""
    if not hypotheses:
        return 0.0
    counts = collections.Counter(tuple(h) for h in hypotheses)
    return sum(c for _, c in counts.most_common(top)) / len(hypotheses)


def user_feature_match(found: Sequence[set[str]], user_features: Sequence[set[str]]) -> float:
    """Share of reasons that name at least one feature from the user's own training reviews."""
    if not found:
        return 0.0
    return sum(1 for f, u in zip(found, user_features) if f & u) / len(found)


def text_metrics(
    references: Sequence[Tokens],
    hypotheses: Sequence[Tokens],
    truth_features: Sequence[str],
    vocabulary: Iterable[str],
) -> dict[str, float]:
    """Every explanation metric at once, on token lists already cut to one length."""
    matcher = FeatureMatcher(vocabulary)
    found = [matcher.find(h) for h in hypotheses]
    return {
        "BLEU-1": bleu(references, hypotheses, 1),
        "BLEU-4": bleu(references, hypotheses, 4),
        "ROUGE-1": rouge_n(references, hypotheses, 1),
        "ROUGE-2": rouge_n(references, hypotheses, 2),
        "ROUGE-L": rouge_l(references, hypotheses),
        "USR": unique_sentence_ratio(hypotheses),
        "FMR": feature_matching_ratio(found, truth_features),
        "FCR": feature_coverage_ratio(found, len(matcher.features)),
        "DIV": feature_diversity(found),
        "Distinct-1": distinct_n(hypotheses, 1),
        "Distinct-2": distinct_n(hypotheses, 2),
        "Generic": generic_rate(hypotheses),
    }


def classification_report(predicted: Sequence[int], actual: Sequence[int], labels: Sequence[str]) -> dict:
    # Macro-F1 averages every class in ``labels``, including classes absent from ``actual``.
    """Accuracy, macro-F1 and per-class precision/recall/F1/support for integer class ids."""
    per_class = {}
    f1s = []
    for k, name in enumerate(labels):
        tp = sum(1 for p, a in zip(predicted, actual) if p == k and a == k)
        fp = sum(1 for p, a in zip(predicted, actual) if p == k and a != k)
        fn = sum(1 for p, a in zip(predicted, actual) if p != k and a == k)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    accuracy = sum(1 for p, a in zip(predicted, actual) if p == a) / len(actual) if actual else 0.0
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "per_class": per_class}


def sentiment_agreement(texts: Sequence[str], predicted_ratings: Sequence[float], midpoint: float = 3.0) -> float:
    """Share of reasons whose VADER polarity agrees with the predicted rating.

    A predicted rating at or above ``midpoint`` expects a reason with compound
    polarity >= 0; one below expects a polarity < 0.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    if not texts:
        return 0.0
    analyzer = SentimentIntensityAnalyzer()
    agree = 0
    for text, rating in zip(texts, predicted_ratings):
        positive_text = analyzer.polarity_scores(text)["compound"] >= 0
        agree += positive_text == (rating >= midpoint)
    return agree / len(texts)
