"""``recreason evaluate``: the fine-tuned model against baselines on one split.

Systems, all on the same records and prompts:

* ``zero-shot``: the base model before fine-tuning, given the same prompt;
* ``retrieval``: the training sentence of the most similar user/item context;
* ``fine-tuned``: the run's best checkpoint (one row per run when several are given);
* ``popularity`` and ``matrix factorization``: rating and ranking baselines, shown with the
  fine-tuned rows, whose rating/interest heads (when trained) are scored by RMSE, MAE,
  interest macro-F1, HR@10 and NDCG@10 over sampled negatives, and sentiment agreement.

Generated texts go to the run's ``generated/<split>-<system>.jsonl`` (:class:`~recreason.rundir.RunPaths`)
with a fingerprint of the weights and settings that wrote them; a later evaluation reuses them only when the
fingerprint and the records match (``--regenerate`` forces new texts). The table goes to the run's
``eval/<split>.json`` and ``.md`` (and an HTML report) and is printed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
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
from recreason.rundir import Run, checkpoint_stamp, report_files
from recreason.text import FeatureMatcher, han_share, split_chars, tokenize

SYSTEMS = ("zero-shot", "retrieval", "fine-tuned")
METRIC_ORDER = ["BLEU-1", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-1 (words)", "BLEU-4 (words)",
                "ROUGE-L (words)", "Chinese", "SemSim", "USR", "FMR", "FCR", "DIV",
                "Distinct-1", "Distinct-2", "Generic", "UserFeat", "Ungrounded", "Filtered",
                "RMSE", "MAE", "InterestF1", "HR@10", "NDCG@10", "Recall@10", "Recall@20", "full NDCG@10", "SentAgree"]
FRACTIONS = {"USR", "FMR", "FCR", "DIV", "RMSE", "MAE", "InterestF1", "InterestAcc", "HR@10", "NDCG@10", "SentAgree",
             "Recall@10", "Recall@20", "full NDCG@10",
             "Ungrounded", "Filtered", "Distinct-1", "Distinct-2", "Generic", "UserFeat", "Chinese"}
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
                 semantic: bool = True, language: str = "en"):
        self.records, self.references, self.vocabulary, self.max_len = records, references, vocabulary, max_len
        self.language = language
        self.refs = [tokenize(t)[:max_len] for t in references]
        self.ref_chars = [split_chars(t) for t in self.refs]
        self.truth = [r.feature for r in records]
        self.matcher = FeatureMatcher(vocabulary)
        self.item_features: dict[str, set[str]] = {}
        user_features: dict[str, set[str]] = {}
        for r in train:
            feats = r.features or [r.feature]
            self.item_features.setdefault(r.item, set()).update(feats)
            user_features.setdefault(r.user, set()).update(feats)
        self.user_features = [user_features.get(r.user, set()) for r in records]
        # all-MiniLM-L6-v2 was trained on English only: its similarities of Chinese sentences measure nothing.
        self.semantic = semantic and language == "en"
        self.samples = intervals_mod.resamples(len(records), bootstrap) if bootstrap and records else None
        self.sentence_scores: dict[str, intervals_mod.SentenceScores] = {}
        self.intervals: dict[str, dict[str, list[float]]] = {}

    def score(self, name: str, texts: Sequence[str]) -> dict[str, float]:
        """Every column for one system. On Chinese (``language: zh``) BLEU and ROUGE count characters (the
        headline: no segmenter's dictionary decides them) and "(words)" columns count jieba's words; features,
        USR and the rest count words either way."""
        hyps = [tokenize(t)[:self.max_len] for t in texts]
        row = text_metrics(self.refs, hyps, self.truth, self.vocabulary)
        row["UserFeat"] = M.user_feature_match([self.matcher.find(h) for h in hyps], self.user_features)
        refs, scored = self.refs, hyps
        if self.language == "zh":
            for metric in ("BLEU-1", "BLEU-4", "ROUGE-L"):
                row[f"{metric} (words)"] = row[metric]
            # what the reasons are written in: a model that answers a Chinese log in English is not explaining
            row["Chinese"] = sum(han_share(t) >= 0.5 for t in texts) / len(texts) if texts else 0.0
            refs, scored = self.ref_chars, [split_chars(h) for h in hyps]  # features above stay on words
            row.update({"BLEU-1": M.bleu(refs, scored, 1), "BLEU-4": M.bleu(refs, scored, 4),
                        "ROUGE-1": M.rouge_n(refs, scored, 1), "ROUGE-2": M.rouge_n(refs, scored, 2),
                        "ROUGE-L": M.rouge_l(refs, scored)})
        row.update(check_rates(texts, self.records, self.item_features, self.vocabulary))
        extra = {}
        if self.semantic and texts:
            from recreason.evaluation.semantic import similarity_scores

            extra["SemSim"] = similarity_scores(self.references, texts)
            row["SemSim"] = sum(extra["SemSim"]) / len(texts)
        if self.samples is not None:
            scores = intervals_mod.SentenceScores(refs, scored, extra)
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


def select_records(run: Run, dataset, split: str, gen_cfg: GenerateConfig, domain: str | None = None):
    """(records, references) that a split's text metrics score: the first ``generate.max_records`` (all when
    unset) that have a reference, of one ``domain`` of a combined dataset when given."""
    records = dataset.subset(run.info["split_seed"], split)
    if domain is not None:
        dataset.domain_features(domain)  # an unknown domain stops here, naming the ones there are
        records = [r for r in records if r.attributes.get("domain") == domain]
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


@dataclass
class _Split:
    """What every row of one evaluation shares: the records, their references and the scorer."""

    runs: list[Run]
    split: str
    dataset: object
    records: list
    references: list[str]
    train: list
    negatives: dict
    scorer: TextScorer
    bootstrap: int
    domain: str | None = None  # one domain of a combined dataset

    @property
    def texts_key(self) -> str:
        """The split's name in RUN/generated/: ``test``, or ``test-DOMAIN`` for one domain of a combined dataset."""
        return f"{self.split}-{self.domain}" if self.domain else self.split

    @property
    def rating_range(self) -> tuple[float, float]:
        return self.dataset.rating_range


