"""Two parts of a decoding step's work on the scores, at the server's 192 rows: what leaving them out saves.

``SeededSampler.pick`` used to take the argmax of every row and then overwrite the sampled rows; it now takes the
argmax of the greedy rows only (one a request: 16 of 192). A candidate decode computed each step's log-normaliser
over the vocabulary (``logsumexp``) for the draws' likelihood; it now skips it where the choice gives the likelihood
no weight (``generation.generate.weighs_likelihood``). This times, on fp32 scores of ``--rows`` rows over the
embedded model's 49,152-token vocabulary (random, rounded through bf16 as the model's are), in reused memory as the
server runs (``reuse_freed_memory``): the argmax of every row against the argmax of one row in ``--draws``, and the
log-normaliser; ``--calls`` calls each, the ways alternating for ``--rounds`` rounds.

Usage: python benchmarks/sampler_parts.py [--rows 192] [--draws 12] [--calls 50] [--rounds 3]
Results: benchmarks/results/sampler_parts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--draws", type=int, default=12, help="rows a request (its first one greedy)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sampler_parts.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.models.registry import reuse_freed_memory

    reuse_freed_memory()
    torch.manual_seed(0)
    scores = (torch.randn(args.rows, VOCAB) * 3).to(torch.bfloat16).float()
    greedy = list(range(0, args.rows, args.draws))
    ways = {"argmax of every row": lambda: scores.argmax(-1),
            "argmax of the greedy rows": lambda: scores[greedy].argmax(-1),
            "log-normaliser": lambda: scores.logsumexp(-1)}
    for way in ways.values():
        way()
    ms = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            start = time.perf_counter()
            for _ in range(args.calls):
                ways[name]()
            ms[name].append((time.perf_counter() - start) / args.calls * 1e3)
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads(),
              "greedy_rows": len(greedy), "ms_per_call": ms,
              "greedy_only_over_every_row": [g / a for g, a in zip(ms["argmax of the greedy rows"],
                                                                   ms["argmax of every row"])]}
    for name, times in ms.items():
        print(f"{name}: {', '.join(f'{t:.2f}' for t in times)} ms")
    print("greedy rows only: " + ", ".join(f"{r:.2f}x" for r in result["greedy_only_over_every_row"])
          + " the time of every row's argmax")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
