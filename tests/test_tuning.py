"""recreason tune (recreason.evaluation.tuning): the rule, the bar, the vectorised choice and the candidate cache,
checked against values worked by hand and against the plain implementations."""

import json
import math
from pathlib import Path

import pytest

from recreason.evaluation import tuning


def test_rate_upper_bound_is_the_one_sided_wilson_bound():
    # 30 of 300 (0.1), z = 1.645: centre 0.1 + 0.0045100 = 0.1045100; spread 1.645 * sqrt(0.0003 + 0.0000075)
    # = 1.645 * 0.0175362 = 0.0288470; (0.1045100 + 0.0288470) / (1 + 0.0090201) = 0.13216
    assert math.isclose(tuning.rate_upper_bound(0.1, 300), 0.13216, abs_tol=5e-5)


def test_the_chosen_setting_is_the_best_feasible_one_within_every_bar_it_was_checked_against():
    bar = {"Generic": 0.2, "Ungrounded": 0.3}

    def trial(gain, generic, feasible=True, **later):
        return {"gain": gain, "feasible": feasible, "Generic": generic, "Ungrounded": 0.1, **later}

    # on 300 records a rate of 0.10 has an upper bound of 0.132 (< 0.2), 0.18 one of 0.22 (> 0.2)
    trials = [trial(3.0, 0.10, feasible=False), trial(2.0, 0.18), trial(1.5, 0.10, within_later_bar=False),
              trial(1.0, 0.10, within_later_bar=True), trial(0.5, 0.10)]
    assert tuning.grounding_first(trials, bar, 300) is trials[3]
    # without a second split's check (no within_later_bar key) the first bar alone decides
    assert tuning.grounding_first([trials[0], trials[1], trials[4]], bar, 300) is trials[4]
    assert tuning.grounding_first([trials[0], trials[1]], bar, 300) is None


def test_a_run_standing_in_for_another_may_lose_nothing_it_has_on_usr_generic_and_ungrounded():
    match = {"USR": 0.9, "Generic": 0.1, "Ungrounded": 0.2}
    assert tuning.matches({"USR": 0.9, "Generic": 0.1, "Ungrounded": 0.2}, match)  # ties are as good
    assert not tuning.matches({"USR": 0.89, "Generic": 0.05, "Ungrounded": 0.1}, match)
    assert not tuning.matches({"USR": 0.95, "Generic": 0.11, "Ungrounded": 0.1}, match)
    assert not tuning.matches({"USR": 0.95, "Generic": 0.05, "Ungrounded": 0.21}, match)
    assert tuning.matches({"USR": 0.1, "Generic": 0.9, "Ungrounded": 0.9}, None)
    # with a margin a tie is not enough: better by the margin on each of the three
    assert not tuning.matches({"USR": 0.9, "Generic": 0.1, "Ungrounded": 0.2}, match, 0.01)
    assert tuning.matches({"USR": 0.91, "Generic": 0.09, "Ungrounded": 0.19}, match, 0.01)
    assert not tuning.matches({"USR": 0.95, "Generic": 0.05, "Ungrounded": 0.195}, match, 0.01)
    # the choice skips the better-gaining trials that lose to the matched run, on either split
    trials = [{"gain": 3.0, "feasible": True, "Generic": 0.1, "Ungrounded": 0.1, "matches": False},
              {"gain": 2.0, "feasible": True, "Generic": 0.1, "Ungrounded": 0.1, "matches": True,
               "later_matches": False},
              {"gain": 1.0, "feasible": True, "Generic": 0.1, "Ungrounded": 0.1, "matches": True,
               "later_matches": True}]
    assert tuning.grounding_first(trials, {}, 300) is trials[2]
    # where both splits were matched, their gains add up: a smaller first-split gain can win on the sum
    both = [{**trials[2], "gain": 2.0, "later_gain": -1.5}, {**trials[2], "gain": 1.0, "later_gain": 0.2}]
    assert tuning.grounding_first(both, {}, 300) is both[1]


def test_full_yaml_carries_the_weights_the_recorded_tuning_chose():
    # benchmarks/quality.py measures the weights configs/full.yaml carries; the recorded tuning
    # (benchmarks/results/quality/tuning.json, `recreason tune`'s record without its trials) must have chosen them,
    # for the candidate count full.yaml decodes
    from recreason.config import load_config

    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "benchmarks" / "results" / "quality" / "tuning.json").read_text())
    config = load_config([root / "configs" / "demo.yaml", root / "configs" / "full.yaml"])["generate"]
    assert record["grid"] == tuning.GRID and "trials" not in record
    assert {k: getattr(config, k) for k in tuning.GRID} == tuning.chosen_weights(record)
    assert config.candidates == record["candidates"]