def _open_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    runs = [Run(d) for d in run_dirs]
    first = runs[0]
    for other in runs[1:]:
        if (other.info["dataset"], other.info["split_seed"]) != (first.info["dataset"], first.info["split_seed"]):
            raise ConfigError(f"{other.dir} uses another dataset or split than {first.dir}; rows would not compare")
    return runs


def _texts(run: Run, ev: _Split, system: str, gen_cfg: GenerateConfig, regenerate: bool, progress: bool,
           predictor: Predictor | None = None) -> list[str]:
    """A generated system's texts for the records: cached in RUN/generated/ when the fingerprint matches."""
    path = run.paths.generated(ev.texts_key, system)
    fingerprint = generation_fingerprint(run, system, gen_cfg)
    texts = None if regenerate else _cached_texts(path, ev.records, fingerprint)
    if texts is None:
        texts = generate_for_run(run, ev.records, system, gen_cfg, progress, ev.dataset, predictor)
    write_generated(path, ev.records, texts, ev.references, ev.dataset.features, fingerprint)
    return texts


def _baseline_rows(ev: _Split, systems: Sequence[str], gen_cfg, regenerate: bool, progress: bool,
                   results: dict, texts_by_system: dict, timings: dict) -> None:
    """The zero-shot and retrieval rows (texts kept in the first run's generated/ folder)."""
    first = ev.runs[0]
    for system in [s for s in systems if s != "fine-tuned"]:
        start = time.time()
        if system == "retrieval":
            baseline = RetrievalBaseline(ev.train)
            texts = [baseline.explain(r.user, r.item) for r in ev.records]
            write_generated(first.paths.generated(ev.texts_key, system), ev.records, texts, ev.references,
                            ev.dataset.features)
        else:
            texts = _texts(first, ev, system, gen_cfg, regenerate, progress)
        results[system] = ev.scorer.score(system, texts)
        texts_by_system[system] = texts
        timings[system] = time.time() - start


