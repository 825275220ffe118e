"""SQLite storage of a comparison: generated responses, the pairs shown, and every judgment.

The database is opened in WAL mode with ``synchronous=FULL`` and each judgment
is written in its own transaction, so a judgment acknowledged to the page has
reached the disk: killing the process (or the machine) loses nothing that was
confirmed. Responses are cached per ``(model, prompt)`` so restarting the
command does not generate again, and a model name is bound to the checkpoint
it was first generated from, so two checkpoints never mix under one name.

One connection is shared by the server's threads behind a lock; SQLite's own
locking still guards against a second process on the same file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.eval.compare.pairs import Pair
from lmlab.eval.compare.schema import Judgment

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    model TEXT NOT NULL, prompt_id TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (model, prompt_id)
);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
    source TEXT NOT NULL, annotator TEXT NOT NULL DEFAULT '',
    model_a TEXT NOT NULL, model_b TEXT NOT NULL,
    overall TEXT NOT NULL CHECK (overall IN ('a', 'b', 'tie')),
    helpfulness TEXT CHECK (helpfulness IN ('a', 'b', 'tie')),
    harmlessness TEXT CHECK (harmlessness IN ('a', 'b', 'tie')),
    honesty TEXT CHECK (honesty IN ('a', 'b', 'tie')),
    created REAL NOT NULL,
    UNIQUE (pair_id, source, annotator)
);
"""

__all__ = ["JudgmentStore", "UnknownPair", "AlreadyJudged"]


class UnknownPair(KeyError):
    """The pair id is not part of this comparison."""


class AlreadyJudged(ValueError):
    """This judge already judged this pair."""


class JudgmentStore:
    """The comparison database at ``path`` (created with its parent directory if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per write
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            with self._tx() as c:
                row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    c.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise ConfigError("--db", f"{self.path} has schema version {row[0]}, expected {SCHEMA_VERSION}", "use a new --db file")
        except sqlite3.DatabaseError as e:
            raise ConfigError("--db", f"cannot open {self.path} as a judgments database: {e}", "point --db at a new or existing .sqlite file") from None

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "JudgmentStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ models and responses

    def register_model(self, name: str, source: str) -> None:
        """Bind ``name`` to ``source`` (e.g. a checkpoint path); a different source for a known name is an error."""
        with self._tx() as c:
            row = c.execute("SELECT source FROM models WHERE name=?", (name,)).fetchone()
            if row is None:
                c.execute("INSERT INTO models VALUES (?, ?)", (name, source))
            elif row[0] != source:
                raise ConfigError(
                    "--model", f"{name!r} was generated from {row[0]!r} in {self.path}, not {source!r}",
                    "give this checkpoint another name or use a new --db",
                )

    def responses(self, model: str) -> dict[str, str]:
        """Cached responses of ``model``: ``{prompt_id: text}``."""
        return dict(self._read("SELECT prompt_id, response FROM responses WHERE model=?", (model,)))

    def put_responses(self, model: str, responses: Mapping[str, str]) -> None:
        """Cache responses of ``model`` (one transaction)."""
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                [(model, pid, text, now) for pid, text in responses.items()],
            )

    # ------------------------------------------------------------------ pairs

    def sync_pairs(self, pairs: Iterable[Pair]) -> list[Pair]:
        """Store new pairs; return the stored version of each, in the given order.

        A pair already in the database keeps its recorded sides and responses,
        so judgments made earlier stay attached to what was shown.
        """
        pairs = list(pairs)
        with self._tx() as c:
            c.executemany(
                "INSERT OR IGNORE INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(p.pair_id, p.prompt_id, p.prompt, p.model_a, p.model_b, p.response_a, p.response_b, p.position) for p in pairs],
            )
        stored = self.pairs()
        return [stored[p.pair_id] for p in pairs]

    def pairs(self) -> dict[str, Pair]:
        """Every stored pair by id."""
        rows = self._read("SELECT pair_id, prompt_id, prompt, model_a, model_b, response_a, response_b, position FROM pairs")
        return {r[0]: Pair(*r) for r in rows}

    # ------------------------------------------------------------------ judgments

    def add_judgment(self, j: Judgment) -> int:
        """Store one judgment in its own transaction; returns its row id.

        Raises :class:`UnknownPair` for a pair id not in the database or with
        other models, and :class:`AlreadyJudged` when this source and annotator
        judged the pair before.
        """
        with self._tx() as c:
            row = c.execute("SELECT model_a, model_b FROM pairs WHERE pair_id=?", (j.pair_id,)).fetchone()
            if row is None or tuple(row) != (j.model_a, j.model_b):
                raise UnknownPair(j.pair_id)
            try:
                cur = c.execute(
                    "INSERT INTO judgments (pair_id, source, annotator, model_a, model_b, overall, helpfulness, harmlessness, honesty, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (j.pair_id, j.source, j.annotator, j.model_a, j.model_b, j.overall, j.helpfulness, j.harmlessness, j.honesty, j.created or time.time()),
                )
            except sqlite3.IntegrityError:
                raise AlreadyJudged(j.pair_id) from None
            return int(cur.lastrowid)

    def judgments(self, source: str | None = None, pair_ids: Iterable[str] | None = None) -> list[Judgment]:
        """Stored judgments in the order they were made, optionally of one source and a set of pairs."""
        sql = "SELECT pair_id, model_a, model_b, overall, helpfulness, harmlessness, honesty, source, annotator, created FROM judgments"
        args: list = []
        if source is not None:
            sql += " WHERE source=?"
            args.append(source)
        rows = self._read(sql + " ORDER BY id", args)
        keep = None if pair_ids is None else set(pair_ids)
        return [Judgment(*r) for r in rows if keep is None or r[0] in keep]

    def judged_ids(self, source: str, annotator: str = "") -> set[str]:
        """Pair ids this source and annotator already judged."""
        return {r[0] for r in self._read("SELECT pair_id FROM judgments WHERE source=? AND annotator=?", (source, annotator))}

