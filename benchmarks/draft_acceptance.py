"""How many decoding steps drafted tokens could save: the ceiling of speculative decoding for served candidates.

Every decoding step of a batch costs a fixed part (about 41 ms on 2 cores, ``benchmarks/step_cost.py``) however few
rows it holds, and a batch runs until its longest draw ends. Checking several drafted tokens of a row in one step
takes fewer steps where the drafts are right. With the counter random stream (``generate.sample_stream: counter``)
a draw's noise at a step does not depend on the steps before it, so a checked draft gives exactly the tokens that
decoding one at a time gives: a drafted token is accepted where it is the token the draw writes. Nothing here
decodes speculatively; this measures what the drafts would be worth, on the tokens the draws really write.

Loads the run with its decoding settings (``--config``/``--set`` as for ``recreason serve``), decodes ``--prompts``
validation pairs (shuffled, seed 0) in batches of ``generate.batch_size`` as the server does (``greedy_decode`` with
the reason rules and the seeded sampler), and replays each draw's tokens against two drafters proposing ``k``
tokens a step:

- ``prompt``: prompt lookup (the continuation of the latest earlier occurrence of the last 2 tokens, else of the
  last one, in the prompt and the draw's tokens so far);
- ``others``: the continuation that the other prompts' draws wrote most often after the last 2 tokens (a table of
  every other prompt's draws: the reasons are formulaic);

and prints, for each, the steps a draw would take (a step checks the drafts and writes one token more), the steps
the batches would take (each as long as its longest draw), and their ratios to decoding one token a step.

Usage: python benchmarks/draft_acceptance.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16
       --set generate.max_new_tokens=32 [--prompts 128] [--draft 2 4]
Results: benchmarks/results/draft_acceptance.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
from pathlib import Path

from runargs import add_run_arguments

ROOT = Path(__file__).resolve().parents[1]


def prompt_lookup(context: list[int], k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of ``context``'s last 2 tokens (else its
    last one) in ``context``."""
    for n in (2, 1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def others_table(draws: dict[int, list[list[int]]]) -> dict:
    """(prompt, 2 tokens) -> Counter of the next token, from every prompt's draws, per prompt, so that a prompt's
    own draws can be left out."""
    table: dict = collections.defaultdict(collections.Counter)
    for prompt, tokens in draws.items():
        for seq in tokens:
            for i in range(2, len(seq)):
                table[prompt, tuple(seq[i - 2:i])][seq[i]] += 1
    return table


def others_draft(context: list[int], k: int, prompt: int, table: dict, prompts: list[int]) -> list[int]:
    """Up to ``k`` tokens, each the one the other prompts' draws wrote most often after the two before it."""
    out, seq = [], list(context)
    for _ in range(k):
        if len(seq) < 2:
            break
        counts = collections.Counter()
        for other in prompts:
            if other != prompt:
                counts.update(table.get((other, tuple(seq[-2:])), {}))
        if not counts:
            break
        token = min(counts, key=lambda t: (-counts[t], t))
        out.append(token)
        seq.append(token)
    return out


def steps_with_drafts(prompt_ids: list[int], tokens: list[int], k: int, draft) -> int:
    """The steps a draw writing ``tokens`` would take if each step checked ``draft(context, k)`` and wrote the
    accepted tokens and one more."""
    steps, i = 0, 0
    while i < len(tokens):
        proposal = draft(prompt_ids + tokens[:i], k)
        accepted = 0
        while accepted < len(proposal) and i + accepted < len(tokens) - 1 and \
                proposal[accepted] == tokens[i + accepted]:
            accepted += 1
        i += accepted + 1
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "validation pairs decoded (default 16)")
    parser.add_argument("--draft", type=int, nargs="+", default=[2, 4], help="tokens drafted a step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/draft_acceptance.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from recreason.config import load_config
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request

    predictor = Predictor(args.run, load_config(args.config or None, args.set)["generate"])
    cfg, tok = predictor.gen_cfg, predictor.tokenizer
    lm = g.plain_causal_lm(predictor.model)
    if lm is None or cfg.candidates < 2:
        raise SystemExit("needs a plain-prompt run choosing among several candidates (generate.candidates > 1)")
    records = predictor.dataset.subset(predictor.run.split_seed, "validation")
    random.Random(0).shuffle(records)
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in records[:args.prompts]]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n, eos = cfg.candidates, [tok.eos_token_id]
    tok.padding_side = "left"
    draws: dict[int, list[list[int]]] = {}
    batches = [list(range(s, min(s + cfg.batch_size, len(ids)))) for s in range(0, len(ids), cfg.batch_size)]
    for batch_rows in batches:
        batch = tok.pad({"input_ids": [ids[i] for i in batch_rows]}, return_tensors="pt")
        seeds = [s for i in batch_rows for s in g.draw_seeds(cfg.seed, prompts[i], range(n))]
        sampler = g.SeededSampler(seeds, cfg.sample_temperature, cfg.sample_top_p, tok.eos_token_id, cfg.sample_stream)
        with torch.no_grad():
            tokens = g.greedy_decode(lm, batch, cfg.max_new_tokens, eos, g.reason_processors(cfg, tok) + [sampler],
                                     draws=n)
        for k, i in enumerate(batch_rows):
            draws[i] = tokens[k * n:(k + 1) * n]
    table = others_table(draws)
    every = list(draws)
    one_at_a_time = {i: [len(t) for t in draws[i]] for i in every}
    result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "candidates": n,
              "sample_stream": cfg.sample_stream, "draws": sum(len(v) for v in draws.values()),
              "tokens_per_draw": statistics.mean(x for v in one_at_a_time.values() for x in v),
              "batch_steps": sum(max(x for i in b for x in one_at_a_time[i]) for b in batches), "drafters": {}}
    print(f"{result['draws']} draws, {result['tokens_per_draw']:.1f} tokens a draw; "
          f"{result['batch_steps']} steps over {len(batches)} batches one token a step")
    for name in ("prompt", "others"):
        for k in args.draft:
            def draft(context, k, i=None):
                if name == "prompt":
                    return prompt_lookup(context, k)
                return others_draft(context[len(ids[i]):], k, i, table, every)
            steps = {i: [steps_with_drafts(ids[i], t, k, lambda c, kk, i=i: draft(c, kk, i)) for t in draws[i]]
                     for i in every}
            draw_steps = sum(x for v in steps.values() for x in v)
            batch_steps = sum(max(x for i in b for x in steps[i]) for b in batches)
            row = {"draw_steps_ratio": draw_steps / sum(x for v in one_at_a_time.values() for x in v),
                   "batch_steps": batch_steps, "batch_steps_ratio": batch_steps / result["batch_steps"]}
            result["drafters"][f"{name}, {k} a step"] = row
            print(f"{name}, {k} drafted a step: draws take {row['draw_steps_ratio']:.2f}x the steps, batches "
                  f"{batch_steps} steps ({row['batch_steps_ratio']:.2f}x)", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
