"""What more training buys: validation loss and test metrics at several step counts, on one plot and one table.

    python benchmarks/learning_curve.py --run runs/full/run [--records 833] [--name learning_curve]

The run must have been trained with ``train.snapshot_steps`` (configs/full.yaml keeps the weights at each
validation pass, every quarter epoch, in RUN/snapshots/step-N; another run can choose its own with
``--set "train.snapshot_steps=[...]"``). For each snapshot and for
RUN/best it generates greedy reasons for the test records and scores them with the same scorer as
``recreason evaluate``; the validation loss at each step comes from RUN/train_log.jsonl. PETER's numbers on
the same split (../shared/peers/peter-split1.json) are drawn as horizontal lines, so the plot shows when the
model passes PETER. Writes benchmarks/results/quality/NAME.{json,md,png} (NAME: ``--name``, default learning_curve).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
PETER = ROOT.parent / "shared" / "peers" / "peter-split1.json"
SHOWN = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/full/run")
    parser.add_argument("--records", type=int, default=None, help="first N test records (default: all)")
    parser.add_argument("--name", default="learning_curve", help="results file stem in benchmarks/results/quality")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import GenerateConfig
    from recreason.data.records import target_text
    from recreason.evaluation.evaluate import TextScorer
    from recreason.inference import Predictor
    from recreason.rundir import Run

    run = Run(args.run)
    log = [json.loads(line) for line in run.paths.train_log.read_text().splitlines()]
    val_loss = {e["step"]: e["validation_loss"] for e in log}
    snapshots = run.paths.snapshots()
    summary = json.loads(run.paths.summary.read_text())
    points = snapshots + [(summary["best_step"], "best")]
    dataset = run.dataset()
    records = dataset.subset(run.split_seed, "test")[: args.records]
    refs = [target_text(r, run.info["target"]) for r in records]
    scorer = TextScorer(records, refs, dataset.subset(run.split_seed, "train"), dataset.features, 20, bootstrap=0,
                        semantic=False)
    rows = []
    for step, checkpoint in points:
        start = time.time()
        predictor = Predictor(run, GenerateConfig(batch_size=50), dataset=dataset, checkpoint=checkpoint)
        row = scorer.score(checkpoint, predictor.explain_records(records, progress=True))
        rows.append({"step": step, "checkpoint": checkpoint, "validation_loss": val_loss.get(step),
                     "epochs": step * run.train_config.batch_size / summary["train_examples"],
                     "train_seconds_to_here": _seconds_at(log, step),
                     **{m: row[m] for m in SHOWN}, "generation_seconds": time.time() - start})
        print(rows[-1])
    peter = json.loads(PETER.read_text())["metrics"] if PETER.exists() else {}
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run.dir), "records": len(records), "decoding": "greedy", "points": rows, "peter": peter}
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| step | epochs | train s | validation loss | " + " | ".join(SHOWN) + " |",
             "|---|---|---|---|" + "---|" * len(SHOWN)]
    for r in rows:
        loss = "" if r["validation_loss"] is None else f"{r['validation_loss']:.4f}"
        lines.append(f"| {r['step']} ({r['checkpoint']}) | {r['epochs']:.2f} | {r['train_seconds_to_here'] or ''} | "
                     f"{loss} | " + " | ".join(f"{r[m]:.3f}" for m in SHOWN) + " |")
    if peter:
        lines.append("| PETER | | | | " + " | ".join(f"{peter[m]:.3f}" for m in SHOWN) + " |")
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, log, peter, OUT / f"{args.name}.png")


def _seconds_at(log: list[dict], step: int):
    known = [e for e in log if e["step"] <= step]
    return round(known[-1]["elapsed_s"]) if known else None


def _plot(rows, log, peter, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot([e["step"] for e in log], [e["validation_loss"] for e in log], marker="o")
    axes[0].set_title("validation loss")
    shown = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])  # best is the last step
    for ax, metrics in zip(axes[1:], (("BLEU-1", "ROUGE-L"), ("BLEU-4",), ("USR", "FMR", "FCR"))):
        for m in metrics:
            line, = ax.plot([r["step"] for r in shown], [r[m] for r in shown], marker="o", label=m)
            if m in peter:
                ax.axhline(peter[m], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_title(" / ".join(metrics) + " (dashed: PETER)")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("optimizer step (16 examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
