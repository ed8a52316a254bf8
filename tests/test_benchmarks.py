"""The comparison helpers of benchmarks/quality.py, checked against values worked by hand."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402


def test_unpaired_difference_combines_both_intervals_as_independent_errors():
    # ours 2.0 with interval 1.0-3.0: standard error 2 / 3.92; PETER 1.0 with 0.5-1.5: 1 / 3.92.
    # Together sqrt(4 + 1) / 3.92 = 0.57042; 1.96 x that = 1.11803, around the difference 1.0.
    low, high = quality.unpaired_difference(2.0, (1.0, 3.0), 1.0, (0.5, 1.5))
    assert math.isclose(low, 1.0 - 1.118034, abs_tol=1e-5)
    assert math.isclose(high, 1.0 + 1.118034, abs_tol=1e-5)


def test_unpaired_difference_is_wider_than_either_interval_alone():
    low, high = quality.unpaired_difference(1.15, (0.76, 1.55), 0.59, (0.0, 0.78))
    assert high - low > 1.55 - 0.76 and high - low > 0.78


def test_rate_upper_bound_is_the_one_sided_wilson_bound():
    # 30 of 300 (0.1), z = 1.645: centre 0.1 + 0.0045100 = 0.1045100; spread 1.645 * sqrt(0.0003 + 0.0000075)
    # = 1.645 * 0.0175362 = 0.0288470; (0.1045100 + 0.0288470) / (1 + 0.0090201) = 0.13216
    assert math.isclose(quality.rate_upper_bound(0.1, 300), 0.13216, abs_tol=5e-5)


def test_the_chosen_setting_is_the_best_feasible_one_within_every_bar_it_was_checked_against():
    bar = {"Generic": 0.2, "Ungrounded": 0.3}

    def trial(gain, generic, feasible=True, **later):
        return {"gain": gain, "feasible": feasible, "Generic": generic, "Ungrounded": 0.1, **later}

    # on 300 records a rate of 0.10 has an upper bound of 0.132 (< 0.2), 0.18 one of 0.22 (> 0.2)
    trials = [trial(3.0, 0.10, feasible=False), trial(2.0, 0.18), trial(1.5, 0.10, within_later_bar=False),
              trial(1.0, 0.10, within_later_bar=True), trial(0.5, 0.10)]
    assert quality.grounding_first(trials, bar, 300) is trials[3]
    # without a second split's check (no within_later_bar key) the first bar alone decides
    assert quality.grounding_first([trials[0], trials[1], trials[4]], bar, 300) is trials[4]
    assert quality.grounding_first([trials[0], trials[1]], bar, 300) is None


def test_shipped_configs_carry_the_weights_the_tuning_chose():
    # full.yaml copies the setting benchmarks/quality.py --tune chose (the best within the grounding bar), and
    # the 8-candidate experiment the one tuned with 8; quality.py scores test with the recorded ones, so a
    # config that drifted from them would not be the configuration measured.
    from recreason.config import load_config

    root = Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results" / "quality"
    base = [root / "configs" / "demo.yaml", root / "configs" / "full.yaml"]
    experiments = root / "configs" / "experiments"
    for layers, tuning_file in ((base, "tuning.json"), (base + [experiments / "candidates16.yaml"], "tuning-16.json"),
                                (base + [experiments / "candidates8.yaml"], "tuning-8.json")):
        tuning = json.loads((results / tuning_file).read_text())
        config = load_config(layers)["generate"]
        weights = tuning["best_within_bar"]["weights"]
        assert set(weights) == set(tuning["grid"]) <= set(quality.GRID)
        # a weight a tuning's grid did not have yet (tuning-8.json predates weight_consensus_bleu) stays off
        assert {k: getattr(config, k) for k in quality.GRID} == {k: weights.get(k, 0.0) for k in quality.GRID}
        assert config.candidates == tuning["candidates"]
        assert config.batch_size * config.candidates == quality.BATCH_ROWS  # as quality.py decodes them
    assert load_config(base)["generate"].candidates == quality.FULL_CANDIDATES


def test_selections_from_precomputed_terms_are_what_choose_keeps():
    # the tuning grid scores weight settings from terms computed once; each must keep choose()'s candidate
    import collections
    import itertools
    from dataclasses import replace

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import agreements, candidate_terms, choose, sentence_key
    from recreason.text import FeatureMatcher

    matcher = FeatureMatcher(["tone", "strings", "price", "cable"])
    generic = collections.Counter({sentence_key("This is a great product."): 7})
    records = [
        ([Candidate("This is a great product.", -0.5, True, count=2),
          Candidate("The tone and the strings are great for the price.", -1.2, False),
          Candidate("The cable is great.", -0.4, False)], {"tone", "strings", "price"}, {"tone"}),
        ([Candidate("", -0.1, True), Candidate("Great price.", -0.9, False),
          Candidate("The price is great.", -1.1, False)], {"price"}, set()),
    ]
    terms = [[candidate_terms(c, item, user, generic, matcher, a) for c, a in zip(cands, agreements(cands))]
             for cands, item, user in records]
    texts = [[c.text for c in cands] for cands, _, _ in records]
    seen = set()
    for lik, gro, ung, usr, gen, con, bleu, length in itertools.product([0, 1], [0, 1], [0, 3], [0, 0.5], [0, 0.5],
                                                                         [0, 8], [0, 8], [0, 0.1]):
        cfg = replace(GenerateConfig(), weight_likelihood=lik, weight_grounded=gro, weight_ungrounded=ung,
                      weight_user=usr, weight_generic=gen, weight_consensus=con, weight_consensus_bleu=bleu,
                      weight_length=length)
        expected = tuple(cands.index(choose(cands, item, user, generic, cfg, matcher)) for cands, item, user in records)
        assert quality.selections(terms, texts, cfg) == expected
        seen.add(expected)
    assert len(seen) > 2  # the settings do pick different candidates, so agreeing is not trivial


def test_candidate_cache_decodes_only_the_records_and_draws_it_lacks(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from recreason.config import GenerateConfig
    from recreason.generation import generate

    decoded = []

    def fake_decode(model, tokenizer, prompts, cfg, users, items, draws=None):
        draws = list(range(cfg.candidates)) if draws is None else list(draws)
        decoded.append((list(prompts), draws))
        # draw 1 stands for two draws of one text and draw 3 writes it again (draw 2 is left out), so the
        # merge must add the counts of the two caches
        return [[generate.Candidate(f"{p} #{min(j, 1)}", -1.0, j == 0, count=1 + (j == 1)) for j in draws
                 if j != 2] for p in prompts]

    monkeypatch.setattr(generate, "generate_candidates", fake_decode)
    monkeypatch.setattr(quality, "candidate_file",
                        lambda predictor, split, gen: tmp_path / f"candidates-{split}-{gen.candidates}.jsonl")
    predictor = SimpleNamespace(model=None, tokenizer=None,
                                prompt=lambda request, n: SimpleNamespace(prompt=f"{request.user}/{request.item}"))
    records = [SimpleNamespace(index=i, user=f"u{i}", item=f"i{i}") for i in range(5)]
    two, four = GenerateConfig(candidates=2), GenerateConfig(candidates=4)
    _, first, _ = quality.load_candidates(predictor, "validation", records[2:4], two)
    _, both, _ = quality.load_candidates(predictor, "validation", records, two)
    assert decoded == [(["u2/i2", "u3/i3"], [0, 1]), (["u0/i0", "u1/i1", "u4/i4"], [0, 1])]
    assert [[c.text for c in cands] for cands in both] == [[f"u{i}/i{i} #0", f"u{i}/i{i} #1"] for i in range(5)]
    assert [c[0].text for c in first] == [c[0].text for c in both[2:4]]
    decoded.clear()
    _, wider, _ = quality.load_candidates(predictor, "validation", records[:2], four)
    assert decoded == [(["u0/i0", "u1/i1"], [2, 3])]  # draws 0-1 come from the two-candidate cache
    assert [(c.text, c.greedy, c.count) for c in wider[0]] == [("u0/i0 #0", True, 1), ("u0/i0 #1", False, 3)]


def test_merged_draws_are_one_decode_of_all_of_them():
    from recreason.generation.generate import Candidate, merge_candidates

    first = [Candidate("a", -1.0, True), Candidate("b", -2.0, False, count=2)]
    more = [Candidate("c", -0.5, False), Candidate("a", -1.0, False, count=3)]
    merged = merge_candidates(first, more)
    assert [(c.text, c.greedy, c.count) for c in merged] == [("a", True, 4), ("b", False, 2), ("c", False, 1)]
    assert first[0].count == 1  # the inputs are left as they were


def test_tuning_on_recorded_seed1_trials_checks_only_the_later_split(tmp_path, monkeypatch):
    """--recorded-first: seed 1's side is the recorded trials as they are; the later split's validation records
    are scored only for settings within seed 1's bar, and the choice must be within both bars."""
    from recreason.config import GenerateConfig

    def weights(consensus):
        return {**{k: v[0] for k, v in quality.GRID.items()}, "weight_consensus": consensus}

    rates = {"BLEU-1": 15.0, "BLEU-4": 1.0, "ROUGE-L": 16.0, "USR": 0.8, "FMR": 0.1, "FCR": 0.1,
             "Generic": 0.05, "Ungrounded": 0.1}
    recorded = {"split": "validation", "records": 633, "first_record": 200, "candidates": quality.FULL_CANDIDATES,
                "grid": quality.GRID, "distinct_selections": 3, "candidate_seconds": 1.0, "grid_seconds": 1.0,
                "greedy": rates,
                "demo_run": rates, "bar": {"Generic": 0.2, "Ungrounded": 0.3},
                "trials": [{"weights": weights(c), "gain": gain, "feasible": True, **rates, "within_bar": within,
                            "later": {"stale": 1}}
                           for c, gain, within in ((8.0, 3.0, False), (16.0, 2.0, True), (32.0, 1.0, True))]}
    later_generic = {8.0: 0.0, 16.0: 0.19, 32.0: 0.02}  # the later split's generic rate per consensus weight
    scored = []

    class Later:  # stands in for the temporal split's ValidationSet: 800 records, bar 0.1 / 0.3
        records = [None] * 800
        first_record, seconds, greedy, demo = 200, 5.0, rates, rates
        bar = {"Generic": 0.1, "Ungrounded": 0.3}

        def __init__(self, *args):
            pass

        def score(self, cfg):
            scored.append(cfg.weight_consensus)
            return {**rates, "Generic": later_generic[cfg.weight_consensus]}

    monkeypatch.setattr(quality, "ValidationSet", Later)
    monkeypatch.setattr(quality, "OUT", tmp_path)
    quality.tune("unused", "unused", GenerateConfig(candidates=quality.FULL_CANDIDATES), None,
                 ("later-run", "later-demo"), recorded)
    result = json.loads((tmp_path / "tuning.json").read_text())
    assert sorted(scored) == [16.0, 32.0]  # the setting outside seed 1's bar is never scored on the later split
    # 0.19 on 800 records is over the later bar of 0.1; 0.02 (upper bound 0.029) is under it
    assert result["best_within_bar"]["weights"]["weight_consensus"] == 32.0
    assert [t.get("within_later_bar") for t in result["trials"]] == [None, False, True]
    assert "stale" not in json.dumps(result["trials"])  # an earlier later-split check is not carried over
    assert result["later"]["bar"] == Later.bar and result["bar"] == recorded["bar"]
    recorded["candidates"] = 8
    try:
        quality.tune("unused", "unused", GenerateConfig(candidates=16), None, ("a", "b"), recorded)
    except SystemExit as exc:
        assert "another grid or candidate count" in str(exc)
    else:
        raise AssertionError("a tuning record for 8 candidates was used for 16")


