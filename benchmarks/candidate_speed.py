"""Decoding several candidates per reason: one prefill per prompt against one prefill per draw, side by side.

``generate_candidates`` decodes the greedy text and the seeded samples of a batch together. The baseline
(``shared_prefill=False``, what recreason did before) repeats every prompt once per draw before the model sees
it, so with 16 draws each prompt's tokens go through the model 16 times; ours runs the prompt once and copies
its KV cache to the draws (``recreason.generation.generate.prefill``). This script loads a run once and decodes
the same test prompts both ways, alternating, with the run's decoding settings (``--config`` files as for
``recreason evaluate``: configs/full.yaml gives 32 candidates in batches of 4 prompts; the recorded result is for
its 16 in batches of 8, configs/experiments/candidates16.yaml now), and prints seconds per
reason, the ratio, and how many prompts got exactly the same candidate texts both ways (bf16 matrix products
may round differently for a batch of 8 rows than for one of 128, so a sample can part ways at a near tie).
``--baseline-rev REV`` makes the baseline the whole generation module as it was at a git revision (e.g. the
commit before the shared prefill and the top-k nucleus), to measure everything that changed since.

Usage: python benchmarks/candidate_speed.py --run RUN --config configs/demo.yaml --config configs/full.yaml
       [--prompts 32 --repeats 2 --baseline-rev REV]
Results: benchmarks/results/candidate_speed.json. Run it alone: on 2 cores anything beside it skews both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str):
    """recreason.generation.generate as it was at git revision ``rev``, imported under another name."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{rev}:src/recreason/generation/generate.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "generate_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generate_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from recreason.config import load_config
    from recreason.generation.generate import generate_candidates
    from recreason.inference import Predictor, Request

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--config", action="append", default=[], help="config files, layered as for evaluate")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, as for recreason (e.g. --set generate.candidates=16)")
    parser.add_argument("--prompts", type=int, default=32, help="test prompts decoded each way")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of each way, alternating")
    parser.add_argument("--baseline-rev", default=None,
                        help="baseline: src/recreason/generation/generate.py at this git revision (default: today's "
                             "module with shared_prefill=False)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/candidate_speed.json"))
    args = parser.parse_args()
    baseline = module_at(args.baseline_rev) if args.baseline_rev else None

    gen = load_config(args.config, args.set)["generate"]
    if gen.candidates < 2:
        parser.error("the settings decode one candidate per reason; give a config with generate.candidates > 1")
    predictor = Predictor(args.run, gen)
    records = predictor.dataset.subset(predictor.run.split_seed, "test")[: args.prompts]
    prompts = [predictor.prompt(Request(r.user, r.item, record=r)).prompt for r in records]
    tokens = [len(predictor.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    def decode(shared: bool):
        kwargs = dict(progress=False, users=[r.user for r in records], items=[r.item for r in records])
        if not shared and baseline is not None:
            return baseline.generate_candidates(predictor.model, predictor.tokenizer, prompts, gen, **kwargs)
        return generate_candidates(predictor.model, predictor.tokenizer, prompts, gen, shared_prefill=shared, **kwargs)

    decode(True)  # warm-up: first-call allocations, oneDNN kernel choice
    base_name = f"baseline (generate.py at {args.baseline_rev})" if baseline else "baseline (prefill per draw)"
    ours_name = "ours (prefill per prompt)"
    seconds: dict[str, list[float]] = {base_name: [], ours_name: []}
    outputs = {}
    for _ in range(args.repeats):
        for name, shared in ((base_name, False), (ours_name, True)):
            start = time.perf_counter()
            outputs[name] = decode(shared)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s for {len(prompts)} reasons", flush=True)
    base, ours = (outputs[k] for k in seconds)
    texts = lambda cands: [c.text for c in cands]  # noqa: E731
    same = sum(texts(a) == texts(b) for a, b in zip(base, ours))
    same_greedy = sum(a[0].text == b[0].text for a, b in zip(base, ours))
    best = {k: min(v) for k, v in seconds.items()}
    ratio = best[base_name] / best[ours_name]
    result = {
        "run": args.run, "config": args.config, "baseline_rev": args.baseline_rev, "prompts": len(prompts),
        "candidates": gen.candidates,
        "batch_size": gen.batch_size, "precision": gen.precision, "max_new_tokens": gen.max_new_tokens,
        "prompt_tokens_mean": sum(tokens) / len(tokens), "prompt_tokens_max": max(tokens),
        "threads": os.cpu_count(), "seconds": seconds,
        "seconds_per_reason": {k: v / len(prompts) for k, v in best.items()}, "speedup": ratio,
        "same_candidates": same, "same_greedy": same_greedy,
    }
    print(f"\n{gen.candidates} candidates, batches of {gen.batch_size}, prompts of {result['prompt_tokens_mean']:.0f} "
          f"tokens on average: {result['seconds_per_reason'][base_name]:.2f} -> "
          f"{result['seconds_per_reason'][ours_name]:.2f} s per reason ({ratio:.2f}x faster); "
          f"identical candidates for {same} of {len(prompts)} prompts, identical greedy text for {same_greedy}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
