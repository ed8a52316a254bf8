"""bf16 against fp32 matrix products on this machine, side by side: why `precision: auto` exists.

    python benchmarks/matmul_precision.py [--repeats 20]

A CPU with AVX-512 BF16 or AMX runs bf16 products natively (several times faster than fp32); one with AVX2 only
emulates them. The shape is one decoder projection of the embedded model on a batch of prompts (512 tokens x 576
-> 1536). Prints GFLOP/s of each and their ratio, and what `precision: auto` resolves to here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gflops(dtype, repeats: int) -> float:
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
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


if __name__ == "__main__":
    main()
