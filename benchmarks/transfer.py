"""What a new domain's data buys, and what starting from another domain's run saves: a transfer curve.

    python benchmarks/transfer.py --source runs/mi/run --data runs/dm/data --work runs/transfer \\
        --config configs/demo.yaml --config configs/digital-music.yaml [--fractions 0.1 0.25 1] [--steps 90]
        [--set KEY=VALUE ...] [--records N] [--results DIR]

For each fraction of the new domain's training split (a seeded sample, ``train.max_train_records``) two runs
are trained with the same settings and steps: one from the base model, one from the source run's best
weights (``train.init_from``: same model and method). Both write greedy reasons for the new domain's test
records (the whole split, or ``--records N``), scored by one TextScorer with 95% bootstrap intervals.
Runs already in ``--work`` are resumed or reused (``--resume-or-start``) and their texts kept
(RUN/generated/test-transfer.jsonl), so the curve can be built across several sittings; the results are written
after every point. Writes benchmarks/results/quality/transfer.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
SHOWN = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR")


def train(data: Path, out: Path, configs: list[str], sets: list[str]) -> float:
    """Train (or finish, or reuse) one run through the CLI; the seconds it took."""
    start = time.time()
    cmd = [sys.executable, "-m", "recreason.cli", "train", str(data), "--out", str(out), "--resume-or-start",
           "--quiet"]
    for config in configs:
        cmd += ["--config", config]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True)
    return time.time() - start


def curve(source: str, data: Path, work: Path, configs: list[str], fractions: list[float], steps: int,
          records: int | None = None, bootstrap: int = 1000, sets: list[str] | None = None,
          results: Path = OUT, name: str = "transfer") -> dict:
    """Train and score every point of the curve; the result written to RESULTS/NAME.{json,md,png} after each point.

    Each run's greedy texts are kept in RUN/generated/test-transfer.jsonl (with the records they explain), so a
    second call on the same work folder retrains nothing and decodes nothing: it only scores again."""
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import load_config
    from recreason.data.dataset import Dataset
    from recreason.data.records import target_text
    from recreason.evaluation import intervals as iv
    from recreason.evaluation.evaluate import TextScorer
    from recreason.inference import Predictor
    from recreason.rundir import Run, RunPaths

    dataset = Dataset(data)
    cfg = load_config(configs, sets or [])
    seed = cfg["train"].split_seed
    n_train = len(dataset.split(seed)["train"])
    chosen = dataset.subset(seed, "test")[:records]
    refs = [target_text(r, "sentence") for r in chosen]
    scorer = TextScorer(chosen, refs, dataset.subset(seed, "train"), dataset.features, 20, bootstrap,
                        semantic=False, language=dataset.language)
    gen = cfg["generate"]
    gen.max_records = None
    keys = [[r.user, r.item] for r in chosen]
    earlier = results / f"{name}.json"  # the seconds of runs trained and decoded by an earlier call
    measured = {(p["start"], p["train_records"]): p for p in
                (json.loads(earlier.read_text())["points"] if earlier.exists() else [])}
    points = []
    result = {"source": source, "data": str(data), "steps": steps, "test_records": len(chosen),
              "configs": configs, "points": points}
    for fraction in fractions:
        n = min(n_train, max(1, round(fraction * n_train)))
        for start in ("base", "source"):
            out = work / f"{start}-{n}"
            run_sets = list(sets or []) + [f"train.max_steps={steps}", f"train.max_train_records={n}"]
            if start == "source":
                run_sets.append(f"train.init_from={source}")
            seconds = train(data, out, configs, run_sets)
            kept = RunPaths(out).generated("test", "transfer")
            begin = time.time()
            rows = [json.loads(line) for line in kept.read_text().splitlines()] if kept.exists() else []
            if [row["key"] for row in rows] == keys:  # trained and decoded before: keep what that took
                texts = [row["text"] for row in rows]
                before = measured.get((start, n), {})
                seconds, decoding = before.get("train_seconds"), before.get("generation_seconds")
            else:
                texts = Predictor(Run(out), gen, dataset=dataset).explain_records(chosen, progress=True)
                decoding = time.time() - begin
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text("".join(json.dumps({"key": k, "text": t}, ensure_ascii=False) + "\n"
                                        for k, t in zip(keys, texts)))
            row = scorer.score(f"{start}-{n}", texts)
            points.append({"start": start, "fraction": fraction, "train_records": n, "train_seconds": seconds,
                           "generation_seconds": decoding, **{m: row[m] for m in SHOWN},
                           "intervals": scorer.intervals.get(f"{start}-{n}", {})})
            if start == "source":  # what the other domain's start buys at this share: paired on the same records
                d = iv.paired_difference(scorer.sentence_scores[f"source-{n}"], scorer.sentence_scores[f"base-{n}"],
                                         scorer.samples)
                points[-1]["minus_base"] = {m: d[m] for m in ("BLEU-1", "BLEU-4", "ROUGE-L")}
            print({k: v for k, v in points[-1].items() if k != "intervals"}, flush=True)
            write(result, results, name)
    return result


def write(result: dict, results: Path, name: str) -> None:
    """The JSON, the Markdown table and the PNG of the points so far."""
    points = sorted(result["points"], key=lambda p: (p["train_records"], p["start"]))
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Transfer curve: {result['steps']} steps a run, {result['test_records']} test records", "",
             "| start | share of training | records | " + " | ".join(SHOWN) + " |",
             "|---|---|---|" + "---|" * len(SHOWN)]
    for p in points:
        cells = [f"{p[m]:.2f}" + (" [{:.2f}, {:.2f}]".format(*p["intervals"][m]) if m in p["intervals"] else "")
                 for m in SHOWN]
        lines.append(f"| {p['start']} | {p['fraction']:.0%} | {p['train_records']} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in points:
        if "minus_base" in p:
            lines.append(f"- source minus base at {p['train_records']} records: " + "; ".join(
                f"{m} {v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]" for m, v in p["minus_base"].items()))
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(points, results / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the run of the first domain (its best weights)")
    parser.add_argument("--data", required=True, type=Path, help="the new domain's prepared dataset")
    parser.add_argument("--work", required=True, type=Path, help="where the curve's runs are kept")
    parser.add_argument("--config", action="append", default=[], help="config files for every run (layered)")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="config overrides for every run")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    parser.add_argument("--steps", type=int, default=90, help="optimizer steps of every run")
    parser.add_argument("--records", type=int, default=None, help="first N test records (default: all)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=OUT, help="where NAME.{json,md,png} are written")
    parser.add_argument("--name", default="transfer")
    args = parser.parse_args()
    curve(args.source, args.data, args.work, args.config, args.fractions, args.steps, args.records,
                   args.bootstrap, args.sets, args.results, args.name)
    print(Path(args.results / f"{args.name}.md").read_text())


def _plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("BLEU-1", "ROUGE-L", "BLEU-4")):
        for start, label in (("base", "from the base model"), ("source", "from the other domain's run")):
            mine = [p for p in points if p["start"] == start]
            xs = [p["train_records"] for p in mine]
            ax.plot(xs, [p[metric] for p in mine], marker="o", label=label)
            lows = [p["intervals"].get(metric, [p[metric]] * 2) for p in mine]
            ax.fill_between(xs, [lo for lo, _ in lows], [hi for _, hi in lows], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("new-domain training records")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
