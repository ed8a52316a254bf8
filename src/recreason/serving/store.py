"""Where the service keeps user histories, item features and recorded interactions.

``Store`` is the interface; ``SQLiteStore`` implements it on one SQLite file
(WAL mode, every write in a transaction, so a concurrent reader sees either
the whole write or none of it, and everything acknowledged survives a
restart). ``open_store(url)`` picks the implementation from a URL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from recreason.data.records import Explained


@dataclass
class Interaction:
    user: str
    item: str
    rating: float
    text: str
    timestamp: int
    features: list[str] = field(default_factory=list)
    summary: str = ""


class Store(ABC):
    @abstractmethod
    def add_interaction(self, interaction: Interaction) -> int:
        """Persist one interaction; returns the user's new history version."""

    @abstractmethod
    def interactions(self, user: str | None = None) -> list[Interaction]:
        """All interactions (of ``user`` when given), oldest first."""

    @abstractmethod
    def user_version(self, user: str) -> int:
        """A number that changes whenever the user's history changes (for cache keys)."""

    @abstractmethod
    def items(self) -> list[str]:
        ...


class SQLiteStore(Store):
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS interactions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL, item TEXT NOT NULL, rating REAL NOT NULL, text TEXT NOT NULL,
        timestamp INTEGER NOT NULL, features TEXT NOT NULL, summary TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS interactions_user ON interactions(user);
    CREATE TABLE IF NOT EXISTS user_versions (user TEXT PRIMARY KEY, version INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(self.SCHEMA)

    def seeded(self) -> bool:
        row = self._conn.execute("SELECT value FROM meta WHERE key='seeded_from'").fetchone()
        return row is not None

    def seed(self, records: Iterable[Explained], source: str) -> int:
        """Load a prepared dataset's records once, in one transaction."""
        rows = [(r.user, r.item, r.rating, r.sentence, r.timestamp, json.dumps(r.features or [r.feature]), r.summary)
                for r in records]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO interactions (user, item, rating, text, timestamp, features, summary) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('seeded_from', ?)", (source,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(rows)

    def add_interaction(self, interaction: Interaction) -> int:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO interactions (user, item, rating, text, timestamp, features, summary) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (interaction.user, interaction.item, interaction.rating, interaction.text,
                     interaction.timestamp, json.dumps(interaction.features), interaction.summary))
                self._conn.execute(
                    "INSERT INTO user_versions VALUES (?, 1) "
                    "ON CONFLICT(user) DO UPDATE SET version = version + 1", (interaction.user,))
                version = self._conn.execute(
                    "SELECT version FROM user_versions WHERE user = ?", (interaction.user,)).fetchone()[0]
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return version

    def interactions(self, user: str | None = None) -> list[Interaction]:
        query = "SELECT user, item, rating, text, timestamp, features, summary FROM interactions"
        args: Sequence = ()
        if user is not None:
            query += " WHERE user = ?"
            args = (user,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id", args).fetchall()
        return [Interaction(u, i, r, t, ts, json.loads(f), s) for u, i, r, t, ts, f, s in rows]

    def user_version(self, user: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT version FROM user_versions WHERE user = ?", (user,)).fetchone()
        return row[0] if row else 0

    def items(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT DISTINCT item FROM interactions ORDER BY item")]

    def close(self) -> None:
        self._conn.close()


def open_store(url: str) -> Store:
    """``sqlite:///path/to/file.db`` or a plain path. Other schemes are named in the error."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"store URL scheme {scheme!r} is not supported yet; use sqlite:///PATH")
    return SQLiteStore(url)
