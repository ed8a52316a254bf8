"""Prepared dataset directories: writing them (``recreason prepare``) and reading them back.

Layout of a dataset directory::

    records.jsonl          one explained record per line (see Explained)
    features.json          feature vocabulary -> document frequency
    splits/<seed>/{train,validation,test}.index   space-separated record indices
    rejects.jsonl          invalid input records: line, reason, raw text
    item_rejects.jsonl     invalid rows of the item table (with --items)
    skipped.jsonl          valid reviews without an explanation sentence, with the reason
    domain_features.json   a combined dataset's vocabulary of each domain (recreason combine)
    stats.json             counts and settings
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from recreason.config import PrepareConfig
from recreason.data.extract import ExtractConfig, detect_language, extract
from recreason.data.items import read_items
from recreason.data.readers import Limits, read_reviews
from recreason.data.records import DataError, Explained
from recreason.data.split import SPLIT_METHODS, split_indices
from recreason.errors import ConfigError
from recreason.text import tokenize

SPLITS = ("train", "validation", "test")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Dataset:
    """A prepared dataset directory loaded in memory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "records.jsonl").exists():
            raise DataError(f"{self.root} is not a prepared dataset (no records.jsonl); run 'recreason prepare' first")
        with open(self.root / "records.jsonl", encoding="utf-8") as fh:
            self.records = [Explained.from_dict(json.loads(line)) for line in fh]
        self.features: dict[str, int] = json.loads((self.root / "features.json").read_text(encoding="utf-8"))
        stats_path = self.root / "stats.json"
        self.stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.exists() else {}

    @property
    def rating_range(self) -> tuple[float, float]:
        r = self.stats.get("rating_range", [1.0, 5.0])
        return float(r[0]), float(r[1])

    @property
    def domains(self) -> list[str]:
        """The domains of a combined dataset (``recreason combine``); empty for a dataset of one."""
        return list(self.stats.get("domains", {}))

    def domain_features(self, domain: str | None) -> dict[str, int]:
        """The feature vocabulary of one domain of a combined dataset (all features when ``domain`` is None)."""
        if domain is None:
            return self.features
        if domain not in self.domains:
            raise DataError(f"{self.root} has no domain {domain!r}; its domains: {', '.join(self.domains) or 'none'}")
        return json.loads((self.root / "domain_features.json").read_text(encoding="utf-8"))[domain]

    @property
    def language(self) -> str:
        """``en`` or ``zh``: what prepare read (datasets prepared before languages were told apart are English)."""
        return self.stats.get("language", "en")

    def seeds(self) -> list[int]:
        return sorted(int(p.name) for p in (self.root / "splits").iterdir() if p.name.isdigit())

    def split(self, seed: int = 1) -> dict[str, list[int]]:
        folder = self.root / "splits" / str(seed)
        if not folder.exists():
            raise DataError(f"{self.root} has no split for seed {seed}; available: {self.seeds()}")
        return {name: [int(x) for x in (folder / f"{name}.index").read_text().split()] for name in SPLITS}

    def subset(self, seed: int, name: str) -> list[Explained]:
        return [self.records[i] for i in self.split(seed)[name]]


def prepare(source: str | Path, out_dir: str | Path, config: PrepareConfig | None = None, progress: bool = True) -> dict:
    """Read, validate, extract and split ``source`` into ``out_dir``; return the stats."""
    config = config or PrepareConfig()
    if config.split not in SPLIT_METHODS:
        raise ConfigError(f"prepare.split must be one of {', '.join(SPLIT_METHODS)}, got {config.split!r}")
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise DataError(f"--out {final} is a file; give a directory for the dataset")
    # Everything is written to a temporary directory beside the target and renamed into place at the end,
    # so a failed run never leaves a mix of new and old files.
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        stats = _prepare_into(source, out, config, progress)
    except BaseException as exc:
        rejects = out / "rejects.jsonl"
        if isinstance(exc, DataError) and rejects.exists():  # keep the rejects of a refused file to look at
            kept = final.with_name(final.name + ".rejects.jsonl")
            os.replace(rejects, kept)
            shutil.rmtree(out, ignore_errors=True)
            raise DataError(f"{exc} (all rejects written to {kept})") from None
        shutil.rmtree(out, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}-old")
    if final.exists():
        os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old, ignore_errors=True)
    return stats


