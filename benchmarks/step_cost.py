"""What one decoding step costs at each row count, and the share of the FLOP bound the server could reach if every
step held all the rows its clients can give it.

Loads the run with its decoding settings (``--config``/``--set`` as for ``recreason serve``) and ``--prompts``
validation pairs (shuffled, seed 0). For each row count in ``--rows`` it prefills as many prompts as the rows make whole
requests of ``generate.candidates`` draws (one prompt below that; every draw a seeded sample, as all but one of a
request's draws are) and decodes
``--steps`` tokens for every row through ``recreason.generation.generate.greedy_decode``'s loop with no end token,
so no row leaves and every step holds exactly that many rows. Each part is timed as ``decode_anatomy.py`` times it
(the products, the attention over the shared prompt cache, the sampler; the rest of a step is norms, rotary
embeddings, residuals, the reason rules and bookkeeping, and at one row the attention too: a single draw keeps
the plain cache).

A step's useful FLOPs are ``serve_load.py``'s: 2 x (decoder weights + vocabulary projection) per row; the peak is its
``matmul_peak`` (the best of one reading before and one after). Prints, per row count, milliseconds a step, its
parts, and the share of the bound the step reaches; then a least-squares line ``step = fixed + per_row x rows``
against the ideal per-row cost (useful FLOPs over the peak). Last, the ceiling for a load of ``--clients`` requests
of ``generate.candidates`` draws: one whole batch's prefill (its time measured here, prompts sharing their header as
the server prefills them) plus every generated token in a step of ``clients x candidates`` rows, with the tokens a
reason takes measured on these prompts. No batching schedule can do better than that with these steps: it is the
share that better scheduling alone could reach. Run it alone: on 2 cores anything beside it skews every row.

Usage: python benchmarks/step_cost.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16
       --set generate.max_new_tokens=32 [--rows 1,4,16,64,128,192] [--steps 16]
Results: benchmarks/results/step_cost.json
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
ROWS = "1,2,4,8,12,24,48,96,144,192"


def layout(rows: int, prompts: int, candidates: int) -> tuple[int, int]:
    """(prompts, draws a prompt) giving ``rows`` decoding rows as requests of ``candidates`` draws give them: one
    prompt's draws up to ``candidates``, then whole requests, at most ``prompts`` of them."""
    if min(rows, prompts, candidates) < 1:
        raise ValueError("rows, prompts and candidates must be at least 1")
    draws = min(rows, candidates)
    if rows % draws or rows // draws > prompts:
        raise ValueError(f"{rows} rows are not whole requests of {candidates} draws from at most {prompts} prompts")
    return rows // draws, draws


