"""Attention over the shared prompt cache: ``SharedPrefix.attend`` against the layout it had before, against
aten's fused CPU flash-attention kernel, and against the compiled kernel (``generate.kernels: compiled``).

``recreason.models.registry.SharedPrefix.attend`` reproduces eager attention's bits. It lays the rows' queries out
per prompt, padded to the prompt with the most rows, by gathers whose indices every layer of a step shares. The
baseline ``scattered_attend`` is the layout before: the queries scattered into zeros and copied through a permute,
and the same back (the same bits, more operations). The rival ``flash_attend`` calls
``_scaled_dot_product_flash_attention_for_cpu`` twice, once on the prompt part and once on each row's own tokens,
and merges the two by their log-sum-exps. It is not used by the library: it computes other bits (an online softmax
in blocks), and this script measured it no faster. ``compiled`` is ``recreason.models.kernels``' C kernel, one call
a layer: the same roundings as ``attend``, its sums in another order (an output may differ in its last bit).

Shapes are the embedded model's (9 query heads over 3 key/value heads of 64) at the server's 16 clients: 16 prompts
of up to ``--length`` tokens (some left-padded), ``--own`` tokens of each row's own, in two layouts: ``even``, 12
rows a prompt (192 rows, a whole batch's first step without merged draws), and ``uneven``, 1 to 12 rows a prompt
(seeded), as merged draws leave them. Random bf16 tensors; after a warm-up of every shape, the ways alternate,
``--calls`` calls each per round. Prints microseconds a call, each way's ratio to ``attend``, and the largest
difference to it.

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


def scattered_attend(prefix, layer: int, query, key, value, scaling: float):
    """What ``SharedPrefix.attend`` returns, computed as it was before its gathers (the same products in the same
    order): the rows scattered into a zero-padded per-prompt layout and copied through a permute, each way."""
    import torch

    rows, heads, _, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    pk, pv = prefix.keys[layer], prefix.values32[layer]
    prompts, length = pk.shape[0], pk.shape[2]
    width, owner, slot = prefix.width, prefix.owner, prefix.slot
    q = query.view(rows, kv_heads, group, d)
    padded = q.new_zeros(prompts, width, kv_heads, group, d)
    padded[owner, slot] = q
    padded = padded.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, width * group, d)
    on_prompt = torch.matmul(padded, pk.transpose(2, 3)) * scaling + prefix.bias[:, None, None, :]
    on_prompt = on_prompt.view(prompts, kv_heads, width, group, length).permute(0, 2, 1, 3, 4)[owner, slot]
    on_own = torch.matmul(q, key.transpose(2, 3)) * scaling
    weights = torch.softmax(torch.cat([on_prompt, on_own], -1), dim=-1, dtype=torch.float32).to(query.dtype)
    spread = weights.new_zeros(prompts, width, kv_heads, group, length, dtype=torch.float32)
    spread[owner, slot] = weights[..., :length].float()
    spread = spread.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, width * group, length)
    out = torch.matmul(spread, pv).view(prompts, kv_heads, width, group, d).permute(0, 2, 1, 3, 4)
    out = out[owner, slot] + torch.matmul(weights[..., length:].float(), value.float())
    return out.to(query.dtype).reshape(rows, 1, heads, d), None


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
           d: int = 64, uneven: bool = False):
    """(a SharedPrefix over random bf16 prompt caches, queries, own keys, own values) at decoding's shapes:
    ``draws`` rows a prompt, or with ``uneven`` 1 to ``draws`` (seeded)."""
    import random

    import torch

    from recreason.models.registry import SharedPrefix

    torch.manual_seed(0)
    keys = [torch.randn(prompts, kv_heads, length, d).to(torch.bfloat16)]
    values = [torch.randn(prompts, kv_heads, length, d).to(torch.bfloat16)]
    mask = torch.ones(prompts, length, dtype=torch.long)
    for p in range(prompts):
        mask[p, : (p * 5) % 40] = 0  # prompts of uneven lengths, left-padded
    counts = [random.Random(p).randint(1, draws) for p in range(prompts)] if uneven else [draws] * prompts
    prefix = SharedPrefix(keys, values, mask, torch.arange(prompts).repeat_interleave(torch.tensor(counts)))
    rows = sum(counts)
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

    from recreason.models.kernels import compiled
    from recreason.models.registry import SharedPrefix

    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads(),
              "layouts": {}}
    owns = [int(x) for x in args.own.split(",")]
    rivals = {"attend": SharedPrefix.attend, "scatter (before)": scattered_attend, "flash": flash_attend}
    kernel = compiled()
    if kernel is not None:
        rivals["compiled"] = lambda prefix, *a: prefix._attend_compiled(kernel, *a)
    for uneven in (False, True):  # warm-up of every shape every way: the first timings of a process ran up to 2x off
        for own in owns:
            prefix, query, key, value = shapes(own, args.length, uneven=uneven)
            for _ in range(args.calls):
                for attend in rivals.values():
                    attend(prefix, 0, query, key, value, 0.125)
    for uneven in (False, True):
        layout = "uneven" if uneven else "even"
        result["layouts"][layout] = {}
        for own in owns:
            prefix, query, key, value = shapes(own, args.length, uneven=uneven)
            ways = {name: (lambda f=f: f(prefix, 0, query, key, value, 0.125)[0]) for name, f in rivals.items()}
            ours = ways["attend"]().float()
            diff = {name: float((way().float() - ours).abs().max()) for name, way in ways.items() if name != "attend"}
            times = {name: [] for name in ways}
            for round_ in range(args.rounds):
                for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
                    for _ in range(5):
                        ways[name]()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        ways[name]()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e6)
            ratios = {name: [t / a for t, a in zip(times[name], times["attend"])] for name in ways if name != "attend"}
            result["layouts"][layout][own] = {"rows": len(prefix.owner), "us_per_call": times,
                                              "over_attend": ratios, "max_abs_difference": diff}
            print(f"{layout} ({len(prefix.owner)} rows), own {own:2d}: " + "; ".join(
                f"{name} {', '.join(f'{t:.0f}' for t in times[name])} us"
                + ("" if name == "attend" else f" ({', '.join(f'{r:.2f}x' for r in ratios[name])}, "
                   f"largest difference {diff[name]:.4f})") for name in ways), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
