"""Export a prepared dataset in the NETE/PETER ``reviews.pickle`` format.

The PETER, PEPLER and NRT codebases read a pickled list of dicts with
``user``, ``item``, ``rating`` and ``template = (feature, adjective,
sentence, sentiment)``, plus ``<fold>/{train,validation,test}.index`` files of
space-separated positions. Writing a pickle is safe; *reading* one from an
untrusted source is not, so :func:`read_nete` uses a restricted unpickler
that only accepts plain containers and scalars.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from recreason.data.dataset import SPLITS, Dataset
from recreason.data.records import DataError
from recreason.text import normalize


def export_nete(dataset: Dataset, out_dir: str | Path, seeds: list[int] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "user": r.user,
            "item": r.item,
            "rating": r.rating,
            "template": (r.feature, r.opinion, normalize(r.sentence), r.sentiment),
        }
        for r in dataset.records
    ]
    with open(out / "reviews.pickle", "wb") as fh:
        pickle.dump(rows, fh, protocol=4)
    for fold, seed in enumerate(seeds or dataset.seeds(), 1):
        parts = dataset.split(seed)
        folder = out / str(fold)
        folder.mkdir(exist_ok=True)
        for name in SPLITS:
            (folder / f"{name}.index").write_text(" ".join(map(str, parts[name])))
    return out / "reviews.pickle"


class _SafeUnpickler(pickle.Unpickler):
    """Accepts only built-in containers and scalars; refuses any class or function."""

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def read_nete(path: str | Path) -> list[dict]:
    """Read a NETE/PETER ``reviews.pickle`` without executing code from it."""
    data = Path(path).read_bytes()
    try:
        rows = _SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a plain-data reviews.pickle: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of records, got {type(rows).__name__}")
    return rows
