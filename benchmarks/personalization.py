"""Personalization comparison: discrete / continuous / hybrid prompts, with and without the rating head.

Every row trains with the same step budget (configs/experiments/compare.yaml on top of configs/demo.yaml)
on the same split, then one `recreason evaluate` call scores all rows against the zero-shot, retrieval,
popularity and matrix-factorization baselines in one table.

Usage:
  python benchmarks/personalization.py --dataset runs/demo/data --seed 1
  python benchmarks/personalization.py --dataset runs/demo/data --seed 2 --experiments discrete hybrid-mf

Writes benchmarks/results/personalization-seed<S>/{test.json,test.md,timings.json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["discrete", "discrete-mf", "continuous", "continuous-mf", "hybrid", "hybrid-mf"]


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="prepared dataset directory (e.g. runs/demo/data)")
    parser.add_argument("--seed", type=int, default=1, help="split seed")
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS, choices=EXPERIMENTS)
    parser.add_argument("--runs", default="runs/compare", help="where run directories go")
    parser.add_argument("--systems", nargs="+", default=["zero-shot", "retrieval", "fine-tuned"],
                        help="rows besides the runs (zero-shot costs a generation pass)")
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("recreason"))
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/experiments/compare.yaml")]
    timings = {}
    run_dirs = []
    for name in args.experiments:
        out = Path(args.runs) / f"seed{args.seed}" / name
        timings[name] = run([exe, "train", args.dataset, "--out", str(out), "--quiet", *base,
                             "--config", str(ROOT / f"configs/experiments/{name}.yaml"),
                             "--set", f"train.split_seed={args.seed}"])
        run_dirs += ["--run", str(out)]
    results = ROOT / "benchmarks" / "results" / f"personalization-seed{args.seed}"
    timings["evaluate"] = run([exe, "evaluate", *run_dirs, "--out", str(results), "--quiet", *base,
                               "--systems", *args.systems])
    (results / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    print((results / "test.md").read_text())
    print("wall seconds:", json.dumps(timings))


if __name__ == "__main__":
    main()
