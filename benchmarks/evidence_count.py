"""How many evidence sentences to quote in the prompt, chosen on the validation split (issue 10).

    python benchmarks/evidence_count.py --data runs/demo/data [--counts 1 3 5] [--steps 104]

For each count N, trains the full configuration (configs/demo.yaml + configs/full.yaml with
``prompt.evidence = N``) on split seed 1 for the same short schedule (``--steps`` optimizer steps, warm-up and
linear decay within them, the same seed and batch order) and records the validation loss at its end: the loss
of the reference reasons given each prompt, on the validation records the trainer evaluates (never test).
A short schedule ranks the counts at a fraction of a full training's cost; the count with the lowest loss is
the one to keep in configs/full.yaml. Writes benchmarks/results/quality/evidence_count.{json,md}; the probe
runs go to RUNS/evidence-N (``--runs``, default runs/evidence) and are reused when they are complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
CONFIGS = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "full.yaml"]


def probe(data: Path, out: Path, count: int, steps: int, max_prompt_tokens: int) -> dict:
    """Train one short run with ``count`` evidence sentences; its summary (RUN/summary.json)."""
    from recreason.config import load_config, to_dict
    from recreason.rundir import RunPaths
    from recreason.training.trainer import Trainer

    if RunPaths(out).summary.exists():
        return json.loads(RunPaths(out).summary.read_text())
    config = load_config(CONFIGS, [f"prompt.evidence={count}", f"train.max_steps={steps}",
                                   f"train.eval_every={steps}", "train.snapshot_steps=[]",
                                   f"train.max_prompt_tokens={max_prompt_tokens}"])
    return Trainer(data, out, config["train"], config["prompt"], to_dict(config), progress=True).fit(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/demo/data", help="dataset prepared by `recreason prepare`")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--steps", type=int, default=104, help="optimizer steps of each probe (104 = a quarter epoch)")
    parser.add_argument("--max-prompt-tokens", type=int, default=320,
                        help="longer than full.yaml's 256, so the largest count is never refused")
    parser.add_argument("--runs", default="runs/evidence", help="where the probe runs are kept")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))

    rows = []
    for count in args.counts:
        summary = probe(Path(args.data), Path(args.runs) / f"evidence-{count}", count, args.steps,
                        args.max_prompt_tokens)
        rows.append({"evidence": count, "steps": summary["steps"], "validation_loss": summary["best_validation_loss"],
                     "validation_records": summary["validation_examples"], "train_seconds": summary["wall_seconds"],
                     "tokens_per_second": summary["tokens_per_second"]})
        print(rows[-1], flush=True)
    best = min(rows, key=lambda r: r["validation_loss"])
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"data": args.data, "split_seed": 1, "steps": args.steps, "configs": [str(c.relative_to(ROOT)) for c in CONFIGS],
              "rows": rows, "best": best["evidence"]}
    (OUT / "evidence_count.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| evidence sentences | validation loss | train s | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['evidence']}{' (lowest)' if r is best else ''} | {r['validation_loss']:.4f} | "
              f"{r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} |" for r in rows]
    (OUT / "evidence_count.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
