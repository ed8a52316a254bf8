"""The comparison helpers of benchmarks/quality.py (a report over the library), checked against values worked by hand,
and benchmarks/quality_cost.py's choice at each count against what `evaluate` writes."""

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


def test_the_cost_tables_bar_is_the_issues_inside_the_interval_and_no_worse_on_the_rates():
    import quality_cost

    ref = {"BLEU-4": 1.2, "ROUGE-L": 17.4, "USR": 0.9, "Generic": 0.06, "Ungrounded": 0.18,
           "intervals": {"BLEU-4": [0.8, 1.6], "ROUGE-L": [16.7, 18.1]}}
    row = {"BLEU-4": 0.9, "ROUGE-L": 16.8, "USR": 0.9, "Generic": 0.05, "Ungrounded": 0.18}
    assert quality_cost.meets_bar(row, ref)  # inside both intervals, rates equal or better
    assert quality_cost.meets_bar({**row, "BLEU-4": 2.0, "ROUGE-L": 19.0}, ref)  # above the interval is fine
    assert not quality_cost.meets_bar({**row, "BLEU-4": 0.7}, ref)
    assert not quality_cost.meets_bar({**row, "ROUGE-L": 16.6}, ref)
    assert not quality_cost.meets_bar({**row, "USR": 0.89}, ref)
    assert not quality_cost.meets_bar({**row, "Generic": 0.07}, ref)
    assert not quality_cost.meets_bar({**row, "Ungrounded": 0.19}, ref)


def test_every_result_file_is_indexed_and_under_a_megabyte():
    # benchmarks/results/README.md names each benchmark's current result; caches and trials stay in run directories
    import re

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    files = [f for f in results.rglob("*") if f.is_file() and f.name != "README.md"]
    assert len(files) > 10
    for f in files:
        assert f.stat().st_size <= 1_000_000, f"{f} is over 1 MB"
        rel = f.relative_to(results)
        named = str(rel.with_suffix("")) in index or (
            len(rel.parts) > 1 and rel.parts[0] != "quality" and re.sub(r"\d+$", "", rel.parts[0]) in index)
        assert named, f"{rel} is not in benchmarks/results/README.md"


def test_quality_cost_scores_at_each_count_the_reasons_evaluate_writes(tiny_run, tmp_path):
    """benchmarks/quality_cost.py chooses at K candidates from the cache filled count by count (each count reusing
    the smaller one's draws): its metrics at K are those of the reasons `evaluate` writes decoding K candidates."""
    import shutil
    from dataclasses import replace

    import quality_cost
    from recreason.config import GenerateConfig
    from recreason.evaluation.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("generated", "eval*", "candidates"))
    gen = GenerateConfig(max_new_tokens=6, precision="fp32", generic_records=8, batch_size=4, max_records=12,
                         weight_consensus_bleu=8.0, weight_length=0.2)
    box: list = []
    quality_cost.top_bootstrap[0] = 0
    rows = quality_cost.measure("tiny", str(run), gen, [1, 3], 12, 2, box, split="validation")
    assert [r["candidates"] for r in rows.values()] == [1, 3]
    assert all(r["seconds_per_reason"] > 0 and r["records"] == 12 for r in rows.values())
    for k, row in zip((1, 3), rows.values()):
        report = evaluate_run(run, "validation", replace(gen, candidates=k), systems=["fine-tuned"], progress=False,
                              bootstrap=0, semantic=False)
        written = report["results"]["fine-tuned"]
        assert {m: written[m] for m in ("BLEU-1", "BLEU-4", "ROUGE-L", "USR")} == \
            pytest.approx({m: row[m] for m in ("BLEU-1", "BLEU-4", "ROUGE-L", "USR")}, abs=1e-9)


