"""Choose, don't just decode: pick one reason among several candidates by a documented score.

For a candidate c of pair (user u, item i)::

    score(c) = weight_likelihood  * mean token log-probability of c under the model
             + weight_grounded    * min(2, features c names that i has)
             - weight_ungrounded  * features c names that i lacks
             + weight_user        * [c names one of u's own features]
             - weight_generic     * log(1 + how often the run's greedy reason is c for other pairs)
             + weight_consensus   * expected ROUGE-L F1 of c against the pair's other draws
             + weight_consensus_bleu * expected sentence BLEU-4 (add-one smoothed) of c against them
             + weight_length      * tokens in c, up to LENGTH_CAP (20)

The consensus term is minimum-Bayes-risk selection (Kumar & Byrne 2004; Freitag et al. 2022): the
draws (greedy + samples, with their multiplicity) stand in for what the model believes a reason for
this pair looks like, and the candidate that agrees most with the others is the one expected to score
best against an unseen reference under the same similarity. It needs no reference and no training. Two
similarities are offered because they reward different things: ROUGE-L the longest shared word sequence in
any order of gaps, BLEU-4 (:func:`~recreason.text.sentence_bleu`, with the other draw as the reference)
contiguous runs of up to four words, what corpus BLEU-4 counts; MBR is known to favour the metric it uses as
its utility (Freitag et al. 2022), so each weight buys mostly its own metric.

Features are counted as :class:`~recreason.text.FeatureMatcher` finds them, less entries made only of
function words (``recreason.text.FUNCTION_WORDS``: "to", "on" are in the demo vocabulary by tagging error).

The length term offsets what consensus does to length: the sentence that agrees most with the others
tends to be a short one, and a reason much shorter than the references loses BLEU through its brevity
penalty (and says less). Tokens are counted as the metrics count them
(:func:`~recreason.text.tokenize`, punctuation included); those past ``LENGTH_CAP`` (the 20 the metrics read,
as PETER's) earn nothing.

The generic term uses a table of the run's own greedy reasons on validation records (what it says for
"everyone"), so a sentence the run produces for many pairs loses to a specific one unless it is much
more likely. The weights are ``generate.weight_*`` keys, tuned on the validation split.
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

import numpy as np

from recreason.config import GenerateConfig
from recreason.generation.generate import Candidate
from recreason.text import (FeatureMatcher, is_content_feature, lcs_f1, ngram_counts, ngram_matches, normalize,
                            sentence_bleu_from_matches, tokenize)


def sentence_key(text: str) -> str:
    """What counts as "the same sentence" for the generic table: the normalized token string."""
    return normalize(text)


def generic_table(texts: Iterable[str]) -> collections.Counter:
    return collections.Counter(sentence_key(t) for t in texts if t.strip())


UTILITIES = ("rouge-l", "bleu")


def consensus(candidates: Sequence[Candidate], utility: str = "rouge-l") -> list[float]:
    """For each candidate, its mean similarity against every *other* draw of the pair, each text counted as
    often as it was drawn (a text drawn twice agrees fully with its second copy). ``utility``: "rouge-l"
    (ROUGE-L F1, beta = 1) or "bleu" (:func:`~recreason.text.sentence_bleu` of the candidate with the other
    draw as reference). With a single draw there is nothing to agree with: 0 for all."""
    if utility not in UTILITIES:
        raise ValueError(f"unknown consensus utility {utility!r}: one of {', '.join(UTILITIES)}")
    tokens = [tokenize(c.text) for c in candidates]
    draws = sum(c.count for c in candidates)
    if draws <= 1:
        return [0.0] * len(candidates)
    n = len(candidates)
    similarity = [[0.0] * n for _ in range(n)]  # [i][j]: candidate i against draw j; each pair computed once
    counts = [ngram_counts(t, 4) for t in tokens] if utility == "bleu" else None
    for i in range(n):
        for j in range(i + 1, n):
            if counts is None:
                similarity[i][j] = similarity[j][i] = lcs_f1(tokens[i], tokens[j])
            else:  # the matches are symmetric; only the lengths swap roles
                matches = ngram_matches(counts[i], counts[j], 4)
                similarity[i][j] = sentence_bleu_from_matches(matches, len(tokens[j]), len(tokens[i]))
                similarity[j][i] = sentence_bleu_from_matches(matches, len(tokens[i]), len(tokens[j]))
    out = []
    for i, c in enumerate(candidates):
        agree = (c.count - 1) * 1.0 + sum(o.count * similarity[i][j] for j, o in enumerate(candidates) if j != i)
        out.append(agree / (draws - 1))
    return out


def agreements(candidates: Sequence[Candidate], cfg: GenerateConfig | None = None) -> list[tuple[float, float]]:
    """(ROUGE-L, BLEU) :func:`consensus` of each candidate; a utility whose weight ``cfg`` sets to 0 is not
    computed (0.0). Without ``cfg`` both are."""
    n = len(candidates)
    rouge = consensus(candidates) if cfg is None or cfg.weight_consensus else [0.0] * n
    bleu = consensus(candidates, "bleu") if cfg is None or cfg.weight_consensus_bleu else [0.0] * n
    return list(zip(rouge, bleu))


WEIGHTS = ("weight_likelihood", "weight_grounded", "weight_ungrounded", "weight_user", "weight_generic",
           "weight_consensus", "weight_consensus_bleu", "weight_length")
LENGTH_CAP = 20


def candidate_terms(candidate: Candidate, item_features: set[str], user_features: set[str],
                    generic: collections.Counter, matcher: FeatureMatcher,
                    agreement: tuple[float, float] = (0.0, 0.0)) -> tuple[float, ...]:
    """The score's terms, signed, in the order of :data:`WEIGHTS`: they do not depend on the weights, so a
    caller scoring many weight settings computes them once per candidate. ``agreement``: the candidate's
    (ROUGE-L, BLEU) :func:`agreements`."""
    tokens = tokenize(candidate.text)
    named = {f for f in matcher.find(tokens) if is_content_feature(f)}
    return (candidate.logprob, min(2, len(named & item_features)), -len(named - item_features),
            float(bool(named & user_features)), -math.log1p(generic.get(sentence_key(candidate.text), 0)),
            agreement[0], agreement[1], float(min(len(tokens), LENGTH_CAP)))


def weight_vector(cfg: GenerateConfig) -> tuple[float, ...]:
    """``cfg``'s weights in the order of :data:`WEIGHTS` (read once per setting, not once per candidate)."""
    return tuple(getattr(cfg, w) for w in WEIGHTS)


