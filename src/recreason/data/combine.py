"""One dataset from several prepared ones, each record tagged with its domain (``recreason combine``).

A model trained on the combined dataset learns every domain at once; the domain is the first item attribute,
so the prompt names it ("Item attributes: domain: digital-music; ..."). Each domain keeps its own split:
the combined split of a seed is the union of the domains' splits of that seed, so the combined run is scored
on exactly the test records of each per-domain run (``recreason evaluate --domain NAME``), with that domain's
own feature vocabulary (``domain_features.json``), and the two can be compared record by record.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from recreason.data.dataset import SPLITS, Dataset, write_json, write_jsonl
from recreason.data.records import DataError


def combine(sources: dict[str, str | Path], out_dir: str | Path) -> dict:
    """Write the combined dataset of ``sources`` ({domain name: prepared dataset directory}); return its stats."""
    if len(sources) < 2:
        raise DataError("combine needs at least two prepared datasets (NAME=DIR each)")
    datasets = {name: Dataset(path) for name, path in sources.items()}
    seeds = sorted(set.intersection(*(set(d.seeds()) for d in datasets.values())))
    if not seeds:
        raise DataError("the datasets share no split seed; prepare them with a common --seeds value")
    ranges = {tuple(d.rating_range) for d in datasets.values()}
    if len(ranges) > 1:
        raise DataError(f"the datasets rate on different scales {sorted(ranges)}; combine datasets of one scale")
    owner: dict[str, str] = {}
    for name, data in datasets.items():
        for item in {r.item for r in data.records}:
            if owner.setdefault(item, name) != name:
                raise DataError(f"item {item!r} is in both {owner[item]!r} and {name!r}; item ids must be unique "
                                "across the combined domains")
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        stats = _combine_into(datasets, sources, seeds, out)
        old = final.with_name(f".{final.name}-old")
        if final.exists():
            os.replace(final, old)
        os.replace(out, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return stats


def _combine_into(datasets: dict[str, Dataset], sources, seeds: list[int], out: Path) -> dict:
    rows, features, domains = [], {}, {}
    splits = {seed: {name: [] for name in SPLITS} for seed in seeds}
    for name, data in datasets.items():
        offset = len(rows)
        for record in data.records:
            row = record.to_dict()
            row["index"] = offset + record.index
            row["attributes"] = {"domain": name, **{k: v for k, v in record.attributes.items() if k != "domain"}}
            rows.append(row)
        for feature, df in data.features.items():
            features[feature] = features.get(feature, 0) + df
        for seed in seeds:
            for part, indices in data.split(seed).items():
                splits[seed][part].extend(offset + i for i in indices)
        domains[name] = {"dataset": str(sources[name]), "explained": len(data.records), "first_index": offset,
                         "language": data.language, "features": len(data.features)}
    write_jsonl(out / "records.jsonl", rows)
    write_json(out / "features.json", dict(sorted(features.items(), key=lambda kv: -kv[1])))
    write_json(out / "domain_features.json", {name: data.features for name, data in datasets.items()})
    for seed, parts in splits.items():
        folder = out / "splits" / str(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for part, indices in parts.items():
            (folder / f"{part}.index").write_text(" ".join(map(str, sorted(indices))) + "\n")
    languages = {d.language for d in datasets.values()}
    first = next(iter(datasets.values()))
    stats = {
        "source": "combined",
        "domains": domains,
        "language": languages.pop() if len(languages) == 1 else "mixed",
        "explained": len(rows),
        "users": len({r["user"] for r in rows}),
        "items": len({r["item"] for r in rows}),
        "features": len(features),
        "rating_range": list(first.rating_range),
        "mean_rating": statistics.fmean(r["rating"] for r in rows),
        "splits": {str(seed): {part: len(ix) for part, ix in parts.items()} for seed, parts in splits.items()},
    }
    write_json(out / "stats.json", stats)
    return stats
