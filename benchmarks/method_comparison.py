"""Fine-tuning methods side by side on one split with one step budget.

Each experiment is a config file in configs/experiments/methods/ holding only its overrides; all share
configs/demo.yaml and configs/experiments/methods/budget.yaml. For every method: train, then score the
fine-tuned model alone on the first `--records` test records.

Usage: python benchmarks/method_comparison.py --dataset runs/demo/data [--methods lora full ...]
Results: benchmarks/results/methods/<method>.json and benchmarks/results/methods/table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "configs" / "experiments" / "methods"
METHODS = ["lora", "adalora", "ia3", "prefix", "prompt", "adapter", "full"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--records", type=int, default=100, help="test records generated per method")
    parser.add_argument("--runs", default="runs/methods")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.rundir import RunPaths, report_files

    exe = str(Path(sys.executable).with_name("recreason"))
    results_dir = ROOT / "benchmarks" / "results" / "methods"
    results_dir.mkdir(parents=True, exist_ok=True)
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(EXP / "budget.yaml")]
    for method in args.methods:
        out = Path(args.runs) / method
        start = time.time()
        cmd = [exe, "train", args.dataset, "--out", str(out), "--quiet", *base, "--config", str(EXP / f"{method}.yaml")]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        train_s = time.time() - start
        cmd = [exe, "evaluate", "--run", str(out), "--systems", "fine-tuned", "--quiet", *base,
               "--max-records", str(args.records), "--out", str(RunPaths(out).report_dir("methods"))]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(RunPaths(out).summary.read_text())
        scores = json.loads(report_files(RunPaths(out).report_dir("methods"), "test")["json"].read_text())
        scores = scores["results"]["fine-tuned"]
        row = {"method": method, "trainable_parameters": summary["trainable_parameters"],
               "peak_memory_mb": summary["peak_memory_mb"], "tokens_per_second": summary["tokens_per_second"],
               "best_validation_loss": summary["best_validation_loss"], "train_seconds": round(train_s, 1),
               **{k: scores[k] for k in ("BLEU-4", "ROUGE-L", "USR", "FMR")}}
        (results_dir / f"{method}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(row, flush=True)
    rows = [json.loads((results_dir / f"{m}.json").read_text()) for m in METHODS if (results_dir / f"{m}.json").exists()]
    lines = ["| method | trainable params | peak RSS (MB) | tokens/s | best val loss | BLEU-4 | ROUGE-L | USR | FMR | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {r['peak_memory_mb']:.0f} | "
                     f"{r['tokens_per_second']:.0f} | {r['best_validation_loss']:.3f} | {r['BLEU-4']:.2f} | "
                     f"{r['ROUGE-L']:.2f} | {r['USR']:.3f} | {r['FMR']:.3f} | {r['train_seconds']:.0f} |")
    (results_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
