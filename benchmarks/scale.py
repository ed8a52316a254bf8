"""Reasons for every user past one machine: the batch job's engines side by side, and stored against live serving.

    python benchmarks/scale.py --run runs/demo/run [--pairs 300] [--seconds 30]

1. The same test pairs explained by the local engine and by the Ray engine with 1 and 2 workers (a local Ray
   instance on this machine; each worker holds the model once and gets its share of the cores), greedy, batches of
   50, at most 24 new tokens: reasons per second of decoding (model loading excluded), and the rows compared; and
   the local engine choosing among 32 candidates (full.yaml's count, 4 prompts a batch) on a few pairs.
2. `benchmarks/serve_load.py --precomputed`: one server run answering stored pairs (`serve --reasons`) and then
   live pairs, at 16 clients: p95 latency of each.

Writes benchmarks/results/scale.json: {"local": {"reasons_per_s": ..}, "ray_1_worker": {..}, "ray_2_workers": {..},
"precomputed_p95_ms": .., "live_p95_ms": .., ...}. Run it alone: the engines compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--candidate-pairs", type=int, default=16, help="pairs decoded with 32 candidates each")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30, help="each serving phase (stored, then live)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.json"))
    parser.add_argument("--only-serving", action="store_true",
                        help="measure part 2 only and replace its figures in --out, keeping the engines' (after a "
                             "change to serving alone)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs
    from recreason.jobs.cluster import explain_pairs_ray, read_shards, start_ray
    from recreason.models.registry import resolve_precision
    from serve_load import pairs_for

    gen = GenerateConfig(batch_size=50, max_new_tokens=args.max_new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="recreason-scale-"))
    pairs = pairs_for(args.run, args.pairs)
    pairs_file = tmp / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"user_id": u, "item_id": i}) + "\n" for u, i in pairs))
    result: dict = {"pairs": len(pairs), "cores": os.cpu_count(), "cpu": torch.backends.cpu.get_cpu_capability(),
                    "precision": resolve_precision(gen.precision, "cpu"), "max_new_tokens": args.max_new_tokens}
    if args.only_serving:
        result = {**json.loads(Path(args.out).read_text()), **serving(args, tmp)}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return

    local = explain_pairs(Predictor(args.run, gen), pairs_file, tmp / "local.jsonl", args.chunk_size)
    result["local"] = {"reasons_per_s": local["reasons_per_second"], "seconds": local["seconds"]}
    print("local", result["local"], flush=True)
    expected = [json.loads(x) for x in (tmp / "local.jsonl").read_text().splitlines()]
    # the shipped candidate count (configs/full.yaml: 32, 4 prompts a batch) on the first --candidate-pairs pairs
    few = tmp / "few.jsonl"
    few.write_text("".join(pairs_file.read_text().splitlines(True)[:args.candidate_pairs]))
    choosing = Predictor(args.run, GenerateConfig(batch_size=4, candidates=32, max_new_tokens=args.max_new_tokens))
    choosing.generic_table(choosing.gen_cfg)  # measured once per run and kept; not part of the per-reason cost
    chosen = explain_pairs(choosing, few, tmp / "chosen.jsonl", args.chunk_size)
    result["local_32_candidates"] = {"reasons_per_s": chosen["reasons_per_second"], "seconds": chosen["seconds"],
                                     "pairs": args.candidate_pairs}
    print("local, 32 candidates", result["local_32_candidates"], flush=True)
    start_ray(None, 2)
    for workers, name in ((1, "ray_1_worker"), (2, "ray_2_workers")):
        stats = explain_pairs_ray(args.run, gen, pairs_file, tmp / name, args.chunk_size, workers=workers)
        result[name] = {"reasons_per_s": stats["reasons_per_second"], "seconds": stats["seconds"],
                        "workers": workers, "same_rows_as_local": read_shards(tmp / name) == expected}
        print(name, result[name], flush=True)
    import ray

    ray.shutdown()
    time.sleep(2)
    result.update(serving(args, tmp))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def serving(args, tmp: Path) -> dict:
    """Part 2: one server run, stored pairs then live ones."""
    from serve_load import pairs_for, precomputed_and_live

    load = argparse.Namespace(run=args.run, clients=args.clients, seconds=args.seconds, max_wait_ms=50,
                              max_new_tokens=args.max_new_tokens, tmp=str(tmp / "serve"), precomputed=args.pairs)
    served = precomputed_and_live(load, pairs_for(args.run, 2000))
    result = {"precomputed_p95_ms": served["precomputed"]["p95_s"] * 1000, "live_p95_ms": served["live"]["p95_s"] * 1000,
              "serving": served}
    print(f"stored: p95 {result['precomputed_p95_ms']:.1f} ms, {served['precomputed']['errors']} errors; live: p95 "
          f"{result['live_p95_ms']:.0f} ms, {served['live']['reasons_per_s']:.2f} reasons/s", flush=True)
    return result


if __name__ == "__main__":
    main()