class TermTable:
    """The score's terms (:func:`candidate_terms`) of every candidate of many records in one array: the one
    implementation of the score and of the choice. :func:`choose` builds it for one record; ``recreason tune``
    for all validation records at once, so a weight setting's choice for every record is a few array
    operations (tens of thousands of settings in seconds).

    ``terms[r][c]``: candidate c of record r; ``texts[r][c]``: its text (empty texts never win over a
    non-empty one)."""

    def __init__(self, terms: Sequence[Sequence[Sequence[float]]], texts: Sequence[Sequence[str]]):
        width = max((len(t) for t in texts), default=0)
        self.terms = np.zeros((len(texts), width, len(WEIGHTS)))
        self.blocked = np.ones((len(texts), width), dtype=bool)  # padding, and empty texts where others exist
        for r, (rec, words) in enumerate(zip(terms, texts)):
            if len(rec):
                self.terms[r, :len(rec)] = rec
            usable = [bool(t.strip()) for t in words]
            self.blocked[r, :len(words)] = [not u for u in usable] if any(usable) else False

    def scores(self, cfg: GenerateConfig) -> np.ndarray:
        """Each candidate's score under ``cfg``'s weights, summed term by term in :data:`WEIGHTS` order (the
        same floating-point result whichever caller asks, so near ties break the same way). A term of weight 0
        is left out, so one not computed (NaN: the likelihood a server skips when it has no weight) counts
        nothing."""
        score = np.zeros(self.blocked.shape)
        for k, w in enumerate(weight_vector(cfg)):
            if w:
                score = score + w * self.terms[:, :, k]
        return score

    def choose(self, cfg: GenerateConfig) -> tuple[int, ...]:
        """The index of each record's best candidate; ties keep the earlier one (the greedy text comes first)."""
        score = self.scores(cfg)
        score[self.blocked] = -np.inf
        return tuple(score.argmax(1).tolist())

    def worst(self, cfg: GenerateConfig) -> tuple[int, ...]:
        """The index of each record's lowest-scoring usable candidate (the rejected text of preference training)."""
        score = self.scores(cfg)
        score[self.blocked] = np.inf
        return tuple(score.argmin(1).tolist())


def candidate_score(candidate: Candidate, item_features: set[str], user_features: set[str],
                    generic: collections.Counter, cfg: GenerateConfig, matcher: FeatureMatcher,
                    agreement: tuple[float, float] = (0.0, 0.0)) -> float:
    """The score above; ``agreement`` is the candidate's (ROUGE-L, BLEU) :func:`agreements`."""
    terms = candidate_terms(candidate, item_features, user_features, generic, matcher, agreement)
    return float(TermTable([[terms]], [[candidate.text]]).scores(cfg)[0, 0])


def choose(candidates: Sequence[Candidate], item_features: set[str], user_features: set[str],
           generic: collections.Counter, cfg: GenerateConfig, matcher: FeatureMatcher,
           agreement: Sequence[tuple[float, float]] | None = None) -> Candidate:
    """The best-scoring candidate (:class:`TermTable`)."""
    if agreement is None:  # a caller scoring many weight settings passes agreements(candidates) once
        agreement = agreements(candidates, cfg)
    terms = [candidate_terms(c, item_features, user_features, generic, matcher, a)
             for c, a in zip(candidates, agreement)]
    return candidates[TermTable([terms], [[c.text for c in candidates]]).choose(cfg)[0]]
