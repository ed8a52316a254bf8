"""How stable is the tuned choice of selection weights from one draw of candidates to another?

Usage: python benchmarks/tuning_stability.py --trials A.json --against B.json [--name tuning-stability]

``recreason tune`` scores every weight setting of its grid on a run's validation candidates and keeps the best
within the grounding bars (``recreason.evaluation.tuning.grounding_first``), writing every trial to
``RUN/tuning/trials.json``. Given two such files for the same grid (e.g. the recorded one, ``git show
58dd527:benchmarks/results/quality/tuning.json``, and the one a rebuilt run writes), this reports each file's
choice, where that choice ranks among the other file's eligible settings and what it gains there, and the rank
correlation of the gains of the settings eligible in both: a choice that ranks near the top of the other draw too
is a property of the weights; one that falls far is the luck of the draw (the maximum of thousands of noisy
objectives). Reads only the two files; writes ``benchmarks/results/quality/NAME.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from recreason.evaluation.tuning import grounding_first

OUT = Path(__file__).resolve().parent / "results" / "quality"


def key(weights: dict) -> tuple:
    return tuple(sorted(weights.items()))


def eligible(record: dict) -> dict[tuple, dict]:
    """The trials the library's choice is made among (feasible, within every bar), by their weights."""
    bar, n = record["bar"], record["records"]
    out = {}
    for trial in record["trials"]:
        if grounding_first([trial], bar, n) is not None:
            out[key(trial["weights"])] = trial
    return out


def ranks(trials: dict[tuple, dict]) -> dict[tuple, int]:
    """1 for the highest gain; ties share the better rank."""
    order = sorted(trials, key=lambda k: -trials[k]["gain"])
    out, last, rank = {}, None, 0
    for i, k in enumerate(order, 1):
        if trials[k]["gain"] != last:
            rank, last = i, trials[k]["gain"]
        out[k] = rank
    return out


def compare(first: dict, second: dict, labels: tuple[str, str]) -> dict:
    """Each record's choice, its rank and gain in the other, and the rank correlation over settings eligible in
    both records."""
    pools = [eligible(first), eligible(second)]
    rank = [ranks(pool) for pool in pools]
    choices = [grounding_first(r["trials"], r["bar"], r["records"]) for r in (first, second)]
    out: dict = {"labels": list(labels), "settings": [len(first["trials"]), len(second["trials"])],
                 "eligible": [len(p) for p in pools], "choices": {}}
    for i, (label, choice) in enumerate(zip(labels, choices)):
        other = 1 - i
        k = key(choice["weights"]) if choice else None
        there = pools[other].get(k) if k else None
        out["choices"][label] = {
            "weights": choice["weights"] if choice else None,
            "gain": choice["gain"] if choice else None,
            f"gain in {labels[other]}": there["gain"] if there else None,
            f"rank in {labels[other]}": rank[other].get(k) if there else None,
            f"eligible in {labels[other]}": there is not None}
    both = sorted(set(pools[0]) & set(pools[1]))
    out["eligible_in_both"] = len(both)
    out["spearman_gain"] = float(spearmanr([pools[0][k]["gain"] for k in both],
                                           [pools[1][k]["gain"] for k in both]).statistic) if len(both) > 2 else None
    top = [{k for k, r in ranked.items() if r <= 100} for ranked in rank]
    out["top100_overlap"] = len(top[0] & top[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", required=True, help="a trials file (RUN/tuning/trials.json)")
    parser.add_argument("--against", required=True, help="another trials file for the same grid")
    parser.add_argument("--labels", nargs=2, default=["trials", "against"], metavar=("A", "B"))
    parser.add_argument("--name", default="tuning-stability")
    args = parser.parse_args()
    records = [json.loads(Path(p).read_text()) for p in (args.trials, args.against)]
    for path, record in zip((args.trials, args.against), records):
        if "trials" not in record:
            raise SystemExit(f"{path}: no 'trials' list (a tuning record without its trials cannot be compared)")
    result = {"args": vars(args), **compare(records[0], records[1], tuple(args.labels))}
    spearman = result["spearman_gain"]
    print(f"eligible settings: {result['eligible'][0]} and {result['eligible'][1]} of {result['settings'][0]}; "
          f"in both {result['eligible_in_both']}; Spearman of their gains "
          f"{'-' if spearman is None else f'{spearman:.3f}'}; top-100 overlap {result['top100_overlap']}")
    for (label, c), other in zip(result["choices"].items(), reversed(args.labels)):
        gain = c[f"gain in {other}"]
        print(f"{label}'s choice {c['weights']}: gain {c['gain']:.3f}; in {other}: gain "
              f"{'-' if gain is None else f'{gain:.3f}'}, rank {c[f'rank in {other}']}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / (args.name + '.json')}")


if __name__ == "__main__":
    main()
