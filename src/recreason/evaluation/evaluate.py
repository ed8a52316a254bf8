"""``recreason evaluate``: the fine-tuned model against baselines on one split.

Systems, all on the same records and prompts:

* ``zero-shot``: the base model before fine-tuning, given the same prompt;
* ``retrieval``: the training sentence of the most similar user/item context;
* ``fine-tuned``: the run's best checkpoint (one row per run when several are given);
* ``popularity`` and ``matrix factorization``: rating and ranking baselines, shown with the
  fine-tuned rows, whose rating/interest heads (when trained) are scored by RMSE, MAE,
  interest macro-F1, HR@10 and NDCG@10 over sampled negatives, and sentiment agreement.

Generated texts go to ``<run>/generated/<split>-<system>.jsonl`` with a fingerprint of the
weights and settings that wrote them; a later evaluation reuses them only when the fingerprint
and the records match (``--regenerate`` forces new texts). The table goes to
``<run>/eval/<split>.json`` and ``.md`` and is printed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from recreason.config import GenerateConfig
from recreason.data.records import Explained, target_text
from recreason.errors import ConfigError
from recreason.evaluation import metrics as M
from recreason.evaluation import intervals as intervals_mod
from recreason.evaluation import ranking
from recreason.evaluation.baselines import RetrievalBaseline
from recreason.evaluation.metrics import text_metrics
from recreason.inference import Predictor
from recreason.inference.safety import REPLACE_FLAGS, ReasonChecker
from recreason.ranking import Ranker
from recreason.rundir import Run, checkpoint_stamp
from recreason.text import FeatureMatcher, tokenize

SYSTEMS = ("zero-shot", "retrieval", "fine-tuned")
METRIC_ORDER = ["BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "SemSim", "USR", "FMR", "FCR", "DIV",
                "Distinct-1", "Distinct-2", "Generic", "UserFeat", "Ungrounded", "Filtered",
                "RMSE", "MAE", "InterestF1", "HR@10", "NDCG@10", "Recall@10", "Recall@20", "full NDCG@10", "SentAgree"]
FRACTIONS = {"USR", "FMR", "FCR", "DIV", "RMSE", "MAE", "InterestF1", "InterestAcc", "HR@10", "NDCG@10", "SentAgree",
             "Recall@10", "Recall@20", "full NDCG@10",
             "Ungrounded", "Filtered", "Distinct-1", "Distinct-2", "Generic", "UserFeat"}
SHOWN_INTERVALS = ("BLEU-1", "BLEU-4", "ROUGE-L")  # the table shows these with their 95% interval
TEXT_BASELINES = ("zero-shot", "retrieval")


def check_rates(texts: Sequence[str], records, item_features: dict[str, set[str]], vocabulary,
                checker: ReasonChecker | None = None) -> dict[str, float]:
    """Share of reasons the serving safety filter would replace, and share naming features the item lacks
    (``checker``: one already built for ``vocabulary``, for callers checking texts a few at a time)."""
    checker = checker or ReasonChecker(vocabulary)
    flags = [checker.check(t, sorted(item_features.get(r.item, ()))).flags for t, r in zip(texts, records)]
    n = max(len(flags), 1)
    return {
        "Filtered": sum(any(f in REPLACE_FLAGS for f in fl) for fl in flags) / n,
        "Ungrounded": sum("ungrounded" in fl for fl in flags) / n,
    }


def write_generated(path: Path, records: Sequence[Explained], texts: Sequence[str], references: Sequence[str],
                    vocabulary=(), fingerprint: str | None = None, explanations=None):
    """One JSON line per record: ids, reference, generated text, ground-truth feature, features generated;
    with ``explanations`` (from the Predictor) also the checked reason a user would see and its flags.
    With ``fingerprint``, a sidecar ``.meta.json`` (written last) says what produced the texts."""
    matcher = FeatureMatcher(vocabulary)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = path.with_suffix(".meta.json")
    meta.unlink(missing_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for n, (r, text, ref) in enumerate(zip(records, texts, references)):
            row = {"index": r.index, "user": r.user, "item": r.item, "reference": ref, "generated": text,
                   "feature": r.feature, "features": sorted(matcher.find(tokenize(text))), "rating": r.rating}
            if explanations is not None:
                row.update(reason=explanations[n].reason, flags=explanations[n].flags)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if fingerprint is not None:
        meta.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def generation_fingerprint(run: Run, system: str, gen_cfg: GenerateConfig) -> str:
    """What cached texts depend on: the run's settings, the decoding settings and, for the fine-tuned
    system, the best checkpoint's files. A retrained run or new options never reuse old texts."""
    digest = hashlib.sha256()
    settings = {"system": system, "run": run.info, "generate": {k: v for k, v in asdict(gen_cfg).items()
                                                               if k != "max_records"}}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if system == "fine-tuned":
        digest.update(checkpoint_stamp(run).encode())
    return digest.hexdigest()[:20]


