"""Two ways of decoding a batch of candidates side by side: draws that agree decoded as one row against a row for
every draw (``--compare merge``, the default), or the counter random stream against the mt19937 one
(``--compare stream``), or the compiled prefix attention kernel against the torch operations (``--compare kernel``).

A request's candidates are seeded draws of one prompt. Until two draws choose different tokens they hold the same
tokens, so the model computes the same row for each of them: every draw's first step feeds the prompt's last token,
and a sharpened model's samples often agree for many tokens. ``greedy_decode(merge_draws=True)`` (shipped) runs
one row per distinct sequence and lets each draw sample from its row's logits with its own stream; a row splits
when its draws choose apart. ``merge_draws=False`` (the baseline) runs a row per draw.

``--compare stream``: the samples' random numbers hashed from seed, step and token where a step reads them
(``generate.sample_stream: counter``, shipped) against a seeded generator's number for every vocabulary token and
step (``mt19937``, the baseline). The two streams draw different samples of the same distributions, so the share
of candidate lists that came out the same says only how often all of a prompt's draws agreed.

``--compare kernel``: bf16 decoding with the compiled kernels (``generate.kernels: compiled``,
``recreason.models.kernels``: the attention over the shared prompt cache in one C call a layer, each RMS norm in one)
against the torch operations (``torch``). The same roundings, sums in another order: an output may differ in its last
bit, and a sample drawn after it may differ, as with other batch companions.

``--compare qkv``: a llama attention layer's query, key and value products as one packed product, its rotary
embedding turning queries and keys together (``packed_products``, shipped: the same bits) against the layer's own
forward (three products, the rotary embedding's dozen operations).

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
       [--compare stream|kernel|qkv]
Results: benchmarks/results/merged_draws.json (--compare stream: sample_stream.json, --compare kernel:
prefix_kernel.json, --compare qkv: fused_attention.json)
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
# each comparison's ways, the baseline first: the keyword arguments of generate_candidates, and config overrides
WAYS = {"merge": {"row per draw": ({"merge_draws": False}, {}), "merged": ({"merge_draws": True}, {})},
        "stream": {"mt19937": ({}, {"sample_stream": "mt19937"}), "counter": ({}, {"sample_stream": "counter"})},
        "kernel": {"torch": ({}, {"kernels": "torch"}), "compiled": ({}, {"kernels": "compiled"})},
        "qkv": {"three products": ({}, {}), "one product": ({}, {})}}
RESULTS = {"merge": "merged_draws.json", "stream": "sample_stream.json", "kernel": "prefix_kernel.json",
           "qkv": "fused_attention.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "validation pairs decoded each way (default 16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both ways, the order alternating")
    parser.add_argument("--compare", choices=sorted(WAYS), default="merge", help="what the two ways differ in")
    parser.add_argument("--out", help="results file (default benchmarks/results/merged_draws.json, or "
                                      "sample_stream.json for --compare stream, prefix_kernel.json for kernel)")
    args = parser.parse_args()
    if args.rounds < 1 or args.prompts < 1:
        parser.error("--rounds and --prompts must be at least 1")
    sys.path.insert(0, str(ROOT / "src"))
    from dataclasses import replace

    import torch

    from recreason.config import load_config
    from recreason.generation.generate import generate_candidates, plain_causal_lm, weighs_likelihood
    from recreason.inference import Predictor, Request
    from recreason.models.registry import use_kernels

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

    attention_layers = [(m, m.forward) for m in lm.modules() if getattr(m, "_recreason_packed", False)
                        and hasattr(m, "q_proj")]
    if args.compare == "qkv" and not attention_layers:
        raise SystemExit("no attention layer runs packed here (bf16 on a CPU with oneDNN's bf16 products)")
    ways = WAYS[args.compare]
    names = list(ways)
    base, shipped = names

    def decode(way: str) -> tuple[float, list[int], list]:
        kwargs, settings = ways[way]
        use_kernels(settings.get("kernels", cfg.kernels))  # process-wide, as the Predictor sets it
        if args.compare == "qkv":  # the attention layers' own forward, or packed_products' (one q/k/v product)
            for module, packed in attention_layers:
                module.forward = packed if way == shipped else module._recreason_unpacked
        rows.clear()
        start = time.perf_counter()
        out = generate_candidates(predictor.model, tokenizer, prompts, replace(cfg, **settings), progress=False,
                                  likelihood=weighs_likelihood(cfg), **kwargs)
        return time.perf_counter() - start, list(rows), [[c.text for c in cands] for cands in out]

    decode(shipped)  # warm-up: packing, allocator
    seconds = {way: [] for way in names}
    steps = texts = None
    for r in range(args.rounds):
        for way in (names if r % 2 == 0 else names[::-1]):
            took, seen, written = decode(way)
            seconds[way].append(took)
            steps = steps or {}
            steps[way] = seen
            texts = texts or {}
            texts[way] = written
            print(f"round {r + 1}, {way}: {took:.1f} s, {len(seen)} steps of {statistics.mean(seen):.1f} rows",
                  flush=True)
    hook.remove()
    same = sum(a == b for a, b in zip(texts[base], texts[shipped])) / len(prompts)
    ratios = [m / a for m, a in zip(seconds[shipped], seconds[base])]
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "candidates": cfg.candidates, "threads": torch.get_num_threads(),
        "ways": {way: {"seconds": seconds[way], "reasons_per_s": [len(prompts) / s for s in seconds[way]],
                       "steps": len(steps[way]), "row_steps": sum(steps[way]),
                       "mean_rows_per_step": statistics.mean(steps[way])} for way in names},
        f"time_ratio_{shipped}": ratios,
        f"row_steps_share_{shipped}": sum(steps[shipped]) / sum(steps[base]),
        "same_candidates_share": same,
    }
    print(f"{shipped}: {', '.join(f'{x:.2f}x' for x in ratios)} the time of {base}; its steps held "
          f"{result[f'row_steps_share_{shipped}']:.0%} of the rows; the same candidates for {same:.0%} of the prompts")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / RESULTS[args.compare]
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
