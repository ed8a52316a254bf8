"""Decoding several candidates per reason: one prefill per prompt against one prefill per draw, side by side.

``generate_candidates`` decodes the greedy text and the seeded samples of a batch together. The baseline
(``shared_prefill=False``, what recreason did before) repeats every prompt once per draw before the model sees
it, so with 16 draws each prompt's tokens go through the model 16 times; ours runs the prompt once and copies
its KV cache to the draws (``recreason.generation.generate.prefill``). This script loads a run once and decodes
the same test prompts both ways, alternating, with the run's decoding settings (``--config`` files as for
``recreason evaluate``: configs/full.yaml gives 16 candidates in batches of 8 prompts), and prints seconds per
reason, the ratio, and how many prompts got exactly the same candidate texts both ways (bf16 matrix products
may round differently for a batch of 8 rows than for one of 128, so a sample can part ways at a near tie).

Usage: python benchmarks/candidate_speed.py --run RUN --config configs/demo.yaml --config configs/full.yaml
       [--prompts 32 --repeats 2]
Results: benchmarks/results/candidate_speed.json. Run it alone: on 2 cores anything beside it skews both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from recreason.config import load_config
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", action="append", default=[], help="config files, layered as for evaluate")
    parser.add_argument("--prompts", type=int, default=32, help="test prompts decoded each way")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of each way, alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/candidate_speed.json"))
    args = parser.parse_args()

    gen = load_config(args.config)["generate"]
    if gen.candidates < 2:
        parser.error("the settings decode one candidate per reason; give a config with generate.candidates > 1")
    predictor = Predictor(args.run, gen)
    records = predictor.dataset.subset(predictor.run.split_seed, "test")[: args.prompts]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    tokens = [len(predictor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    def decode(shared: bool):
        return generate_candidates(predictor.model, predictor.tokenizer, prompts, gen, progress=False,
                                   users=[r.user for r in records], items=[r.item for r in records],
                                   shared_prefill=shared)

    decode(True)  # warm-up: first-call allocations, oneDNN kernel choice
    seconds: dict[str, list[float]] = {"baseline (prefill per draw)": [], "ours (prefill per prompt)": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, shared in (("baseline (prefill per draw)", False), ("ours (prefill per prompt)", True)):
            start = time.perf_counter()
            outputs[name] = decode(shared)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s for {len(prompts)} reasons", flush=True)
    base, ours = (outputs[k] for k in seconds)
    texts = lambda cands: [c.text for c in cands]  # noqa: E731
    same = sum(texts(a) == texts(b) for a, b in zip(base, ours))
    same_greedy = sum(a[0].text == b[0].text for a, b in zip(base, ours))
    best = {k: min(v) for k, v in seconds.items()}
    ratio = best["baseline (prefill per draw)"] / best["ours (prefill per prompt)"]
    result = {
        "run": args.run, "config": args.config, "prompts": len(prompts), "candidates": gen.candidates,
        "batch_size": gen.batch_size, "precision": gen.precision, "max_new_tokens": gen.max_new_tokens,
        "prompt_tokens_mean": sum(tokens) / len(tokens), "prompt_tokens_max": max(tokens),
        "threads": os.cpu_count(), "seconds": seconds,
        "seconds_per_reason": {k: v / len(prompts) for k, v in best.items()}, "speedup": ratio,
        "same_candidates": same, "same_greedy": same_greedy,
    }
    print(f"\n{gen.candidates} candidates, batches of {gen.batch_size}, prompts of {result['prompt_tokens_mean']:.0f} "
          f"tokens on average: {result['seconds_per_reason']['baseline (prefill per draw)']:.2f} -> "
          f"{result['seconds_per_reason']['ours (prefill per prompt)']:.2f} s per reason ({ratio:.2f}x faster); "
          f"identical candidates for {same} of {len(prompts)} prompts, identical greedy text for {same_greedy}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