def test_selection_scorer_gives_the_text_scorers_numbers_for_every_choice():
    # the tuning grid scores choices from per-candidate figures; each must equal scoring the chosen texts whole
    import itertools
    from types import SimpleNamespace

    from recreason.evaluation.evaluate import TextScorer

    vocabulary = ["tone", "strings", "price", "cable", "sound"]
    train = [SimpleNamespace(user="u1", item="a", feature="tone", features=["tone", "sound"]),
             SimpleNamespace(user="u2", item="b", feature="price", features=["price"]),
             SimpleNamespace(user="u1", item="c", feature="strings", features=["strings", "cable"])]
    records = [SimpleNamespace(user="u1", item="a", feature="tone"),
               SimpleNamespace(user="u2", item="b", feature="price"),
               SimpleNamespace(user="u2", item="c", feature="cable"),
               SimpleNamespace(user="u1", item="b", feature="price")]
    references = ["The tone is warm and the sound is full.", "Great price for what you get.",
                  "The cable is sturdy and long enough for the stage.", "A fair price."]
    texts = [["The tone is warm.", "The sound is full and the tone is warm.", "Great strings."],
             ["Great price.", "Great price for what you get.", "The cable broke."],
             ["The cable is long enough.", "Great price."],
             ["Great price.", "The tone is great, the price fair and the strings last a long time, well worth it."]]
    scorer = TextScorer(records, references, train, vocabulary, 20, bootstrap=0, semantic=False)
    fast = quality.SelectionScorer(scorer, texts)
    seen = set()
    for chosen in itertools.product(*(range(len(t)) for t in texts)):
        whole = scorer.score("trial", [t[k] for t, k in zip(texts, chosen)])
        quick = fast.score(chosen)
        assert set(quick) == {*quality.TARGETS, "Generic", "Ungrounded"}
        for metric, value in quick.items():
            assert value == pytest.approx(whole[metric], abs=1e-9), (chosen, metric)
        seen.add(tuple(round(v, 6) for v in quick.values()))
    assert len(seen) > 10  # the choices differ in their scores, so agreeing is not trivial