def line_fit(xs, ys) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points (at least two distinct xs; else
    ``statistics.StatisticsError``, a ValueError)."""
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def full_rows_share(prefill_s: float, prompt_tokens: float, generated: float, rows: int, step_s: float,
                    decoder: int, vocab: int, peak: float) -> dict:
    """The share of the bound a reason reaches when its prefill costs ``prefill_s`` and each of its ``generated``
    tokens (every candidate's) is decoded in a step of ``rows`` rows costing ``step_s``: its useful FLOPs over
    that time, over ``peak`` (FLOP/s)."""
    from serve_load import useful_flop

    seconds = prefill_s + generated / rows * step_s
    useful = useful_flop(decoder, vocab, prompt_tokens, generated)
    return {"seconds_per_reason": seconds, "reasons_per_s": 1 / seconds, "gflop_per_reason": useful / 1e9,
            "share_of_bound": useful / seconds / peak}


def decode_rows(lm, tokenizer, encoded: list, prompts: list[str], cfg, draws: int, steps: int) -> list[list[int]]:
    """Decode ``steps`` tokens for each of ``draws`` seeded samples of every prompt (``encoded``: their token ids)
    in ``greedy_decode``'s loop, with the reason rules and no end token: no row leaves, so every step holds
    ``len(prompts) x draws`` rows. Returns the rows' tokens."""
    from recreason.generation import generate as g

    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
    # every row sampled, as all but one of a request's rows are (draws 1..n: seeded samples, no greedy one)
    seeds = [s for p in prompts for s in g.draw_seeds(cfg.seed, p, range(1, draws + 1))]
    sampler = g.SeededSampler(seeds, cfg.sample_temperature, cfg.sample_top_p)  # no end token: no row leaves
    likelihood = g.weighs_likelihood(cfg)  # the likelihood as the server has it
    decoded = g.greedy_decode(lm, batch, steps, eos_ids=[], processors=g.reason_processors(cfg, tokenizer) + [sampler],
                              draws=draws, scores=likelihood,
                              merge_draws=False)  # a row per draw: rows whose tokens agree would share one
    return decoded[0] if likelihood else decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "pairs prefilled (rows beyond them are more draws of each)")
    parser.add_argument("--rows", default=ROWS, help=f"row counts, comma-separated (default {ROWS})")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed at each row count")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight for the ceiling")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step_cost.json"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from decode_anatomy import Clock, instrument
    from recreason.config import load_config
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request
    from serve_load import matmul_peak, model_sizes

    peak_before = matmul_peak()
    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    cfg, tokenizer = predictor.gen_cfg, predictor.tokenizer
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
        layouts = {r: layout(r, args.prompts, cfg.candidates) for r in rows_list}
    except ValueError as exc:
        raise SystemExit(f"--rows: {exc}") from None
    lm = g.plain_causal_lm(predictor.model)
    if lm is None:
        raise SystemExit("this run's prompts are not plain token ids: its steps are transformers' generate")
    clock = Clock()
    instrument(predictor, clock)
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in records[:args.prompts]]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    decoder, vocab = model_sizes(lm)

    def decode(rows: int, steps: int) -> None:
        used, draws = layouts[rows]
        decode_rows(lm, tokenizer, encoded[:used], prompts[:used], cfg, draws, steps)

    decode(rows_list[0], 2)  # warm-up: packing, allocator
    per_rows = {}
    for rows in rows_list:
        clock.reset()
        start = time.perf_counter()
        decode(rows, args.steps)
        total = time.perf_counter() - start - clock.seconds["prefill"]
        step = total / args.steps
        parts = {"products": clock.seconds["products in decoding"] / args.steps,
                 "attention over the prompt cache": clock.seconds["attention over the prompt cache"] / args.steps,
                 "sampler": clock.seconds["sampler"] / args.steps}
        parts["rest"] = step - sum(parts.values())
        per_rows[rows] = {"prompts": layouts[rows][0], "draws": layouts[rows][1], "ms_per_step": step * 1e3,
                          "parts_ms": {k: v * 1e3 for k, v in parts.items()},
                          "useful_gflop_per_step": 2 * (decoder + vocab) * rows / 1e9}
        print(f"{rows:4d} rows: {step * 1e3:6.1f} ms a step (" + ", ".join(
            f"{k} {v * 1e3:.1f}" for k, v in parts.items()) + ")", flush=True)

    # one whole batch of the server: its prefill, and the tokens its reasons take (every candidate's)
    clock.reset()
    batch = [predictor.prompt(Request(r.user, r.item)) for r in records[:args.prompts]]
    before = predictor.decoded_tokens
    predictor.generate(batch)
    generated = (predictor.decoded_tokens - before) / len(batch)
    prefill_s = clock.seconds["prefill"] / len(batch)
    prompt_tokens = sum(len(ids) for ids in encoded) / len(encoded)

    after = matmul_peak()
    peak, precision = max(peak_before[0], after[0]) * 1e9, peak_before[1]
    for rows, r in per_rows.items():
        r["share_of_bound"] = r["useful_gflop_per_step"] * 1e9 / (r["ms_per_step"] / 1e3) / peak
        r["share_if_only_products"] = r["useful_gflop_per_step"] * 1e9 / (r["parts_ms"]["products"] / 1e3) / peak
    fixed, per_row = line_fit(list(per_rows), [r["ms_per_step"] for r in per_rows.values()])
    ideal = 2 * (decoder + vocab) / peak * 1e3
    full = args.clients * max(1, cfg.candidates)
    if full in per_rows:
        full_step = per_rows[full]["ms_per_step"] / 1e3
    else:
        full_step = (fixed + per_row * full) / 1e3
    ceiling = full_rows_share(prefill_s, prompt_tokens, generated, full, full_step, decoder, vocab, peak)
    ceiling.update({"rows": full, "step_ms": full_step * 1e3, "prefill_s_per_reason": prefill_s,
                    "prompt_tokens": prompt_tokens, "generated_tokens": generated,
                    "prefill_share_of_bound": 2 * decoder * prompt_tokens / prefill_s / peak})
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "peak_gflop_s": peak / 1e9, "peak_measurements_gflop_s": [peak_before[0], after[0]], "precision": precision,
        "threads": torch.get_num_threads(), "rows": per_rows,
        "fit": {"fixed_ms": fixed, "per_row_ms": per_row, "ideal_per_row_ms": ideal},
        "every_step_full": ceiling,
    }
    print(f"peak {peak / 1e9:.0f} GFLOP/s ({precision}); share of the bound a step reaches:")
    print("  " + ", ".join(f"{rows} rows {r['share_of_bound']:.0%}" for rows, r in per_rows.items()))
    print(f"step = {fixed:.1f} ms + {per_row:.3f} ms a row (the products alone at the peak: {ideal:.3f} ms a row)")
    print(f"every step full ({full} rows, {full_step * 1e3:.0f} ms), prefill {prefill_s:.3f} s a reason "
          f"({ceiling['prefill_share_of_bound']:.0%} of the bound), {generated:.0f} tokens a reason: "
          f"{ceiling['reasons_per_s']:.2f} reasons/s, {ceiling['share_of_bound']:.0%} of the bound")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
