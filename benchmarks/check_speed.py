"""Reason-check speed: the profanity check with and without remembering its answer per text.

Usage: python benchmarks/check_speed.py [--distinct 200] [--repeats 10]

``better-profanity`` walks its whole list of variants for every word of a sentence. Evaluation checks every
reason (``check_rates``: the Filtered and Ungrounded columns), a run repeats many of its reasons, and the
selection tuning of benchmarks/quality.py scores thousands of weight settings over the same candidates. This
checks ``distinct`` sentences ``repeats`` times each, through the library directly (the baseline) and through
``recreason.inference.safety.is_profane`` (cache emptied first), and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import random
import time

from recreason.inference.safety import is_profane, profanity_filter

WORDS = ("the tone is bright and the strings feel easy on the fingers for the price this cable works well with my "
         "amp pedal and sounds great a solid stand holds any guitar i have used it for months without a problem").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = random.Random(0)
    distinct = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "." for _ in range(args.distinct)]
    texts = [t for _ in range(args.repeats) for t in distinct]
    rng.shuffle(texts)
    library = profanity_filter()
    library.contains_profanity("warm up")  # the word list loads once, outside both timings
    start = time.perf_counter()
    plain = [library.contains_profanity(t) for t in texts]
    t_plain = time.perf_counter() - start
    is_profane.cache_clear()
    start = time.perf_counter()
    cached = [is_profane(t) for t in texts]
    t_cached = time.perf_counter() - start
    assert plain == cached
    n = len(texts)
    print(f"{n} checks of {args.distinct} distinct sentences: library {t_plain:.2f} s ({1000 * t_plain / n:.1f} ms "
          f"each), remembered {t_cached:.2f} s ({1000 * t_cached / n:.2f} ms each), ratio {t_plain / t_cached:.1f}x")


if __name__ == "__main__":
    main()
