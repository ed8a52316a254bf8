"""Where a batch of served reasons spends its time, and the share of the FLOP bound its matrix products alone allow.

Loads the run with its decoding settings (``--config``/``--set`` as for ``recreason serve``), then writes reasons for
``--batches`` batches of ``--prompts`` validation pairs (shuffled, seed 0) as the server's whole batches do
(``Predictor.generate``: candidates, then the choice among them), after one warm-up batch. Every part is timed by
wrapping it (a perf_counter pair a call):

- ``prefill``: the model's calls over the prompts (``recreason.generation.generate.prefill``);
- ``decoding forward``: the model's one-token steps, and inside them the ``products in decoding`` (every linear
  layer, the output head included) and the ``attention over the prompt cache`` (``SharedPrefix.attend``); the
  prefill's products are counted apart;
- ``sampler``: ``SeededSampler.pick``, and inside it ``uniform draws`` (each sampled row's seeded numbers);
- ``rest``: the choice among candidates, the decoding loop's bookkeeping.

FLOPs as ``serve_load.py`` counts them (2 x decoder weights x (prompt + generated tokens) + 2 x vocabulary x
generated tokens, every candidate's tokens, padding and attention left out), the peak from its ``matmul_peak``.
Prints seconds a batch per part, the share of the bound the batches reached, and the share they would reach if
everything but the products took no time (the useful FLOPs over the products' seconds): the ceiling that faster
non-product code could approach at these shapes. Run it alone: on 2 cores anything beside it skews every part.

Usage: python benchmarks/decode_anatomy.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16
       --set generate.max_new_tokens=32 [--batches 4]
Results: benchmarks/results/decode_anatomy.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from runargs import add_run_arguments

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds and calls per part, accumulated by wrapped callables."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.product_flop = 0.0
        self.prefilling = False

    def wrap(self, part: str, fn, pick=None):
        """``fn`` timed under ``part``; ``pick(args, kwargs)`` may name another part for this call (None: skip)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = part if pick is None else pick(args, kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if name is not None:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.product_flop = 0.0


def instrument(predictor, clock: Clock) -> None:
    import torch

    from recreason.generation import generate as g
    from recreason.models import registry

    lm = g.plain_causal_lm(predictor.model)
    lm.forward = clock.wrap("forward", lm.forward, lambda a, k: "decoding forward" if k["input_ids"].shape[1] == 1
                            else None)  # the prefill's calls count under "prefill"
    prefill = clock.wrap("prefill", g.prefill)

    def flagged(*args, **kwargs):
        clock.prefilling = True
        try:
            return prefill(*args, **kwargs)
        finally:
            clock.prefilling = False
    g.prefill = flagged
    registry.SharedPrefix.attend = clock.wrap("attention over the prompt cache", registry.SharedPrefix.attend)
    g.SeededSampler.pick = clock.wrap("sampler", g.SeededSampler.pick)
    g.SeededSampler._uniform = clock.wrap("uniform draws", g.SeededSampler._uniform)
    def part(a, k):
        return "products in the prefill" if clock.prefilling else "products in decoding"

    for module in lm.modules():
        if isinstance(module, torch.nn.Linear):
            forward = module.forward

            def counted(x, forward=forward, module=module):
                clock.product_flop += 2 * x.numel() // x.shape[-1] * module.weight.numel()
                return forward(x)
            module.forward = clock.wrap("products", counted, part)
    gate_up = registry._gate_up  # a gated MLP's gate and up products, run as one (packed_products)

    def counted_gate_up(module, x):
        weights = module.gate_proj.weight.numel() + module.up_proj.weight.numel()
        clock.product_flop += 2 * x.numel() // x.shape[-1] * weights
        return gate_up(module, x)
    registry._gate_up = clock.wrap("products", counted_gate_up, part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "pairs in a batch (the server's at 16 clients)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches, after one warm-up batch")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_anatomy.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from recreason.config import load_config
    from recreason.inference import Predictor, Request
    from serve_load import matmul_peak, model_sizes, useful_flop

    peak_before = matmul_peak()
    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    clock = Clock()
    instrument(predictor, clock)
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    requests = [Request(r.user, r.item) for r in records[:args.prompts * (args.batches + 1)]]
    lm = predictor.model.lm if hasattr(predictor.model, "lm") else predictor.model
    decoder, vocab = model_sizes(lm)
    useful = total = 0.0
    for k in range(args.batches + 1):
        batch = [predictor.prompt(r) for r in requests[k * args.prompts:(k + 1) * args.prompts]]
        if k == 1:  # the first batch warms up (packing, caches)
            clock.reset()
            useful = total = 0.0
        before = predictor.decoded_tokens
        start = time.perf_counter()
        predictor.generate(batch)
        total += time.perf_counter() - start
        prompt = sum(len(predictor.tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) for p in batch)
        generated = predictor.decoded_tokens - before
        useful += useful_flop(decoder, vocab, prompt, generated)
    n = args.batches
    # the best of a peak measured before and one after: this shared machine's speed wanders (300-430 GFLOP/s)
    after = matmul_peak()
    peak, precision = max(peak_before[0], after[0]), peak_before[1]
    parts = {name: clock.seconds[name] / n for name in (
        "prefill", "products in the prefill", "decoding forward", "products in decoding",
        "attention over the prompt cache", "sampler", "uniform draws")}
    products = clock.seconds["products in the prefill"] + clock.seconds["products in decoding"]
    parts["rest"] = total / n - parts["prefill"] - parts["decoding forward"] - parts["sampler"]
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "peak_gflop_s": peak, "peak_measurements_gflop_s": [peak_before[0], after[0]], "precision": precision,
        "threads": torch.get_num_threads(),
        "seconds_per_batch": total / n, "parts_seconds_per_batch": parts,
        "useful_gflop_per_batch": useful / n / 1e9, "product_gflop_per_batch": clock.product_flop / n / 1e9,
        "products_gflop_s": clock.product_flop / products / 1e9,
        "share_of_bound": useful / total / 1e9 / peak,
        "share_if_only_products": useful / products / 1e9 / peak,
    }
    print(f"{total / n:.2f} s a batch of {args.prompts} reasons ({precision}, {result['threads']} threads, peak "
          f"{peak:.0f} GFLOP/s):")
    for name, seconds in parts.items():
        print(f"  {name}: {seconds:.2f} s ({seconds / (total / n):.0%})")
    print(f"products: {result['product_gflop_per_batch']:.0f} GFLOP a batch ({result['useful_gflop_per_batch']:.0f} "
          f"useful, the rest padding) at {result['products_gflop_s']:.0f} GFLOP/s")
    print(f"share of the FLOP bound: {result['share_of_bound']:.0%}; with everything but the products free: "
          f"{result['share_if_only_products']:.0%}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
