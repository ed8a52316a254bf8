"""Whole batches against the running batch (continuous batching) for closed-loop clients, in one process.

``serve_load.py`` measures both through the HTTP server; this takes the server away, so that only the decoding
schedule differs. ``--clients`` simulated clients each keep one request in flight: a request is a validation pair
(shuffled, seed 0) whose candidates are drawn and chosen among as the server does, and a client sends its next pair
as soon as its reason is written, until ``--pairs`` pairs are done.

- ``whole``: ``Predictor.generate`` on ``--clients`` pairs at a time (the server's whole batches at that load: every
  client waits for the batch).
- ``continuous`` at each ``--admit-at``: the server's ``CandidateDecoder`` (``CandidateDecoder.for_config``), each
  finished request's client adding its next pair at once; waiting requests join once ``admit_at`` of them can.

Prints reasons/s, decoding steps, mean rows a step and the seconds spent admitting (prefilling and joining) for
each, after one warm-up batch. The two ways alternate over ``--rounds``. Run it alone: on 2 cores anything beside
it skews both.

Usage: python benchmarks/closed_loop.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16
       --set generate.max_new_tokens=32 [--pairs 80] [--admit-at 1,16] [--rounds 2]
Results: benchmarks/results/closed_loop.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from runargs import add_run_arguments

ROOT = Path(__file__).resolve().parents[1]


def continuous(predictor, prompted: list, clients: int, admit_at: int) -> dict:
    """``prompted`` requests through one ``CandidateDecoder`` driven by ``clients`` closed-loop clients: reasons/s,
    steps, mean rows a step, seconds admitting, and the chosen texts in request order."""
    from recreason.generation import generate as g
    from recreason.generation.engine import CandidateDecoder

    cfg, tokenizer = predictor.gen_cfg, predictor.tokenizer
    decoder = CandidateDecoder.for_config(g.plain_causal_lm(predictor.model), tokenizer, cfg, clients, admit_at)
    texts: list[str | None] = [None] * len(prompted)
    sent = 0

    def send() -> None:
        nonlocal sent
        k, sent = sent, sent + 1
        ids = tokenizer(prompted[k].prompt, add_special_tokens=False)["input_ids"]
        decoder.add(ids, cfg.max_new_tokens, g.draw_seeds(cfg.seed, prompted[k].prompt, range(cfg.candidates)),
                    lambda tokens, logprobs, k=k: done(k, tokens, logprobs))

    def done(k: int, tokens, logprobs) -> None:
        candidates = g.candidate_list(tokenizer, tokens, logprobs, range(cfg.candidates))
        texts[k] = predictor.choose_among([prompted[k]], [candidates], cfg)[0]
        if sent < len(prompted):
            send()

    admit = decoder._admit
    admitting = 0.0

    def timed_admit() -> None:
        nonlocal admitting
        start = time.perf_counter()
        admit()
        admitting += time.perf_counter() - start
    decoder._admit = timed_admit
    for _ in range(min(clients, len(prompted))):
        send()
    steps = rows = 0
    start = time.perf_counter()
    while decoder.busy:
        rows += decoder.step()
        steps += 1
    seconds = time.perf_counter() - start
    return {"reasons_per_s": len(prompted) / seconds, "seconds": seconds, "steps": steps,
            "rows_per_step": rows / max(steps, 1), "admitting_s": admitting, "texts": texts}


def whole(predictor, prompted: list, clients: int) -> dict:
    """``prompted`` requests in whole batches of ``clients``: reasons/s, decoding steps, mean rows a step."""
    from recreason.generation.generate import plain_causal_lm

    lm = plain_causal_lm(predictor.model)
    rows: list[int] = []
    hook = lm.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    try:
        start = time.perf_counter()
        texts = [t for k in range(0, len(prompted), clients) for t in predictor.generate(prompted[k:k + clients])]
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return {"reasons_per_s": len(prompted) / seconds, "seconds": seconds, "steps": len(rows),
            "rows_per_step": sum(rows) / max(len(rows), 1), "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "closed-loop clients (requests in flight)")
    parser.add_argument("--pairs", type=int, default=80, help="validation pairs served in each measurement")
    parser.add_argument("--admit-at", default="1,16", help="the running batch's admit_at values, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="times each way is measured, alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/closed_loop.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.config import load_config
    from recreason.generation.generate import plain_causal_lm
    from recreason.inference import Predictor, Request

    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    if plain_causal_lm(predictor.model) is None or predictor.gen_cfg.candidates < 2:
        raise SystemExit("the running batch of candidates needs a plain-prompt model and generate.candidates > 1")
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    if len(records) < args.pairs + args.prompts:
        raise SystemExit(f"--pairs {args.pairs}: the validation split has {len(records)} records")
    prompted = [predictor.prompt(Request(r.user, r.item)) for r in records[:args.pairs + args.prompts]]
    warm, prompted = prompted[:args.prompts], prompted[args.prompts:]
    predictor.generate(warm)  # packing, the generic-sentence table, allocator
    ways = ["whole"] + [f"continuous, admit_at {a}" for a in args.admit_at.split(",")]
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in ways if round_ % 2 == 0 else ways[::-1]:
            if way == "whole":
                got = whole(predictor, prompted, args.prompts)
            else:
                got = continuous(predictor, prompted, args.prompts, int(way.rsplit(" ", 1)[1]))
            got.pop("texts")
            runs[way].append(got)
            print(f"{way}: {got['reasons_per_s']:.2f} reasons/s, {got['steps']} steps of "
                  f"{got['rows_per_step']:.0f} rows" + (f", {got['admitting_s']:.1f} s admitting" if
                                                        "admitting_s" in got else ""), flush=True)
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "threads": torch.get_num_threads(),
              "runs": runs,
              "ratio_to_whole": {way: [r["reasons_per_s"] / w["reasons_per_s"] for r, w in zip(runs[way], runs["whole"])]
                                 for way in ways[1:]}}
    for way, ratios in result["ratio_to_whole"].items():
        print(f"{way} / whole: " + ", ".join(f"{r:.2f}x" for r in ratios))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
