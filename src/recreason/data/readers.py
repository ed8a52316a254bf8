"""Readers for behaviour logs with per-record validation.

Two schemas are understood:

* **Amazon review dumps** (McAuley et al.): JSON lines with ``reviewerID``,
  ``asin``, ``overall``, ``reviewText``, ``unixReviewTime`` and optionally
  ``summary``.
* **Generic**: JSONL, CSV or Parquet with ``user_id``, ``item_id``,
  ``rating``, ``text``, ``timestamp`` and optionally ``title``, ``summary``
  and ``attributes`` (a JSON object, or a JSON string in CSV).

Files may be gzip-compressed (``.gz``). Every record that fails validation is
returned as a :class:`Reject` with its line number and reason, never dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from recreason.data.records import DataError, Review

AMAZON_FIELDS = {
    "user_id": "reviewerID",
    "item_id": "asin",
    "rating": "overall",
    "text": "reviewText",
    "timestamp": "unixReviewTime",
    "summary": "summary",
    "title": "title",
}
GENERIC_FIELDS = {k: k for k in ("user_id", "item_id", "rating", "text", "timestamp", "summary", "title")}
REQUIRED = ("user_id", "item_id", "rating", "text", "timestamp")


@dataclass
class Reject:
    line: int
    reason: str
    raw: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "raw": self.raw[:2000]}


@dataclass
class ReadResult:
    reviews: list[Review]
    rejects: list[Reject]
    total: int
    schema: str


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _iter_raw(path: Path) -> Iterator[tuple[int, str, dict[str, Any] | None, str | None]]:
    """Yield (line, raw text, parsed row or None, parse error or None)."""
    kind = _base_suffix(path)
    if kind in (".jsonl", ".json", ".ndjson", ""):
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, line, None, f"malformed JSON: {exc.msg} at column {exc.colno}"
                    continue
                if not isinstance(row, dict):
                    yield lineno, line, None, "malformed record: expected a JSON object"
                    continue
                yield lineno, line, row, None
    elif kind in (".csv", ".tsv"):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if kind == ".tsv" else ",")
            for row in reader:
                # DictReader's line_num is the physical line the row ended on; header is line 1.
                raw = json.dumps(row, ensure_ascii=False)
                if None in row:
                    yield reader.line_num, raw, None, "malformed CSV row: more fields than the header"
                    continue
                yield reader.line_num, raw, row, None
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise DataError("reading Parquet needs pyarrow: pip install 'recreason[parquet]'") from exc
        for lineno, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield lineno, json.dumps(row, ensure_ascii=False, default=str), row, None
    else:
        raise DataError(f"{path}: unknown file type {kind!r}; use .jsonl, .csv, .tsv or .parquet (optionally .gz)")


def detect_schema(row: dict[str, Any]) -> str:
    if "reviewerID" in row or "asin" in row:
        return "amazon"
    return "generic"


def _parse_timestamp(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(float(value))
        except ValueError:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    raise ValueError(f"expected seconds since the epoch or an ISO date, got {type(value).__name__}")


def validate(row: dict[str, Any], schema: str, lineno: int, rating_range: tuple[float, float]) -> Review:
    """Turn a raw row into a :class:`Review` or raise ``DataError`` naming the field."""
    names = AMAZON_FIELDS if schema == "amazon" else GENERIC_FIELDS
    values: dict[str, Any] = {}
    for key in REQUIRED:
        src = names[key]
        value = row.get(src)
        if value is None or (isinstance(value, str) and not value.strip()):
            what = "empty" if isinstance(value, str) else "missing"
            raise DataError(f"field {src!r} is {what}")
        values[key] = value
    for key in ("user_id", "item_id"):
        if not isinstance(values[key], (str, int)) or isinstance(values[key], bool):
            raise DataError(f"field {names[key]!r} must be a string or integer id, got {type(values[key]).__name__}")
        values[key] = str(values[key]).strip()
    rating = values["rating"]
    try:
        if isinstance(rating, bool):
            raise ValueError
        rating = float(rating)
    except (TypeError, ValueError):
        raise DataError(f"field {names['rating']!r} must be a number, got {values['rating']!r}") from None
    low, high = rating_range
    if not (low <= rating <= high):
        raise DataError(f"field {names['rating']!r} is {rating:g}, outside the rating range {low:g}..{high:g}")
    if not isinstance(values["text"], str):
        raise DataError(f"field {names['text']!r} must be text, got {type(values['text']).__name__}")
    try:
        timestamp = _parse_timestamp(values["timestamp"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"field {names['timestamp']!r} is not a time: {exc}") from None
    optional = {}
    for key in ("summary", "title"):
        value = row.get(names[key])
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {names[key]!r} must be text, got {type(value).__name__}")
        optional[key] = (value or "").strip()
    attributes = row.get("attributes") or {}
    if isinstance(attributes, str):
        try:
            attributes = json.loads(attributes)
        except json.JSONDecodeError:
            raise DataError("field 'attributes' must be a JSON object") from None
    if not isinstance(attributes, dict):
        raise DataError(f"field 'attributes' must be an object, got {type(attributes).__name__}")
    return Review(
        user_id=values["user_id"],
        item_id=values["item_id"],
        rating=rating,
        text=values["text"].strip(),
        timestamp=timestamp,
        attributes=attributes,
        line=lineno,
        **optional,
    )


def read_reviews(
    path: str | Path,
    schema: str = "auto",
    rating_range: tuple[float, float] = (1.0, 5.0),
    max_reject_fraction: float = 0.5,
) -> ReadResult:
    """Read and validate a behaviour log.

    Raises :class:`DataError` when the file is missing, of an unknown type, or
    when more than ``max_reject_fraction`` of its records are bad (the rejects
    are still returned on the exception as ``.rejects`` so they can be saved).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if schema not in ("auto", "amazon", "generic"):
        raise DataError(f"unknown schema {schema!r}; use auto, amazon or generic")
    reviews: list[Review] = []
    rejects: list[Reject] = []
    seen: dict[tuple[str, str, int], int] = {}
    total = 0
    detected = None if schema == "auto" else schema
    for lineno, raw, row, error in _iter_raw(path):
        total += 1
        if error is not None:
            rejects.append(Reject(lineno, error, raw))
            continue
        if detected is None:
            detected = detect_schema(row)
        try:
            review = validate(row, detected, lineno, rating_range)
        except DataError as exc:
            rejects.append(Reject(lineno, str(exc), raw))
            continue
        key = (review.user_id, review.item_id, review.timestamp)
        if key in seen:
            rejects.append(Reject(lineno, f"duplicate of line {seen[key]}: same user, item and time", raw))
            continue
        seen[key] = lineno
        reviews.append(review)
    result = ReadResult(reviews, rejects, total, detected or "generic")
    if total == 0:
        raise DataError(f"{path}: no records")
    if len(rejects) > max_reject_fraction * total:
        first = "; ".join(f"line {r.line}: {r.reason}" for r in rejects[:3])
        exc = DataError(
            f"{path}: {len(rejects)} of {total} records are bad (more than {max_reject_fraction:.0%}); "
            f"is this the right file and schema? First problems: {first}"
        )
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    return result
