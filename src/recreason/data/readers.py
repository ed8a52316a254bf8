"""Readers for behaviour logs with per-record validation.

Two schemas are understood:

* **Amazon review dumps** (McAuley et al.): JSON lines with ``reviewerID``,
  ``asin``, ``overall``, ``reviewText``, ``unixReviewTime`` and optionally
  ``summary``.
* **Generic**: JSONL, CSV or Parquet with ``user_id``, ``item_id``,
  ``rating``, ``text``, ``timestamp`` and optionally ``title``, ``summary``
  and ``attributes`` (a JSON object, or a JSON string in CSV). A log whose
  columns have other names is read through a column mapping
  (``prepare.columns`` / ``--columns user_id=user_md5,...``).

Files may be gzip-compressed (``.gz``). Every record that fails validation is
returned as a :class:`Reject` with its line number and reason, never dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import math
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
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
# Short names accepted in a column mapping for our fields.
COLUMN_ALIASES = {"user": "user_id", "item": "item_id", "time": "timestamp", "review": "text"}


def column_mapping(columns: dict[str, str] | None) -> dict[str, str]:
    """A column mapping (our field -> the file's column) with short names expanded; unknown fields refused."""
    known = (*GENERIC_FIELDS, "attributes")
    mapping = {}
    for ours, theirs in (columns or {}).items():
        field = COLUMN_ALIASES.get(ours, ours)
        if field not in known:
            raise DataError(f"column mapping: unknown field {ours!r}; map one of {', '.join(known)} "
                            f"(or {', '.join(COLUMN_ALIASES)}) to a column of the file")
        if not isinstance(theirs, str) or not theirs:
            raise DataError(f"column mapping: {ours} must name a column of the file")
        mapping[field] = theirs
    return mapping


def field_names(schema: str, columns: dict[str, str] | None = None) -> dict[str, str]:
    """Our field -> the file's column, for a schema and an optional (expanded) column mapping."""
    names = dict(AMAZON_FIELDS if schema == "amazon" else GENERIC_FIELDS, attributes="attributes")
    names.update(columns or {})
    return names


def check_columns(row: dict[str, Any], names: dict[str, str], path: Path) -> None:
    """Stop before reading on when a table's header lacks a required column: one message naming the
    missing fields, the file's columns and the option that maps them (rather than every record rejected)."""
    missing = [f"{field} (column {names[field]!r})" for field in REQUIRED if names[field] not in row]
    if missing:
        raise DataError(f"{path}: no column for {', '.join(missing)}; the file's columns are "
                        f"{', '.join(map(repr, list(row)[:30]))}. Map them with --columns (e.g. --columns "
                        f"user_id=COLUMN,item_id=COLUMN,rating=COLUMN,text=COLUMN,timestamp=COLUMN) or a "
                        f"prepare.columns section")


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


class Limits:
    """What one record may be before it is rejected (``prepare.*`` keys; they protect the pipeline)."""

    def __init__(self, max_record_bytes: int = 1_000_000, max_review_chars: int = 20_000, max_id_chars: int = 200,
                 min_timestamp: int = 0, max_timestamp: int = 4_102_444_800, max_row_lines: int = 20):
        self.max_record_bytes, self.max_review_chars, self.max_id_chars = max_record_bytes, max_review_chars, max_id_chars
        self.min_timestamp, self.max_timestamp, self.max_row_lines = min_timestamp, max_timestamp, max_row_lines


def base_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def physical_lines(path: Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, bytes, None) per line split on \\n only (a bare CR stays inside its record), or
    (line, None, reason) once when the file ends early. A file whose lines all end in a bare CR (old Mac
    line ends: a CR and no LF in the first block read) is split on CR instead. Opening problems are whole-file
    errors."""
    try:
        fh = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        head = fh.peek(65536)[:65536]  # a file named .gz that is not gzip fails here, before any record
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if b"\r" in head and b"\n" not in head:
        yield from _cr_lines(fh)
        return
    lineno = 0
    with fh:
        while True:
            try:
                line = fh.readline()
            except (EOFError, OSError, zlib.error) as exc:
                yield lineno + 1, None, f"the file ends early or is damaged from here on ({exc}); earlier records were read"
                return
            if not line:
                return
            lineno += 1
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark
            yield lineno, line, None


def _cr_lines(fh) -> Iterator[tuple[int, bytes | None, str | None]]:
    with fh:
        try:
            data = fh.read()
        except (EOFError, OSError, zlib.error) as exc:
            yield 1, None, f"the file is damaged ({exc})"
            return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, line in enumerate(data.split(b"\r"), 1):
        if line:
            yield lineno, line + b"\n", None


CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # raw control bytes other than tab, LF and CR


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None


def _iter_jsonl(path: Path, limits: Limits):
    for lineno, line, error in physical_lines(path):
        if error is not None:
            yield lineno, "", None, error
            return
        raw = line.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        if len(line) > limits.max_record_bytes:
            yield lineno, raw[:2000], None, f"record is {len(line)} bytes, more than prepare.max_record_bytes " \
                                            f"({limits.max_record_bytes})"
            continue
        control = CONTROL.search(line)
        if control:  # JSON allows them only escaped (\\u0001); a raw one is damage, not text
            yield lineno, raw[:2000], None, f"malformed record: raw control character 0x{control.group()[0]:02x} " \
                                            f"at byte {control.start()}"
            continue
        try:
            row = json.loads(_decode(line), strict=False)  # a bare CR or tab inside a string is text
        except json.JSONDecodeError as exc:
            yield lineno, raw, None, f"malformed JSON: {exc.msg} at column {exc.colno}"
            continue
        except RecursionError:
            yield lineno, raw[:2000], None, "malformed record: JSON nested too deeply"
            continue
        except ValueError as exc:  # invalid UTF-8, or an integer with thousands of digits
            yield lineno, raw[:2000], None, f"malformed record: {exc}"
            continue
        if not isinstance(row, dict):
            yield lineno, raw, None, "malformed record: expected a JSON object"
            continue
        yield lineno, raw, row, None


def _iter_csv(path: Path, kind: str, limits: Limits):
    """CSV rows with the line each starts on. A quoted field may span lines, but a row that does not close
    within ``max_row_lines`` lines, or parses to the wrong number of fields, is rejected on its first line
    and reading restarts at the next line, so one unclosed quote never swallows the rows after it."""
    delimiter = "\t" if kind == ".tsv" else ","
    csv.field_size_limit(max(limits.max_record_bytes, 131072))
    lines: list[tuple[int, str]] = []
    for lineno, line, error in physical_lines(path):
        if error is not None:
            lines.append((lineno, None))
            ended = error
            break
        try:
            lines.append((lineno, _decode(line)))
        except ValueError as exc:
            lines.append((lineno, exc))
    else:
        ended = None
    header = None
    i = 0
    while i < len(lines):
        start, text = lines[i]
        if text is None:
            break
        if isinstance(text, Exception):
            yield start, "", None, f"malformed record: {text}"
            i += 1
            continue
        if header is None:
            header = next(csv.reader([text], delimiter=delimiter), [])
            i += 1
            continue
        if not text.strip():
            i += 1
            continue
        buf, j, outcome = text, i, None
        while True:
            if len(buf) > limits.max_record_bytes:
                outcome = f"row is longer than prepare.max_record_bytes ({limits.max_record_bytes})"
                break
            if buf.count('"') % 2 == 0:
                try:
                    rows = list(csv.reader(io.StringIO(buf, newline=""), delimiter=delimiter, strict=True))
                except csv.Error as exc:
                    outcome = f"malformed CSV row: {exc}" + (" (a quote is never closed on its line)" if j > i else "")
                    break
                rows = [r for r in rows if r]
                if len(rows) == 1 and len(rows[0]) == len(header):
                    outcome = dict(zip(header, rows[0]))
                else:
                    outcome = (f"malformed CSV row: {len(rows[0]) if rows else 0} fields, the header has "
                               f"{len(header)}" + (" (a quote is never closed on its line)" if j > i else ""))
                break
            nxt = lines[j + 1][1] if j + 1 < len(lines) else None
            if j - i + 1 >= limits.max_row_lines or not isinstance(nxt, str):
                outcome = "malformed CSV row: a quote is never closed"
                break
            j += 1
            buf += nxt
        if isinstance(outcome, dict):
            yield start, json.dumps(outcome, ensure_ascii=False)[:2000], outcome, None
            i = j + 1
        else:
            yield start, text[:2000], None, outcome
            i += 1  # restart right after the bad row's first line
    if ended is not None:
        yield lines[-1][0], "", None, ended


def iter_records(path: Path, limits: Limits | None = None) -> Iterator[tuple[int, str, dict[str, Any] | None, str | None]]:
    """Yield (line, raw text, parsed row or None, problem or None) for every record of a JSONL, CSV/TSV or Parquet
    file (optionally .gz): a problem (invalid UTF-8, malformed JSON or CSV, a record over the limits) is a reject
    with its line, never an exception, so every record is accounted for. Only a file that cannot be read at all
    raises :class:`DataError`."""
    limits = limits or Limits()
    kind = base_suffix(path)
    if kind in (".jsonl", ".json", ".ndjson", ""):
        yield from _iter_jsonl(path, limits)
    elif kind in (".csv", ".tsv"):
        yield from _iter_csv(path, kind, limits)
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise DataError("reading Parquet needs pyarrow: pip install 'recreason[parquet]'") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own types for damaged files
            raise DataError(f"{path}: cannot be read as Parquet ({exc})") from None
        for lineno, row in enumerate(table.to_pylist(), 1):
            yield lineno, json.dumps(row, ensure_ascii=False, default=str), row, None
    else:
        raise DataError(f"{path}: unknown file type {kind!r}; use .jsonl, .csv, .tsv or .parquet (optionally .gz)")


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a :class:`DataError` saying it is missing or a directory (``what``: its role)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file ({what})")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give {what} file")
    return path


def detect_schema(row: dict[str, Any]) -> str:
    if "reviewerID" in row or "asin" in row:
        return "amazon"
    return "generic"


def _parse_timestamp(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:  # a time without a zone is read as UTC, the same on every machine
                moment = moment.replace(tzinfo=timezone.utc)
            return int(moment.timestamp())
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return int(value)
    raise ValueError(f"expected seconds since the epoch or an ISO date, got {type(value).__name__}")


def _text_ok(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"field {field!r} holds a lone surrogate (not valid Unicode text)") from None


def validate(row: dict[str, Any], schema: str, lineno: int, rating_range: tuple[float, float],
             limits: Limits | None = None, names: dict[str, str] | None = None) -> Review:
    """Turn a raw row into a :class:`Review` or raise ``DataError`` naming the field (``names``: our field ->
    the file's column, :func:`field_names`)."""
    limits = limits or Limits()
    names = names or field_names(schema)
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
        _text_ok(values[key], names[key])
        if len(values[key]) > limits.max_id_chars:
            raise DataError(f"field {names[key]!r} is {len(values[key])} characters, more than "
                            f"prepare.max_id_chars ({limits.max_id_chars})")
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
    _text_ok(values["text"], names["text"])
    if len(values["text"]) > limits.max_review_chars:
        raise DataError(f"field {names['text']!r} is {len(values['text'])} characters, more than "
                        f"prepare.max_review_chars ({limits.max_review_chars})")
    try:
        timestamp = _parse_timestamp(values["timestamp"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"field {names['timestamp']!r} is not a time: {exc}") from None
    if not limits.min_timestamp <= timestamp <= limits.max_timestamp:
        raise DataError(f"field {names['timestamp']!r} is {timestamp}, outside prepare.min_timestamp.."
                        f"prepare.max_timestamp ({limits.min_timestamp}..{limits.max_timestamp})")
    optional = {}
    for key in ("summary", "title"):
        value = row.get(names[key])
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {names[key]!r} must be text, got {type(value).__name__}")
        if value:
            _text_ok(value, names[key])
            if len(value) > limits.max_review_chars:
                raise DataError(f"field {names[key]!r} is longer than prepare.max_review_chars")
        optional[key] = (value or "").strip()
    attributes = row.get(names["attributes"]) or {}
    attr = names["attributes"]
    if isinstance(attributes, str):
        try:
            attributes = json.loads(attributes)
        except json.JSONDecodeError:
            raise DataError(f"field {attr!r} must be a JSON object") from None
    if not isinstance(attributes, dict):
        raise DataError(f"field {attr!r} must be an object, got {type(attributes).__name__}")
    try:
        json.dumps(attributes, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError, RecursionError):
        raise DataError(f"field {attr!r} must be a plain JSON object of text and numbers") from None
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
    limits: Limits | None = None,
    columns: dict[str, str] | None = None,
) -> ReadResult:
    """Read and validate a behaviour log (``columns``: our field -> the file's column, for logs whose columns
    have other names).

    Raises :class:`DataError` when the file is missing, of an unknown type, or
    when more than ``max_reject_fraction`` of its records are bad (the rejects
    are still returned on the exception as ``.rejects`` so they can be saved).
    """
    path = existing_file(path, "the review log")
    limits = limits or Limits()
    if schema not in ("auto", "amazon", "generic"):
        raise DataError(f"unknown schema {schema!r}; use auto, amazon or generic")
    mapping = column_mapping(columns)
    reviews: list[Review] = []
    rejects: list[Reject] = []
    seen: dict[tuple[str, str, int], int] = {}
    total = 0
    detected = None if schema == "auto" else schema
    names = None
    for lineno, raw, row, error in iter_records(path, limits):
        total += 1
        if error is not None:
            rejects.append(Reject(lineno, error, raw))
            continue
        if detected is None:
            detected = "generic" if mapping else detect_schema(row)
        if names is None:
            names = field_names(detected, mapping)
            if detected == "generic" and base_suffix(path) in (".csv", ".tsv", ".parquet"):
                check_columns(row, names, path)  # a header names every row's columns
        try:
            review = validate(row, detected, lineno, rating_range, limits, names)
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