def test_quality_cost_systems_carry_counts_configs_and_overrides_of_their_own():
    import quality_cost

    assert quality_cost.parse_system("full run=runs/full/run", [1, 32]) == \
        ("full run", "runs/full/run", [1, 32], [], [])
    assert quality_cost.parse_system("d=runs/d@8,1,8+configs/distilled.yaml+x.yaml", [1, 32]) == \
        ("d", "runs/d", [1, 8], ["configs/distilled.yaml", "x.yaml"], [])
    assert quality_cost.parse_system("d=runs/d@12+configs/distilled.yaml+generate.sample_stream=mt19937", [1]) == \
        ("d", "runs/d", [12], ["configs/distilled.yaml"], ["generate.sample_stream=mt19937"])
    with pytest.raises(SystemExit, match="NAME=RUN"):
        quality_cost.parse_system("runs/full/run", [1])


def test_a_recorded_reference_row_is_read_back_checked_and_labelled(tmp_path):
    """--recorded-reference: the row of an earlier file (its figures and interval, not its verdicts), refused for
    another split or another number of records."""
    import json

    import quality_cost

    path = tmp_path / "cost-old.json"
    row = {"records": 833, "candidates": 32, "BLEU-4": 1.26, "ROUGE-L": 17.47, "USR": 0.896, "Generic": 0.066,
           "Ungrounded": 0.185, "intervals": {"BLEU-4": [0.84, 1.67], "ROUGE-L": [16.73, 18.21]}, "meets_bar": False,
           "vs_reference": {}}
    path.write_text(json.dumps({"split": "test", "systems": {"full run, 32 candidates": row}}))
    label, got = quality_cost.recorded_reference(f"{path}#full run, 32 candidates", "test", 833)
    assert label == "full run, 32 candidates (recorded)" and got["recorded_in"] == "cost-old.json"
    assert got["intervals"]["BLEU-4"] == [0.84, 1.67] and "meets_bar" not in got and "vs_reference" not in got
    ours = {"BLEU-4": 1.0, "ROUGE-L": 17.0, "USR": 0.93, "Generic": 0.05, "Ungrounded": 0.08}
    assert quality_cost.meets_bar(ours, got) and not quality_cost.meets_bar({**ours, "BLEU-4": 0.8}, got)
    with pytest.raises(SystemExit, match="833 test records, these rows on 577 validation"):
        quality_cost.recorded_reference(f"{path}#full run, 32 candidates", "validation", 577)
    with pytest.raises(SystemExit, match="no row 'greedy'"):
        quality_cost.recorded_reference(f"{path}#greedy", "test", 833)


def test_domains_rescoring_matches_evaluate_and_refuses_texts_of_other_records(tiny_run, tmp_path):
    """benchmarks/domains.py scores the texts evaluate wrote as evaluate does, adds the paired differences to
    zero-shot and retrieval (and, for texts from another run, to the domain's own run), and refuses a file that is not on the same records in the same order."""
    import json
    import shutil

    import domains
    from recreason.config import GenerateConfig
    from recreason.evaluation.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("generated", "eval*", "candidates"))
    gen = GenerateConfig(max_new_tokens=6, precision="fp32", batch_size=16, max_records=None)
    report = evaluate_run(run, "test", gen, progress=False, bootstrap=0, semantic=False)
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in (run / "generated" / "test-retrieval.jsonl").read_text().splitlines()]
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = domains.score_domain(str(run), [f"copy of retrieval={other}"], bootstrap=50)
    base = json.loads((run / "run.json").read_text())["model"]
    fine = entry["systems"][f"fine-tuned ({base})"]
    for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR"):
        assert fine[metric] == pytest.approx(report["results"]["fine-tuned"][metric], abs=1e-9)
        assert entry["systems"]["retrieval"][metric] == pytest.approx(report["results"]["retrieval"][metric], abs=1e-9)
    copy = entry["differences"]["copy of retrieval"]
    assert copy["retrieval"]["BLEU-1"]["diff"] == 0.0 and copy["retrieval"]["ROUGE-L"]["high"] == 0.0
    assert entry["ahead_of_zero_shot_and_retrieval"]["copy of retrieval"] is False
    # a system read from elsewhere is also compared with the domain's own run, which is not compared with itself
    own = f"fine-tuned ({base})"
    assert set(entry["differences"][own]) == {f"zero-shot ({base})", "retrieval"}
    assert copy[own]["ROUGE-L"]["diff"] == pytest.approx(
        entry["systems"]["retrieval"]["ROUGE-L"] - fine["ROUGE-L"], abs=1e-6)
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    with pytest.raises(SystemExit, match="not on the"):
        domains.score_domain(str(run), [f"reversed={other}"], bootstrap=50)


