"""The typed records passed between stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from recreason.errors import DataError  # noqa: F401  (re-exported: the data stage's error)


@dataclass
class Review:
    """One validated behaviour record as read from a log."""

    user_id: str
    item_id: str
    rating: float
    text: str
    timestamp: int
    summary: str = ""
    title: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # 1-based position in the source file, for error messages


@dataclass
class Explained:
    """A review with its explanation target, as stored in a prepared dataset."""

    index: int
    user: str
    item: str
    rating: float
    timestamp: int
    feature: str  # the aspect the explanation sentence is about, e.g. "strings"
    opinion: str  # the opinion word attached to it, e.g. "bright"
    sentence: str  # the explanation sentence as written
    sentiment: int  # +1 / -1
    summary: str = ""
    features: list[str] = field(default_factory=list)  # every vocabulary feature in the review
    title: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)  # item attributes given with the review

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Explained":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def target_text(record: Explained, target: str) -> str:
    """The explanation a run learns to write: the extracted ``sentence`` or the review's ``summary``."""
    return record.summary if target == "summary" else record.sentence