def test_selections_from_precomputed_terms_are_what_choose_keeps():
    # the tuning grid scores weight settings from terms computed once; each must keep choose()'s candidate
    import collections
    import itertools
    from dataclasses import replace

    from recreason.config import GenerateConfig
    from recreason.generation.generate import Candidate
    from recreason.inference.selection import TermTable, agreements, candidate_terms, choose, sentence_key
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
        assert TermTable(terms, texts).choose(cfg) == expected
        seen.add(expected)
    assert len(seen) > 2  # the settings do pick different candidates, so agreeing is not trivial


def test_candidate_cache_decodes_only_the_records_and_draws_it_lacks(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from recreason.config import GenerateConfig
    from recreason.generation import generate
    from recreason.inference import candidates as cache

    decoded = []

    def fake_decode(model, tokenizer, prompts, cfg, users, items, draws=None):
        draws = list(range(cfg.candidates)) if draws is None else list(draws)
        decoded.append((list(prompts), draws))
        # draw 1 stands for two draws of one text and draw 3 writes it again (draw 2 is left out), so the
        # merge must add the counts of the two caches
        return [[generate.Candidate(f"{p} #{min(j, 1)}", -1.0, j == 0, count=1 + (j == 1)) for j in draws
                 if j != 2] for p in prompts]

    monkeypatch.setattr(generate, "generate_candidates", fake_decode)
    monkeypatch.setattr(cache, "cache_path",
                        lambda predictor, split, gen: tmp_path / f"candidates-{split}-{gen.candidates}.jsonl")
    predictor = SimpleNamespace(model=None, tokenizer=None,
                                prompt=lambda request, n: SimpleNamespace(prompt=f"{request.user}/{request.item}"))
    records = [SimpleNamespace(index=i, user=f"u{i}", item=f"i{i}") for i in range(5)]
    two, four = GenerateConfig(candidates=2), GenerateConfig(candidates=4)
    _, first, _ = cache.decode(predictor, "validation", records[2:4], two, progress=False)
    _, both, _ = cache.decode(predictor, "validation", records, two, progress=False)
    assert decoded == [(["u2/i2", "u3/i3"], [0, 1]), (["u0/i0", "u1/i1", "u4/i4"], [0, 1])]
    assert [[c.text for c in cands] for cands in both] == [[f"u{i}/i{i} #0", f"u{i}/i{i} #1"] for i in range(5)]
    assert [c[0].text for c in first] == [c[0].text for c in both[2:4]]
    decoded.clear()
    _, wider, _ = cache.decode(predictor, "validation", records[:2], four, progress=False)
    assert decoded == [(["u0/i0", "u1/i1"], [2, 3])]  # draws 0-1 come from the two-candidate cache
    assert [(c.text, c.greedy, c.count) for c in wider[0]] == [("u0/i0 #0", True, 1), ("u0/i0 #1", False, 3)]


def test_merged_draws_are_one_decode_of_all_of_them():
    from recreason.generation.generate import Candidate, merge_candidates

    first = [Candidate("a", -1.0, True), Candidate("b", -2.0, False, count=2)]
    more = [Candidate("c", -0.5, False), Candidate("a", -1.0, False, count=3)]
    merged = merge_candidates(first, more)
    assert [(c.text, c.greedy, c.count) for c in merged] == [("a", True, 4), ("b", False, 2), ("c", False, 1)]
    assert first[0].count == 1  # the inputs are left as they were


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
    fast = tuning.ChoiceScorer(scorer, texts)
    seen = set()
    for chosen in itertools.product(*(range(len(t)) for t in texts)):
        whole = scorer.score("trial", [t[k] for t, k in zip(texts, chosen)])
        quick = fast.score(chosen)
        assert set(quick) == {*tuning.TARGETS, "Generic", "Ungrounded"}
        for metric, value in quick.items():
            assert value == pytest.approx(whole[metric], abs=1e-9), (chosen, metric)
        seen.add(tuple(round(v, 6) for v in quick.values()))
    assert len(seen) > 10  # the choices differ in their scores, so agreeing is not trivial


def test_tune_writes_the_config_that_evaluate_then_uses(tiny_run, tmp_path):
    """`recreason tune` on a tiny run: RUN/tuned.yaml carries the chosen weights, and `evaluate` with it layered
    writes, for the tuning's records, exactly the candidates the tuning chose (one selection score, one cache)."""
    import shutil
    from dataclasses import replace

    from recreason.cli import main
    from recreason.config import load_config
    from recreason.evaluation.evaluate import evaluate_run, read_generated
    from recreason.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("generated", "eval*"))
    base = tmp_path / "decode.yaml"
    # seed 1: draws with which the tuned weights choose a sample for some records, so that comparing evaluate's texts
    # with the tuning's choice is not a comparison of greedy texts only (with seed 0's draws they chose greedy ones)
    base.write_text("generate:\n  candidates: 3\n  max_new_tokens: 6\n  precision: fp32\n  generic_records: 8\n"
                    "  batch_size: 4\n  seed: 1\n")
    assert main(["tune", "--run", str(run), "--config", str(base), "--quiet"]) == 0
    paths = Run(run).paths
    record = json.loads(paths.trials.read_text())
    weights = tuning.chosen_weights(record)
    assert weights is not None and len(record["trials"]) == record["settings"] == 29160
    assert record["best"]["gain"] == max(t["gain"] for t in record["trials"] if t["feasible"])
    tuned = load_config([base, paths.tuned_config])["generate"]
    assert {k: getattr(tuned, k) for k in tuning.GRID} == weights and tuned.candidates == 3

    report = evaluate_run(run, "validation", tuned, systems=["fine-tuned"], progress=False, bootstrap=0,
                          semantic=False)
    assert {k: report["generation"][k] for k in tuning.GRID} == weights
    written = {r["index"]: r["generated"] for r in read_generated(paths.generated("validation", "fine-tuned"))}
    again = tuning.ValidationSet(run, replace(load_config([base])["generate"]), progress=False)  # the cache: no decode
    chosen = again.table.choose(tuned)
    expected = {r.index: texts[k] for r, texts, k in zip(again.records, again.texts, chosen)}
    assert len(expected) >= 20 and all(written[i] == text for i, text in expected.items())
    assert sum(k > 0 for k in chosen) > 0  # some reasons are not the greedy text: the choice did something


