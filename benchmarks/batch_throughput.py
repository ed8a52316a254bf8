"""The batch job's throughput next to the server's (issue 12).

    python benchmarks/batch_throughput.py --run runs/demo/run

Writes every test pair of the run's split to a pairs file, runs `recreason explain`'s library function on it
(greedy decoding, batches of 50, at most 24 new tokens as in the server benchmark) and prints reasons/s beside the server's reasons/s
at 16 clients from benchmarks/results/serve_load.json (measured by benchmarks/serve_load.py on this machine).
Writes benchmarks/results/batch_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo/run")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=24, help="as in the server benchmark (default 24)")
    args = parser.parse_args()
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs

    predictor = Predictor(args.run, GenerateConfig(batch_size=50, max_new_tokens=args.max_new_tokens))
    records = predictor.dataset.subset(predictor.run.split_seed, "test")
    folder = Path(tempfile.mkdtemp())
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": r.user, "item_id": r.item}) + "\n" for r in records))
    stats = explain_pairs(predictor, pairs, folder / "reasons.jsonl", args.chunk_size)
    server = json.loads((ROOT / "benchmarks" / "results" / "serve_load.json").read_text())
    served = server.get("server", server).get("reasons_per_s") if isinstance(server, dict) else None
    result = {"pairs": len(records), "batch_reasons_per_s": stats["reasons_per_second"], "seconds": stats["seconds"],
              "server_reasons_per_s_16_clients": served, "ratio": stats["reasons_per_second"] / served if served else None}
    (ROOT / "benchmarks" / "results" / "batch_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
