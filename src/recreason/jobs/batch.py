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
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from recreason.data.readers import Limits, iter_records
from recreason.errors import ConfigError, DataError, UnknownId
from recreason.inference import Predictor, Request
from recreason.inference.predictor import (MAX_FEATURE_CHARS, MAX_HISTORY, MAX_HISTORY_CHARS, MAX_ID_CHARS,
                                           MAX_ITEM_FEATURES)

FORMATS = (".jsonl", ".csv", ".parquet")
PAIR_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".ndjson", ".parquet")
MAX_PAIR_BYTES = 1_000_000  # one pairs row


@dataclass
class Pair:
    line: int
    user: str
    item: str
    history: list[str]
    item_features: list[str]

    def key(self) -> tuple:
        """What the reason depends on: equal keys are decoded once per job."""
        return self.user, self.item, tuple(self.history), tuple(self.item_features)


def _output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: the extension names the format; use one of {', '.join(FORMATS)}")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the output file")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: {out.parent} is a file, not a folder")
    return suffix


def _text_list(value, field: str, most: int, chars: int) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{field}: not a JSON list of strings") from None
    if isinstance(value, list):
        value = [v.get("text") if isinstance(v, dict) else v for v in value]  # history may be [{"text": ...}]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field}: expected a list of strings")
    if len(value) > most or any(len(v) > chars for v in value):
        raise ValueError(f"{field}: at most {most} texts of at most {chars} characters each (the API's limits)")
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
        if len(value) > MAX_ID_CHARS:
            raise ValueError(f"{field}: longer than {MAX_ID_CHARS} characters")
        if not value.isprintable():
            raise ValueError(f"{field}: holds control or unprintable characters")
        ids.append(value.strip())
    return Pair(line, ids[0], ids[1], _text_list(row.get("history"), "history", MAX_HISTORY, MAX_HISTORY_CHARS),
                _text_list(row.get("item_features"), "item_features", MAX_ITEM_FEATURES, MAX_FEATURE_CHARS))


def read_pairs(path: Path) -> tuple[list[Pair], list[dict]]:
    """(valid pairs, rejects with line and reason) from a CSV/TSV, JSONL or Parquet pairs file (optionally .gz).
    Every row is one or the other: a malformed row, invalid UTF-8 or a row over the limits is a reject with
    its line, and reading goes on (``recreason prepare``'s reader)."""
    if not path.exists():
        raise DataError(f"{path}: no such pairs file")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the pairs file")
    kind = "".join(s for s in path.suffixes[-2:] if s != ".gz")[-8:].lower()
    if not any(kind.endswith(f) for f in PAIR_FORMATS):
        raise DataError(f"{path}: pairs must be {', '.join(PAIR_FORMATS)} (optionally .gz)")
    pairs, rejects = [], []
    header_checked = False
    for line, raw, row, problem in iter_records(path, Limits(max_record_bytes=MAX_PAIR_BYTES)):
        if problem is None and not header_checked:
            header_checked = True
            if kind.endswith((".csv", ".tsv")) and not {"user_id", "item_id"} <= set(row):
                raise DataError(f"{path}: the header must name user_id and item_id columns")
        if problem is not None:
            rejects.append({"line": line, "reason": problem, "raw": raw[:500]})
            continue
        try:
            pairs.append(_pair(line, row))
        except ValueError as exc:
            rejects.append({"line": line, "reason": str(exc), "raw": raw[:500]})
    return pairs, rejects


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def differing(old: dict | None, new: dict) -> str:
    """What differs between a saved job and this one, for the refusal: "input, sha256 differ"."""
    keys = sorted(k for k in set(new) | set(old or {}) if (old or {}).get(k) != new.get(k))
    return f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''}" if keys and old else "unreadable"


class Journal:
    """Finished rows, appended chunk by chunk and flushed, read back (minus a torn last line) on resume. Its
    first line names the job (input file and its hash, run, options): a journal of another job is refused,
    saying what differs, instead of mixing two jobs' rows."""

    def __init__(self, out: Path, job: dict):
        self.path = out.with_name(out.name + ".journal.jsonl")
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().split("\n")
            try:
                head = json.loads(lines[0]).get("job")
            except (json.JSONDecodeError, AttributeError):
                head = None
            if head != job:
                raise ConfigError(f"{self.path} is the journal of another job ({differing(head, job)}); delete it "
                                  "to start over, or give another --out")
            for raw in lines[1:]:
                try:
                    self.rows.append(json.loads(raw))
                except json.JSONDecodeError:  # the chunk being written when the job was killed
                    break
        with open(self.path, "w", encoding="utf-8") as fh:  # the head, and the rows without a torn tail
            fh.write(json.dumps({"job": job}, ensure_ascii=False) + "\n")
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
                desc: str, job: dict, on_chunk=None, on_resume=None) -> dict:
    if chunk_size < 1:
        raise ConfigError("the chunk size must be at least 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(out, job)
    done = {key(r) for r in journal.rows}
    for row in journal.rows if on_resume is not None else ():
        on_resume(row)
    todo = [j for j in jobs if key(j) not in done]
    start = time.time()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="pair", disable=not progress)
    written = 0
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