def _rating_baseline_rows(ev: _Split) -> dict[str, dict[str, float]]:
    """Popularity and matrix factorization: the rating and ranking rows the fine-tuned heads are read against."""
    low, high = ev.rating_range
    actual = [r.rating for r in ev.records]
    rows = {}
    for name, base in (("popularity", ranking.PopularityBaseline(ev.train)),
                       ("matrix factorization", ranking.MatrixFactorization(ev.train))):
        predicted = [base.predict(r.user, r.item) for r in ev.records]
        row = {"RMSE": M.rmse(predicted, actual, low, high), "MAE": M.mae(predicted, actual, low, high)}
        row.update(ranking.evaluate_ranking(base.score, ev.records, ev.negatives, ks=(10,)))
        row.update(_full_ranking(base.score, ev.train, ev.records, ev.bootstrap))
        rows[name] = row
    return rows


def _fine_tuned_rows(ev: _Split, run: Run, gen_cfg, regenerate: bool, progress: bool) -> tuple[dict, list[str]]:
    """The run's text row (with its heads' rating and ranking metrics) and its ranker's row, when it has one."""
    name = "fine-tuned" if len(ev.runs) == 1 else f"fine-tuned: {run.dir.name}"
    predictor = None
    if run.train_config.rating_head or run.train_config.interest_head:
        predictor = Predictor(run, gen_cfg, dataset=ev.dataset)
    texts = _texts(run, ev, "fine-tuned", gen_cfg, regenerate, progress, predictor)
    row = ev.scorer.score(name, texts)
    if predictor is not None:
        row.update(rating_and_ranking(predictor, ev.records, ev.negatives, *ev.rating_range, texts))
        if "HR@10" in row:
            row.update(_full_ranking(lambda u, items: predictor.head_ratings([u] * len(items), items),
                                     ev.train, ev.records, ev.bootstrap))
    rows = {name: row}
    if Ranker.exists(run.paths.ranker):
        ranker = Ranker.load(run.paths.ranker)
        label = f"ranker ({ranker.config.model})" + ("" if len(ev.runs) == 1 else f": {run.dir.name}")
        rows[label] = {**ranking.evaluate_ranking(ranker.score, ev.records, ev.negatives, ks=(10,)),
                       **_full_ranking(ranker.score, ev.train, ev.records, ev.bootstrap)}
    return rows, texts


def _notes(report: dict, split: str, low: float, high: float) -> str:
    """The paragraph under the table that says what each column measures."""
    chinese = ("Chinese: BLEU/ROUGE count Han characters (the headline, independent of the segmenter), the "
               "'(words)' columns count jieba's words, features and USR count words; Chinese: share of reasons mostly "
               "in Han characters; SemSim is left empty "
               "(all-MiniLM-L6-v2 reads English only); sentiment is the rating's. ") \
        if report.get("language") == "zh" else ""
    return chinese + (
        f"Text metrics on the first {report['max_len']} tokens; BLEU/ROUGE x100 with 95% bootstrap intervals "
        f"({report['bootstrap_resamples']} resamples of the records); SemSim: cosine similarity x100 of "
        f"all-MiniLM-L6-v2 embeddings of reason and reference; DIV lower is better; Distinct-n: distinct n-grams "
        f"over all n-grams; Generic: share of reasons that are one of the 10 most frequent; UserFeat: share naming "
        f"a feature of the user's own training reviews. "
        f"HR@10/NDCG@10: {report['ranking_protocol']}. Recall@10/20 and full NDCG@10: every training item the "
        f"user has not interacted with in training is ranked; the user's {split} items are relevant. RMSE/MAE "
        f"with predictions clipped to [{low:g}, {high:g}]. SentAgree: share of reasons whose VADER polarity "
        f"matches the predicted rating. Filtered: share the serving safety filter would replace; Ungrounded: share "
        f"naming a feature absent from the item's training reviews.\n")


