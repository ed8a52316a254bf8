"""The ranking stage against popularity and rating regression, on split seeds 1-3 (issue 11).

    python benchmarks/ranking.py --dataset runs/demo/data [--seeds 1 2 3]

For every seed: each library model (implicit's ALS and BPR) is tuned on that seed's validation split by the
small grid below (selection by the sum of sampled and full-ranking NDCG@10 on validation; the grid includes
a blend with popularity, ``rank.popularity_weight``), refitted on the training split, and
scored on the test split beside popularity and rating-regression matrix factorization (the MF baseline of
``recreason evaluate``): HR@10 and NDCG@10 against 99 sampled negatives (as the literature reports them),
and full-ranking Recall@10, Recall@20 and NDCG@10 over every unseen training item (Krichene & Rendle, KDD
2020), with 95% bootstrap intervals over users. The chosen model is the family with the best mean
validation score. Also times one fit and ranking the whole catalogue for one user.

Writes benchmarks/results/ranking.json and prints the README table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {
    "als": {"factors": [32, 64, 128], "regularization": [0.1, 1.0, 10.0], "alpha": [1.0, 10.0, 40.0],
            "iterations": [15], "popularity_weight": [0.0, 0.1, 0.3]},
    "bpr": {"factors": [32, 64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.01], "iterations": [100],
            "popularity_weight": [0.0, 0.3, 1.0]},
}
METRICS = ("HR@10", "NDCG@10", "Recall@10", "Recall@20", "full NDCG@10")


def scores(scorer, train, test, negatives):
    from recreason.evaluation import ranking

    out = ranking.evaluate_ranking(scorer, test, negatives, ks=(10,))
    out.update(ranking.full_ranking(scorer, train, test, ks=(10, 20)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="runs/demo/data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import RankConfig
    from recreason.data.dataset import Dataset
    from recreason.evaluation import ranking
    from recreason.ranking import fit_ranker

    ds = Dataset(args.dataset)
    per_seed: dict[int, dict] = {}
    tuning: dict[int, dict] = {}
    for seed in args.seeds:
        train, valid, test = (ds.subset(seed, s) for s in ("train", "validation", "test"))
        valid_neg = ranking.sample_negatives(ds.records, valid, 99, seed=0)
        test_neg = ranking.sample_negatives(ds.records, test, 99, seed=0)
        rows, tuning[seed] = {}, {}
        for family, grid in GRIDS.items():
            trials = []
            for values in itertools.product(*grid.values()):
                cfg = replace(RankConfig(model=family), **dict(zip(grid, values)))
                ranker = fit_ranker(train, cfg)
                full = ranking.full_ranking(ranker.score, train, valid, ks=(10,), n_resamples=1)
                sampled = ranking.evaluate_ranking(ranker.score, valid, valid_neg, ks=(10,))
                trials.append((full["full NDCG@10"] + sampled["NDCG@10"], asdict(cfg)))
            trials.sort(key=lambda t: -t[0])
            best_cfg = RankConfig(**trials[0][1])
            tuning[seed][family] = {"validation NDCG@10 sampled + full": trials[0][0], "config": trials[0][1],
                                    "grid": [{"NDCG@10 sampled + full": v, **{k: c[k] for k in grid}}
                                             for v, c in trials]}
            start = time.perf_counter()
            ranker = fit_ranker(train, best_cfg)
            fit_s = time.perf_counter() - start
            rows[family] = scores(ranker.score, train, test, test_neg)
            rows[family]["fit_seconds"] = fit_s
            user = test[0].user
            start = time.perf_counter()
            for _ in range(100):
                ranker.recommend(user, 10, exclude=[r.item for r in train if r.user == user])
            rows[family]["rank_all_ms"] = (time.perf_counter() - start) * 10  # ms per call, mean of 100
        rows["popularity"] = scores(ranking.PopularityBaseline(train).score, train, test, test_neg)
        rows["MF rating regression"] = scores(ranking.MatrixFactorization(train).score, train, test, test_neg)
        per_seed[seed] = rows
        print(f"seed {seed}: " + "; ".join(f"{n} NDCG@10 {r['NDCG@10']:.3f} full {r['full NDCG@10']:.3f}"
                                             for n, r in rows.items()))
    chosen = max(GRIDS, key=lambda f: np.mean([tuning[s][f]["validation NDCG@10 sampled + full"] for s in args.seeds]))
    names = list(per_seed[args.seeds[0]])
    systems = {}
    for name in names:
        systems[name] = {m: float(np.mean([per_seed[s][name][m] for s in args.seeds])) for m in METRICS}
        systems[name]["per_seed"] = {str(s): {m: per_seed[s][name][m] for m in per_seed[s][name]} for s in args.seeds}
    result = {"chosen": chosen, "seeds": args.seeds, "systems": systems, "tuning": tuning,
              "protocol": "HR@10/NDCG@10: test item vs 99 sampled unseen items; Recall@K/full NDCG@10: all training "
                          "items the user has not interacted with in training, the user's test items relevant; "
                          "means over seeds; per-seed 95% bootstrap intervals over users in per_seed"}
    out = ROOT / "benchmarks" / "results" / "ranking.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| system | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in names:
        cells = []
        for m in METRICS:
            spread = [per_seed[s][name].get(f"{m} CI") for s in args.seeds]
            cell = f"{systems[name][m]:.4f}"
            if all(spread):
                cell += " (" + ", ".join(f"{lo:.3f}-{hi:.3f}" for lo, hi in spread) + ")"
            cells.append(cell)
        label = f"{name} (chosen)" if name == chosen else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"chosen: {chosen} {tuning[args.seeds[0]][chosen]['config']}; fit "
          f"{np.mean([per_seed[s][chosen]['fit_seconds'] for s in args.seeds]):.2f} s; ranking the catalogue for "
          f"one user {np.mean([per_seed[s][chosen]['rank_all_ms'] for s in args.seeds]):.2f} ms")


if __name__ == "__main__":
    main()
