"""Reason quality on a whole test split, side by side with PETER (issue 10).

    python benchmarks/quality.py --demo-run runs/demo/run --full-run runs/full/run [--tune]

1. ``--tune``: on the validation split only, generates the candidates of the full run once, then scores a
   small grid of selection weights offline and keeps the weights with the best mean relative gain over
   greedy decoding on BLEU-1, BLEU-4, ROUGE-L, USR, FMR and FCR (the metrics PETER is compared on; see
   ``relative_gain``).
   Writes benchmarks/results/quality/tuning.json; the chosen weights are used below.
2. Scores on every test record of the split: the zero-shot base model, the retrieval baseline, the demo run,
   the full run decoded greedily and the full run with candidate selection, each with 95% bootstrap
   intervals (the same resamples for every system), and the paired difference of each run to the best baseline.
3. Adds PETER's numbers from ../shared/peers/peter-split1.json (measured by running PETER's public code on
   this split; its per-record outputs are not available, so comparisons with PETER use our interval's lower
   bound against PETER's point value, which is stricter than a paired test).

Writes benchmarks/results/quality/seed1.json ({"systems": {NAME: {"records": N, metric: value, ...}}}) and
seed1.md, the table the README shows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
PETER = ROOT.parent / "shared" / "peers" / "peter-split1.json"
TARGETS = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR")
COLUMNS = ("BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "SemSim", "USR", "FMR", "FCR", "DIV", "Distinct-2",
           "Generic", "UserFeat", "Ungrounded")
GRID = {"weight_grounded": [0.0, 0.5, 1.0], "weight_user": [0.0, 0.5], "weight_generic": [0.0, 0.5, 1.0],
        "weight_ungrounded": [0.0, 1.0]}


def _scorer(records, references, dataset, bootstrap):
    from recreason.evaluation.evaluate import TextScorer

    train = dataset.subset(1, "train")
    return TextScorer(records, references, train, dataset.features, 20, bootstrap, semantic=True)


FLOORS = {"BLEU-1": 1.0, "BLEU-4": 0.5, "ROUGE-L": 1.0, "USR": 0.05, "FMR": 0.02, "FCR": 0.01}


def relative_gain(row: dict, greedy: dict) -> float:
    """Mean over the PETER metrics of (trial - greedy) / max(greedy, floor): the floor keeps a metric that is
    near zero on a few hundred records (BLEU-4) from dominating the mean."""
    return sum((row[m] - greedy[m]) / max(abs(greedy[m]), FLOORS[m]) for m in TARGETS) / len(TARGETS)


def tune(full_run: str, gen, n_records: int) -> dict:
    """Selection weights chosen on validation records, from one set of candidates scored offline."""
    from recreason.data.records import target_text
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request
    from recreason.inference.selection import choose

    predictor = Predictor(full_run, gen)
    records = predictor.dataset.subset(1, "validation")
    records = records[-n_records:]  # the generic table is measured on the first validation records
    refs = [target_text(r, "sentence") for r in records]
    prompted = [predictor.prompt(Request(r.user, r.item, record=r), n) for n, r in enumerate(records)]
    start = time.time()
    candidates = generate_candidates(predictor.model, predictor.tokenizer, [p.prompt for p in prompted], gen,
                                     users=[r.user for r in records], items=[r.item for r in records])
    seconds = time.time() - start
    generic = predictor.generic_table(gen)
    scorer = _scorer(records, refs, predictor.dataset, bootstrap=0)
    scorer.semantic = False
    greedy = scorer.score("greedy", [c[0].text for c in candidates])
    trials = []
    for values in itertools.product(*GRID.values()):
        cfg = replace(gen, **dict(zip(GRID, values)))
        texts = [choose(c, set(p.known_features), p.user_features, generic, cfg, predictor.matcher).text
                 for p, c in zip(prompted, candidates)]
        row = scorer.score("trial", texts)
        gain = relative_gain(row, greedy)
        trials.append({"weights": dict(zip(GRID, values)), "gain": gain, **{m: row[m] for m in TARGETS}})
    trials.sort(key=lambda t: -t["gain"])
    result = {"split": "validation", "records": len(records), "candidates": gen.candidates,
              "candidate_seconds": seconds, "greedy": {m: greedy[m] for m in TARGETS}, "best": trials[0],
              "trials": trials}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"tuned on {len(records)} validation records: best weights {trials[0]['weights']} "
          f"(mean relative gain {trials[0]['gain']:+.3f} over greedy)")
    return trials[0]["weights"]


def evaluate(runs: list[tuple[str, str, object, list[str]]], bootstrap: int) -> tuple[dict, dict]:
    """(rows, intervals) for each (name, run, generate config, systems) on the whole test split."""
    from recreason.evaluation.evaluate import evaluate_runs

    rows, intervals, seconds = {}, {}, {}
    for name, run, gen, systems in runs:
        start = time.time()
        report = evaluate_runs([run], "test", gen, systems, 20, progress=True, bootstrap=bootstrap,
                               out_dir=Path(run) / "eval" / ("quality-" + "-".join(name.replace(",", "").split())))
        for system, row in report["results"].items():
            if system in ("popularity", "matrix factorization") or system.startswith("ranker"):
                continue  # ranking rows: see benchmarks/ranking.py
            label = name if system == "fine-tuned" else system
            rows[label] = {"records": report["records"], **{k: v for k, v in row.items() if isinstance(v, float)}}
            intervals[label] = report["intervals"].get(system, {})
            diff = report["differences_to_best_baseline"].get(system)
            if diff:
                rows[label]["vs_best_baseline"] = diff
        seconds[name] = time.time() - start
    return rows, intervals, seconds


def peter_row() -> dict:
    peter = json.loads(PETER.read_text())
    row = {"records": peter["metrics"]["n"], **{k: v for k, v in peter["metrics"].items() if k not in ("n", "words")}}
    return row, peter["intervals"]


def table(rows: dict, intervals: dict) -> str:
    from recreason.evaluation.evaluate import format_table

    return format_table(rows, intervals, ("records", *COLUMNS))


def against_peter(rows: dict, intervals: dict, name: str) -> dict:
    peter = rows["PETER"]
    out = {}
    for m in TARGETS:
        ours, theirs = rows[name][m], peter[m]
        ci = intervals.get(name, {}).get(m)
        out[m] = {"ours": ours, "peter": theirs, "ratio": ours / theirs if theirs else None, "ahead": ours > theirs,
                  "lower_bound_ahead": None if ci is None else ci[0] > theirs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", default="runs/demo/run")
    parser.add_argument("--full-run", default="runs/full/run")
    parser.add_argument("--tune", action="store_true", help="choose selection weights on the validation split first")
    parser.add_argument("--tune-records", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import GenerateConfig

    greedy = GenerateConfig(batch_size=50)
    chosen = replace(greedy, candidates=args.candidates, batch_size=16)
    weights = {}
    if args.tune:
        weights = tune(args.full_run, chosen, args.tune_records)
    elif (OUT / "tuning.json").exists():
        weights = json.loads((OUT / "tuning.json").read_text())["best"]["weights"]
    chosen = replace(chosen, **weights)
    rows, intervals, seconds = evaluate([
        ("make demo run", args.demo_run, greedy, ["zero-shot", "retrieval", "fine-tuned"]),
        ("full run, greedy", args.full_run, greedy, ["fine-tuned"]),
        ("full run, chosen among candidates", args.full_run, chosen, ["fine-tuned"]),
    ], args.bootstrap)
    rows["PETER"], intervals["PETER"] = peter_row()
    best = "full run, chosen among candidates"
    summary = json.loads((Path(args.full_run) / "summary.json").read_text())
    result = {"split_seed": 1, "split": "test", "systems": rows, "intervals": intervals,
              "generation": {"greedy": asdict(greedy), "chosen": asdict(chosen)},
              "against_peter": {name: against_peter(rows, intervals, name) for name in rows if name != "PETER"
                                and all(m in rows[name] for m in TARGETS)},
              "full_run_training": {k: summary[k] for k in ("steps", "best_step", "best_validation_loss",
                                                          "stopped_early", "wall_seconds", "tokens_per_second")},
              "evaluation_seconds": seconds, "best": best}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "seed1.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(rows, intervals)
    (OUT / "seed1.md").write_text(md + "\n")
    print(md)
    for m, v in result["against_peter"][best].items():
        print(f"{m}: ours {v['ours']:.4g} vs PETER {v['peter']:.4g} (x{v['ratio']:.2f}); ahead: {v['ahead']}; "
              f"our 95% lower bound ahead: {v['lower_bound_ahead']}")


if __name__ == "__main__":
    main()