def _write_report_files(out_dir: Path, report: dict, ev: _Split, gen_cfg: GenerateConfig,
                        texts_by_system: dict) -> None:
    """SPLIT.json, SPLIT.md and the HTML report into ``out_dir``; the report gains ``html``."""
    from recreason.evaluation.report import write_report

    files = report_files(out_dir, ev.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    files["json"].write_text(json.dumps({k: v for k, v in report.items() if k not in ("table", "differences_table")},
                                        indent=2) + "\n")
    capped = f" (the first {gen_cfg.max_records}: generate.max_records caps it)" if gen_cfg.max_records else \
        " (the whole split)"
    differences = report["differences_table"]
    files["md"].write_text(
        f"# Evaluation on the {ev.split} split: {len(ev.records)} records{capped}\n\n{report['table']}\n\n"
        + (f"Paired bootstrap difference of each fine-tuned run to the best text baseline on that metric "
           f"(95% interval, {ev.bootstrap} resamples):\n\n{differences}\n\n" if differences else "")
        + _notes(report, ev.split, *ev.rating_range))
    report["html"] = str(write_report(files["html"], report, ev.runs[0].paths.train_log, ev.records, ev.references,
                                      texts_by_system, ev.scorer.item_features, ev.dataset.features))


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
    domain: str | None = None,
) -> dict:
    """One table: baselines once, then one fine-tuned row per run (all runs must share dataset and split).
    Written to ``out_dir`` (the first run's eval/ folder by default, eval/DOMAIN for one ``domain`` of a
    combined dataset, scored with that domain's feature vocabulary) as JSON, Markdown and HTML."""
    gen_cfg = gen_cfg or GenerateConfig()
    for system in systems:
        if system not in SYSTEMS:
            raise ConfigError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    runs = _open_runs(run_dirs)
    first = runs[0]
    dataset = first.dataset()
    records, references = select_records(first, dataset, split, gen_cfg, domain)
    train = dataset.subset(first.split_seed, "train")
    ev = _Split(runs, split, dataset, records, references, train,
                ranking.sample_negatives(dataset.records, records, n_negatives, seed=0),
                TextScorer(records, references, train, dataset.domain_features(domain), max_len, bootstrap, semantic,
                           dataset.language), bootstrap, domain)
    results: dict[str, dict[str, float]] = {}
    texts_by_system: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    _baseline_rows(ev, systems, gen_cfg, regenerate, progress, results, texts_by_system, timings)
    if "fine-tuned" in systems:
        start = time.time()
        results.update(_rating_baseline_rows(ev))
        timings["rating baselines"] = time.time() - start
        for run in runs:
            start = time.time()
            rows, texts = _fine_tuned_rows(ev, run, gen_cfg, regenerate, progress)
            results.update(rows)
            texts_by_system[next(iter(rows))] = texts
            timings[next(iter(rows))] = time.time() - start
    differences = ev.scorer.differences(results, [n for n in results if n.startswith("fine-tuned")])
    report = {
        "runs": [str(r.dir) for r in runs],
        "split": split,
        "records": len(records),
        "max_len": max_len,
        "language": dataset.language,
        "domain": domain,
        "ranking_protocol": f"each test item ranked against {n_negatives} sampled items the user never "
                            "interacted with; ties rank the test item last",
        "generation": asdict(gen_cfg),
        "results": results,
        "intervals": ev.scorer.intervals,
        "bootstrap_resamples": bootstrap,
        "differences_to_best_baseline": differences,
        "seconds": timings,
        "table": format_table(results, ev.scorer.intervals),
        "differences_table": format_differences(differences),
    }
    default_out = first.paths.eval / domain if domain else first.paths.eval
    _write_report_files(Path(out_dir) if out_dir else default_out, report, ev, gen_cfg, texts_by_system)
    return report


def evaluate_run(run_dir: str | Path, *args, **kwargs) -> dict:
    """:func:`evaluate_runs` for a single run."""
    return evaluate_runs([run_dir], *args, **kwargs)
