"""Where the service keeps user histories, item features and recorded interactions.

``Store`` is the interface. Two implementations share their SQL:
``SQLiteStore`` (one file, WAL mode; the default, next to the model run) and
``PostgresStore`` (a connection URL, for several replicas behind a load
balancer; needs ``pip install 'recreason[postgres]'``). Every write is one
transaction, so a concurrent reader sees the whole write or none of it, and
everything acknowledged survives a restart.

Each interaction gets a store-wide sequence number, taken from a one-row
counter inside the writing transaction. Writers therefore commit in sequence
order, and ``interactions_after(seq)`` lets every server process (uvicorn
workers, replicas) fold in what the others recorded, never skipping a row.
``open_store(url)`` picks the implementation from a URL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from recreason.data.records import Explained
from recreason.errors import ConfigError


@dataclass
class Interaction:
    user: str
    item: str
    rating: float
    text: str
    timestamp: int
    features: list[str] = field(default_factory=list)
    summary: str = ""
    seq: int = 0  # store-wide order; set by the store


class Store(ABC):
    @abstractmethod
    def seeded(self) -> bool:
        """Whether the store was already loaded from a dataset."""

    @abstractmethod
    def seed(self, records: Iterable[Explained], source: str) -> int:
        """Load a prepared dataset's records once; returns how many (0 if another process already did)."""

    @abstractmethod
    def add_interaction(self, interaction: Interaction) -> int:
        """Persist one interaction; returns the user's new history version."""

    @abstractmethod
    def interactions(self, user: str | None = None) -> list[Interaction]:
        """All interactions (of ``user`` when given), oldest first."""

    @abstractmethod
    def interactions_after(self, seq: int) -> list[Interaction]:
        """Interactions with a sequence number above ``seq``, in order."""

    @abstractmethod
    def user_version(self, user: str) -> int:
        """A number that changes whenever the user's history changes."""

    @abstractmethod
    def items(self) -> list[str]:
        ...

    @abstractmethod
    def put_reasons(self, rows: list[dict], model: str, kind: str) -> int:
        """Store a batch job's rows (``kind``: explain or recommend) as written by the run ``model`` (its
        fingerprint), each with the user's history version now; returns how many."""

    @abstractmethod
    def stored_reasons(self, model: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """The stored rows of ``model`` for ``pairs`` whose user's history has not changed since they were stored."""

    @abstractmethod
    def has_reasons(self, model: str) -> bool:
        """Whether any rows of ``model`` are stored (a server without them skips the lookups)."""

    @abstractmethod
    def stored_recommendations(self, model: str, user: str, k: int) -> list[dict]:
        """The user's stored top-K rows of ``model``, by rank, if the user's history has not changed since."""

    def close(self) -> None:
        pass


_COLUMNS = 'seq, "user", item, rating, text, timestamp, features, summary'
# Precomputed reasons (serve --reasons): a batch job's rows, keyed by the run that wrote them (its fingerprint).
REASONS_TABLE = ('CREATE TABLE IF NOT EXISTS reasons (model TEXT NOT NULL, kind TEXT NOT NULL, "user" TEXT NOT NULL, '
                 'item TEXT NOT NULL, rank INTEGER, version BIGINT NOT NULL, body TEXT NOT NULL, '
                 'PRIMARY KEY (model, kind, "user", item))')


class _SQLStore(Store):
    """The SQL both backends run; subclasses give the schema, the placeholder and transactions."""

    SCHEMA: list[str] = []
    PLACEHOLDER = "?"
    CREATE_LOCK = ""  # a statement that makes schema creation one-at-a-time across processes

    def _q(self, sql: str) -> str:
        return sql if self.PLACEHOLDER == "?" else sql.replace("?", self.PLACEHOLDER)

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator:
        """One transaction; ``write=False`` for reads, which then never wait for the write lock."""
        raise NotImplementedError

    def _create(self) -> None:
        with self._transaction() as conn:
            if self.CREATE_LOCK:
                conn.execute(self.CREATE_LOCK)
            for statement in self.SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO log_seq (id, seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")

    @staticmethod
    def _one(cursor):
        """The single row of an INSERT/UPDATE ... RETURNING, stepping the statement to its end."""
        rows = cursor.fetchall()
        return rows[0] if rows else None

    def seeded(self) -> bool:
        with self._transaction(write=False) as conn:
            return conn.execute("SELECT value FROM meta WHERE key = 'seeded_from'").fetchone() is not None

    def seed(self, records: Iterable[Explained], source: str) -> int:
        rows = [(r.user, r.item, r.rating, r.sentence, r.timestamp, json.dumps(r.features or [r.feature]), r.summary)
                for r in records]
        with self._transaction() as conn:
            # The first process to insert the marker seeds; a concurrent one waits on it, then skips.
            claimed = self._one(conn.execute(self._q(
                "INSERT INTO meta (key, value) VALUES ('seeded_from', ?) ON CONFLICT (key) DO NOTHING RETURNING key"),
                (source,)))
            if claimed is None:
                return 0
            start = self._one(conn.execute(self._q("UPDATE log_seq SET seq = seq + ? WHERE id = 1 RETURNING seq"),
                                           (len(rows),)))[0] - len(rows)
            conn.cursor().executemany(self._q(f"INSERT INTO interactions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                                      [(start + n + 1, *row) for n, row in enumerate(rows)])
        return len(rows)

    def add_interaction(self, interaction: Interaction) -> int:
        i = interaction
        with self._transaction() as conn:
            # The counter row stays locked until commit: writers commit in sequence order.
            seq = self._one(conn.execute("UPDATE log_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq"))[0]
            conn.execute(self._q(f"INSERT INTO interactions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                         (seq, i.user, i.item, i.rating, i.text, i.timestamp, json.dumps(i.features), i.summary))
            version = self._one(conn.execute(self._q(
                'INSERT INTO user_versions ("user", version) VALUES (?, 1) '
                'ON CONFLICT ("user") DO UPDATE SET version = user_versions.version + 1 RETURNING version'),
                (i.user,)))[0]
        interaction.seq = seq
        return version

    def _select(self, where: str = "", args: tuple = ()) -> list[Interaction]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(self._q(f"SELECT {_COLUMNS} FROM interactions {where} ORDER BY seq"), args).fetchall()
        return [Interaction(u, i, float(r), t, int(ts), json.loads(f), s, int(seq))
                for seq, u, i, r, t, ts, f, s in rows]

    def interactions(self, user: str | None = None) -> list[Interaction]:
        return self._select('WHERE "user" = ?', (user,)) if user is not None else self._select()

    def interactions_after(self, seq: int) -> list[Interaction]:
        return self._select("WHERE seq > ?", (seq,))

    def user_version(self, user: str) -> int:
        with self._transaction(write=False) as conn:
            row = conn.execute(self._q('SELECT version FROM user_versions WHERE "user" = ?'), (user,)).fetchone()
        return row[0] if row else 0

    def _versions(self, conn, users) -> dict[str, int]:
        found = {}
        for user in set(users):
            row = conn.execute(self._q('SELECT version FROM user_versions WHERE "user" = ?'), (user,)).fetchone()
            found[user] = row[0] if row else 0
        return found

    def put_reasons(self, rows: list[dict], model: str, kind: str) -> int:
        with self._transaction() as conn:
            versions = self._versions(conn, [r["user_id"] for r in rows])
            conn.cursor().executemany(self._q(
                'INSERT INTO reasons (model, kind, "user", item, rank, version, body) VALUES (?, ?, ?, ?, ?, ?, ?) '
                'ON CONFLICT (model, kind, "user", item) DO UPDATE SET rank = excluded.rank, '
                'version = excluded.version, body = excluded.body'),
                [(model, kind, r["user_id"], r["item_id"], r.get("rank"), versions[r["user_id"]],
                  json.dumps(r, ensure_ascii=False)) for r in rows])
        return len(rows)

    def stored_reasons(self, model: str, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        found: dict[tuple[str, str], dict] = {}
        with self._transaction(write=False) as conn:
            versions = self._versions(conn, [u for u, _ in pairs])
            for user, item in set(pairs):
                rows = conn.execute(self._q(
                    'SELECT version, body FROM reasons WHERE model = ? AND "user" = ? AND item = ? ORDER BY kind'),
                    (model, user, item)).fetchall()
                for version, body in rows:
                    if version == versions[user]:
                        found[(user, item)] = json.loads(body)
                        break
        return found

    def has_reasons(self, model: str) -> bool:
        with self._transaction(write=False) as conn:
            return conn.execute(self._q("SELECT 1 FROM reasons WHERE model = ? LIMIT 1"), (model,)).fetchone() is not None

    def stored_recommendations(self, model: str, user: str, k: int) -> list[dict]:
        with self._transaction(write=False) as conn:
            version = self._versions(conn, [user])[user]
            rows = conn.execute(self._q(
                "SELECT version, body FROM reasons WHERE model = ? AND kind = 'recommend' AND \"user\" = ? "
                "ORDER BY rank LIMIT ?"), (model, user, k)).fetchall()
        if not rows or any(v != version for v, _ in rows):
            return []
        return [json.loads(body) for _, body in rows]

    def items(self) -> list[str]:
        with self._transaction(write=False) as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT item FROM interactions ORDER BY item").fetchall()]


class SQLiteStore(_SQLStore):
    SCHEMA = [
        'CREATE TABLE IF NOT EXISTS interactions (seq INTEGER PRIMARY KEY, "user" TEXT NOT NULL, item TEXT NOT NULL, '
        "rating REAL NOT NULL, text TEXT NOT NULL, timestamp INTEGER NOT NULL, features TEXT NOT NULL, "
        "summary TEXT NOT NULL DEFAULT '')",
        'CREATE INDEX IF NOT EXISTS interactions_user ON interactions("user")',
        'CREATE TABLE IF NOT EXISTS user_versions ("user" TEXT PRIMARY KEY, version INTEGER NOT NULL)',
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS log_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)",
        REASONS_TABLE,
    ]

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(interactions)")}
        if columns and "seq" not in columns:
            raise ConfigError(f"store {self.path} was written by an older recreason (no 'seq' column); "
                             "delete it and restart to seed it again from the dataset")
        self._create()

    @contextmanager
    def _transaction(self, write: bool = True):
        with self._lock:
            # IMMEDIATE takes the write lock up front (no upgrade deadlocks); a WAL read needs no lock.
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class PostgresStore(_SQLStore):
    SCHEMA = [
        'CREATE TABLE IF NOT EXISTS interactions (seq BIGINT PRIMARY KEY, "user" TEXT NOT NULL, item TEXT NOT NULL, '
        "rating DOUBLE PRECISION NOT NULL, text TEXT NOT NULL, timestamp BIGINT NOT NULL, features TEXT NOT NULL, "
        "summary TEXT NOT NULL DEFAULT '')",
        'CREATE INDEX IF NOT EXISTS interactions_user ON interactions("user")',
        'CREATE TABLE IF NOT EXISTS user_versions ("user" TEXT PRIMARY KEY, version BIGINT NOT NULL)',
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS log_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL)",
        REASONS_TABLE,
    ]
    PLACEHOLDER = "%s"
    CREATE_LOCK = "SELECT pg_advisory_xact_lock(74151)"

    def __init__(self, url: str, max_connections: int = 4):
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ImportError("a postgresql:// store needs psycopg: pip install 'recreason[postgres]'") from exc
        # A pool re-opens connections a database restart broke; each block is one transaction.
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True,
                                    kwargs={"application_name": "recreason"})
        self._pool.wait(timeout=30)
        self._create()

    @contextmanager
    def _transaction(self, write: bool = True):
        with self._pool.connection() as conn:  # commits on success, rolls back on an exception
            yield conn

    def close(self) -> None:
        self._pool.close()


def check_store(url: str, timeout_s: int = 5) -> None:
    """Refuse, in one line and before any worker starts, a store that cannot be opened: a SQLite file in a folder
    that does not exist (or a folder given as the file), a PostgreSQL server that does not answer in
    ``timeout_s`` seconds."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a postgresql:// store needs psycopg: pip install 'recreason[postgres]'") from None
        try:
            psycopg.connect(url, connect_timeout=timeout_s).close()
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--store: cannot reach the PostgreSQL server ({first})") from None
        return
    if "://" in url and not url.startswith("sqlite:///"):
        open_store(url)  # the unsupported-scheme message
    path = Path(url[len("sqlite:///"):] if url.startswith("sqlite:///") else url)
    if path.is_dir():
        raise ConfigError(f"--store {path} is a folder; name the SQLite file")
    if not path.parent.is_dir():
        raise ConfigError(f"--store {path}: the folder {path.parent} does not exist")


def open_store(url: str) -> Store:
    """``sqlite:///path/to/file.db``, a plain path, or ``postgresql://user@host/db``."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"store URL scheme {scheme!r} is not supported; use sqlite:///PATH or postgresql://...")
    return SQLiteStore(url)
