"""Reason quality against decoding cost: runs (a full run, its distilled second stage) at several candidate counts.

    python benchmarks/quality_cost.py --system "full run=runs/full/run" --system "distilled=runs/full/distilled" \
        --candidates 1 4 8 16 32 --config configs/demo.yaml --config configs/full.yaml [--records N] [--name seed1]

For each run the test records' candidates are decoded at each count in turn (kept in RUN/candidates/,
recreason.inference.candidates: a count reuses the smaller count's draws, each seeded by its prompt and index, and
decodes only the rest, so all counts together cost one decode at the largest); each count's choice is made with
the selection weights of the config, and scored with one TextScorer (the same bootstrap resamples for every row, so
each row's paired difference to the reference row, the first system at the largest count, is exact).

Seconds per reason are measured side by side in this process: the first ``--timing-records`` records decoded
afresh at every count for every run (prompts batched so that a batch holds about 128 sequences), so the ratios
are comparable; run it alone on the machine.

Each (system, count) row is one look at the split; the file says how many looks were taken in all.

``--recorded-reference FILE#LABEL`` takes the reference row from an earlier results file (e.g.
``benchmarks/results/quality/cost-stream.json#full run, 32 candidates``) instead of decoding it again: the same run
and records are the caller's to vouch for (the file's split and record count are checked). Each row is then judged
against the recorded figures and interval; the paired differences need the reference's texts and are left out.

Writes benchmarks/results/quality/cost.json (``--name cost``; {"systems": {NAME: {"records", "candidates",
"seconds_per_reason", metrics..., "intervals": {...}, "vs_reference": {...}, "meets_bar": bool, and for a distilled
run "distillation": its pairs and seconds of decoding and training}}}), cost.md (the table) and cost.png (ROUGE-L and BLEU-4 against seconds per reason). A row meets the bar (the issue's "done when")
when its BLEU-4 and ROUGE-L are inside the reference row's 95% interval or above it, and its USR is at least the
reference's and its generic and ungrounded rates at most the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
METRICS = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR", "Generic", "Ungrounded")
ROWS_PER_BATCH = 128


def per_batch(gen, k: int):
    """``gen`` at ``k`` candidates, its batches holding about :data:`ROWS_PER_BATCH` sequences (greedy decoding
    of 4 prompts at a time, full.yaml's batch for 32 candidates, would take longer than the 32 candidates)."""
    return replace(gen, candidates=k, batch_size=max(1, min(50, ROWS_PER_BATCH // k)))


def seconds_per_reason(predictor, prompted, records, gen, k: int) -> float:
    """Decode ``records``' candidates afresh at count ``k`` (no cache) and choose as the server does
    (``Predictor.choose_among``): seconds per reason."""
    from recreason.generation.generate import generate_candidates

    cfg = per_batch(gen, k)
    if k > 1:
        predictor.generic_table(cfg)  # measured once per run and kept: not a reason's cost
    start = time.perf_counter()
    for i in range(0, len(records), cfg.batch_size):
        part = slice(i, i + cfg.batch_size)
        decoded = generate_candidates(predictor.model, predictor.tokenizer, [p.prompt for p in prompted[part]], cfg,
                                      users=[r.user for r in records[part]], items=[r.item for r in records[part]])
        if k > 1:
            predictor.choose_among(prompted[part], decoded, cfg)
    return (time.perf_counter() - start) / len(records)


def distillation_cost(run: str) -> dict:
    """A distilled run's training cost (RUN/distill/summary.json: pairs, decoding and training seconds), if any."""
    from recreason.rundir import RunPaths

    path = RunPaths(run).distill_summary
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {"distillation": {k: summary[k] for k in ("mode", "train_pairs", "candidates", "decode_seconds",
                                                       "train_seconds", "steps") if k in summary}}


def measure(name: str, run: str, gen, counts: list[int], records_limit: int | None, timing_records: int,
            scorer_box: list, split: str = "test", from_end: bool = False) -> dict:
    from recreason.evaluation.evaluate import TextScorer, select_records
    from recreason.inference import Predictor
    from recreason.inference import candidates as cache
    from recreason.inference.predictor import Request

    top = replace(gen, candidates=max(counts), max_records=None if from_end else records_limit)
    predictor = Predictor(run, top)
    records, refs = select_records(predictor.run, predictor.dataset, split, top)
    if from_end and records_limit:  # the split's last records (validation: those tuning and distillation decode)
        records, refs = records[-records_limit:], refs[-records_limit:]
    if not scorer_box:
        scorer_box.append(TextScorer(records, refs, predictor.train, predictor.dataset.features, 20,
                                     bootstrap=top_bootstrap[0], semantic=False))
    scorer = scorer_box[0]
    if [r.index for r in scorer.records] != [r.index for r in records]:
        raise SystemExit(f"{run}: not the same test records as the first system's (same dataset and split needed)")
    prompted = [predictor.prompt(Request(r.user, r.item, record=r), n) for n, r in enumerate(records[:timing_records])]
    rows = {}
    for k in counts:  # ascending: each count's cache reuses the smaller one's draws and decodes the rest
        texts = cache.chosen_texts(predictor, split, records, per_batch(top, k))
        label = f"{name}, {k} candidate{'s' if k > 1 else ''}"
        timing = (seconds_per_reason(predictor, prompted, records[:timing_records], top, k)
                  if timing_records else None)
        rows[label] = {"run": run, "records": len(records), "candidates": k, "seconds_per_reason": timing,
                       **{m: v for m, v in scorer.score(label, texts).items() if isinstance(v, float)},
                       **distillation_cost(run)}
        print(f"{label}: {timing or float('nan'):.2f} s/reason, " + ", ".join(f"{m} {rows[label][m]:.4g}" for m in METRICS),
              flush=True)
    return rows


top_bootstrap = [1000]


def meets_bar(row: dict, reference: dict) -> bool:
    """Inside the reference's 95% interval or above on BLEU-4 and ROUGE-L, at least as good on USR, generic and
    ungrounded rates."""
    inside = all(row[m] >= reference["intervals"].get(m, [reference[m]])[0] for m in ("BLEU-4", "ROUGE-L"))
    return (inside and row["USR"] >= reference["USR"] and row["Generic"] <= reference["Generic"]
            and row["Ungrounded"] <= reference["Ungrounded"])


def table(result: dict) -> str:
    """The rows as a markdown table: intervals beside BLEU-4 and ROUGE-L, the paired difference to the reference."""
    timed = (f"seconds per reason timed on the first {result['timing_records']} records, side by side in one process"
             if result["timing_records"] else "not timed")
    source = result["systems"].get(result["reference"], {}).get("recorded_in")
    recorded = f"; read back from {source}" if source else ""
    lines = [f"Reference row: {result['reference']} ({result['split']} split; {timed}{recorded}).", "",
             "| system | s / reason | BLEU-1 | BLEU-4 | ROUGE-L | USR | FMR | FCR | Generic | Ungrounded "
             "| BLEU-4 vs ref. | ROUGE-L vs ref. | meets the bar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def with_interval(row, m):
        low, high = row["intervals"].get(m, [float("nan")] * 2)
        return f"{row[m]:.2f} ({low:.2f}-{high:.2f})"

    def diff(row, m):
        d = row.get("vs_reference", {}).get(m)
        return f"{d['diff']:+.2f} ({d['low']:+.2f} to {d['high']:+.2f})" if d else ""

    for label, row in result["systems"].items():
        timing = f"{row['seconds_per_reason']:.2f}" if row["seconds_per_reason"] and result["timing_records"] else ""
        lines.append(f"| {label} | {timing} | {row['BLEU-1']:.2f} | {with_interval(row, 'BLEU-4')} | "
                     f"{with_interval(row, 'ROUGE-L')} | {row['USR']:.3f} | {row['FMR']:.3f} | {row['FCR']:.3f} | "
                     f"{row['Generic']:.3f} | {row['Ungrounded']:.3f} | {diff(row, 'BLEU-4')} | "
                     f"{diff(row, 'ROUGE-L')} | {'reference' if label == result['reference'] else 'yes' if row['meets_bar'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(systems: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("ROUGE-L", "BLEU-4")):
        runs = {}
        for label, row in systems.items():
            runs.setdefault(label.rsplit(", ", 1)[0], []).append(row)
        for name, rows in runs.items():
            rows = sorted(rows, key=lambda r: r["candidates"])
            ax.plot([r["seconds_per_reason"] for r in rows], [r[metric] for r in rows], marker="o", label=name)
            for r in rows:
                ax.annotate(str(r["candidates"]), (r["seconds_per_reason"], r[metric]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # plain seconds, not 2x10^-1
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("seconds of CPU per reason (log)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # below the plots: the lines fill both axes
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("reason quality against decoding cost (points: candidates decoded)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)


def parse_system(spec: str, counts: list[int]) -> tuple[str, str, list[int], list[str], list[str]]:
    """``NAME=RUN[@K,K][+CONFIG...][+SECTION.KEY=VALUE...]`` as (name, run, candidate counts, config files of its
    own, overrides of its own)."""
    name, equals, run = spec.partition("=")
    if not equals or not name or not run:
        raise SystemExit(f"--system {spec!r}: expected NAME=RUN[@K,K][+CONFIG][+SECTION.KEY=VALUE]")
    run, *own = run.split("+")
    run, at, counts_given = run.partition("@")
    mine = sorted({int(k) for k in counts_given.split(",")}) if at else counts
    return name, run, mine, [c for c in own if "=" not in c], [c for c in own if "=" in c]


def recorded_reference(spec: str, split: str, records: int) -> tuple[str, dict]:
    """(label, row) of ``FILE#LABEL``'s reference row, checked to be of ``split`` and ``records`` records."""
    path, _, label = spec.partition("#")
    recorded = json.loads(Path(path).read_text())
    row = recorded.get("systems", {}).get(label)
    if row is None:
        raise SystemExit(f"--recorded-reference: {path} has no row {label!r}: {', '.join(recorded.get('systems', {}))}")
    if recorded.get("split", "test") != split or row["records"] != records:
        raise SystemExit(f"--recorded-reference: {label!r} was scored on {row['records']} {recorded.get('split', 'test')}"
                         f" records, these rows on {records} {split} records")
    row = {k: v for k, v in row.items() if k not in ("vs_reference", "meets_bar")}
    return f"{label} (recorded)", {**row, "recorded_in": f"{Path(path).name}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", action="append", required=True, metavar="NAME=RUN[@K,K][+CONFIG][+KEY=VALUE]",
                        help="a run to measure (repeatable), at --candidates or at its own counts after @, with "
                             "config files of its own layered after --config's (+FILE, repeatable: a distilled run's "
                             "tuned weights) and overrides of its own after --set's (+SECTION.KEY=VALUE, "
                             "repeatable); the first system at its largest count is the reference row")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--config", action="append", default=None,
                        help="decoding and selection weights (default: configs/demo.yaml then configs/full.yaml)")
    parser.add_argument("--set", action="append", default=[], help="a config override, as recreason's --set")
    parser.add_argument("--records", type=int, default=None, help="the first N test records (default: all)")
    parser.add_argument("--timing-records", type=int, default=16, help="records decoded afresh per count to time "
                        "it (0: no timing, e.g. when comparing choices on validation)")
    parser.add_argument("--from-end", action="store_true", help="the last --records records instead of the first")
    parser.add_argument("--split", default="test", choices=("validation", "test"),
                        help="validation to choose between configurations; test once per configuration named")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--name", default="cost", help="results file stem (cost; cost-temporal1 for later reviews)")
    parser.add_argument("--recorded-reference", metavar="FILE#LABEL", default=None,
                        help="the reference row from an earlier results file instead of decoding it (not a look)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import load_config
    from recreason.evaluation import intervals as intervals_mod

    top_bootstrap[0] = args.bootstrap
    configs = args.config or [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "full.yaml"]
    gen = load_config(configs, args.set)["generate"]
    counts = sorted(set(args.candidates))
    scorer_box: list = []
    systems: dict = {}
    for spec in args.system:
        name, run, mine, own_configs, own_sets = parse_system(spec, counts)
        system_gen = (load_config([*configs, *own_configs], [*args.set, *own_sets])["generate"]
                      if own_configs or own_sets else gen)
        rows = measure(name, run, system_gen, mine, args.records, args.timing_records, scorer_box, args.split,
                       args.from_end)
        for row in rows.values():
            row["configs"] = own_configs
            if own_sets:
                row["overrides"] = own_sets
        systems.update(rows)
    scorer = scorer_box[0]
    looks = len(systems) if args.split == "test" else 0
    for label, row in systems.items():
        row["intervals"] = scorer.intervals.get(label, {})
    if args.recorded_reference:
        reference, row = recorded_reference(args.recorded_reference, args.split, len(scorer.records))
        systems = {reference: row, **systems}
    else:
        first = next(iter(systems.values()))["run"]
        reference = max((label for label, row in systems.items() if row["run"] == first),
                        key=lambda label: systems[label]["candidates"])
    for label, row in systems.items():
        if label != reference and scorer.samples is not None and label in scorer.sentence_scores \
                and reference in scorer.sentence_scores:
            row["vs_reference"] = intervals_mod.paired_difference(scorer.sentence_scores[label],
                                                                  scorer.sentence_scores[reference], scorer.samples)
    for label, row in systems.items():
        row["meets_bar"] = label != reference and meets_bar(row, systems[reference])
    result = {"split": args.split, "configs": [str(c) for c in configs], "overrides": args.set,
              "reference": reference, "looks_at_test": looks, "timing_records": args.timing_records,
              "systems": systems}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"{args.name}.md").write_text(table(result))
    if all(row["seconds_per_reason"] for row in systems.values()):
        plot(systems, OUT / f"{args.name}.png")
    print(f"wrote {OUT / (args.name + '.json')} ({result['looks_at_test']} looks at the test split)")


if __name__ == "__main__":
    main()