def test_transfer_curve_trains_each_share_from_base_and_source_and_reuses_its_texts(tiny_run, tiny_model_dir,
                                                                                    prepared_dir, tmp_path):
    """benchmarks/transfer.py trains a run from the base model and one from the source run's weights per share of
    the training split, scores their texts as TextScorer does, and a second call decodes nothing again."""
    import json

    import transfer
    import yaml
    from recreason.data.dataset import Dataset
    from recreason.data.records import target_text
    from recreason.evaluation.evaluate import TextScorer
    from recreason.rundir import RunPaths

    sets = [f"train.model={tiny_model_dir}", "train.method=lora", "train.lora_r=4", "train.batch_size=4",
            "train.precision=fp32", "train.eval_every=2", "train.max_eval_records=8", "generate.max_new_tokens=6",
            "generate.precision=fp32", "generate.batch_size=8"]
    work, results = tmp_path / "work", tmp_path / "results"
    dataset = Dataset(prepared_dir)
    n_train = len(dataset.split(1)["train"])
    first = transfer.curve(str(tiny_run[0]), prepared_dir, work, [], [0.5], 2, records=8, bootstrap=20,
                           sets=sets, results=results, name="curve")
    half = round(0.5 * n_train)
    shares = [(p["start"], p["train_records"]) for p in first["points"]]
    assert shares == [("base", half), ("source", half)] and half < n_train
    for start, n in shares:
        train_cfg = yaml.safe_load((work / f"{start}-{n}" / "config.yaml").read_text())["train"]
        assert train_cfg["max_train_records"] == n and train_cfg["max_steps"] == 2
        assert train_cfg["init_from"] == (str(tiny_run[0]) if start == "source" else None)
    written = json.loads((results / "curve.json").read_text())
    assert [p["BLEU-1"] for p in written["points"]] == [p["BLEU-1"] for p in first["points"]]
    table = (results / "curve.md").read_text()
    assert (results / "curve.png").stat().st_size > 0 and f"| source | 50% | {half} |" in table
    gain = first["points"][1]["minus_base"]["ROUGE-L"]
    assert gain["diff"] == pytest.approx(first["points"][1]["ROUGE-L"] - first["points"][0]["ROUGE-L"], abs=1e-6)
    assert "minus_base" not in first["points"][0] and gain["low"] <= gain["high"]
    records = dataset.subset(1, "test")[:8]
    scorer = TextScorer(records, [target_text(r, "sentence") for r in records], dataset.subset(1, "train"),
                        dataset.features, 20, 0, semantic=False)
    kept = RunPaths(work / f"source-{half}").generated("test", "transfer")
    texts = [json.loads(line)["text"] for line in kept.read_text().splitlines()]
    assert scorer.score("again", texts)["ROUGE-L"] == pytest.approx(first["points"][-1]["ROUGE-L"], abs=1e-9)
    stamp = kept.stat().st_mtime_ns
    second = transfer.curve(str(tiny_run[0]), prepared_dir, work, [], [0.5], 2, records=8, bootstrap=20,
                            sets=sets, results=results, name="curve")
    assert kept.stat().st_mtime_ns == stamp
    assert second["points"][1]["ROUGE-L"] == pytest.approx(first["points"][-1]["ROUGE-L"], abs=1e-9)