def read_generated(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _fmt(metric: str, value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if metric in FRACTIONS else f"{value:.2f}"


def format_table(results: dict[str, dict[str, float]], intervals: dict | None = None,
                 columns: Sequence[str] = tuple(METRIC_ORDER)) -> str:
    """A Markdown table of ``columns`` (those any row has), BLEU-1/BLEU-4/ROUGE-L with their intervals."""
    cols = [m for m in columns if any(m in r for r in results.values())]
    lines = ["| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, res in results.items():
        cells = []
        for m in cols:
            v = res.get(m)
            cell = "" if v is None else _fmt(m, v)
            ci = (intervals or {}).get(name, {}).get(m)
            if ci is not None and m in SHOWN_INTERVALS:
                cell += f" ({_fmt(m, ci[0])}-{_fmt(m, ci[1])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_differences(differences: dict) -> str:
    """One row per fine-tuned run: its paired bootstrap difference to the best text baseline per metric."""
    if not differences:
        return ""
    metrics = [m for m in ("BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "SemSim")
               if any(m in d for d in differences.values())]
    lines = ["| run | " + " | ".join(f"{m} (vs)" for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, diffs in differences.items():
        cells = [f"{d['diff']:+.2f} ({d['low']:+.2f} to {d['high']:+.2f}; {d['baseline']})"
                 for d in (diffs[m] for m in metrics)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class TextScorer:
    """Scores every system's texts on the same records: PETER's metrics, the diversity, personalization and
    grounding columns, semantic similarity, bootstrap intervals and paired differences."""

    def __init__(self, records, references, train, vocabulary, max_len: int, bootstrap: int = 1000,
                 semantic: bool = True):
        self.records, self.references, self.vocabulary, self.max_len = records, references, vocabulary, max_len
        self.refs = [tokenize(t)[:max_len] for t in references]
        self.truth = [r.feature for r in records]
        self.matcher = FeatureMatcher(vocabulary)
        self.item_features: dict[str, set[str]] = {}
        user_features: dict[str, set[str]] = {}
        for r in train:
            feats = r.features or [r.feature]
            self.item_features.setdefault(r.item, set()).update(feats)
            user_features.setdefault(r.user, set()).update(feats)
        self.user_features = [user_features.get(r.user, set()) for r in records]
        self.semantic = semantic
        self.samples = intervals_mod.resamples(len(records), bootstrap) if bootstrap and records else None
        self.sentence_scores: dict[str, intervals_mod.SentenceScores] = {}
        self.intervals: dict[str, dict[str, list[float]]] = {}

    def score(self, name: str, texts: Sequence[str]) -> dict[str, float]:
        hyps = [tokenize(t)[:self.max_len] for t in texts]
        row = text_metrics(self.refs, hyps, self.truth, self.vocabulary)
        row["UserFeat"] = M.user_feature_match([self.matcher.find(h) for h in hyps], self.user_features)
        row.update(check_rates(texts, self.records, self.item_features, self.vocabulary))
        extra = {}
        if self.semantic and texts:
            from recreason.evaluation.semantic import similarity_scores

            extra["SemSim"] = similarity_scores(self.references, texts)
            row["SemSim"] = sum(extra["SemSim"]) / len(texts)
        if self.samples is not None:
            scores = intervals_mod.SentenceScores(self.refs, hyps, extra)
            self.sentence_scores[name] = scores
            self.intervals[name] = intervals_mod.intervals(scores, self.samples)
        return row

    def differences(self, results: dict, systems: Sequence[str]) -> dict:
        """For each of ``systems``: the paired difference to the best text baseline on each metric (the
        baseline with the higher value on that metric)."""
        baselines = [b for b in TEXT_BASELINES if b in self.sentence_scores]
        out = {}
        for name in systems:
            if name not in self.sentence_scores or not baselines:
                continue
            diffs = {}
            for metric in (*intervals_mod.INTERVAL_METRICS, "SemSim"):
                if metric not in results[name]:
                    continue
                best = max(baselines, key=lambda b: results[b].get(metric, float("-inf")))
                d = intervals_mod.paired_difference(self.sentence_scores[name], self.sentence_scores[best],
                                                    self.samples)[metric]
                diffs[metric] = {"baseline": best, **d}
            out[name] = diffs
        return out


def generate_for_run(run: Run, records, system: str, gen_cfg: GenerateConfig, progress: bool = True, dataset=None,
                     predictor: Predictor | None = None) -> list[str]:
    """Texts for ``records`` from the fine-tuned run or its zero-shot base model, through the Predictor."""
    predictor = predictor or Predictor(run, gen_cfg, system=system, dataset=dataset)
    return predictor.explain_records(records, progress=progress)


def select_records(run: Run, dataset, split: str, gen_cfg: GenerateConfig):
    """(records, references) that a split's text metrics score: the first ``generate.max_records`` (all when
    unset) that have a reference."""
    records = dataset.subset(run.info["split_seed"], split)
    if gen_cfg.max_records:
        records = records[: gen_cfg.max_records]
    refs = [target_text(r, run.info["target"]) for r in records]
    keep = [i for i, ref in enumerate(refs) if ref]
    return [records[i] for i in keep], [refs[i] for i in keep]


def _cached_texts(path: Path, records, fingerprint: str) -> list[str] | None:
    """Texts generated earlier for exactly these records by exactly this model and these settings."""
    meta = path.with_suffix(".meta.json")
    if not (path.exists() and meta.exists()) or json.loads(meta.read_text()).get("fingerprint") != fingerprint:
        return None
    rows = read_generated(path)
    if [r["index"] for r in rows] != [r.index for r in records]:
        return None
    return [r["generated"] for r in rows]


def rating_and_ranking(predictor: Predictor, records, negatives, low: float, high: float, texts=None) -> dict[str, float]:
    """RMSE/MAE, interest accuracy/macro-F1, HR@10/NDCG@10 and sentiment agreement of a run's heads."""
    import torch

    from recreason.models.personalized import INTEREST_LABELS, interest_class

    out: dict[str, float] = {}
    model = predictor.model
    if not getattr(model, "uses_ids", False):
        return out
    actual = [r.rating for r in records]
    predicted = predictor.head_ratings([r.user for r in records], [r.item for r in records])
    if predicted is not None:
        out["RMSE"] = M.rmse(predicted, actual, low, high)
        out["MAE"] = M.mae(predicted, actual, low, high)
        out.update(ranking.evaluate_ranking(lambda user, items: predictor.head_ratings([user] * len(items), items),
                                            records, negatives, ks=(10,)))
        if texts is not None:
            out["SentAgree"] = M.sentiment_agreement(texts, predicted, midpoint=(low + high) / 2)
    u, i = model.ids([r.user for r in records], [r.item for r in records])
    with torch.no_grad():
        interest = model.predict_interest(u.to(predictor.device), i.to(predictor.device))
    if interest is not None:
        report = M.classification_report(interest.argmax(-1).cpu().tolist(), [interest_class(a) for a in actual],
                                         INTEREST_LABELS)
        out["InterestF1"] = report["macro_f1"]
        out["InterestAcc"] = report["accuracy"]
        out["InterestPerClass"] = report["per_class"]
    return out


def _full_ranking(scorer, train, records, bootstrap: int) -> dict:
    full = ranking.full_ranking(scorer, train, records, ks=(10, 20), n_resamples=max(bootstrap, 1))
    return {k: v for k, v in full.items() if k in ("Recall@10", "Recall@20", "full NDCG@10")}


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    split: str = "test",
    gen_cfg: GenerateConfig | None = None,
    systems: Sequence[str] = SYSTEMS,
    max_len: int = 20,
    regenerate: bool = False,
    progress: bool = True,
    out_dir: str | Path | None = None,
    n_negatives: int = 99,
    bootstrap: int = 1000,
    semantic: bool = True,
) -> dict:
    """One table: baselines once, then one fine-tuned row per run (all runs must share dataset and split)."""
    gen_cfg = gen_cfg or GenerateConfig()
    runs = [Run(d) for d in run_dirs]
    first = runs[0]
    for other in runs[1:]:
        if (other.info["dataset"], other.info["split_seed"]) != (first.info["dataset"], first.info["split_seed"]):
            raise ConfigError(f"{other.dir} uses another dataset or split than {first.dir}; rows would not compare")
    dataset = first.dataset()
    records, references = select_records(first, dataset, split, gen_cfg)
    train = dataset.subset(first.info["split_seed"], "train")
    low, high = dataset.rating_range
    negatives = ranking.sample_negatives(dataset.records, records, n_negatives, seed=0)
    scorer = TextScorer(records, references, train, dataset.features, max_len, bootstrap, semantic)
    results: dict[str, dict[str, float]] = {}
    texts_by_system: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    for system in systems:
        if system not in SYSTEMS:
            raise ConfigError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    for system in [s for s in systems if s != "fine-tuned"]:
        start = time.time()
        path = first.dir / "generated" / f"{split}-{system}.jsonl"
        if system == "retrieval":
            baseline = RetrievalBaseline(train)
            texts = [baseline.explain(r.user, r.item) for r in records]
            fingerprint = None
        else:
            fingerprint = generation_fingerprint(first, system, gen_cfg)
            texts = None if regenerate else _cached_texts(path, records, fingerprint)
            if texts is None:
                texts = generate_for_run(first, records, system, gen_cfg, progress, dataset)
        write_generated(path, records, texts, references, dataset.features, fingerprint)
        results[system] = scorer.score(system, texts)
        texts_by_system[system] = texts
        timings[system] = time.time() - start
    if "fine-tuned" in systems:
        start = time.time()
        pop = ranking.PopularityBaseline(train)
        mf = ranking.MatrixFactorization(train)
        for name, base in (("popularity", pop), ("matrix factorization", mf)):
            predicted = [base.predict(r.user, r.item) for r in records]
            row = {"RMSE": M.rmse(predicted, [r.rating for r in records], low, high),
                   "MAE": M.mae(predicted, [r.rating for r in records], low, high)}
            row.update(ranking.evaluate_ranking(base.score, records, negatives, ks=(10,)))
            row.update(_full_ranking(base.score, train, records, bootstrap))
            results[name] = row
        timings["rating baselines"] = time.time() - start
        for run in runs:
            start = time.time()
            name = "fine-tuned" if len(runs) == 1 else f"fine-tuned: {run.dir.name}"
            path = run.dir / "generated" / f"{split}-fine-tuned.jsonl"
            fingerprint = generation_fingerprint(run, "fine-tuned", gen_cfg)
            texts = None if regenerate else _cached_texts(path, records, fingerprint)
            predictor = None
            if texts is None or run.train_config.rating_head or run.train_config.interest_head:
                predictor = Predictor(run, gen_cfg, dataset=dataset)
            if texts is None:
                texts = generate_for_run(run, records, "fine-tuned", gen_cfg, progress, dataset, predictor)
            write_generated(path, records, texts, references, dataset.features, fingerprint)
            row = scorer.score(name, texts)
            texts_by_system[name] = texts
            if predictor is not None:
                row.update(rating_and_ranking(predictor, records, negatives, low, high, texts))
                if "HR@10" in row:
                    row.update(_full_ranking(lambda u, items: predictor.head_ratings([u] * len(items), items),
                                             train, records, bootstrap))
            results[name] = row
            timings[name] = time.time() - start
            ranker_dir = run.dir / "ranker"
            if (ranker_dir / "ranker.json").exists():
                ranker = Ranker.load(ranker_dir)
                label = f"ranker ({ranker.config.model})" + ("" if len(runs) == 1 else f": {run.dir.name}")
                results[label] = {**ranking.evaluate_ranking(ranker.score, records, negatives, ks=(10,)),
                                  **_full_ranking(ranker.score, train, records, bootstrap)}
    table = format_table(results, scorer.intervals)
    fine_tuned = [n for n in results if n.startswith("fine-tuned")]
    differences = scorer.differences(results, fine_tuned)
    capped = f" (the first {gen_cfg.max_records}: generate.max_records caps it)" if gen_cfg.max_records else \
        " (the whole split)"
    report = {
        "runs": [str(r.dir) for r in runs],
        "split": split,
        "records": len(records),
        "max_len": max_len,
        "ranking_protocol": f"each test item ranked against {n_negatives} sampled items the user never "
                            "interacted with; ties rank the test item last",
        "generation": asdict(gen_cfg),
        "results": results,
        "intervals": scorer.intervals,
        "bootstrap_resamples": bootstrap,
        "differences_to_best_baseline": differences,
        "seconds": timings,
    }
    out = Path(out_dir) if out_dir else first.dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{split}.md").write_text(
        f"# Evaluation on the {split} split: {len(records)} records{capped}\n\n{table}\n\n"
        + (f"Paired bootstrap difference of each fine-tuned run to the best text baseline on that metric "
           f"(95% interval, {bootstrap} resamples):\n\n{format_differences(differences)}\n\n" if differences else "")
        + f"Text metrics on the first {max_len} tokens; BLEU/ROUGE x100 with 95% bootstrap intervals "
        f"({bootstrap} resamples of the records); SemSim: cosine similarity x100 of all-MiniLM-L6-v2 embeddings "
        f"of reason and reference; DIV lower is better; Distinct-n: distinct n-grams over all n-grams; Generic: "
        f"share of reasons that are one of the 10 most frequent; UserFeat: share naming a feature of the user's "
        f"own training reviews. "
        f"HR@10/NDCG@10: {report['ranking_protocol']}. Recall@10/20 and full NDCG@10: every training item the "
        f"user has not interacted with in training is ranked; the user's {split} items are relevant. RMSE/MAE with predictions clipped to "
        f"[{low:g}, {high:g}]. SentAgree: share of reasons whose VADER polarity matches the predicted rating. "
        f"Filtered: share the serving safety filter would replace; Ungrounded: share naming a feature absent "
        f"from the item's training reviews.\n"
    )
    report["table"] = table
    report["differences_table"] = format_differences(differences)
    from recreason.evaluation.report import write_report

    name = "report.html" if split == "test" else f"report-{split}.html"
    report["html"] = str(write_report(out / name, report, first.dir, records, references, texts_by_system,
                                      scorer.item_features, dataset.features))
    return report


def evaluate_run(run_dir: str | Path, *args, **kwargs) -> dict:
    """:func:`evaluate_runs` for a single run."""
    return evaluate_runs([run_dir], *args, **kwargs)
