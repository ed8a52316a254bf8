"""Batch jobs: reasons for a file of (user, item) pairs, or every user's top K, written to a file.

Both go through the same staged call as ``generate`` and the server (:meth:`Predictor.explain` and
:meth:`Predictor.recommend_many`, one call per chunk). Work is done
in chunks; each finished chunk is appended to a journal next to the output (``OUT.journal.jsonl``) and
flushed to disk, so a killed job loses at most the chunk it was writing, and running the same command again
skips what the journal already holds. When every pair is done the output is written in the format its
extension names (``.jsonl``, ``.csv``, ``.parquet``), atomically, and the journal is removed. Bad rows in the
pairs file go to ``OUT.rejects.jsonl`` with their line and reason; they never stop the job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from recreason.errors import ConfigError, DataError, UnknownId
from recreason.inference import Predictor, Request

FORMATS = (".jsonl", ".csv", ".parquet")
MAX_FIELD = 10_000  # characters of one id or history text in a pairs file


@dataclass
class Pair:
    line: int
    user: str
    item: str
    history: list[str]
    item_features: list[str]


def _output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: the extension names the format; use one of {', '.join(FORMATS)}")
    return suffix


def _text_list(value, field: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except json.JSONDecodeError:
            raise ValueError(f"{field}: not a JSON list of strings") from None
    if isinstance(value, list):
        value = [v.get("text") if isinstance(v, dict) else v for v in value]  # history may be [{"text": ...}]
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= MAX_FIELD for v in value):
        raise ValueError(f"{field}: expected a list of strings of at most {MAX_FIELD} characters")
    return value


def _pair(line: int, row) -> Pair:
    if not isinstance(row, dict):
        raise ValueError("expected an object with user_id and item_id")
    ids = []
    for field in ("user_id", "item_id"):
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{field}: missing or empty")
        if len(value) > MAX_FIELD:
            raise ValueError(f"{field}: longer than {MAX_FIELD} characters")
        ids.append(value.strip())
    return Pair(line, ids[0], ids[1], _text_list(row.get("history"), "history"),
                _text_list(row.get("item_features"), "item_features"))


def read_pairs(path: Path) -> tuple[list[Pair], list[dict]]:
    """(valid pairs, rejects with line and reason) from a CSV, JSONL or Parquet pairs file."""
    if not path.exists() or path.is_dir():
        raise DataError(f"{path}: no such pairs file")
    pairs, rejects = [], []

    def take(line: int, row, raw: str = "") -> None:
        try:
            pairs.append(_pair(line, row))
        except ValueError as exc:
            rejects.append({"line": line, "reason": str(exc), "raw": raw[:500]})

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'recreason[parquet]'") from None
        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            take(n, row)
        return pairs, rejects
    with open(path, "rb") as fh:
        data = fh.read().decode("utf-8-sig", errors="replace")
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                rejects.append({"line": n, "reason": f"malformed JSON: {exc}", "raw": raw[:500]})
                continue
            take(n, row, raw)
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(data, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames or not {"user_id", "item_id"} <= set(reader.fieldnames):
            raise DataError(f"{path}: the header must name user_id and item_id columns")
        line = 1
        try:
            for row in reader:
                take(line + 1, row)
                line = reader.line_num
        except csv.Error as exc:
            rejects.append({"line": line + 1, "reason": f"malformed CSV: {exc}", "raw": ""})
    else:
        raise DataError(f"{path}: pairs must be .csv, .tsv, .jsonl or .parquet")
    return pairs, rejects


class Journal:
    """Finished rows, appended chunk by chunk and flushed, read back (minus a torn last line) on resume."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".journal.jsonl")
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for raw in fh:
                    try:
                        self.rows.append(json.loads(raw))
                    except json.JSONDecodeError:  # the chunk being written when the job was killed
                        break
            with open(self.path, "w", encoding="utf-8") as fh:  # drop the torn tail
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.extend(rows)


def write_rows(out: Path, rows: list[dict]) -> None:
    """Write ``rows`` in the format ``out``'s extension names, atomically."""
    fmt = _output_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                                 for k, v in r.items()})
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("writing Parquet needs pyarrow: pip install 'recreason[parquet]'") from None
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out)


