"""Reason quality on a whole test split, side by side with PETER: a report over the library.

    make full                          # prepare, train and evaluate configs/full.yaml (seed 1)
    python benchmarks/quality.py --demo-run runs/demo/run --full-run runs/full/run            # -> seed1.*
    python benchmarks/quality.py --demo-run runs/temporal/demo --full-run runs/temporal/run --name temporal1

The selection weights measured are the ones the configuration carries (``--config``, default configs/demo.yaml
+ configs/full.yaml); ``recreason tune`` chose them on validation records (recreason.evaluation.tuning; the
command is in docs/results.md). Rows, all on every test record of the split, with 95% bootstrap intervals
(the same resamples for every system) and the paired difference to the best baseline:

* zero-shot, retrieval and the demo run, through ``recreason evaluate``'s code (``--baseline-rows FILE`` takes
  them from an earlier results file of the same split instead: they reproduce to every digit);
* the full run decoded greedily (the first candidate) and chosen among candidates with the configuration's
  weights, both from one decode of its test candidates (RUN/candidates/, recreason.inference.candidates);
* the full run's choice without the grounding bar, when the run was tuned (its RUN/tuning/trials.json);
* PETER's numbers from ../shared/peers/peter-split1.json (measured by running PETER's public code on seed 1's
  random split; only there). Its per-record outputs are not available, so each row is compared with it by an
  unpaired interval of the difference (:func:`unpaired_difference`).

Writes benchmarks/results/quality/NAME.json ({"systems": {NAME: {"records": N, metric: value, ...}}}) and
NAME.md; with a tuned full run also tuning.json, its trials file without the trials (the choice, the bar,
the greedy and reference rates).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
PETER = ROOT.parent / "shared" / "peers" / "peter-split1.json"
COLUMNS = ("BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "SemSim", "USR", "FMR", "FCR", "DIV", "Distinct-2",
           "Generic", "UserFeat", "Ungrounded")
CHOSEN = "full run, chosen among candidates"


def evaluate(name: str, run: str, gen, bootstrap: int) -> tuple[dict, dict]:
    """(rows, intervals) of zero-shot, retrieval and ``run`` (as ``name``) on the whole test split."""
    from recreason.evaluation.evaluate import evaluate_runs
    from recreason.rundir import RunPaths

    report = evaluate_runs([run], "test", gen, ["zero-shot", "retrieval", "fine-tuned"], 20, progress=True,
                           bootstrap=bootstrap, out_dir=RunPaths(run).report_dir("quality"))
    rows, intervals = {}, {}
    for system, row in report["results"].items():
        if system in ("popularity", "matrix factorization") or system.startswith("ranker"):
            continue  # ranking rows: see benchmarks/ranking.py
        label = name if system == "fine-tuned" else system
        rows[label] = {"records": report["records"], **{k: v for k, v in row.items() if isinstance(v, float)}}
        intervals[label] = report["intervals"].get(system, {})
        if report["differences_to_best_baseline"].get(system):
            rows[label]["vs_best_baseline"] = report["differences_to_best_baseline"][system]
    return rows, intervals


def score_candidates(full_run: str, gen, settings: dict, bootstrap: int) -> tuple[dict, dict, float]:
    """Rows for the full run on every test record, all from one decode of its candidates: ``settings`` maps a
    row name to selection weights (None: the greedy text, the first candidate). The retrieval baseline is
    scored on the same resamples so each row gets a paired difference to it."""
    from recreason.evaluation.baselines import RetrievalBaseline
    from recreason.evaluation.evaluate import TextScorer, select_records
    from recreason.inference import Predictor
    from recreason.inference import candidates as cache

    predictor = Predictor(full_run, gen)
    records, refs = select_records(predictor.run, predictor.dataset, "test", replace(gen, max_records=None))
    prompted, candidates, seconds = cache.decode(predictor, "test", records, gen)
    table, texts = cache.term_table(predictor, prompted, candidates, predictor.generic_table(gen))
    scorer = TextScorer(records, refs, predictor.train, predictor.dataset.features, 20, bootstrap, semantic=True)
    baseline = RetrievalBaseline(predictor.train)
    rows = {"retrieval": scorer.score("retrieval", [baseline.explain(r.user, r.item) for r in records])}
    for name, weights in settings.items():
        chosen = [0] * len(records) if weights is None else table.choose(replace(gen, **weights))
        rows[name] = {"records": len(records), **scorer.score(name, [t[k] for t, k in zip(texts, chosen)])}
    differences = scorer.differences(rows, list(settings))
    for name in settings:
        rows[name]["vs_best_baseline"] = differences[name]
    del rows["retrieval"]
    return rows, {name: scorer.intervals[name] for name in settings}, seconds


def peter_row() -> tuple[dict, dict]:
    peter = json.loads(PETER.read_text())
    row = {"records": peter["metrics"]["n"], **{k: v for k, v in peter["metrics"].items() if k not in ("n", "words")}}
    return row, peter["intervals"]


def unpaired_difference(ours: float, ours_ci, theirs: float, theirs_ci, z: float = 1.96) -> list[float]:
    """Approximate 95% interval of ``ours - theirs`` for two systems scored independently: each standard error
    read off its 95% percentile interval (width / 3.92), combined as for independent samples. Both systems are
    scored on the same records, so a paired interval would be narrower: this is the cautious stand-in."""
    se = math.hypot((ours_ci[1] - ours_ci[0]) / (2 * z), (theirs_ci[1] - theirs_ci[0]) / (2 * z))
    return [ours - theirs - z * se, ours - theirs + z * se]


def against_peter(rows: dict, intervals: dict, name: str) -> dict:
    from recreason.evaluation.tuning import TARGETS

    peter = rows["PETER"]
    out = {}
    for m in TARGETS:
        ours, theirs = rows[name][m], peter[m]
        ci, peter_ci = intervals.get(name, {}).get(m), intervals.get("PETER", {}).get(m)
        out[m] = {"ours": ours, "peter": theirs, "ratio": ours / theirs if theirs else None, "ahead": ours > theirs,
                  "lower_bound_ahead": None if ci is None else ci[0] > theirs}
        if ci is not None and peter_ci is not None:
            out[m]["unpaired_difference"] = unpaired_difference(ours, ci, theirs, peter_ci)
    return out


def against_demo(rows: dict, demo: str = "make demo run") -> dict:
    """Each row's generic and ungrounded rates over the demo run's (the grounding bar asks at most 0.5)."""
    return {name: {m: row[m] / rows[demo][m] if rows[demo][m] else None for m in ("Generic", "Ungrounded")}
            for name, row in rows.items() if name != demo and all(m in row for m in ("Generic", "Ungrounded"))}


def tuning_summary(full_run: str) -> dict | None:
    """The run's tuning record without its trials (they stay in the run: tens of MB), or None if untuned."""
    from recreason.rundir import RunPaths

    path = RunPaths(full_run).trials
    if not path.exists():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "trials"}