def test_tune_with_match_keeps_the_matched_runs_usr_generic_and_ungrounded(tiny_run, tmp_path):
    """`recreason tune --match TEACHER`: the teacher's served reasons (its own config.yaml: here its greedy text)
    are scored on the same records, every trial is marked against them, and the chosen one matches."""
    import shutil

    from recreason.cli import main
    from recreason.config import load_config
    from recreason.evaluation.evaluate import TextScorer
    from recreason.inference import Predictor
    from recreason.rundir import Run

    run, teacher = tmp_path / "run", tmp_path / "teacher"
    for to in (run, teacher):
        shutil.copytree(tiny_run[0], to, ignore=shutil.ignore_patterns("generated", "eval*", "candidates"))
    base = tmp_path / "decode.yaml"
    base.write_text("generate:\n  candidates: 3\n  max_new_tokens: 6\n  precision: fp32\n  generic_records: 8\n"
                    "  batch_size: 4\n")
    # the teacher serves as its config.yaml says: the choice among 2 candidates with weights of its own
    Run(teacher).paths.config.write_text("generate:\n  candidates: 2\n  max_new_tokens: 6\n  precision: fp32\n"
                                         "  generic_records: 8\n  batch_size: 4\n  weight_consensus_bleu: 0.0\n")
    # no margin: on a tiny run's few records a margin of 0.01 leaves nothing to choose
    assert main(["tune", "--run", str(run), "--match", str(teacher), "--match-margin", "0", "--config", str(base),
                 "--quiet"]) == 0
    record = json.loads(Run(run).paths.trials.read_text())
    served = tuning.served_config(teacher)
    assert (served.candidates, served.weight_consensus_bleu, served.max_records) == (2, 0.0, None)
    again = tuning.ValidationSet(run, load_config([base])["generate"], progress=False)  # the same records, cached
    predictor = Predictor(teacher, served)
    from recreason.inference import candidates as cache

    texts = cache.chosen_texts(predictor, "validation", again.records, served, progress=False)
    from recreason.data.records import target_text

    scorer = TextScorer(again.records, [target_text(r, again.run.info["target"]) for r in again.records],
                        predictor.train, predictor.dataset.features, 20, bootstrap=0, semantic=False)
    expected = scorer.score("teacher", texts)
    assert record["match_run"] == str(teacher)
    assert {m: record["match"][m] for m in ("USR", "Generic", "Ungrounded")} == pytest.approx(
        {m: expected[m] for m in ("USR", "Generic", "Ungrounded")})
    assert record["bar"] == {}  # matching replaces the half-of-greedy bar when no --reference is given
    assert record["match_margin"] == 0.0
    marks = [t["matches"] == tuning.matches(t, record["match"]) for t in record["trials"]]
    assert len(marks) == 29160 and all(marks)
    assert any(t["matches"] for t in record["trials"]) and not all(t["matches"] for t in record["trials"])
    chosen = record["best_within_bar"]
    assert chosen["matches"] and chosen["gain"] == max(t["gain"] for t in record["trials"]
                                                       if t["matches"] and t["feasible"])
    assert tuning.chosen_weights(record) == chosen["weights"]
