"""Precomputed reasons: a nightly batch job's output loaded into the store, answered without the model.

``recreason serve --run RUN --reasons PATH`` reads PATH (the output of ``recreason explain`` or ``recreason
recommend --all-users``: a .jsonl, .csv or .parquet file, or a folder of Ray shards) into the store before the
workers start. Each row carries the fingerprint of the run that wrote it (``model``); rows of another run are
counted and left out, so a server never answers with another model's reasons. A stored reason is served for a
plain request of the same (user, item) (no history, no item features, default decoding) while the user's history
is unchanged since the import; anything else is generated live. Answers say which: ``"precomputed": true``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from recreason.errors import DataError
from recreason.serving.store import Store

LIST_FIELDS = ("features", "flags")


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a batch job's output: a .jsonl, .csv or .parquet file, or a folder of part-* shards."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--reasons {path}: no such file or folder")
    files = sorted(path.glob("part-*.*")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise DataError(f"--reasons {path}: a folder with no part-* shards")
    rows: list[dict] = []
    for f in files:
        suffix = f.suffix.lower()
        try:
            if suffix == ".jsonl":
                rows += [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                rows += pq.read_table(f).to_pylist()
            elif suffix == ".csv":
                with open(f, encoding="utf-8", newline="") as fh:
                    for row in csv.DictReader(fh):
                        for key in LIST_FIELDS:
                            row[key] = json.loads(row[key]) if row.get(key) else []
                        for key in ("predicted_rating", "score"):
                            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
                        row["rank"] = int(row["rank"]) if row.get("rank") else None
                        rows.append(row)
            else:
                raise DataError(f"--reasons {f}: a batch job writes .jsonl, .csv or .parquet")
        except (json.JSONDecodeError, ValueError, OSError) as exc:
            raise DataError(f"--reasons {f}: not a batch job's output ({exc})") from None
    if any(not isinstance(r, dict) or not {"user_id", "item_id", "reason"} <= set(r) for r in rows):
        raise DataError(f"--reasons {path}: rows need user_id, item_id and reason (a batch job's output)")
    return rows


def import_reasons(store: Store, path: str | Path, model: str) -> dict:
    """Load ``path`` into ``store`` for the run fingerprinted ``model``: {"stored": N, "other_runs": M}."""
    rows = read_rows(path)
    mine = [r for r in rows if r.get("model") == model]
    ranked = [r for r in mine if r.get("rank") not in (None, "")]
    plain = [r for r in mine if r.get("rank") in (None, "")]
    stored = (store.put_reasons(ranked, model, "recommend") if ranked else 0) + \
        (store.put_reasons(plain, model, "explain") if plain else 0)
    return {"stored": stored, "other_runs": len(rows) - len(mine)}