def _run_chunks(jobs: list, out: Path, chunk_size: int, work: Callable[[list], list[dict]], key, progress: bool,
                desc: str, on_chunk=None) -> dict:
    journal = Journal(out)
    done = {key(r) for r in journal.rows}
    todo = [j for j in jobs if key(j) not in done]
    start = time.time()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="pair", disable=not progress)
    written = 0
    if chunk_size < 1:
        raise ConfigError("the chunk size must be at least 1")
    for n in range(0, len(todo), chunk_size):
        chunk = todo[n : n + chunk_size]
        rows = work(chunk)
        journal.append(rows)
        written += sum("rejected" not in r for r in rows)
        bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(n // chunk_size + 1)
    bar.close()
    seconds = time.time() - start
    results = [r for r in journal.rows if "rejected" not in r]
    rejected = [{"line": r["line"], "reason": r["rejected"], "raw": r.get("raw", "")} for r in journal.rows
                if "rejected" in r]
    write_rows(out, sorted(results, key=lambda r: (r.get("line", 0), r.get("user_id", ""), r.get("rank", 0))))
    journal.path.unlink(missing_ok=True)
    return {"rows": len(results), "resumed": len(jobs) - len(todo), "new": written, "seconds": seconds,
            "reasons_per_second": written / seconds if seconds > 0 else 0.0, "journal_rejects": rejected}


def _row(explanation, **extra) -> dict:
    row = explanation.to_dict()
    return {**extra, **{k: row[k] for k in ("user_id", "item_id", "reason", "predicted_rating", "interest",
                                            "features", "flags")}, **({"score": row["score"]} if "score" in row else {})}


def explain_pairs(predictor: Predictor, pairs_file: str | Path, out: str | Path, chunk_size: int = 256,
                  options: dict | None = None, progress: bool = True, on_chunk=None) -> dict:
    """Reasons for every valid pair of ``pairs_file``, one row per pair (its input ``line`` first)."""
    out = Path(out)
    _output_format(out)
    pairs, rejects = read_pairs(Path(pairs_file))

    def work(chunk: list[Pair]) -> list[dict]:
        rows = []

        def reject(position: int, exc: UnknownId) -> None:  # journaled like a result: a resumed job reports it
            p = chunk[position]
            rows.append({"line": p.line, "rejected": str(exc).split(": ", 1)[-1], "raw": f"{p.user},{p.item}"})

        explained = predictor.explain([Request(p.user, p.item, p.history, p.item_features) for p in chunk], options,
                                      on_unknown=reject)
        rows += [_row(e, line=p.line) for p, e in zip(chunk, explained) if e is not None]
        return rows

    stats = _run_chunks(pairs, out, chunk_size, work, key=lambda x: x["line"] if isinstance(x, dict) else x.line,
                        progress=progress, desc="explaining", on_chunk=on_chunk)
    rejects += stats.pop("journal_rejects")
    _write_rejects(out, rejects)
    return {**stats, "rejected": len(rejects), "rejects_file": str(_rejects_path(out))}


def recommend_all(predictor: Predictor, k: int, out: str | Path, chunk_size: int = 32, options: dict | None = None,
                  progress: bool = True, on_chunk=None, users: list[str] | None = None) -> dict:
    """Every known user's top ``k`` with a reason each: one row per (user, item), ``rank`` from 1."""
    out = Path(out)
    _output_format(out)
    users = users if users is not None else sorted(predictor.prompter.user_profiles)

    def work(chunk: list[str]) -> list[dict]:
        return [_row(e, rank=rank) for recs in predictor.recommend_many(chunk, k, options=options)
                for rank, e in enumerate(recs, 1)]

    stats = _run_chunks(users, out, chunk_size, work, key=lambda x: x["user_id"] if isinstance(x, dict) else x,
                        progress=progress, desc="recommending", on_chunk=on_chunk)
    stats.pop("journal_rejects")
    return stats


def _rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.jsonl")


def _write_rejects(out: Path, rejects: list[dict]) -> None:
    path = _rejects_path(out)
    if not rejects:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r["line"]))
