"""Reason-check speed: the profanity check as the library runs it, with its word set as regular expressions, and
remembered per text.

Usage: python benchmarks/check_speed.py [--distinct 200] [--repeats 10]

``better-profanity`` compares every word of a sentence (and every pair of words) with each entry of its word list in
Python, with each entry's leetspeak alternatives. Serving checks every reason it writes (new texts: nothing is
remembered), evaluation checks every reason (``check_rates``: the Filtered and Ungrounded columns), and the selection
tuning of benchmarks/quality.py scores thousands of weight settings over the same candidates. This checks
``distinct`` sentences ``repeats`` times each, three ways: the library as shipped (a fresh ``Profanity``, the
baseline); ``recreason.inference.safety.profanity_filter`` (the library's word splitting, its word set matched by
``WordPatterns``), each text anew; and ``is_profane`` (that, remembered per text; cache emptied first). All three
must agree on every sentence. Prints the times and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import random
import time

from better_profanity import Profanity

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
    library = Profanity()  # the library as shipped: its word list as VaryingString entries
    library.contains_profanity("warm up")  # the word lists load once, outside the timings
    ours = profanity_filter()
    ours.contains_profanity("warm up")
    start = time.perf_counter()
    plain = [library.contains_profanity(t) for t in texts]
    t_plain = time.perf_counter() - start
    start = time.perf_counter()
    patterns = [ours.contains_profanity(t) for t in texts]
    t_patterns = time.perf_counter() - start
    is_profane.cache_clear()
    start = time.perf_counter()
    cached = [is_profane(t) for t in texts]
    t_cached = time.perf_counter() - start
    assert plain == patterns == cached
    n = len(texts)
    print(f"{n} checks of {args.distinct} distinct sentences: library {t_plain:.2f} s ({1000 * t_plain / n:.2f} ms "
          f"each); word set as patterns {t_patterns:.3f} s ({1000 * t_patterns / n:.3f} ms each, "
          f"{t_plain / t_patterns:.0f}x faster); remembered {t_cached:.3f} s ({1000 * t_cached / n:.3f} ms each, "
          f"{t_plain / t_cached:.0f}x faster)")


if __name__ == "__main__":
    main()