def test_decoding_sweep_scores_each_setting_on_validation_and_reuses_what_it_evaluated(tiny_run, prepared_dir,
                                                                                     tmp_path, monkeypatch):
    """benchmarks/decoding_sweep.py evaluates the run once per setting (the keys reach generation: the kept texts
    are those of that setting) and retrieval once, scores as TextScorer does, and a second call evaluates nothing."""
    import json

    import decoding_sweep
    from recreason.data.dataset import Dataset
    from recreason.data.records import target_text
    from recreason.evaluation.evaluate import TextScorer

    config = tmp_path / "tiny.yaml"
    config.write_text("generate:\n  max_new_tokens: 8\n  precision: fp32\n  batch_size: 8\n")
    work, results = tmp_path / "work", tmp_path / "results"
    setting = "no_repeat_ngram=2,min_new_tokens=3"
    out = decoding_sweep.sweep(tiny_run[0], [str(config)], [setting], 6, work, "sweep", results)
    assert list(out["systems"]) == ["retrieval", setting]
    evaluated = json.loads((work / "no_repeat_ngram-2_min_new_tokens-3" / "validation.json").read_text())
    assert evaluated["generation"]["no_repeat_ngram"] == 2 and evaluated["generation"]["min_new_tokens"] == 3
    dataset = Dataset(prepared_dir)
    records = dataset.subset(1, "validation")[:6]
    scorer = TextScorer(records, [target_text(r, "sentence") for r in records], dataset.subset(1, "train"),
                        dataset.features, 20, 0, semantic=False)
    kept = work / "no_repeat_ngram-2_min_new_tokens-3" / "texts.jsonl"
    texts = [json.loads(line)["generated"] for line in kept.read_text().splitlines()]
    row = out["systems"][setting]
    assert row["BLEU-1"] == pytest.approx(scorer.score("again", texts)["BLEU-1"], abs=1e-9)
    assert row["distinct reasons"] == len(set(texts)) and len(texts) == 6
    assert f"| {setting} | {row['BLEU-1']:.2f}" in (results / "sweep.md").read_text()

    def no_second_run(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(decoding_sweep.subprocess, "run", no_second_run)
    again = decoding_sweep.sweep(tiny_run[0], [str(config)], [setting], 6, work, "sweep", results)
    assert again["systems"] == json.loads(json.dumps(out["systems"]))
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        decoding_sweep.folder_name("min_new_tokens")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decode_anatomy_counts_every_product_once_and_splits_prefill_from_decoding(tiny_run, monkeypatch, precision):
    """benchmarks/decode_anatomy.py's FLOP count of the products is that of every linear layer's calls (counted here
    by forward hooks; in bf16 a gated MLP's gate and up products run as one, counted by a hook on the MLP), split
    between the prefill's calls and the decoding steps'; one timed call per step."""
    import decode_anatomy
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request
    from recreason.models import registry

    for owner, name in ((g, "prefill"), (registry.SharedPrefix, "attend"), (g.SeededSampler, "pick"),
                        (g.SeededSampler, "_uniform"), (registry, "_gate_up")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test: instrument patches them
    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=5, precision=precision, candidates=3,
                                                      batch_size=4, generic_records=8))
    predictor.generic_table(predictor.gen_cfg)  # measured once per run (the benchmark's warm-up batch does this)
    lm = g.plain_causal_lm(predictor.model)
    flop = {"prefill": 0, "decoding": 0}
    steps = []
    phase = {"prefill": False}

    def add(x, weights: int) -> None:
        part = "prefill" if phase["prefill"] else "decoding"
        flop[part] += 2 * x.numel() // x.shape[-1] * weights

    hooks = [m.register_forward_hook(lambda m, a, out: add(a[0], m.weight.numel()))
             for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    switched = [m for m in lm.modules() if getattr(m, "_recreason_packed", False) and hasattr(m, "gate_proj")]
    assert bool(switched) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    hooks += [m.register_forward_hook(  # bf16 inputs run the gate and up products as one: no linear hook sees them
        lambda m, a, out: add(a[0], m.gate_proj.weight.numel() + m.up_proj.weight.numel())
        if a[0].dtype == torch.bfloat16 else None) for m in switched]
    hooks.append(lm.register_forward_pre_hook(
        lambda m, a, kw: steps.append(1) if kw["input_ids"].shape[1] == 1 else None, with_kwargs=True))
    prefill = g.prefill

    def marked(*args, **kwargs):
        phase["prefill"] = True
        try:
            return prefill(*args, **kwargs)
        finally:
            phase["prefill"] = False
    monkeypatch.setattr(g, "prefill", marked)
    clock = decode_anatomy.Clock()
    decode_anatomy.instrument(predictor, clock)
    try:
        records = predictor.dataset.subset(1, "test")[:4]
        predictor.generate([predictor.prompt(Request(r.user, r.item, record=r)) for r in records])
    finally:
        for hook in hooks:
            hook.remove()
    assert flop["prefill"] > 0 and flop["decoding"] > 0
    assert clock.product_flop == flop["prefill"] + flop["decoding"]
    assert clock.calls["decoding forward"] == len(steps) > 0
    assert clock.calls["prefill"] == 1 and clock.calls["sampler"] == len(steps)
    assert clock.seconds["products in the prefill"] > 0 and clock.seconds["products in decoding"] > 0
    assert clock.seconds["products in decoding"] < clock.seconds["decoding forward"]


def test_step_cost_lays_out_whole_requests_and_its_ceiling_is_worked_by_hand():
    import step_cost

    assert step_cost.layout(192, 16, 12) == (16, 12)
    assert step_cost.layout(48, 16, 12) == (4, 12)
    assert step_cost.layout(4, 16, 12) == (1, 4)  # one request's draws
    for rows, prompts in ((30, 16), (204, 16), (0, 16)):  # not whole requests; more than 16 requests; no rows
        with pytest.raises(ValueError):
            step_cost.layout(rows, prompts, 12)
    fixed, per_row = step_cost.line_fit([1, 2, 4], [5.0, 7.0, 11.0])
    assert math.isclose(fixed, 3.0) and math.isclose(per_row, 2.0)
    with pytest.raises(ValueError):
        step_cost.line_fit([8, 8], [1.0, 2.0])
    # prefill 0.1 s, 192 tokens a reason in steps of 96 rows at 0.2 s: 0.1 + 2 x 0.2 = 0.5 s a reason;
    # useful FLOPs 2 x (10 x (100 + 192) + 5 x 192) = 7,760, over 0.5 s and a 100,000 FLOP/s peak
    got = step_cost.full_rows_share(0.1, 100, 192, 96, 0.2, decoder=10, vocab=5, peak=1e5)
    assert math.isclose(got["seconds_per_reason"], 0.5) and math.isclose(got["reasons_per_s"], 2.0)
    assert math.isclose(got["share_of_bound"], 7760 / 0.5 / 1e5)


def test_step_cost_decodes_every_row_for_every_step(tiny_run):
    """The benchmark's steps hold a fixed row count: with no end token no row leaves, even when the model writes its
    end-of-text token at every step (forced here)."""
    import step_cost

    from recreason.config import GenerateConfig
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=5, precision="fp32", candidates=3))
    records = predictor.dataset.subset(1, "test")[:2]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    encoded = [predictor.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lm = g.plain_causal_lm(predictor.model)
    eos = predictor.tokenizer.eos_token_id
    calls = []

    def end_now(module, args, out):  # in place; returns None, so the output stays the model's
        out.logits[..., eos] = 1e4
    hooks = [lm.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True),
             lm.register_forward_hook(end_now)]
    try:
        tokens = step_cost.decode_rows(lm, predictor.tokenizer, encoded, prompts, predictor.gen_cfg, draws=3, steps=7)
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(t) for t in tokens] == [7] * 6 and eos in tokens[0]
    assert [shape[0] for shape in calls if shape[1] == 1] == [6] * 7  # every step: 2 prompts x 3 draws


