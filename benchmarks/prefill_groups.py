"""Prefilling a batch's prompts in groups of similar length against one call padded to the batch's longest.

Loads the run with its decoding settings (``--config``/``--set`` as for ``recreason serve``), lays out ``--batches``
batches of ``--prompts`` validation prompts (shuffled, seed 0), and times ``recreason.generation.generate.prefill``
on each batch both ways, alternating batch by batch for ``--rounds`` rounds after one warm-up round:

- ``one call``: the shared header once, then every prompt's own tokens in one call padded to the longest (the code
  before ``length_groups``);
- ``length groups``: the own tokens in the groups ``length_groups`` chooses, each padded to its own longest.

Prints the padded share of the own tokens each way, seconds a batch (median over rounds) and the ratio. The
decoding steps after the prefill are the same either way. Run it alone: on 2 cores anything beside it skews both.

Usage: python benchmarks/prefill_groups.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml [--batches 6 --rounds 3]
Results: benchmarks/results/prefill_groups.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from runargs import add_run_arguments

ROOT = Path(__file__).resolve().parents[1]


def padding(lengths: list[int], groups: list[list[int]]) -> float:
    """The share of the prefilled positions that are padding when each group is padded to its longest."""
    padded = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    return 1 - sum(lengths) / padded if padded else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over all batches, after one warm-up")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prefill_groups.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.config import load_config
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request

    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    tok = predictor.tokenizer
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in records[:args.prompts * args.batches]]
    batches = [tok.pad({"input_ids": [tok(p, add_special_tokens=False)["input_ids"]
                                      for p in prompts[k:k + args.prompts]]}, return_tensors="pt")
               for k in range(0, len(prompts), args.prompts)]
    lm = g.plain_causal_lm(predictor.model)
    ways = {"one call": 10 ** 9, "length groups": g.PREFILL_CALL_TOKENS}
    shares: dict[str, list[float]] = {name: [] for name in ways}
    for batch in batches:
        header = g.shared_header(batch)
        own = [int(n) - header - 1 for n in batch["attention_mask"].sum(1)]
        for name, call in ways.items():
            shares[name].append(padding(own, g.length_groups(own, call)))
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    default = g.PREFILL_CALL_TOKENS
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            for batch in batches:
                for name, call in ways.items():
                    g.PREFILL_CALL_TOKENS = call
                    start = time.perf_counter()
                    g.prefill(lm, batch, 1)
                    if round_:  # the first round warms up
                        seconds[name].append(time.perf_counter() - start)
    g.PREFILL_CALL_TOKENS = default
    rounds = {name: [sum(s[r * len(batches):(r + 1) * len(batches)]) for r in range(args.rounds)]
              for name, s in seconds.items()}  # all batches of one round
    results = {}
    for name in ways:
        total = statistics.median(rounds[name])
        results[name] = {"padding_share": statistics.mean(shares[name]), "seconds_per_batch": total / len(batches),
                         "ratio_to_one_call": total / statistics.median(rounds["one call"])}
        print(f"{name}: padding {results[name]['padding_share']:.1%} of prefilled positions, "
              f"{results[name]['seconds_per_batch']:.2f} s a batch of {args.prompts} "
              f"(x{results[name]['ratio_to_one_call']:.2f}; rounds {', '.join(f'{t:.1f}' for t in rounds[name])} s)")
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "call_tokens": default, "ways": results,
                                          "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
