"""What computing a batch's shared prompt header once buys greedy decoding, side by side with computing it per row.

    python benchmarks/shared_header.py --run runs/demo/run [--prompts 64 --batch-size 16 --repeats 2]

Three workloads on the same run, each timed with the header shared (recreason's default,
``generation.generate.prefill``) and with sharing off (the baseline: every row's prompt prefilled whole, as before),
alternating, the best of ``--repeats`` kept; the texts of both must be identical:

* ``test pairs``: batches of different users' test pairs (the header is the chat template's system turn);
* ``one user's top 10``: the ten items of one user in one batch, as ``recommend`` explains them (the header also
  holds the user's part of the prompt);
* both again with 3 evidence sentences in the prompt (``prompt.evidence: 3``, configs/full.yaml's prompt), longer
  prompts whose own part is larger.

Results: benchmarks/results/shared_header.json. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(predictor, prompts, cfg, shared: bool) -> tuple[float, list[str]]:
    from recreason.generation import generate as gen_mod

    saved = gen_mod.MIN_SHARED_HEADER
    gen_mod.MIN_SHARED_HEADER = saved if shared else 10**9
    try:
        start = time.perf_counter()
        texts = gen_mod.generate_texts(predictor.model, predictor.tokenizer, prompts, cfg, progress=False)
        return time.perf_counter() - start, texts
    finally:
        gen_mod.MIN_SHARED_HEADER = saved


def workloads(predictor, n: int, evidence: int) -> dict[str, list[str]]:
    from recreason.prompts.discrete import DiscretePrompter, render

    train = predictor.dataset.subset(predictor.run.split_seed, "train")
    prompter = DiscretePrompter(train, dataclasses.replace(predictor.run.prompt_config, evidence=evidence))
    test = predictor.dataset.subset(predictor.run.split_seed, "test")
    pairs = random.Random(0).sample(test, n)
    users = {}
    for r in train:
        users.setdefault(r.user, set()).add(r.item)
    user = max(users, key=lambda u: len(users[u]))
    items = sorted({r.item for r in train} - users[user])[:10]
    tok = predictor.tokenizer
    one_user = [render(tok, prompter.messages(user, item)) for item in items] * max(1, n // 10)
    return {"test pairs": [render(tok, prompter.for_record(r)) for r in pairs], "one user's top 10": one_user}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/shared_header.json"))
    args = parser.parse_args()
    import torch

    from recreason.config import GenerateConfig
    from recreason.generation.generate import shared_header
    from recreason.inference import Predictor

    cfg = GenerateConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    predictor = Predictor(args.run, cfg)
    result = {"run": args.run, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(), "workloads": {}}
    for evidence in (predictor.run.prompt_config.evidence, 3):
        for name, prompts in workloads(predictor, args.prompts, evidence).items():
            tok = predictor.tokenizer
            tok.padding_side = "left"
            first = tok.pad({"input_ids": [tok(p, add_special_tokens=False)["input_ids"]
                                           for p in prompts[:args.batch_size]]}, return_tensors="pt")
            best = {True: float("inf"), False: float("inf")}
            texts = {}
            for _ in range(args.repeats):
                for shared in (False, True):
                    seconds, texts[shared] = timed(predictor, prompts, cfg, shared)
                    best[shared] = min(best[shared], seconds)
            label = f"{name}, evidence {evidence}"
            result["workloads"][label] = {
                "prompts": len(prompts), "prompt_tokens": float(first["attention_mask"].sum(1).float().mean()),
                "header_tokens": shared_header(first), "seconds_shared": best[True], "seconds_each": best[False],
                "speedup": best[False] / best[True], "same_texts": texts[True] == texts[False]}
            r = result["workloads"][label]
            print(f"{label}: header {r['header_tokens']} of {r['prompt_tokens']:.0f} prompt tokens; "
                  f"{r['seconds_each']:.2f} s -> {r['seconds_shared']:.2f} s ({r['speedup']:.2f}x), "
                  f"same texts: {r['same_texts']}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
