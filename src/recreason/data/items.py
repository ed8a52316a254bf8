"""Item tables: titles and attributes read beside a behaviour log (``prepare --items FILE``).

Understood formats:

* **Amazon metadata** (McAuley et al., 2014 dump): one Python dict literal per
  line (``{'asin': ..., 'title': ..., 'categories': [[...]], ...}``), not JSON.
  A line is read with :func:`ast.literal_eval`, which builds only literals
  (strings, numbers, lists, dicts) and runs nothing; a line past
  ``prepare.max_record_bytes`` is rejected before it is parsed.
* **Tables**: JSONL, CSV/TSV or Parquet with one row per item, e.g. Douban's
  ``movies.csv``. The id and title columns are found by name (``item_id``,
  ``asin``, ``MOVIE_ID``, ``id``; ``title``, ``name``) or mapped
  (``prepare.item_columns`` / ``--item-columns item_id=MOVIE_ID,title=NAME``).

Attributes are the row's other short values: text and numbers, lists of
text joined with ", ", Amazon's nested category paths flattened to their
distinct names (the store-wide top level dropped). Links, images, related
items and sales ranks are not attributes of what the item *is* and are left
out, as is any value over 300 characters. Every row is kept or rejected with
its line and reason (``item_rejects.jsonl``), like the log's records.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recreason.data.readers import Limits, Reject, base_suffix, existing_file, iter_records, physical_lines
from recreason.data.records import DataError

ID_COLUMNS = ("item_id", "asin", "movie_id", "id", "iid")
TITLE_COLUMNS = ("title", "name")
# Not attributes of what the item is: links, pictures, other items, ranks, free text too long for a prompt.
LEFT_OUT = {"imurl", "image", "images", "url", "related", "salesrank", "also_bought", "also_viewed", "description",
            "storyline", "alias"}
TOP_CATEGORIES = {"CDs & Vinyl", "Digital Music", "Musical Instruments", "Movies & TV", "Books"}
MAX_VALUE_CHARS = 300


@dataclass
class ItemTable:
    """Item id -> (title, attributes), with the rows that were refused."""

    items: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    total: int = 0
    format: str = "table"

    def stats(self, log_items: set[str]) -> dict[str, Any]:
        """Counts for ``stats.json``: rows read, refused, and how many of the log's items the table describes."""
        described = log_items & set(self.items)
        return {"rows": self.total, "rejected": len(self.rejects), "items": len(self.items), "format": self.format,
                "log_items_described": len(described), "log_items_without_metadata": len(log_items - described),
                "log_items_with_title": sum(1 for i in described if self.items[i][0])}


def _python_literal_lines(path: Path, limits: Limits):
    """(line, raw, row or None, problem or None) for a file of Python dict literals, parsed without ``eval``."""
    for lineno, line, error in physical_lines(path):
        if error is not None:
            yield lineno, "", None, error
            return
        if not line.strip():
            continue
        raw = line.decode("utf-8", errors="replace")
        if len(line) > limits.max_record_bytes:
            yield lineno, raw[:2000], None, (f"record is {len(line)} bytes, more than prepare.max_record_bytes "
                                             f"({limits.max_record_bytes})")
            continue
        try:
            row = ast.literal_eval(line.decode("utf-8").strip())
        except UnicodeDecodeError as exc:
            yield lineno, raw[:2000], None, f"malformed record: invalid UTF-8 at byte {exc.start}"
            continue
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            why = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
            yield lineno, raw[:2000], None, f"malformed record: not a Python literal ({why})"
            continue
        if not isinstance(row, dict):
            yield lineno, raw[:2000], None, "malformed record: expected a dict"
            continue
        yield lineno, raw[:2000], row, None


def _is_python_literals(path: Path) -> bool:
    """Amazon's metadata lines start ``{'``; JSON lines start ``{"``."""
    for _, line, error in physical_lines(path):
        if error is not None or line is None:
            return False
        text = line.strip()
        if text:
            return text.startswith(b"{'")
    return False