def test_closed_loop_serves_every_pair_the_same_reason_both_ways(tiny_run):
    """benchmarks/closed_loop.py's two schedules write the same reason for each pair (fp32: a prompt's draws do not
    depend on the rows beside it), the running batch never holding more rows than its clients' draws."""
    import closed_loop

    from recreason.config import GenerateConfig
    from recreason.inference import Predictor, Request

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=6, precision="fp32", candidates=3, batch_size=2,
                                                      generic_records=8))
    records = predictor.dataset.subset(1, "test")[:5]
    prompted = [predictor.prompt(Request(r.user, r.item, record=r)) for r in records]
    whole = closed_loop.whole(predictor, prompted, clients=2)
    running = closed_loop.continuous(predictor, prompted, clients=2, admit_at=1)
    assert running["texts"] == whole["texts"] and None not in running["texts"]
    assert whole["steps"] > 0 and running["steps"] > 0
    assert 0 < running["rows_per_step"] <= 2 * 3 and 0 < whole["rows_per_step"] <= 2 * 3


def test_prefix_attention_alternative_computes_the_same_attention():
    """benchmarks/prefix_attention.py times a fair rival: its fused-kernel attention gives SharedPrefix.attend's
    output up to bf16 rounding, for rows with one own token and with several."""
    import prefix_attention
    import torch

    from recreason.models.registry import SharedPrefix

    for own in (1, 5):
        prefix, query, key, value = prefix_attention.shapes(own, length=48, prompts=3, draws=4)
        ours = SharedPrefix.attend(prefix, 0, query, key, value, 0.125)[0].float()
        theirs = prefix_attention.flash_attend(prefix, 0, query, key, value, 0.125)[0].float()
        assert theirs.shape == ours.shape == (12, 1, 9, 64)
        assert torch.allclose(theirs, ours, atol=2e-2), float((theirs - ours).abs().max())
        assert not torch.allclose(theirs, torch.zeros_like(theirs), atol=2e-2)


