"""Greedy decoding on CPU, step by step from transformers' generate to what recreason ships, side by side.

One run's model is loaded once; the same test prompts are decoded greedily in batches under five settings,
each adding one change to the one before:

1. baseline: transformers' ``generate`` (with the prompts' shared header prefilled once, as before), eager
   attention, ``F.linear``;
2. + own loop: ``recreason.generation.generate.greedy_decode`` (finished rows leave the batch, logits of the
   last position only);
3. + small products the other way round: ``recreason.models.registry.transposed_small_products``;
4. + grouped attention: ``recreason.models.registry.use_grouped_attention`` (what ``Predictor`` uses on CPU);
5. + shared prompt cache: each prompt's KV cache kept once for all of its rows
   (``recreason.models.registry.SharedPrefix``, ``greedy_decode(shared_prefix=True)``; shipped).

With ``--candidates K`` the same five settings also decode K candidates for each of the first
``--candidate-prompts`` prompts (``generate_candidates``: the greedy text and K - 1 seeded samples, one prefill
per prompt; from setting 2 on in the own loop, where a draw that has ended leaves the batch), in batches of
``--candidate-batch``.

``--precision`` is the weights' precision (default auto: bf16 where the CPU has native bf16 products, as
``Predictor`` ships; the small-products switch applies to fp32 only, so under bf16 setting 3 changes nothing).

The settings take turns for ``--rounds`` rounds (the best round of each is kept, so a slow moment of the
machine does not pick the winner). Prints reasons per second, the ratio to the baseline, and how many texts
equal the baseline's. Run it alone on the machine.

Usage: python benchmarks/greedy_loop.py --run runs/demo/run [--prompts 64 --batch-size 16 --rounds 2]
           [--candidates 32 --candidate-prompts 16 --candidate-batch 4] [--precision auto|fp32|bf16]
Results: benchmarks/results/greedy_loop.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("baseline: generate, eager, F.linear", "+ own loop", "+ small products the other way round",
            "+ grouped attention", "+ shared prompt cache (shipped)")


def apply(lm, setting: int) -> None:
    """Put ``lm`` in the state of ``SETTINGS[setting]`` (each setting includes the changes before it)."""
    import torch

    from recreason.models.registry import transposed_small_products, use_grouped_attention

    for module in lm.modules():  # undo the product switch, then redo it where asked
        if isinstance(module, torch.nn.Linear) and getattr(module, "_recreason_small_rows", False):
            del module.forward
            module._recreason_small_rows = False
    if setting >= 2:
        transposed_small_products(lm)
    if setting >= 3:
        use_grouped_attention(lm)
    else:
        lm.set_attn_implementation("eager")


def main() -> None:
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation.generate import generate_texts
    from recreason.inference import Predictor, Request

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=0, help="also time K-candidate decoding (0: no)")
    parser.add_argument("--candidate-prompts", type=int, default=16)
    parser.add_argument("--candidate-batch", type=int, default=4)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/greedy_loop.json"))
    args = parser.parse_args()

    predictor = Predictor(args.run, GenerateConfig(precision=args.precision, max_new_tokens=args.max_new_tokens,
                                                   batch_size=args.batch_size))
    if not str(predictor.device).startswith("cpu"):
        raise SystemExit("this benchmark measures CPU decoding; run it without a GPU")
    test = predictor.dataset.subset(predictor.run.split_seed, "test")
    random.Random(0).shuffle(test)
    prompted = [predictor.prompt(Request(r.user, r.item)) for r in test[: args.prompts]]
    prompts = [p.prompt for p in prompted]
    cfg = predictor.generation_config(None)
    model, tok, lm = predictor.model, predictor.tokenizer, predictor.model.lm
    best: dict[int, float] = {}
    texts: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        for setting in range(len(SETTINGS)):
            apply(lm, setting)
            generate_texts(model, tok, prompts[: args.batch_size], cfg, progress=False, own_loop=setting >= 1,
                           shared_prefix=setting >= 4)  # warm
            start = time.perf_counter()
            texts[setting] = generate_texts(model, tok, prompts, cfg, progress=False, own_loop=setting >= 1,
                                            shared_prefix=setting >= 4)
            seconds = time.perf_counter() - start
            best[setting] = min(best.get(setting, seconds), seconds)
            print(f"{SETTINGS[setting]}: {len(prompts) / seconds:.2f} reasons/s", flush=True)
    rows = {}
    for setting, name in enumerate(SETTINGS):
        rate = len(prompts) / best[setting]
        rows[name] = {"reasons_per_s": rate, "ratio_to_baseline": best[0] / best[setting],
                      "texts_equal_to_baseline": sum(a == b for a, b in zip(texts[setting], texts[0]))}
        print(f"{name:40s} {rate:5.2f} reasons/s  {best[0] / best[setting]:.2f}x  "
              f"{rows[name]['texts_equal_to_baseline']}/{len(prompts)} texts as the baseline's")
    candidates = time_candidates(args, predictor, prompts[: args.candidate_prompts]) if args.candidates > 1 else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(),
                                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                          "dtype": predictor.dtype,
                                          "settings": rows, "candidates": candidates}, indent=2) + "\n")


def time_candidates(args, predictor, prompts) -> dict:
    """Seconds per reason of K-candidate decoding under each setting, and how many prompts got the baseline's
    candidate texts."""
    from dataclasses import replace

    from recreason.generation.generate import generate_candidates

    cfg = replace(predictor.generation_config(None), candidates=args.candidates, batch_size=args.candidate_batch)
    lm, best, texts = predictor.model.lm, {}, {}
    for _ in range(args.rounds):
        for setting in range(len(SETTINGS)):
            apply(lm, setting)
            start = time.perf_counter()
            out = generate_candidates(predictor.model, predictor.tokenizer, prompts, cfg, progress=False,
                                      own_loop=setting >= 1, shared_prefix=setting >= 4)
            seconds = (time.perf_counter() - start) / len(prompts)
            best[setting] = min(best.get(setting, seconds), seconds)
            texts[setting] = [[c.text for c in row] for row in out]
            print(f"{args.candidates} candidates, {SETTINGS[setting]}: {seconds:.2f} s a reason", flush=True)
    rows = {}
    for setting, name in enumerate(SETTINGS):
        drawn = [text for row in texts[setting] for text in row]
        rows[name] = {"s_per_reason": best[setting], "ratio_to_baseline": best[0] / best[setting],
                      "prompts_with_baseline_candidates": sum(a == b for a, b in zip(texts[setting], texts[0])),
                      "candidates_as_baseline": sum(text in set(base) for row, base in zip(texts[setting], texts[0])
                                                    for text in row),
                      "candidates": len(drawn)}
        print(f"{args.candidates} candidates, {name:40s} {best[setting]:5.2f} s a reason  "
              f"{best[0] / best[setting]:.2f}x  {rows[name]['prompts_with_baseline_candidates']}/{len(prompts)} "
              f"prompts with the baseline's candidates ({rows[name]['candidates_as_baseline']}/{len(drawn)} texts "
              "among the baseline's)")
    return {"candidates": args.candidates, "prompts": len(prompts), "settings": rows}


if __name__ == "__main__":
    main()