def _pick(row: dict[str, Any], mapped: str | None, candidates: tuple[str, ...]) -> str | None:
    if mapped:
        return mapped if mapped in row else None
    lower = {str(k).lower(): k for k in row}
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def _categories(value: Any) -> str:
    paths = value if isinstance(value, list) else []
    names: list[str] = []
    for path in paths:
        for name in (path if isinstance(path, list) else [path]):
            if isinstance(name, str) and name and name not in TOP_CATEGORIES and name not in names:
                names.append(name)
    return ", ".join(names)


def attribute_value(key: str, value: Any) -> str | float | int | None:
    """The value an attribute keeps (text, a number, or listed text joined), or None when it is left out."""
    if str(key).lower() in LEFT_OUT or value is None or isinstance(value, bool):
        return None
    if str(key).lower() == "categories":
        value = _categories(value)
    elif isinstance(value, list):
        value = ", ".join(str(v) for v in value if isinstance(v, (str, int, float)) and str(v).strip())
    if isinstance(value, (int, float)):
        return value if value == value else None  # NaN (Parquet's empty cell) is no value
    if not isinstance(value, str):
        return None
    value = " ".join(value.split()).replace(" / ", "/")
    if not value or len(value) > MAX_VALUE_CHARS:
        return None
    return value


def read_items(path: str | Path, limits: Limits | None = None, columns: dict[str, str] | None = None,
               keep: list[str] | None = None) -> ItemTable:
    """Read an item table (see the module's docstring). ``columns`` maps ``item_id`` and ``title`` to the
    table's names; ``keep`` lists the columns to keep as attributes (default: every short value)."""
    path = existing_file(path, "the item table")
    limits = limits or Limits()
    columns = dict(columns or {})
    unknown = set(columns) - {"item_id", "title", "item", "id"}
    if unknown:
        raise DataError(f"item column mapping: unknown field(s) {', '.join(sorted(unknown))}; map item_id and title")
    id_name = columns.get("item_id") or columns.get("item") or columns.get("id")
    title_name = columns.get("title")
    literal = base_suffix(path) in (".jsonl", ".json", "") and _is_python_literals(path)
    table = ItemTable(format="amazon-metadata" if literal else "table")
    records = _python_literal_lines(path, limits) if literal else iter_records(path, limits)
    for lineno, raw, row, error in records:
        table.total += 1
        if error is not None:
            table.rejects.append(Reject(lineno, error, raw))
            continue
        id_col = _pick(row, id_name, ID_COLUMNS)
        if id_col is None:
            if id_name:
                raise DataError(f"item table {path}: no column {id_name!r}; its columns are {', '.join(map(repr, row))}")
            raise DataError(f"item table {path}: no item id column (looked for {', '.join(ID_COLUMNS)}); its columns "
                            f"are {', '.join(map(repr, row))}. Map it with --item-columns item_id=COLUMN")
        item = row.get(id_col)
        if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
            table.rejects.append(Reject(lineno, f"field {id_col!r} is missing or not an id", raw))
            continue
        item = str(item).strip()
        if len(item) > limits.max_id_chars:
            table.rejects.append(Reject(lineno, f"field {id_col!r} is longer than prepare.max_id_chars", raw))
            continue
        if item in table.items:
            table.rejects.append(Reject(lineno, f"duplicate item {item!r}: its first row is kept", raw))
            continue
        title_col = _pick(row, title_name, TITLE_COLUMNS)
        title = row.get(title_col) if title_col else None
        if title is not None and not isinstance(title, str):
            table.rejects.append(Reject(lineno, f"field {title_col!r} must be text, got {type(title).__name__}", raw))
            continue
        title = " ".join((title or "").split())[: limits.max_review_chars]
        attributes = {}
        for key, value in row.items():
            if key in (id_col, title_col) or (keep and key not in keep):
                continue
            kept = attribute_value(key, value)
            if kept is not None:
                attributes[str(key).lower()] = kept
        try:
            json.dumps(attributes, ensure_ascii=False).encode("utf-8")
            title.encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            table.rejects.append(Reject(lineno, "malformed record: text that is not valid Unicode", raw))
            continue
        table.items[item] = (title, attributes)
    return table
