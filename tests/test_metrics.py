import itertools
import math
import random

import pytest

from recreason.evaluation import metrics as M
from recreason.text import normalize, tokenize


def test_tokenize_splits_clitics_and_punctuation():
    assert tokenize("It's GREAT, isn't it?!") == ["it", "'s", "great", ",", "is", "n't", "it", "?", "!"]
    assert normalize("Works fine...really (mostly)") == "works fine . really ( mostly )"
    assert tokenize("") == []


def test_bleu_hand_computed():
    ref = [["the", "cat", "sat", "on", "the", "mat"]]
    hyp = [["the", "cat", "the", "mat"]]
    # BLEU-1: clipped unigram matches the:2 cat:1 mat:1 = 4 of 4; c=4 < r=6 -> BP = exp(1 - 6/4)
    assert M.bleu(ref, hyp, 1) == pytest.approx(100 * math.exp(1 - 6 / 4))
    # bigrams: "the cat", "cat the", "the mat" -> 2 of 3 match; no trigram match -> BLEU-4 is 0
    assert M.bleu(ref, hyp, 2) == pytest.approx(100 * math.sqrt(1 * 2 / 3) * math.exp(1 - 6 / 4))
    assert M.bleu(ref, hyp, 4) == 0.0
    assert M.bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d", "e"]], 4) == pytest.approx(
        100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    )


def test_bleu_is_corpus_level_not_sentence_average():
    refs = [["a", "b"], ["c", "d"]]
    hyps = [["a", "b"], ["x", "y"]]
    # corpus: unigram 2/4, bigram 1/2 -> sqrt(0.25) = 0.5, BP = 1
    assert M.bleu(refs, hyps, 2) == pytest.approx(50.0)


def test_rouge_n_uses_ngram_sets():
    ref = [["a", "a", "b"]]
    hyp = [["a", "b", "b", "c"]]
    # sets: ref {a, b}, hyp {a, b, c}: P = 2/3, R = 1 -> F = 0.8
    assert M.rouge_n(ref, hyp, 1) == pytest.approx(80.0)
    # bigrams: ref {aa, ab}, hyp {ab, bb, bc} -> P 1/3, R 1/2 -> F 0.4
    assert M.rouge_n(ref, hyp, 2) == pytest.approx(40.0)


def test_rouge_l_formula():
    ref = ["a", "b", "c", "d"]
    hyp = ["a", "c", "d", "e", "f"]
    lcs = 3
    r, p = lcs / 4, lcs / 5
    beta = p / r
    expected = (1 + beta**2) * r * p / (r + beta**2 * p)
    assert M.lcs_length(ref, hyp) == 3
    assert M.rouge_l([ref], [hyp]) == pytest.approx(100 * expected)
    assert M.rouge_l([ref], [["x"]]) == 0.0


def test_usr_counts_distinct_sequences():
    assert M.unique_sentence_ratio([["a"], ["a"], ["b"], ["a", "b"]]) == pytest.approx(3 / 4)


def test_feature_metrics_with_multiword_features():
    matcher = M.FeatureMatcher(["tone", "pop filter", "price"])
    found = [
        matcher.find(tokenize("the pop filter has great tone")),
        matcher.find(tokenize("filter pop and a good price")),  # words out of order: no "pop filter"
        matcher.find(tokenize("nothing here")),
    ]
    assert found == [{"pop filter", "tone"}, {"price"}, set()]
    assert M.feature_matching_ratio(found, ["tone", "tone", "price"]) == pytest.approx(1 / 3)
    assert M.feature_coverage_ratio(found, 3) == pytest.approx(1.0)
    # pairs: (0,1)=0, (0,2)=0, (1,2)=0
    assert M.feature_diversity(found) == 0.0
    assert M.feature_diversity([{"a", "b"}, {"a"}, {"a", "b"}]) == pytest.approx((1 + 2 + 1) / 3)


def test_diversity_matches_pairwise_definition():
    rng = random.Random(3)
    vocab = [f"f{i}" for i in range(12)]
    sets = [set(rng.sample(vocab, rng.randint(0, 4))) for _ in range(60)]
    brute = sum(len(a & b) for a, b in itertools.combinations(sets, 2)) / (60 * 59 / 2)
    assert M.feature_diversity(sets) == pytest.approx(brute)


def test_rating_errors_clip_to_range():
    assert M.rmse([6.0, 0.0], [5.0, 1.0], 1, 5) == 0.0
    assert M.mae([4.0, 2.0], [5.0, 1.0], 1, 5) == pytest.approx(1.0)
    assert M.rmse([3.0, 5.0], [5.0, 5.0], 1, 5) == pytest.approx(math.sqrt(2))