def print_summary(result: dict) -> None:
    for name, comparison in result["against_peter"].items():
        if name.startswith("full run"):
            print(name)
            for m, v in comparison.items():
                diff = v.get("unpaired_difference")
                print(f"  {m}: ours {v['ours']:.4g} vs PETER {v['peter']:.4g} (x{v['ratio']:.2f}); "
                      f"our 95% lower bound ahead: {v['lower_bound_ahead']}"
                      + (f"; difference {diff[0]:+.2f} to {diff[1]:+.2f} (unpaired)" if diff else ""))
    for name, ratios in result["against_demo_run"].items():
        print(f"{name}: generic {ratios['Generic']:.2f}x, ungrounded {ratios['Ungrounded']:.2f}x the demo run's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", default="runs/demo/run")
    parser.add_argument("--full-run", default="runs/full/run")
    parser.add_argument("--config", action="append", default=None,
                        help="the configuration measured (default: configs/demo.yaml then configs/full.yaml)")
    parser.add_argument("--baseline-rows", type=Path, default=None,
                        help="take the zero-shot, retrieval and demo-run rows from this earlier results file of the "
                             "same split instead of evaluating the demo run again")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--name", default="seed1", help="results file stem (seed1; temporal1 for the later reviews)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import GenerateConfig, load_config
    from recreason.evaluation.tuning import GRID, TARGETS
    from recreason.rundir import Run

    configs = args.config or [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "full.yaml"]
    chosen = load_config(configs)["generate"]
    greedy = GenerateConfig(batch_size=50)  # as the demo configuration decodes
    weights = {k: getattr(chosen, k) for k in GRID}
    tuning = tuning_summary(args.full_run)
    unbarred = tuning["best"]["weights"] if tuning else None
    full_run = Run(args.full_run)
    split_method = full_run.dataset().stats["settings"].get("split", "random")
    start = time.time()
    if args.baseline_rows:
        earlier = json.loads(args.baseline_rows.read_text())
        names = ("zero-shot", "retrieval", "make demo run")
        rows = {n: earlier["systems"][n] for n in names}
        intervals = {n: earlier["intervals"][n] for n in names}
    else:
        rows, intervals = evaluate("make demo run", args.demo_run, greedy, args.bootstrap)
    seconds = {"make demo run": time.time() - start}
    full_rows, full_intervals, seconds["test candidates"] = score_candidates(args.full_run, chosen, {
        "full run, greedy": None, CHOSEN: weights,
        **({"full run, chosen without the grounding bar": unbarred} if unbarred and unbarred != weights else {}),
    }, args.bootstrap)
    rows.update(full_rows)
    intervals.update(full_intervals)
    if full_run.split_seed == 1 and split_method == "random":
        rows["PETER"], intervals["PETER"] = peter_row()
    summary = json.loads(full_run.paths.summary.read_text())
    result = {"split_seed": full_run.split_seed, "split_method": split_method, "split": "test",
              "configs": [str(Path(c).resolve().relative_to(ROOT)) if Path(c).resolve().is_relative_to(ROOT)
                          else str(c) for c in configs],
              **({"baseline_rows_from": args.baseline_rows.name} if args.baseline_rows else {}),
              "systems": rows, "intervals": intervals, "generation": {"greedy": asdict(greedy), "chosen": asdict(chosen)},
              "against_peter": {name: against_peter(rows, intervals, name) for name in rows if name != "PETER"
                                and all(m in rows[name] for m in TARGETS)} if "PETER" in rows else {},
              "against_demo_run": against_demo(rows),
              "full_run_training": {k: summary[k] for k in ("steps", "best_step", "best_validation_loss",
                                                          "stopped_early", "wall_seconds", "tokens_per_second")},
              "evaluation_seconds": seconds, "best": CHOSEN}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    from recreason.evaluation.evaluate import format_table

    md = format_table(rows, intervals, ("records", *COLUMNS))
    (OUT / f"{args.name}.md").write_text(md + "\n")
    if tuning is not None and args.name == "seed1":
        (OUT / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
    print(md)
    print_summary(result)


if __name__ == "__main__":
    main()
