"""Attention over the shared prompt cache: ``SharedPrefix.attend`` against aten's fused CPU flash-attention kernel.

``recreason.models.registry.SharedPrefix.attend`` reproduces eager attention's bits with about 25 small operations a
layer and step. The alternative measured here calls ``_scaled_dot_product_flash_attention_for_cpu`` twice, once on
the prompt part (the rows' queries laid out per prompt, as ``attend`` lays them) and once on each row's own tokens,
and merges the two by their log-sum-exps. It is not used by the library: it computes other bits (an online softmax
in blocks), and this script measured it no faster.

Shapes are the embedded model's (9 query heads over 3 key/value heads of 64) at the server's 16 clients: 16 prompts
x 12 draws = 192 rows, prompts of up to ``--length`` tokens (some left-padded), ``--own`` tokens of each row's own.
Random bf16 tensors; after a warm-up of every shape, the two ways alternate, ``--calls`` calls each per round. Prints microseconds a call, the
ratio, and the largest difference between the two outputs.

Usage: python benchmarks/prefix_attention.py [--own 1,8,24] [--calls 200] [--rounds 3]
Results: benchmarks/results/prefix_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flash_attend(prefix, layer: int, query, key, value, scaling: float):
    """What ``SharedPrefix.attend`` returns, by two fused flash-attention calls merged by their log-sum-exps."""
    import torch

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rows, heads, _, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    keys, values = prefix.keys[layer], prefix.values32[layer].to(query.dtype)
    prompts = keys.shape[0]
    q = query.view(rows, kv_heads, group, d)
    padded = q.new_zeros(prompts, prefix.width, kv_heads, group, d)
    padded[prefix.owner, prefix.slot] = q
    padded = padded.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, prefix.width * group, d)
    on_prompt, lse_prompt = flash(padded, keys, values, attn_mask=prefix.bias[:, None, None, :].to(query.dtype),
                                  scale=scaling)
    on_prompt = on_prompt.view(prompts, kv_heads, prefix.width, group, d).permute(0, 2, 1, 3, 4)[prefix.owner,
                                                                                                  prefix.slot]
    lse_prompt = lse_prompt.view(prompts, kv_heads, prefix.width, group).permute(0, 2, 1, 3)[prefix.owner,
                                                                                              prefix.slot]
    on_own, lse_own = flash(q, key, value, scale=scaling)
    both = torch.logaddexp(lse_prompt, lse_own)
    out = (on_prompt.float() * (lse_prompt - both).exp()[..., None]
           + on_own.float() * (lse_own - both).exp()[..., None])
    return out.to(query.dtype).reshape(rows, 1, heads, d), None


def shapes(own: int, length: int, prompts: int = 16, draws: int = 12, kv_heads: int = 3, group: int = 3,
           d: int = 64):
    """(a SharedPrefix over random bf16 prompt caches, queries, own keys, own values) at decoding's shapes."""
    import torch

    from recreason.models.registry import SharedPrefix

    torch.manual_seed(0)
    keys = [torch.randn(prompts, kv_heads, length, d).to(torch.bfloat16)]
    values = [torch.randn(prompts, kv_heads, length, d).to(torch.bfloat16)]
    mask = torch.ones(prompts, length, dtype=torch.long)
    for p in range(prompts):
        mask[p, : (p * 5) % 40] = 0  # prompts of uneven lengths, left-padded
    prefix = SharedPrefix(keys, values, mask, torch.arange(prompts).repeat_interleave(draws))
    rows = prompts * draws
    query = torch.randn(rows, kv_heads * group, 1, d).to(torch.bfloat16)
    key = torch.randn(rows, kv_heads, own, d).to(torch.bfloat16)
    value = torch.randn(rows, kv_heads, own, d).to(torch.bfloat16)
    return prefix, query, key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--own", default="1,8,24", help="own tokens a row has written, comma-separated")
    parser.add_argument("--length", type=int, default=160, help="prompt cache columns")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix_attention.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.models.registry import SharedPrefix

    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads(),
              "own": {}}
    owns = [int(x) for x in args.own.split(",")]
    for own in owns:  # warm-up of every shape both ways: the first timings of a process ran up to 2x off
        prefix, query, key, value = shapes(own, args.length)
        for _ in range(args.calls):
            SharedPrefix.attend(prefix, 0, query, key, value, 0.125)
            flash_attend(prefix, 0, query, key, value, 0.125)
    for own in owns:
        prefix, query, key, value = shapes(own, args.length)
        ways = {"attend": lambda: SharedPrefix.attend(prefix, 0, query, key, value, 0.125),
                "flash": lambda: flash_attend(prefix, 0, query, key, value, 0.125)}
        diff = float((ways["attend"]()[0].float() - ways["flash"]()[0].float()).abs().max())
        times = {name: [] for name in ways}
        for round_ in range(args.rounds):
            for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
                for _ in range(5):
                    ways[name]()
                start = time.perf_counter()
                for _ in range(args.calls):
                    ways[name]()
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
        ratio = [f / a for f, a in zip(times["flash"], times["attend"])]
        result["own"][own] = {"us_per_call": times, "flash_over_attend": ratio, "max_abs_difference": diff}
        print(f"own {own:2d}: attend {', '.join(f'{t:.0f}' for t in times['attend'])} us, flash "
              f"{', '.join(f'{t:.0f}' for t in times['flash'])} us ({', '.join(f'{r:.2f}x' for r in ratio)}); "
              f"largest difference {diff:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