def test_the_gathered_prompt_layout_gives_the_scattered_layouts_bits():
    """SharedPrefix.attend's gathered layout (indices shared by every layer) returns exactly what the scattered layout
    before it returned (benchmarks/prefix_attention.py's baseline), with even and uneven rows a prompt, after rows
    left, repeated (a merged row split) and whole prompts went, with the queries scaled first or the scores."""
    import prefix_attention
    import torch

    from recreason.models.registry import SharedPrefix

    for uneven in (False, True):
        prefix, query, key, value = prefix_attention.shapes(6, length=40, prompts=5, draws=6, uneven=uneven)
        for keep in (None, torch.tensor([0, 0, 1, 3, 3, 3, len(prefix.owner) - 1])):
            if keep is not None:
                prefix.select(keep)
                query, key, value = query[keep], key[keep], value[keep]
            for scaling in (0.125, 0.1):  # queries scaled first (a power of two, exact), or the scores
                ours = SharedPrefix.attend(prefix, 0, query, key, value, scaling)[0]
                before = prefix_attention.scattered_attend(prefix, 0, query, key, value, scaling)[0]
                assert torch.equal(ours, before) and ours.shape == (len(query), 1, 9, 64)
    assert prefix.keys[0].shape[0] < 5  # prompts none of whose rows remained left the prefix


