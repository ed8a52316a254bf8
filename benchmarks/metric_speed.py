"""DIV (feature diversity) speed: our O(N * features) count against the pairwise O(N^2) definition.

Usage: python benchmarks/metric_speed.py [--n 30000] [--pairwise-n 3000]

Prints seconds for both on the same N (pairwise-n) and ours alone on N, plus the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

from recreason.evaluation.metrics import feature_diversity
from recreason.text import FeatureMatcher


def pairwise(sets):
    n = len(sets)
    return sum(len(a & b) for a, b in itertools.combinations(sets, 2)) / (n * (n - 1) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30000)
    parser.add_argument("--pairwise-n", type=int, default=3000)
    args = parser.parse_args()
    rng = random.Random(0)
    vocab = [f"feature{i}" for i in range(1500)] + ["pop filter", "guitar strap"]
    words = [w for f in vocab for w in f.split()] + ["the", "is", "great", "and", "for"] * 200
    sentences = [[rng.choice(words) for _ in range(20)] for _ in range(args.n)]
    matcher = FeatureMatcher(vocab)
    t = time.perf_counter()
    found = [matcher.find(s) for s in sentences]
    t_match = time.perf_counter() - t
    t = time.perf_counter()
    ours = feature_diversity(found)
    t_ours = time.perf_counter() - t
    small = found[: args.pairwise_n]
    t = time.perf_counter()
    ref = pairwise(small)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    ours_small = feature_diversity(small)
    t_ours_small = time.perf_counter() - t
    assert abs(ref - ours_small) < 1e-12
    print(f"feature matching, N={args.n}: {t_match:.3f} s")
    print(f"DIV ours, N={args.n}: {t_ours:.4f} s (value {ours:.4f})")
    print(f"DIV N={args.pairwise_n}: ours {t_ours_small:.4f} s, pairwise {t_ref:.3f} s, "
          f"ratio pairwise/ours {t_ref / max(t_ours_small, 1e-9):.0f}x (same value {ref:.4f})")


if __name__ == "__main__":
    main()
