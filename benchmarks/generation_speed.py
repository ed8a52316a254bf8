"""Batched generation speed of a trained run, with and without the contiguous head input, side by side.

recreason registers a forward pre-hook that makes the output head's input contiguous
(`recreason.models.registry.contiguous_head_input`). Without it, `logits_to_keep` hands the head a strided
slice and `F.linear` copies the vocabulary matrix once per batch row. This script loads the run once,
then times on the same test prompts: the prefill of one batch, and `generate_texts` at several batch
sizes, with the hook (ours) and with the hook removed (baseline), printing the ratios.

Usage: python benchmarks/generation_speed.py --run runs/demo/run [--prompts 32 --batch-sizes 1 16 32]
Results: benchmarks/results/generation_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_texts
    from recreason.inference import Predictor, Request

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_speed.json"))
    args = parser.parse_args()

    predictor = Predictor(args.run, GenerateConfig(precision="bf16"))
    model, tok, run = predictor.model, predictor.tokenizer, predictor.run
    records = predictor.dataset.subset(run.split_seed, "test")[: args.prompts]
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in records]
    head = model.lm.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)

    def set_hook(on: bool) -> None:
        head._forward_pre_hooks.clear()
        if on:
            head._forward_pre_hooks.update(hooks)

    tok.padding_side = "left"
    batch = tok(prompts[:16], return_tensors="pt", padding=True, add_special_tokens=False)
    results: dict[str, dict] = {}
    for name, on in (("baseline (no hook)", False), ("ours (contiguous head input)", True)):
        set_hook(on)
        row = {}
        with torch.no_grad():
            model.lm(**batch, logits_to_keep=1)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                model.lm(**batch, logits_to_keep=1)
            row["prefill_16_s"] = (time.perf_counter() - start) / 3
        for bs in args.batch_sizes:
            cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=bs)
            n = len(prompts) if bs > 1 else min(4, len(prompts))
            generate_texts(model, tok, prompts[:bs], cfg, progress=False)  # warm-up
            start = time.perf_counter()
            generate_texts(model, tok, prompts[:n], cfg, progress=False)
            row[f"reasons_per_s_batch_{bs}"] = n / (time.perf_counter() - start)
        results[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    set_hook(True)
    base, ours = results["baseline (no hook)"], results["ours (contiguous head input)"]
    print(f"\nprefill of 16 prompts: {base['prefill_16_s']:.2f} s -> {ours['prefill_16_s']:.2f} s "
          f"({base['prefill_16_s'] / ours['prefill_16_s']:.2f}x faster)")
    for bs in args.batch_sizes:
        key = f"reasons_per_s_batch_{bs}"
        print(f"batch {bs}: {base[key]:.2f} -> {ours[key]:.2f} reasons/s ({ours[key] / base[key]:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
