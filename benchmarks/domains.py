"""Every domain's systems on its whole test split, in one file: benchmarks/results/domains.json (and .md).

    python benchmarks/domains.py --domain musical-instruments runs/mi/run \\
        --domain digital-music runs/dm/run "joint (both domains)=runs/joint/run/generated/test-music-fine-tuned.jsonl" \\
        --domain douban-zh runs/zh/smol "Gemma 3 270M zero-shot=runs/zh/gemma/generated/test-zero-shot.jsonl" ...

Each ``--domain NAME RUN [SYSTEM=TEXTS.jsonl ...]`` takes the texts ``recreason evaluate`` wrote for RUN on its
test split (RUN/generated/test-{zero-shot,retrieval,fine-tuned}.jsonl: evaluate it on the whole split first,
``--set generate.max_records=null``) and any other system's texts on the same records (another run's
generated file: a joint run evaluated with ``--domain``, another base model). Nothing is generated here: every
system is scored again by one TextScorer (the same 1,000 resamples of the records for all) with 95% intervals,
and each fine-tuned system's paired difference to zero-shot and to retrieval on BLEU-1, BLEU-4 and ROUGE-L.
A domain given again replaces its entry; the others are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "domains.json"
SHOWN = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR", "DIV", "Generic", "Chinese", "BLEU-1 (words)",
         "BLEU-4 (words)", "ROUGE-L (words)")
COMPARED = ("BLEU-1", "BLEU-4", "ROUGE-L")
BASELINES = ("zero-shot", "retrieval")


def _systems(run, extra: list[str]) -> dict[str, Path]:
    base = run.info.get("model", "model")
    systems = {f"zero-shot ({base})": run.paths.generated("test", "zero-shot"),
               "retrieval": run.paths.generated("test", "retrieval"),
               f"fine-tuned ({base})": run.paths.generated("test", "fine-tuned")}
    for item in extra:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected SYSTEM=TEXTS.jsonl, got {item!r}")
        systems[name] = Path(path)
    return systems


def score_domain(run_dir: str, extra: list[str], bootstrap: int) -> dict:
    from recreason.evaluation import intervals as iv
    from recreason.evaluation.evaluate import TextScorer, read_generated, select_records
    from recreason.config import GenerateConfig
    from recreason.rundir import Run

    run = Run(run_dir)
    dataset = run.dataset()
    records, refs = select_records(run, dataset, "test", GenerateConfig(max_records=None))
    scorer = TextScorer(records, refs, dataset.subset(run.split_seed, "train"), dataset.features, 20, bootstrap,
                        semantic=False, language=dataset.language)
    out: dict = {"run": str(run_dir), "language": dataset.language, "systems": {}, "differences": {}}
    for name, path in _systems(run, extra).items():
        if not path.exists():
            raise SystemExit(f"{path} is missing: evaluate the run on the whole test split first")
        rows = read_generated(path)
        keys = [(r["user"], r["item"], r["reference"]) for r in rows]
        if keys != [(r.user, r.item, ref) for r, ref in zip(records, refs)]:
            raise SystemExit(f"{path} is not on the {len(records)} test records of {run_dir} in their order")
        row = scorer.score(name, [r["generated"] for r in rows])
        out["systems"][name] = {"records": len(rows), **{m: row[m] for m in SHOWN if m in row},
                                "intervals": scorer.intervals[name]}
    baselines = [n for n in out["systems"] if n == "retrieval" or n.startswith("zero-shot")]
    own = next((n for n in _systems(run, []) if n not in baselines), None)  # the run's own fine-tuned system
    for name in out["systems"]:
        if name in baselines:
            continue
        # against the baselines, and a system read from elsewhere (a joint run's texts) against the domain's own run
        others = baselines + ([own] if own in out["systems"] and name != own else [])
        out["differences"][name] = {
            other: {m: d[m] for m in COMPARED} for other in others for d in [iv.paired_difference(
                scorer.sentence_scores[name], scorer.sentence_scores[other], scorer.samples)]}
    ahead = {name: all(diffs[b][m]["low"] > 0 for b in baselines for m in ("BLEU-1", "ROUGE-L"))
             for name, diffs in out["differences"].items()}
    out["ahead_of_zero_shot_and_retrieval"] = ahead  # BLEU-1 and ROUGE-L, the paired 95% interval above zero
    return out


def markdown(results: dict) -> str:
    lines = ["# Every domain on its whole test split", ""]
    for domain, entry in results.items():
        cols = [m for m in SHOWN if any(m in s for s in entry["systems"].values())]
        lines += [f"## {domain} ({entry['language']}, {next(iter(entry['systems'].values()))['records']} test "
                  f"records)", "", "| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, row in entry["systems"].items():
            cells = []
            for m in cols:
                v = row.get(m)
                ci = row["intervals"].get(m)
                cells.append("" if v is None else f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, diffs in entry["differences"].items():
            for other, d in diffs.items():
                text = "; ".join(f"{m} {v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]" for m, v in d.items())
                lines.append(f"- {name} minus {other}: {text}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", nargs="+", action="append", required=True, metavar="NAME RUN [SYSTEM=FILE]")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for spec in args.domain:
        if len(spec) < 2:
            raise SystemExit("--domain takes a name and a run directory, then optional SYSTEM=TEXTS.jsonl")
        results[spec[0]] = score_domain(spec[1], spec[2:], args.bootstrap)
        print(json.dumps({spec[0]: results[spec[0]]["ahead_of_zero_shot_and_retrieval"]}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