def _prepare_into(source: str | Path, out: Path, config: PrepareConfig, progress: bool) -> dict:
    rating_range = (config.rating_min, config.rating_max)
    limits = Limits(config.max_record_bytes, config.max_review_chars, config.max_id_chars, config.min_timestamp,
                    config.max_timestamp, config.max_row_lines)
    try:
        result = read_reviews(source, config.schema, rating_range, config.max_reject_fraction, limits, config.columns)
    except DataError as exc:
        if hasattr(exc, "result"):
            write_jsonl(out / "rejects.jsonl", (r.to_dict() for r in exc.result.rejects))
        raise
    write_jsonl(out / "rejects.jsonl", (r.to_dict() for r in result.rejects))
    reviews = result.reviews[: config.max_records] if config.max_records else result.reviews
    item_stats = None
    if config.items:
        table = read_items(config.items, limits, config.item_columns, config.item_attributes or None)
        write_jsonl(out / "item_rejects.jsonl", (r.to_dict() for r in table.rejects))
        item_stats = table.stats({r.item_id for r in reviews})
        for review in reviews:  # the table fills what the log does not say of the item
            title, attributes = table.items.get(review.item_id, ("", {}))
            review.title = review.title or title
            review.attributes = {**attributes, **review.attributes}
    language = detect_language([r.text for r in reviews]) if config.language == "auto" else config.language
    explained, skipped, vocabulary = extract(
        reviews,
        ExtractConfig(config.min_feature_df, config.min_words, config.max_words, config.n_process, language=language),
        rating_range,
        progress=progress,
    )
    if not explained:
        raise DataError(f"{source}: no review has an explanation sentence; check the text field and min_feature_df")
    write_jsonl(out / "records.jsonl", (e.to_dict() for e in explained))
    write_jsonl(
        out / "skipped.jsonl",
        ({"line": r.line, "user_id": r.user_id, "item_id": r.item_id, "reason": why} for r, why in skipped),
    )
    # Features that no explanation uses are still part of the vocabulary (FCR counts all of them).
    write_json(out / "features.json", vocabulary)
    users = [e.user for e in explained]
    items = [e.item for e in explained]
    timestamps = [e.timestamp for e in explained] if config.split == "temporal" else None
    split_sizes = {}
    for seed in config.seeds:
        parts = split_indices(users, items, seed, timestamps=timestamps, cold_users=config.cold_users)
        folder = out / "splits" / str(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for name, idx in parts.items():
            (folder / f"{name}.index").write_text(" ".join(map(str, idx)) + "\n")
        split_sizes[str(seed)] = {k: len(v) for k, v in parts.items()}
    lengths = [len(e.sentence.split()) if language == "en" else sum(1 for t in tokenize(e.sentence) if t.isalnum())
               for e in explained]  # words: jieba's for Chinese
    stats = {
        "source": str(source),
        "schema": result.schema,
        "language": language,
        "input_records": result.total,
        "rejected": len(result.rejects),
        "valid": len(result.reviews),
        "used": len(reviews),
        "unused": len(result.reviews) - len(reviews),  # past prepare.max_records
        "skipped_no_explanation": len(skipped),
        "explained": len(explained),
        "users": len(set(users)),
        "items": len(set(items)),
        "features": len(vocabulary),
        "rating_range": list(rating_range),
        "mean_rating": statistics.fmean(e.rating for e in explained),
        "median_sentence_words": statistics.median(lengths),
        "splits": split_sizes,
        "settings": asdict(config),
    }
    if item_stats is not None:
        stats["item_table"] = {"source": str(config.items), **item_stats}
    write_json(out / "stats.json", stats)
    return stats
