"""Decoding settings of one run compared on validation records: how a domain's `generate:` keys were chosen.

    python benchmarks/decoding_sweep.py --run runs/music/run --config configs/demo.yaml \\
        --config configs/digital-music.yaml --records 300 --work runs/music/sweep --name decoding-digital-music \\
        --setting "min_new_tokens=0,no_repeat_ngram=0" --setting "min_new_tokens=10,no_repeat_ngram=0" ...

Each ``--setting`` is a comma-separated list of ``generate`` keys; each is one ``recreason evaluate --split
validation --systems fine-tuned`` of the run on the first ``--records`` validation records, with the config files
given and those keys set, and retrieval is scored once on the same records as the bar to clear. Choose on
validation, then score the test split once. Each setting's evaluation and texts are kept in ``--work``
(SETTING/validation.json, SETTING/texts.jsonl): a second call evaluates only the settings it has not seen.
Writes benchmarks/results/quality/NAME.{json,md}: BLEU-1, BLEU-4 and ROUGE-L with 95% intervals, USR, the
generic rate, on Chinese data the share of reasons written in Chinese, and how many distinct reasons the records got.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
SHOWN = ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "Generic", "Chinese")  # Chinese: on Chinese data only


def folder_name(setting: str) -> str:
    """A folder for a setting: ``min_new_tokens=10,no_repeat_ngram=4`` -> ``min_new_tokens-10_no_repeat_ngram-4``."""
    pairs = [p.strip() for p in setting.split(",") if p.strip()]
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip() or not value.strip() or "/" in p:
            raise SystemExit(f"a setting is KEY=VALUE[,KEY=VALUE...] of the generate section, got {setting!r}")
    return "_".join(p.replace("=", "-") for p in pairs) or "plain"


def evaluate(run: Path, configs: list[str], records: int, out: Path, system: str, setting: str) -> dict:
    """One `recreason evaluate` on validation records; its JSON (reused when ``out`` already holds it)."""
    if (out / "validation.json").exists():
        return json.loads((out / "validation.json").read_text())
    cmd = [sys.executable, "-m", "recreason.cli", "evaluate", "--run", str(run), "--split", "validation",
           "--systems", system, "--set", f"generate.max_records={records}", "--out", str(out), "--json", "--quiet"]
    for config in configs:
        cmd += ["--config", config]
    for pair in filter(None, (p.strip() for p in setting.split(","))):
        cmd += ["--set", f"generate.{pair}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "validation.json").read_text())


def row(result: dict, system: str, texts: list[str] | None) -> dict:
    scores = result["results"][system]
    out = {m: scores[m] for m in SHOWN if m in scores}
    out["intervals"] = {m: v for m, v in result["intervals"].get(system, {}).items() if m in SHOWN}
    out["seconds"] = result.get("seconds", {}).get(system)
    if texts is not None:
        out["distinct reasons"] = len(set(texts))
    return out


def sweep(run: Path, configs: list[str], settings: list[str], records: int, work: Path, name: str,
          results: Path = OUT) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from recreason.rundir import Run

    paths = Run(run).paths
    rows = {"retrieval": row(evaluate(run, configs, records, work / "retrieval", "retrieval", ""), "retrieval", None)}
    for setting in settings:
        folder = work / folder_name(setting)
        kept = folder / "texts.jsonl"
        result = evaluate(run, configs, records, folder, "fine-tuned", setting)
        if not kept.exists():  # evaluate writes the run's validation texts; each setting keeps its own
            shutil.copyfile(paths.generated("validation", "fine-tuned"), kept)
        texts = [json.loads(line)["generated"] for line in kept.read_text().splitlines() if line.strip()]
        rows[setting or "plain"] = row(result, "fine-tuned", texts)
    out = {"run": str(run), "configs": configs, "split": "validation", "records": records, "systems": rows}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    shown = [m for m in SHOWN if any(m in r for r in rows.values())]
    lines = [f"# Decoding settings on {records} validation records of {run.name}", "",
             "| generate settings | " + " | ".join(shown) + " | distinct reasons |", "|---|" + "---|" * (len(shown) + 1)]
    for setting, r in rows.items():
        cells = [(f"{r[m]:.2f}" + (" [{:.2f}, {:.2f}]".format(*r["intervals"][m]) if m in r["intervals"] else ""))
                 if m in r else "" for m in shown]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {r.get('distinct reasons', '')} |")
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a trained run")
    parser.add_argument("--config", action="append", default=[], help="config files (layered), as for evaluate")
    parser.add_argument("--setting", action="append", required=True,
                        help="generate keys, comma-separated: min_new_tokens=10,no_repeat_ngram=4")
    parser.add_argument("--records", type=int, default=300, help="first N validation records")
    parser.add_argument("--work", required=True, type=Path, help="where each setting's evaluation is kept")
    parser.add_argument("--results", type=Path, default=OUT, help="where NAME.{json,md} are written")
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    sweep(args.run, args.config, args.setting, args.records, args.work, args.name, args.results)
    print((args.results / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
