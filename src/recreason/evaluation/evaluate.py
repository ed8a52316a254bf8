"""``recreason evaluate``: the fine-tuned model against baselines on one split.

Systems, all on the same records and prompts:

* ``zero-shot``: the base model before fine-tuning, given the same prompt;
* ``retrieval``: the training sentence of the most similar user/item context;
* ``fine-tuned``: the run's best checkpoint.

Generated texts go to ``<run>/generated/<split>-<system>.jsonl``; the table
goes to ``<run>/eval/<split>.json`` and ``.md`` and is printed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from recreason.data.records import Explained
from recreason.evaluation.baselines import RetrievalBaseline
from recreason.evaluation.metrics import text_metrics
from recreason.generation.generate import GenerateConfig, generate_texts
from recreason.prompts.discrete import render
from recreason.text import tokenize
from recreason.training.run import Run, target_text

SYSTEMS = ("zero-shot", "retrieval", "fine-tuned")
METRIC_ORDER = ["BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "USR", "FMR", "FCR", "DIV"]


def score_texts(
    references: Sequence[str], generated: Sequence[str], truth_features: Sequence[str], vocabulary, max_len: int = 20
) -> dict[str, float]:
    refs = [tokenize(t)[:max_len] for t in references]
    hyps = [tokenize(t)[:max_len] for t in generated]
    return text_metrics(refs, hyps, truth_features, vocabulary)


def _write_generated(path: Path, records: Sequence[Explained], texts: Sequence[str], references: Sequence[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r, text, ref in zip(records, texts, references):
            row = {"index": r.index, "user": r.user, "item": r.item, "reference": ref, "generated": text,
                   "feature": r.feature, "rating": r.rating}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_generated(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in results.items():
        cells = []
        for m in cols:
            v = res.get(m)
            cells.append("" if v is None else (f"{v:.4f}" if m in ("USR", "FMR", "FCR", "DIV") else f"{v:.2f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate_for_run(
    run: Run, records, system: str, gen_cfg: GenerateConfig, progress: bool = True, dataset=None
) -> list[str]:
    """Texts for ``records`` from the fine-tuned run or its zero-shot base model."""
    import torch

    from recreason.models.registry import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bf16" if gen_cfg.precision == "bf16" else "fp32"
    prompter = run.prompter(dataset or run.dataset())
    if system == "fine-tuned":
        model, tokenizer = run.load_model(dtype=dtype, device=device)
        prompts = [run.prompt_for(prompter, tokenizer, r) for r in records]
    else:  # the base model before fine-tuning sees the discrete prompt
        model, tokenizer, _ = load_model(run.info["base_model_path"], dtype=dtype, device=device)
        model.eval()
        prompts = [render(tokenizer, prompter.for_record(r)) for r in records]
    return generate_texts(model, tokenizer, prompts, gen_cfg, progress=progress, desc=f"generating ({system})",
                          users=[r.user for r in records], items=[r.item for r in records])


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    gen_cfg: GenerateConfig | None = None,
    systems: Sequence[str] = SYSTEMS,
    max_len: int = 20,
    regenerate: bool = False,
    progress: bool = True,
) -> dict:
    gen_cfg = gen_cfg or GenerateConfig()
    run = Run(run_dir)
    dataset = run.dataset()
    records = dataset.subset(run.info["split_seed"], split)
    if gen_cfg.max_records:
        records = records[: gen_cfg.max_records]
    references = [target_text(r, run.info["target"]) for r in records]
    keep = [i for i, ref in enumerate(references) if ref]
    records = [records[i] for i in keep]
    references = [references[i] for i in keep]
    truth = [r.feature for r in records]
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for system in systems:
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
        path = run.dir / "generated" / f"{split}-{system}.jsonl"
        start = time.time()
        cached = None
        if path.exists() and not regenerate:
            rows = read_generated(path)
            if [r["index"] for r in rows] == [r.index for r in records]:
                cached = [r["generated"] for r in rows]
        if cached is not None:
            texts = cached
        elif system == "retrieval":
            baseline = RetrievalBaseline(dataset.subset(run.info["split_seed"], "train"))
            texts = [baseline.explain(r.user, r.item) for r in records]
        else:
            texts = generate_for_run(run, records, system, gen_cfg, progress, dataset)
        timings[system] = time.time() - start
        _write_generated(path, records, texts, references)
        results[system] = score_texts(references, texts, truth, dataset.features, max_len)
    table = format_table(results)
    report = {
        "run": str(run.dir),
        "split": split,
        "records": len(records),
        "max_len": max_len,
        "generation": asdict(gen_cfg),
        "results": results,
        "seconds": timings,
    }
    out = run.dir / "eval"
    out.mkdir(exist_ok=True)
    (out / f"{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{split}.md").write_text(
        f"# Evaluation on the {split} split ({len(records)} records)\n\n{table}\n\n"
        f"Text metrics on the first {max_len} tokens; BLEU/ROUGE x100; DIV lower is better.\n"
    )
    report["table"] = table
    return report