def test_text_metrics_returns_every_metric():
    res = M.text_metrics([["good", "tone"]], [["good", "tone"]], ["tone"], ["tone"])
    assert res["BLEU-1"] == pytest.approx(100.0)
    assert res["ROUGE-L"] == pytest.approx(100.0)
    assert res["FMR"] == 1.0 and res["FCR"] == 1.0 and res["USR"] == 1.0


def test_classification_report_hand_computed():
    rep = M.classification_report([2, 2, 0, 1], [2, 0, 0, 1], ["low", "medium", "high"])
    assert rep["accuracy"] == pytest.approx(0.75)
    assert rep["per_class"]["high"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert rep["per_class"]["low"]["recall"] == 0.5 and rep["per_class"]["medium"]["f1"] == 1.0
    assert rep["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)


def test_sentiment_agreement():
    texts = ["Great tone, I love it.", "Terrible strings, they broke.", "It is a cable."]
    assert M.sentiment_agreement(texts, [5.0, 1.0, 4.0]) == pytest.approx(1.0)
    assert M.sentiment_agreement(texts, [1.0, 5.0, 4.0]) == pytest.approx(1 / 3)


def test_distinct_generic_and_user_feature_match_hand_computed():
    hyps = [["a", "b", "a"], ["a", "b"]]
    assert M.distinct_n(hyps, 1) == 2 / 5  # a b a a b: 2 distinct of 5
    assert M.distinct_n(hyps, 2) == 2 / 3  # (a b) (b a) (a b)
    assert M.generic_rate([["x"], ["x"], ["y"], ["z"]], top=1) == 2 / 4
    assert M.generic_rate([["x"], ["y"]], top=10) == 1.0
    found = [{"tone"}, {"price"}, set()]
    users = [{"tone", "cable"}, {"strings"}, {"tone"}]
    assert M.user_feature_match(found, users) == 1 / 3


def test_bleu_from_summed_sentence_stats_is_corpus_bleu():
    refs = [tokenize("the tone is bright and clear"), tokenize("great strings for the price")]
    hyps = [tokenize("the tone is bright"), tokenize("good strings for the money")]
    totals = [sum(x) for x in zip(*(M.bleu_stats(r, h) for r, h in zip(refs, hyps)))]
    # matches: 1-grams 4+3, 2-grams 3+2, 3-grams 2+1, 4-grams 1+0; possible 4+5, 3+4, 2+3, 1+2; lengths 9 / 11
    assert totals == [7, 5, 3, 1, 9, 7, 5, 3, 9, 11]
    assert M.bleu_from_stats(totals) == pytest.approx(M.bleu(refs, hyps))
    assert M.bleu(refs, hyps) == pytest.approx(100 * (7 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25 * math.exp(1 - 11 / 9))


def test_bootstrap_intervals_and_paired_differences():
    from recreason.evaluation import intervals as I

    refs = [tokenize(t) for t in ["the tone is bright", "great strings", "nice cable", "good price"] * 10]
    good = [list(r) for r in refs]  # perfect copies
    bad = [["something", "else"] for _ in refs]
    a, b = I.SentenceScores(refs, good), I.SentenceScores(refs, bad)
    samples = I.resamples(len(refs), 200, seed=1)
    ci = I.intervals(a, samples)
    assert ci["ROUGE-L"] == [100.0, 100.0] and ci["BLEU-1"] == [pytest.approx(100.0), pytest.approx(100.0)]
    same = I.paired_difference(a, a, samples)["ROUGE-L"]
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p_not_better"] == 1.0
    better = I.paired_difference(a, b, samples)["ROUGE-L"]
    assert better["diff"] == 100.0 and better["low"] == 100.0 and better["p_not_better"] == 0.0
    mixed = [list(r) if n % 2 else ["x"] for n, r in enumerate(refs)]
    lo, hi = I.intervals(I.SentenceScores(refs, mixed), samples)["ROUGE-L"]
    assert lo < 50.0 < hi  # half the sentences perfect: the mean is 50 and the interval spans it


def test_semantic_similarity_uses_the_shipped_sentence_model():
    from recreason.evaluation.semantic import similarity_scores

    same, para, other = similarity_scores(["the tone is bright and clear"] * 3,
                                          ["the tone is bright and clear", "bright, clear sound", "the cable broke"])
    assert same == pytest.approx(100.0, abs=0.01)
    assert para > other + 20
