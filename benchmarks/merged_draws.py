"""Draws that agree decoded as one row, against a row for every draw: what merging them buys a batch of candidates.

A request's candidates are seeded draws of one prompt. Until two draws choose different tokens they hold the same
tokens, so the model computes the same row for each of them: every draw's first step feeds the prompt's last token,
and a sharpened model's samples often agree for many tokens. ``greedy_decode(merge_draws=True)`` (shipped) runs
one row per distinct sequence and lets each draw sample from its row's logits with its own stream; a row splits
when its draws choose apart. ``merge_draws=False`` (the baseline) runs a row per draw.

Loads the run with its decoding settings (``--config``/``--set`` as for ``recreason serve``), takes ``--prompts``
validation pairs (shuffled, seed 0) and decodes their candidates (``generate.candidates`` each, the server's
``generation.generate.generate_candidates``, likelihood as the server computes it) in batches of
``generate.batch_size``, both ways in turn for ``--rounds`` rounds (the order alternating). Prints and records each
way's seconds, the rows its steps held (counted at the model's input), and the share of each batch's candidate lists
that came out the same both ways (in fp32 all of them, tested; in bf16 a row's sums round by its batch companions).
Run it alone: on 2 cores anything beside it skews the times.

Usage: python benchmarks/merged_draws.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16
       --set generate.max_new_tokens=32 [--prompts 64] [--rounds 2]
Results: benchmarks/results/merged_draws.json
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
WAYS = ("row per draw", "merged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "validation pairs decoded each way (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both ways, the order alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/merged_draws.json"))
    args = parser.parse_args()
    if args.rounds < 1 or args.prompts < 1:
        parser.error("--rounds and --prompts must be at least 1")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.config import load_config
    from recreason.generation.generate import generate_candidates, plain_causal_lm, weighs_likelihood
    from recreason.inference import Predictor, Request

    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    cfg, tokenizer = predictor.gen_cfg, predictor.tokenizer
    if cfg.candidates < 2:
        raise SystemExit("merging needs several draws a prompt: set generate.candidates above 1")
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in records[:args.prompts]]
    rows: list[int] = []
    lm = plain_causal_lm(predictor.model)
    if lm is None:
        raise SystemExit("this run's prompts are not plain token ids: its draws decode through transformers' generate")
    embed = lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]) if a[0].shape[1] == 1 else None)

    def decode(merge: bool) -> tuple[float, list[int], list]:
        rows.clear()
        start = time.perf_counter()
        out = generate_candidates(predictor.model, tokenizer, prompts, cfg, progress=False, merge_draws=merge,
                                  likelihood=weighs_likelihood(cfg))
        return time.perf_counter() - start, list(rows), [[c.text for c in cands] for cands in out]

    decode(True)  # warm-up: packing, allocator
    seconds = {way: [] for way in WAYS}
    steps = texts = None
    for r in range(args.rounds):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            took, seen, written = decode(way == "merged")
            seconds[way].append(took)
            steps = steps or {}
            steps[way] = seen
            texts = texts or {}
            texts[way] = written
            print(f"round {r + 1}, {way}: {took:.1f} s, {len(seen)} steps of {statistics.mean(seen):.1f} rows",
                  flush=True)
    hook.remove()
    same = sum(a == b for a, b in zip(texts[WAYS[0]], texts[WAYS[1]])) / len(prompts)
    ratios = [m / a for m, a in zip(seconds["merged"], seconds[WAYS[0]])]
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "candidates": cfg.candidates, "threads": torch.get_num_threads(),
        "ways": {way: {"seconds": seconds[way], "reasons_per_s": [len(prompts) / s for s in seconds[way]],
                       "steps": len(steps[way]), "row_steps": sum(steps[way]),
                       "mean_rows_per_step": statistics.mean(steps[way])} for way in WAYS},
        "time_ratio_merged": ratios,
        "row_steps_share_merged": sum(steps["merged"]) / sum(steps[WAYS[0]]),
        "same_candidates_share": same,
    }
    print(f"merged: {', '.join(f'{x:.2f}x' for x in ratios)} the time of a row per draw; its steps held "
          f"{result['row_steps_share_merged']:.0%} of the rows; the same candidates for {same:.0%} of the prompts")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