def row_from(explanation, model: str = "", **extra) -> dict:
    """An output row: ``extra`` (line or rank) first, the reason and its figures, then ``model`` (the fingerprint
    of the run that wrote it: ``serve --reasons`` serves a stored reason only from the same run)."""
    row = explanation.to_dict()
    return {**extra, **{k: row[k] for k in ("user_id", "item_id", "reason", "predicted_rating", "interest",
                                            "features", "flags")}, **({"score": row["score"]} if "score" in row else {}),
            "model": model}


def explain_rows(predictor: Predictor, chunk: list[Pair], options: dict | None,
                 answered: dict[tuple, dict] | None = None) -> list[dict]:
    """One row per pair of ``chunk`` (its ``line`` first; a ``rejected`` reason for an unknown id), each distinct
    request decoded once: ``answered`` (a pair's key -> its row) carries what was decoded before. Both engines
    write these rows."""
    answered = {} if answered is None else answered
    fresh = list({p.key(): p for p in chunk if p.key() not in answered}.values())

    def reject(position: int, exc: UnknownId) -> None:  # journaled like a result: a resumed job reports it
        p = fresh[position]
        answered[p.key()] = {"rejected": str(exc).split(": ", 1)[-1], "raw": f"{p.user},{p.item}"}

    explained = predictor.explain([Request(p.user, p.item, p.history, p.item_features) for p in fresh], options,
                                  on_unknown=reject)
    for p, e in zip(fresh, explained):
        if e is not None:
            answered[p.key()] = row_from(e, model=predictor.model_tag)
    return [{"line": p.line, **answered[p.key()]} for p in chunk]


def recommend_rows(predictor: Predictor, users: list[str], k: int, options: dict | None) -> list[dict]:
    """Each user's top ``k`` with a reason each, ``rank`` from 1: one row per (user, item)."""
    return [row_from(e, rank=rank, model=predictor.model_tag)
            for recs in predictor.recommend_many(users, k, options=options) for rank, e in enumerate(recs, 1)]


def _job(kind: str, predictor: Predictor, options: dict | None, **extra) -> dict:
    """What a journal's rows depend on: the job, the run's weights (its fingerprint, the ``model`` of every row and of
    a Ray job's manifest) and the decoding settings."""
    job = {"kind": kind, "run": str(predictor.run.dir.resolve()), "weights": predictor.model_tag,
           "generate": asdict(predictor.gen_cfg), "options": options or {}, **extra}
    return json.loads(json.dumps(job, default=str))  # as it reads back from the journal


def explain_pairs(predictor: Predictor, pairs_file: str | Path, out: str | Path, chunk_size: int = 256,
                  options: dict | None = None, progress: bool = True, on_chunk=None) -> dict:
    """Reasons for every valid pair of ``pairs_file``, one row per pair (its input ``line`` first). Pairs asking
    for the same reason (same user, item, history and features) are decoded once. Every input row ends up
    explained or rejected: ``rows + rejected == input_rows``."""
    out, pairs_file = Path(out), Path(pairs_file)
    _output_format(out)
    pairs, rejects = read_pairs(pairs_file)
    input_rows = len(pairs) + len(rejects)
    job = _job("explain", predictor, options, input=str(pairs_file.resolve()), bytes=pairs_file.stat().st_size,
               sha256=file_digest(pairs_file))
    by_line = {p.line: p for p in pairs}
    answered: dict[tuple, dict] = {}  # a pair's key -> its row (or its reject), for duplicates

    def work(chunk: list[Pair]) -> list[dict]:
        return explain_rows(predictor, chunk, options, answered)

    def resumed(row: dict) -> None:
        pair = by_line.get(row.get("line"))
        if pair is not None:
            answered.setdefault(pair.key(), {k: v for k, v in row.items() if k != "line"})

    stats = _run_chunks(pairs, out, chunk_size, work, key=lambda x: x["line"] if isinstance(x, dict) else x.line,
                        progress=progress, desc="explaining", job=job, on_chunk=on_chunk, on_resume=resumed)
    rejects += stats.pop("journal_rejects")
    write_rejects(_rejects_path(out), rejects)
    return {**stats, "rejected": len(rejects), "input_rows": input_rows,
            "decoded": len(answered), "rejects_file": str(_rejects_path(out))}


def recommend_all(predictor: Predictor, k: int, out: str | Path, chunk_size: int = 32, options: dict | None = None,
                  progress: bool = True, on_chunk=None, users: list[str] | None = None) -> dict:
    """Every known user's top ``k`` with a reason each: one row per (user, item), ``rank`` from 1."""
    out = Path(out)
    _output_format(out)
    if not 1 <= k <= 1000:
        raise ConfigError(f"-k {k} is out of range; valid: 1 to 1000")
    users = users if users is not None else sorted(predictor.prompter.user_profiles)
    job = _job("recommend", predictor, options, k=k,
               users=hashlib.sha256("\n".join(users).encode("utf-8", "surrogateescape")).hexdigest())

    def work(chunk: list[str]) -> list[dict]:
        return recommend_rows(predictor, chunk, k, options)

    stats = _run_chunks(users, out, chunk_size, work, key=lambda x: x["user_id"] if isinstance(x, dict) else x,
                        progress=progress, desc="recommending", job=job, on_chunk=on_chunk)
    stats.pop("journal_rejects")
    return stats


def _rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.jsonl")


def write_rejects(path: Path, rejects: list[dict]) -> None:
    """The rejected rows, by input line, written whole or not at all (a temporary file moved over ``path``); none:
    no file."""
    if not rejects:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r["line"])),
                   encoding="utf-8")
    os.replace(tmp, path)
