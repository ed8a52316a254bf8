"""bf16 against fp32 matrix products on this machine, side by side: why `precision: auto` exists.

    python benchmarks/matmul_precision.py [--repeats 20]

A CPU with AVX-512 BF16 or AMX runs bf16 products natively (several times faster than fp32); one with AVX2 only
emulates them. The shape is one decoder projection of the embedded model on a batch of prompts (512 tokens x 576
-> 1536). Prints GFLOP/s of each and their ratio, and what `precision: auto` resolves to here. Where oneDNN runs
bf16, also each of the embedded model's layer shapes at decoding's row counts (16, 64, 192 rows: one token for
each of 16 prompts' 1, 4 or 12 draws), ``F.linear`` against a weight packed once
(``recreason.models.registry.packed_products``), with their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gflops(dtype, repeats: int, packed: bool = False) -> float:
    """GFLOP/s of one 512 x 576 by 576 x 1536 product in ``dtype``; ``packed``: against a weight packed once for
    oneDNN (bf16 only, as ``recreason.models.registry.packed_products`` runs decoding's layers)."""
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    product = lambda: a @ b  # noqa: E731
    if packed:
        weight = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 512)
        product = lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")  # noqa: E731
    for _ in range(3):
        product()
    start = time.perf_counter()
    for _ in range(repeats):
        product()
    return 2 * 512 * 576 * 1536 / ((time.perf_counter() - start) / repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.models.registry import native_bf16, resolve_precision

    fp32, bf16 = gflops(torch.float32, args.repeats), gflops(torch.bfloat16, args.repeats)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16('cpu')}, "
          f"{torch.get_num_threads()} threads")
    print(f"fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s, bf16/fp32 {bf16 / fp32:.3f}x; "
          f"precision auto -> {resolve_precision('auto', 'cpu')}")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        packed = gflops(torch.bfloat16, args.repeats, packed=True)
        print(f"bf16 against a packed weight {packed:.1f} GFLOP/s ({packed / bf16:.2f}x the plain product)")
        decoding_shapes(args.repeats)


def decoding_shapes(repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    layers = {"q, o": (576, 576), "k, v": (576, 192), "gate, up": (576, 1536), "down": (1536, 576),
              "output head": (576, 49152)}
    print("bf16 GFLOP/s at decoding's shapes, F.linear / packed weight (ratio):")
    for rows in (16, 64, 192):
        cells = []
        for name, (k, n) in layers.items():
            x, w = torch.randn(rows, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            rates = []
            for product in (lambda: F.linear(x, w), lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")):
                for _ in range(3):
                    product()
                start = time.perf_counter()
                for _ in range(repeats):
                    product()
                rates.append(2 * rows * k * n / ((time.perf_counter() - start) / repeats) / 1e9)
            cells.append(f"{name} {rates[0]:.0f}/{rates[1]:.0f} ({rates[1] / rates[0]:.2f}x)")
        print(f"  {rows} rows: " + "; ".join(cells))


if __name__ == "__main__":
    main()