def test_merged_draws_decodes_fewer_rows_and_the_same_candidates(tiny_run, tmp_path, monkeypatch):
    """benchmarks/merged_draws.py end to end on the tiny run (fp32): both ways take the same steps and write the same
    candidates for every prompt; merged, the steps hold fewer rows (a prompt's draws share its first row)."""
    import json

    import merged_draws

    out = tmp_path / "merged.json"
    monkeypatch.setattr(sys, "argv", ["merged_draws.py", "--run", str(tiny_run[0]), "--set", "generate.candidates=3",
                                      "--set", "generate.precision=fp32", "--set", "generate.max_new_tokens=5",
                                      "--set", "generate.batch_size=2", "--prompts", "3", "--rounds", "1",
                                      "--out", str(out)])
    merged_draws.main()
    result = json.loads(out.read_text())
    ways = result["ways"]
    assert result["same_candidates_share"] == 1.0 and result["candidates"] == 3
    assert ways["merged"]["steps"] == ways["row per draw"]["steps"] > 0
    assert ways["merged"]["row_steps"] < ways["row per draw"]["row_steps"]
    assert 0 < result["row_steps_share_merged"] < 1 and len(result["time_ratio_merged"]) == 1

    # the random streams compared: the same steps' rows counted, each stream's own samples
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--compare", "stream", "--set", "generate.sample_temperature=5.0"])
    merged_draws.main()
    result = json.loads(out.read_text())
    assert set(result["ways"]) == {"mt19937", "counter"} and len(result["time_ratio_counter"]) == 1
    assert result["same_candidates_share"] < 1.0  # hot samples: the two streams' draws differ


def test_draft_acceptance_counts_the_steps_checked_drafts_would_take():
    """benchmarks/draft_acceptance.py: prompt lookup proposes what followed the last 2 tokens' latest earlier
    occurrence (else the last one's); a step writes the accepted drafted tokens and one more, never past the draw's
    end; the other prompts' table drafts their most common continuation and leaves the prompt's own draws out."""
    import draft_acceptance as da

    assert da.prompt_lookup([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert da.prompt_lookup([1, 2, 3, 9, 3], 2) == [9, 3]  # no earlier (9, 3): the last token's continuation
    assert da.prompt_lookup([1, 2, 3], 2) == []
    tokens = [7, 8, 5, 6, 1]
    assert da.steps_with_drafts([], tokens, 4, lambda context, k: []) == len(tokens)  # no drafts: a token a step
    assert da.steps_with_drafts([], tokens, 4, lambda context, k: tokens[len(context):len(context) + k]) == 1
    # right for 2 tokens, then wrong: 3 tokens the first step, then one a step
    wrong = lambda context, k: [7, 8, 0][:k] if not context else [0] * k  # noqa: E731
    assert da.steps_with_drafts([], tokens, 3, wrong) == 1 + 2
    table = da.others_table({0: [[1, 2, 3, 4]], 1: [[1, 2, 9, 4], [1, 2, 9, 5]], 2: [[1, 2, 3]]})
    assert da.others_draft([1, 2], 1, 0, table, [0, 1, 2]) == [9]  # prompt 1's two draws outvote prompt 2's one
    assert da.others_draft([1, 2], 1, 1, table, [0, 1, 2]) == [3]  # prompt 1's own draws left out


def test_tuning_stability_ranks_each_choice_among_the_other_draws_eligible_settings():
    """Two draws' trials of the same grid: each choice's gain and rank in the other draw (among its eligible
    settings, ties sharing a rank), settings out of a bar never ranked, and the rank correlation of the gains."""
    import tuning_stability

    def trial(a, gain, ok=True):
        return {"weights": {"weight_a": a}, "gain": gain, "feasible": True, "within_bar": ok, "within_later_bar": True}

    first = {"bar": {}, "records": 10, "trials": [trial(1, 2.0), trial(2, 1.5), trial(3, 1.0), trial(4, 9.0, False)]}
    second = {"bar": {}, "records": 10, "trials": [trial(1, 0.5), trial(2, 1.8), trial(3, 1.8), trial(4, 9.0)]}
    out = tuning_stability.compare(first, second, ("one", "two"))
    assert out["eligible"] == [3, 4] and out["eligible_in_both"] == 3
    one, two = out["choices"]["one"], out["choices"]["two"]
    assert one["weights"] == {"weight_a": 1} and one["gain in two"] == 0.5 and one["rank in two"] == 4
    assert two["weights"] == {"weight_a": 4} and two["eligible in one"] is False and two["rank in one"] is None
    # gains over the three settings eligible in both: (2.0, 1.5, 1.0) against (0.5, 1.8, 1.8)
    assert out["spearman_gain"] == pytest.approx(-0.866, abs=1e-3)
