"""The preference store: prompts, responses, pairs and their comparisons in one SQLite file.

Every kind of feedback lands here -- people in the annotation app, AI judges, simulated annotators,
imported datasets -- and every consumer reads from here (``export`` to JSONL for the reward model
and DAP stages). One file, open format: ``sqlite3 store.db 'select * from labelled'`` works.

Safety with several writers (the web app's threads, a judge process, a CLI import):

* WAL journal, ``busy_timeout``, and every write inside ``BEGIN IMMEDIATE`` (taking the write lock
  up front, so two read-then-write transactions never deadlock or act on stale reads);
* at most one human label per (pair, annotator): a unique index, not a check in Python;
* a process killed mid-transaction leaves no trace: SQLite rolls the journal back on next open.

The schema version lives in ``PRAGMA user_version``; ``MIGRATIONS[i]`` brings a store from version
``i`` to ``i + 1`` and runs in its own transaction together with the version bump, so a store is
always exactly at one version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Iterator

SOURCES = ("human", "ai", "simulated")
# Unanswered pairs one annotator may hold at once (one per open tab or API worker).
MAX_OPEN = 16
LABELS = ("a", "b", "tie")
CHOICES = ("a", "b", "tie", "skip", "left", "right")
_NOW = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"

# Version 1: the human-feedback core.
_V1 = (
    f"""CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT {_NOW})""",
    f"""CREATE TABLE responses (
        id INTEGER PRIMARY KEY,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        text TEXT NOT NULL,
        hash TEXT NOT NULL,
        model TEXT,
        sampling TEXT,
        created_at TEXT NOT NULL DEFAULT {_NOW},
        UNIQUE (prompt_id, hash))""",
    f"""CREATE TABLE pairs (
        id INTEGER PRIMARY KEY,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        response_a INTEGER NOT NULL REFERENCES responses(id),
        response_b INTEGER NOT NULL REFERENCES responses(id),
        created_at TEXT NOT NULL DEFAULT {_NOW},
        CHECK (response_a <> response_b))""",
    # (x, y) and (y, x) are the same pair.
    "CREATE UNIQUE INDEX pairs_unordered"
    " ON pairs (min(response_a, response_b), max(response_a, response_b))",
    f"""CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        label TEXT NOT NULL CHECK (label IN ('a', 'b', 'tie')),
        source TEXT NOT NULL CHECK (source IN ('human', 'ai', 'simulated')),
        annotator TEXT NOT NULL,
        shown_left TEXT CHECK (shown_left IN ('a', 'b')),
        comment TEXT,
        created_at TEXT NOT NULL DEFAULT {_NOW})""",
    "CREATE UNIQUE INDEX comparisons_one_human_label ON comparisons (pair_id, annotator, source)"
    " WHERE source = 'human'",
    "CREATE INDEX comparisons_by_pair ON comparisons (pair_id, source)",
    f"""CREATE TABLE annotators (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
        created_at TEXT NOT NULL DEFAULT {_NOW})""",
    """CREATE TABLE assignments (
        id INTEGER PRIMARY KEY,
        pair_id INTEGER NOT NULL REFERENCES pairs(id),
        annotator_id INTEGER NOT NULL REFERENCES annotators(id),
        shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')),
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'skipped')),
        assigned_at REAL NOT NULL,
        finished_at REAL,
        UNIQUE (pair_id, annotator_id))""",
    "CREATE INDEX assignments_by_annotator ON assignments (annotator_id, status)",
)

# Version 2: AI-judge bookkeeping (soft labels, cost, latency, a request cache) and a readable view.
_V2 = (
    "ALTER TABLE comparisons ADD COLUMN prob_a REAL CHECK (prob_a BETWEEN 0 AND 1)",
    "ALTER TABLE comparisons ADD COLUMN template_version TEXT",
    "ALTER TABLE comparisons ADD COLUMN rationale TEXT",
    "ALTER TABLE comparisons ADD COLUMN cost REAL",
    "ALTER TABLE comparisons ADD COLUMN latency_s REAL",
    f"""CREATE TABLE judgements_cache (
        key TEXT PRIMARY KEY,
        judge TEXT NOT NULL,
        template_version TEXT NOT NULL,
        answer TEXT NOT NULL,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        cost REAL,
        created_at TEXT NOT NULL DEFAULT {_NOW})""",
    """CREATE VIEW labelled AS
        SELECT c.id, c.pair_id, p.text AS prompt, ra.text AS response_a, rb.text AS response_b,
               c.label, c.prob_a, c.source, c.annotator, c.template_version, c.shown_left,
               c.rationale, c.comment, c.cost, c.latency_s, c.created_at
        FROM comparisons c JOIN pairs ON pairs.id = c.pair_id
        JOIN prompts p ON p.id = pairs.prompt_id
        JOIN responses ra ON ra.id = pairs.response_a
        JOIN responses rb ON rb.id = pairs.response_b""",
)

MIGRATIONS: list[tuple[str, ...]] = [_V1, _V2]


class StoreError(Exception):
    """A request the store refuses (unknown annotator, pair not assigned, ...)."""


class StoreInputError(StoreError, ValueError):
    """Bad input data; the message names the file and line."""


class LabelConflict(StoreError):
    """A second, different answer to a pair this annotator already answered.

    ``comparison_id`` is the stored label's id (``None`` if the earlier answer was a skip) and
    ``choice`` the earlier answer as the person saw it: ``left``, ``right``, ``tie`` or ``skip``.
    """

    def __init__(self, message: str, *, comparison_id: int | None, choice: str):
        super().__init__(message)
        self.comparison_id = comparison_id
        self.choice = choice


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Pair:
    id: int
    prompt: str
    response_a: str
    response_b: str
    response_a_id: int
    response_b_id: int


@dataclass(frozen=True)
class Assignment:
    """A pair handed to one annotator, with the side (``a`` or ``b``) shown on the left;
    ``status`` is ``open`` until they answer it (then ``done`` or ``skipped``)."""

    pair_id: int
    prompt: str
    response_a: str
    response_b: str
    shown_left: str
    status: str = "open"

    @property
    def left(self) -> str:
        return self.response_a if self.shown_left == "a" else self.response_b

    @property
    def right(self) -> str:
        return self.response_b if self.shown_left == "a" else self.response_a


def _hash(*parts: Any) -> str:
    # JSON of a list is unambiguous: ("ab", "c") and ("a", "bc") hash differently.
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings: a fast unsalted hash is enough (no dictionary to attack).
    return hashlib.sha256(token.encode()).hexdigest()


def is_text(value: str) -> bool:
    """Whether ``value`` can be stored: SQLite holds UTF-8, and a lone surrogate (which JSON's
    ``"\\ud800"`` escapes and undecodable file names produce) has no UTF-8 form."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def migrate(conn: sqlite3.Connection, migrations: list[tuple[str, ...]] | None = None) -> int:
    """Bring the database on ``conn`` (autocommit mode) to the newest schema; return its version."""
    migrations = MIGRATIONS if migrations is None else migrations
    while True:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise StoreError(
                f"store schema version {version} is newer than this alignkit "
                f"({len(migrations)}); upgrade alignkit"
            )
        if version == len(migrations):
            return version
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] == version:
                for statement in migrations[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def majority(labels: Iterable[str]) -> tuple[str, float]:
    """Majority vote over ``a``/``b``/``tie`` labels: (winner, share of votes for it).

    No unique winner (e.g. one ``a`` and one ``b``) counts as a tie: the annotators disagree.
    """
    counts = Counter(labels).most_common()
    n = sum(c for _, c in counts)
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie", counts[0][1] / n
    return counts[0][0], counts[0][1] / n


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e).

    ``None`` when undefined (no items, or both raters always give one and the same label).
    """
    if not pairs:
        return None
    n = len(pairs)
    p_o = sum(x == y for x, y in pairs) / n
    first, second = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    p_e = sum(first[k] * second[k] for k in first) / (n * n)
    if p_e == 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


class PreferenceStore:
    """A preference store in the SQLite file ``path`` (created and migrated on open).

    ``labels_per_pair``: how many people may label one pair in the annotation app;
    ``assignment_ttl_s``: after this long an unanswered assignment stops reserving its pair;
    ``create=False``: refuse a file that does not exist instead of creating an empty store (for
    readers: a typo in a path must not look like an empty store).

    A path that cannot be opened as a store raises :class:`StoreError` naming the path and why.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        labels_per_pair: int = 1,
        assignment_ttl_s: float = 3600.0,
        timeout_s: float = 30.0,
        create: bool = True,
    ):
        if labels_per_pair < 1:
            raise ValueError(f"labels_per_pair must be >= 1, got {labels_per_pair}")
        self.path = str(path)
        self.labels_per_pair = labels_per_pair
        self.assignment_ttl_s = assignment_ttl_s
        self._depth = 0
        self._check_path(create)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, nothing implicit. fsencode:
            # a file name that is not UTF-8 (surrogate-escaped by Python) still opens.
            self._conn = sqlite3.connect(
                os.fsencode(self.path), timeout=timeout_s, isolation_level=None
            )
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the store: {e}") from None
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            # The first statement that reads the file: "file is not a database" shows up here.
            self._conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives a killed process; only a power cut may lose the last
            # commits.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(f"{self.path}: not a usable preference store: {e}") from None
        try:
            migrate(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def _check_path(self, create: bool) -> None:
        """Refuse what SQLite would only report as "unable to open database file"."""
        if self.path == ":memory:" or self.path.startswith("file:"):
            return
        path = Path(self.path)
        if path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a store file")
        if path.exists():
            return
        if not create:
            raise StoreError(f"{self.path}: no such store")
        if not path.parent.is_dir():
            raise StoreError(
                f"{self.path}: cannot create the store: folder {path.parent} does not exist"
            )

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PreferenceStore]:
        """All writes inside happen together or not at all. Nests (inner blocks are savepoints)."""
        if self._depth:
            name = f"sp{self._depth}"
            self._conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._conn.execute(f"ROLLBACK TO {name}")
                self._conn.execute(f"RELEASE {name}")
                raise
            else:
                self._conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _one(self, sql: str, params: tuple = ()) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- prompts, responses, pairs ---------------------------------------------------------

    def add_prompt(self, text: str) -> int:
        """Id of the prompt with this text, added if new."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a string, got {type(text).__name__}")
        digest = _hash(text)
        with self.transaction():
            self._conn.execute(
                "INSERT INTO prompts (text, hash) VALUES (?, ?) ON CONFLICT (hash) DO NOTHING",
                (text, digest),
            )
            return self._one("SELECT id FROM prompts WHERE hash = ?", (digest,))

    def add_response(
        self, prompt_id: int, text: str, *, model: str | None = None, sampling: dict | None = None
    ) -> int:
        """Id of the response ``text`` to prompt ``prompt_id``, added if new.

        The same text from a second model is the same response; the first model is kept.
        """
        if not isinstance(text, str):
            raise TypeError(f"response must be a string, got {type(text).__name__}")
        digest = _hash(text)
        settings = None if sampling is None else json.dumps(sampling, sort_keys=True)
        with self.transaction():
            self._conn.execute(
                "INSERT INTO responses (prompt_id, text, hash, model, sampling)"
                " VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (prompt_id, hash) DO NOTHING",
                (prompt_id, text, digest, model, settings),
            )
            return self._one(
                "SELECT id FROM responses WHERE prompt_id = ? AND hash = ?", (prompt_id, digest)
            )

    def _add_pair(self, response_a_id: int, response_b_id: int) -> tuple[int, bool]:
        if response_a_id == response_b_id:
            raise StoreError("a pair needs two different responses")
        with self.transaction():
            prompts = {
                r[0]
                for r in self._conn.execute(
                    "SELECT prompt_id FROM responses WHERE id IN (?, ?)",
                    (response_a_id, response_b_id),
                )
            }
            if len(prompts) != 1:
                raise StoreError(
                    f"responses {response_a_id} and {response_b_id} do not both exist "
                    "and answer the same prompt"
                )
            cur = self._conn.execute(
                "INSERT INTO pairs (prompt_id, response_a, response_b) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (prompts.pop(), response_a_id, response_b_id),
            )
            created = cur.rowcount == 1
            pair_id = self._one(
                "SELECT id FROM pairs"
                " WHERE min(response_a, response_b) = ? AND max(response_a, response_b) = ?",
                (min(response_a_id, response_b_id), max(response_a_id, response_b_id)),
            )
            return pair_id, created

    def add_pair(self, response_a_id: int, response_b_id: int) -> int:
        """Id of the pair of two responses to one prompt; (x, y) and (y, x) are the same pair,
        stored in the order first seen -- check ``pair(id).response_a_id`` before labelling."""
        return self._add_pair(response_a_id, response_b_id)[0]

    def add_pair_from_texts(
        self,
        prompt: str,
        response_a: str,
        response_b: str,
        *,
        model_a: str | None = None,
        model_b: str | None = None,
        sampling: dict | None = None,
    ) -> int:
        """Prompt, both responses and their pair in one go; returns the pair id."""
        with self.transaction():
            prompt_id = self.add_prompt(prompt)
            a = self.add_response(prompt_id, response_a, model=model_a, sampling=sampling)
            b = self.add_response(prompt_id, response_b, model=model_b, sampling=sampling)
            return self.add_pair(a, b)

    def pair(self, pair_id: int) -> Pair:
        row = self._conn.execute(
            "SELECT pairs.id, p.text, ra.text, rb.text, ra.id, rb.id FROM pairs "
            "JOIN prompts p ON p.id = pairs.prompt_id "
            "JOIN responses ra ON ra.id = pairs.response_a "
            "JOIN responses rb ON rb.id = pairs.response_b WHERE pairs.id = ?",
            (pair_id,),
        ).fetchone()
        if row is None:
            raise StoreError(f"no pair {pair_id}")
        return Pair(*row)

    def count(self, table: str) -> int:
        if table not in (
            "prompts",
            "responses",
            "pairs",
            "comparisons",
            "annotators",
            "assignments",
            "judgements_cache",
        ):
            raise ValueError(f"unknown table {table!r}")
        return self._one(f"SELECT count(*) FROM {table}")

    # -- comparisons ---------------------------------------------------------------------------

    def add_comparison(
        self,
        pair_id: int,
        label: str,
        *,
        source: str,
        annotator: str,
        prob_a: float | None = None,
        template_version: str | None = None,
        rationale: str | None = None,
        cost: float | None = None,
        latency_s: float | None = None,
        shown_left: str | None = None,
        comment: str | None = None,
    ) -> int | None:
        """Record one judgement of pair ``pair_id``: ``label`` a, b or tie (relative to the pair's
        stored a/b); ``prob_a`` the probability that a is preferred, for soft labels.

        ``annotator`` is a person's name or a judge id. Returns the new comparison id, or ``None``
        when this person already labelled this pair (human labels are unique per annotator).
        """
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if prob_a is not None and not 0.0 <= prob_a <= 1.0:
            raise ValueError(f"prob_a must be in [0, 1], got {prob_a}")
        if shown_left not in (None, "a", "b"):
            raise ValueError(f"shown_left must be 'a', 'b' or None, got {shown_left!r}")
        if not annotator:
            raise ValueError("annotator (a name or judge id) is required")
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO comparisons (pair_id, label, source, annotator, prob_a,"
                " template_version, rationale, cost, latency_s, shown_left, comment)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (
                    pair_id,
                    label,
                    source,
                    annotator,
                    prob_a,
                    template_version,
                    rationale,
                    cost,
                    latency_s,
                    shown_left,
                    comment,
                ),
            )
            return cur.lastrowid if cur.rowcount == 1 else None

    def comparisons(self, *, source: str | None = None, annotator: str | None = None) -> list[dict]:
        """All comparisons (rows of the ``labelled`` view), oldest first, optionally filtered."""
        sql, params = "SELECT * FROM labelled WHERE 1", []
        if source is not None:
            sql, params = sql + " AND source = ?", params + [source]
        if annotator is not None:
            sql, params = sql + " AND annotator = ?", params + [annotator]
        return [dict(r) for r in self._conn.execute(sql + " ORDER BY id", params)]

    # -- AI judge cache ------------------------------------------------------------------------

    @staticmethod
    def request_key(
        judge: str, template_version: str, prompt: str, response_a: str, response_b: str
    ) -> str:
        """Cache key of one judge request; a and b swapped is a different request."""
        return _hash("judgement", judge, template_version, prompt, response_a, response_b)

    def get_cached(self, key: str) -> dict | None:
        """The stored raw answer of an identical earlier request, or ``None``."""
        row = self._conn.execute(
            "SELECT judge, template_version, answer, prompt_tokens, completion_tokens, cost "
            "FROM judgements_cache WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else dict(row)

    def put_cached(
        self,
        key: str,
        *,
        judge: str,
        template_version: str,
        answer: str,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cost: float | None = None,
    ) -> None:
        """Remember a judge's raw answer; the first answer stored for a key wins."""
        with self.transaction():
            self._conn.execute(
                "INSERT INTO judgements_cache (key, judge, template_version, answer, prompt_tokens,"
                " completion_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                (key, judge, template_version, answer, prompt_tokens, completion_tokens, cost),
            )

    # -- annotators ----------------------------------------------------------------------------

    def add_annotator(self, name: str, *, admin: bool = False) -> str:
        """Create an annotator; returns the access token (only its hash is stored)."""
        name = name.strip()
        if not name:
            raise StoreError("annotator name must not be empty")
        if not is_text(name):
            raise StoreError(f"annotator name {name!r} is not valid Unicode text")
        token = secrets.token_urlsafe(32)
        with self.transaction():
            if self._one("SELECT 1 FROM annotators WHERE name = ?", (name,)):
                raise StoreError(f"annotator {name!r} exists; use reset-token for a new token")
            self._conn.execute(
                "INSERT INTO annotators (name, token_hash, is_admin) VALUES (?, ?, ?)",
                (name, hash_token(token), int(admin)),
            )
        return token

    def reset_token(self, name: str) -> str:
        """Issue a new token for ``name``; the old one stops working."""
        token = secrets.token_urlsafe(32)
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE annotators SET token_hash = ? WHERE name = ?", (hash_token(token), name)
            )
            if cur.rowcount != 1:
                raise StoreError(f"no annotator {name!r}")
        return token

    def _annotator(self, where: str, value: Any) -> Annotator | None:
        row = self._conn.execute(
            f"SELECT id, name, is_admin FROM annotators WHERE {where} = ?", (value,)
        ).fetchone()
        return None if row is None else Annotator(row[0], row[1], bool(row[2]))

    def annotator(self, name: str) -> Annotator | None:
        return self._annotator("name", name)

    def annotator_by_id(self, annotator_id: int) -> Annotator | None:
        return self._annotator("id", annotator_id)

    def annotator_by_token(self, token: str) -> Annotator | None:
        # A token that is not text (a lone surrogate from a form) matches nobody.
        if not token or not is_text(token):
            return None
        return self._annotator("token_hash", hash_token(token))

    def session_key(self, annotator_id: int) -> str | None:
        """A fingerprint of the annotator's current token (``None`` if there is no such annotator).

        A login session records it and is valid only while it still matches, so that resetting
        the token ends every session logged in with the old one. It derives from the token's hash
        one-way: a session cookie (signed, but readable by its holder) reveals nothing stored.
        """
        token_hash = self._one("SELECT token_hash FROM annotators WHERE id = ?", (annotator_id,))
        if token_hash is None:
            return None
        return hashlib.sha256(f"alignkit-session:{token_hash}".encode()).hexdigest()

    def annotators(self) -> list[Annotator]:
        rows = self._conn.execute("SELECT id, name, is_admin FROM annotators ORDER BY name")
        return [Annotator(r[0], r[1], bool(r[2])) for r in rows]

    # -- assignments: which pair a person labels next --------------------------------------------

    # Pairs the annotator (:who id, :name) was never given and never labelled, holding fewer than
    # :cap human labels plus live (not yet stale) reservations by others.
    _ELIGIBLE = """
        FROM pairs p
        WHERE NOT EXISTS (SELECT 1 FROM assignments s
                          WHERE s.pair_id = p.id AND s.annotator_id = :who)
          AND NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.pair_id = p.id AND c.source = 'human'
                          AND c.annotator = :name)
          AND (SELECT count(*) FROM comparisons c WHERE c.pair_id = p.id AND c.source = 'human')
            + (SELECT count(*) FROM assignments s WHERE s.pair_id = p.id AND s.status = 'open'
               AND s.assigned_at > :live_since) < :cap"""

    def _require(self, name: str) -> Annotator:
        who = self.annotator(name)
        if who is None:
            raise StoreError(f"no annotator {name!r}")
        return who

    def _eligible_params(self, who: Annotator, labels_per_pair: int | None) -> dict:
        return {
            "who": who.id,
            "name": who.name,
            "live_since": time.time() - self.assignment_ttl_s,
            "cap": labels_per_pair or self.labels_per_pair,
        }

    def next_pair_for(
        self,
        annotator: str,
        *,
        labels_per_pair: int | None = None,
        rng: random.Random | None = None,
        max_open: int = MAX_OPEN,
    ) -> Assignment | None:
        """A pair for ``annotator`` to label now, or ``None`` when nothing is left for them.

        Every call reserves a new pair -- the least labelled eligible one, with a random side
        shown on the left -- so that several tabs (or API workers) of one person label different
        pairs. Once they hold ``max_open`` unanswered pairs, or no new pair is left, the one they
        were handed longest ago comes back (same left/right order): a person cannot hoard more than
        ``max_open`` pairs, and pairs left open in a closed tab are not lost to them.
        A person never gets a pair they answered.
        """
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        rng = rng or random
        with self.transaction():
            who = self._require(annotator)
            held = self._conn.execute(
                "SELECT id, pair_id FROM assignments WHERE annotator_id = ? AND status = 'open' "
                "ORDER BY assigned_at, id",
                (who.id,),
            ).fetchall()
            pair_id = None
            if len(held) < max_open:
                pair_id = self._one(
                    "SELECT p.id "
                    + self._ELIGIBLE
                    + """
                    ORDER BY (SELECT count(*) FROM comparisons c
                              WHERE c.pair_id = p.id AND c.source = 'human'), p.id LIMIT 1""",
                    self._eligible_params(who, labels_per_pair),
                )
            if pair_id is not None:
                self._conn.execute(
                    "INSERT INTO assignments (pair_id, annotator_id, shown_left, assigned_at) "
                    "VALUES (?, ?, ?, ?)",
                    (pair_id, who.id, rng.choice("ab"), time.time()),
                )
            elif held:
                # Handing it out again renews its reservation, and moves it to the back of the
                # queue: the next call (another tab) gets another of the held pairs.
                oldest = held[0]
                self._conn.execute(
                    "UPDATE assignments SET assigned_at = ? WHERE id = ?",
                    (time.time(), oldest["id"]),
                )
                pair_id = oldest["pair_id"]
            else:
                return None
            return self.assignment(annotator, pair_id)

    def assignment(self, annotator: str, pair_id: int) -> Assignment | None:
        """The pair ``pair_id`` as handed to ``annotator`` (any status), or ``None`` if never."""
        row = self._conn.execute(
            "SELECT s.shown_left, s.status FROM assignments s"
            " JOIN annotators n ON n.id = s.annotator_id WHERE n.name = ? AND s.pair_id = ?",
            (annotator, pair_id),
        ).fetchone()
        if row is None:
            return None
        pair = self.pair(pair_id)
        return Assignment(pair.id, pair.prompt, pair.response_a, pair.response_b, *row)

    def submit(
        self, annotator: str, pair_id: int, choice: str, comment: str | None = None
    ) -> int | None:
        """Answer the assignment of ``pair_id`` to ``annotator``.

        ``choice``: ``a``/``b``/``tie``, ``left``/``right`` (the side as shown), or ``skip``.
        Returns the comparison id (``None`` for a skip).

        Answering twice (two tabs, a double click, a retried request): the same answer again
        returns the first one's comparison id and changes nothing; a label after a skip is
        recorded; any other second answer raises :class:`LabelConflict` naming the first.
        Raises :class:`StoreError` if the pair was never given to this annotator.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        with self.transaction():
            who = self._require(annotator)
            row = self._conn.execute(
                "SELECT id, shown_left, status FROM assignments"
                " WHERE annotator_id = ? AND pair_id = ?",
                (who.id, pair_id),
            ).fetchone()
            if row is None:
                raise StoreError(f"pair {pair_id} is not assigned to {annotator!r}")
            shown_left = row["shown_left"]
            other = "b" if shown_left == "a" else "a"
            label = {"left": shown_left, "right": other}.get(choice, choice)
            earlier = self._conn.execute(
                "SELECT id, label FROM comparisons"
                " WHERE pair_id = ? AND source = 'human' AND annotator = ?",
                (pair_id, who.name),
            ).fetchone()
            if earlier is not None:
                if earlier["label"] == label:
                    return earlier["id"]
                shown = {shown_left: "left", other: "right", "tie": "tie"}[earlier["label"]]
                raise LabelConflict(
                    f"pair {pair_id}: {who.name!r} already labelled it {shown!r} (comparison "
                    f"{earlier['id']}); the second answer {choice!r} was not recorded",
                    comparison_id=earlier["id"],
                    choice=shown,
                )
            if label == "skip":
                if row["status"] == "open":
                    self._conn.execute(
                        "UPDATE assignments SET status = 'skipped', finished_at = ? WHERE id = ?",
                        (time.time(), row["id"]),
                    )
                return None
            # Open, or skipped earlier (perhaps in another tab): a label says more than a skip.
            self._conn.execute(
                "UPDATE assignments SET status = 'done', finished_at = ? WHERE id = ?",
                (time.time(), row["id"]),
            )
            comparison_id = self.add_comparison(
                pair_id,
                label,
                source="human",
                annotator=who.name,
                shown_left=shown_left,
                comment=comment or None,
            )
            # Cannot happen (we looked for an earlier label inside this write transaction), but a
            # label must never vanish silently.
            if comparison_id is None:
                raise StoreError(f"pair {pair_id}: the label of {who.name!r} was not recorded")
            return comparison_id

    def progress(self, annotator: str, *, labels_per_pair: int | None = None) -> dict:
        """``labelled``, ``skipped``, ``remaining`` (incl. the open ones) and ``total`` =
        labelled + remaining, for one annotator."""
        who = self._require(annotator)
        labelled = self._one(
            "SELECT count(*) FROM comparisons WHERE source = 'human' AND annotator = ?", (who.name,)
        )
        by_status = dict(
            self._conn.execute(
                "SELECT status, count(*) FROM assignments WHERE annotator_id = ? GROUP BY status",
                (who.id,),
            )
        )
        eligible = self._one(
            "SELECT count(*) " + self._ELIGIBLE, self._eligible_params(who, labels_per_pair)
        )
        remaining = eligible + by_status.get("open", 0)
        return {
            "labelled": labelled,
            "skipped": by_status.get("skipped", 0),
            "remaining": remaining,
            "total": labelled + remaining,
        }

    # -- statistics ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Label counts and agreement.

        * ``labels_per_annotator``: rows ``{annotator, source, labels}``;
        * ``inter_annotator``: over pairs with two or more human labels, ``percent_agreement`` over
          all pairs of people on the same item, and Cohen's kappa per pair of annotators
          (``by_annotators``) with ``kappa`` their mean weighted by shared items;
        * ``human_vs``: per AI/simulated judge, each human label against that judge's (majority)
          label on the same pair: ``n``, ``percent_agreement``, ``kappa``.
        """
        rows = self._conn.execute(
            "SELECT pair_id, label, source, annotator FROM comparisons"
        ).fetchall()
        per_annotator = Counter((r["annotator"], r["source"]) for r in rows)
        human: dict[int, dict[str, str]] = defaultdict(dict)
        judges: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["source"] == "human":
                human[r["pair_id"]][r["annotator"]] = r["label"]
            else:
                judges[(r["source"], r["annotator"])][r["pair_id"]].append(r["label"])

        shared = [labels for labels in human.values() if len(labels) >= 2]
        item_pairs = [(x, y) for labels in shared for x, y in combinations(labels.values(), 2)]
        by_annotators: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for labels in shared:
            for p, q in combinations(sorted(labels), 2):
                by_annotators[(p, q)].append((labels[p], labels[q]))
        table = [
            {
                "annotators": list(k),
                "n": len(v),
                "percent_agreement": _agree(v),
                "kappa": cohen_kappa(v),
            }
            for k, v in sorted(by_annotators.items())
        ]
        defined = [t for t in table if t["kappa"] is not None]
        kappa = (
            sum(t["kappa"] * t["n"] for t in defined) / sum(t["n"] for t in defined)
            if defined
            else None
        )

        human_vs = []
        for (source, judge), labels in sorted(judges.items()):
            both = [
                (h, majority(labels[pid])[0])
                for pid, people in human.items()
                if pid in labels
                for h in people.values()
            ]
            if both:
                human_vs.append(
                    {
                        "source": source,
                        "judge": judge,
                        "n": len(both),
                        "percent_agreement": _agree(both),
                        "kappa": cohen_kappa(both),
                    }
                )
        return {
            "pairs": self.count("pairs"),
            "pairs_labelled_by_humans": len(human),
            "labels_per_annotator": [
                {"annotator": a, "source": s, "labels": n}
                for (a, s), n in sorted(per_annotator.items())
            ],
            "inter_annotator": {
                "pairs": len(shared),
                "percent_agreement": _agree(item_pairs),
                "kappa": kappa,
                "by_annotators": table,
            },
            "human_vs": human_vs,
        }

    # -- import and export ---------------------------------------------------------------------

    def import_pairs(self, path: str | Path) -> dict:
        """Import ``{prompt, response_a, response_b, [model | model_a, model_b], [sampling]}``
        JSONL (pairs sampled from a policy) in one transaction; returns counts."""
        records = read_jsonl(path, ("prompt", "response_a", "response_b"))
        counts = Counter(added=0, existing=0, identical=0)
        with self.transaction():
            for _, r in records:
                if r["response_a"] == r["response_b"]:
                    counts["identical"] += 1
                    continue
                prompt_id = self.add_prompt(r["prompt"])
                a = self.add_response(
                    prompt_id,
                    r["response_a"],
                    model=r.get("model_a", r.get("model")),
                    sampling=r.get("sampling"),
                )
                b = self.add_response(
                    prompt_id,
                    r["response_b"],
                    model=r.get("model_b", r.get("model")),
                    sampling=r.get("sampling"),
                )
                counts["added" if self._add_pair(a, b)[1] else "existing"] += 1
        return dict(counts)

    def import_preferences(
        self, path: str | Path, *, source: str, annotator: str | None = None
    ) -> dict:
        """Import a ``{prompt, chosen, rejected}`` JSONL dataset as labelled comparisons from
        ``source`` by ``annotator`` (default ``import:<file name>``), in one transaction.
        Re-importing the same file adds nothing."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        annotator = annotator or f"import:{Path(path).name}"
        records = read_jsonl(path, ("prompt", "chosen", "rejected"))
        counts = Counter(added=0, existing=0, identical=0)
        with self.transaction():
            for _, r in records:
                if r["chosen"] == r["rejected"]:
                    counts["identical"] += 1
                    continue
                prompt_id = self.add_prompt(r["prompt"])
                chosen = self.add_response(prompt_id, r["chosen"], model=r.get("model"))
                rejected = self.add_response(prompt_id, r["rejected"], model=r.get("model"))
                pair_id = self.add_pair(chosen, rejected)
                if self._one(
                    "SELECT 1 FROM comparisons WHERE pair_id = ? AND source = ? AND annotator = ?",
                    (pair_id, source, annotator),
                ):
                    counts["existing"] += 1
                    continue
                label = "a" if self.pair(pair_id).response_a_id == chosen else "b"
                self.add_comparison(pair_id, label, source=source, annotator=annotator)
                counts["added"] += 1
        return dict(counts)

    def export(
        self,
        *,
        format: str = "preference",
        source: str | None = None,
        annotator: str | None = None,
        min_agreement: float = 0.0,
        ties: str = "drop",
    ) -> Iterator[dict]:
        """Labelled pairs as training records, one majority vote per pair.

        ``format="preference"``: ``{prompt, chosen, rejected}``; ``"unpaired"``:
        ``{prompt, completion, label}`` (label true for the winner, false for the loser).
        Pairs whose majority holds less than ``min_agreement`` of the votes are left out.
        A tied pair is dropped (``ties="drop"``) or ``"split"`` into both orders, which cancel
        out to a 0.5 target in a Bradley-Terry loss.
        """
        if format not in ("preference", "unpaired"):
            raise ValueError(f"format must be 'preference' or 'unpaired', got {format!r}")
        if not 0.0 <= min_agreement <= 1.0:  # also refuses NaN
            raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
        if ties not in ("drop", "split"):
            raise ValueError(f"ties must be 'drop' or 'split', got {ties!r}")
        votes: dict[int, list[str]] = defaultdict(list)
        texts: dict[int, tuple[str, str, str]] = {}
        for c in self.comparisons(source=source, annotator=annotator):
            votes[c["pair_id"]].append(c["label"])
            texts[c["pair_id"]] = (c["prompt"], c["response_a"], c["response_b"])
        for pair_id, labels in votes.items():
            winner, share = majority(labels)
            # Small slack so that 2 of 3 passes --min-agreement 0.6667 despite float rounding.
            if share + 1e-9 < min_agreement or (winner == "tie" and ties == "drop"):
                continue
            prompt, a, b = texts[pair_id]
            orders = {"a": [(a, b)], "b": [(b, a)], "tie": [(a, b), (b, a)]}[winner]
            for chosen, rejected in orders:
                if format == "preference":
                    yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}
                else:
                    yield {"prompt": prompt, "completion": chosen, "label": True}
                    yield {"prompt": prompt, "completion": rejected, "label": False}

    def export_jsonl(self, path: str | Path, **options: Any) -> int:
        """Write :meth:`export` records to ``path`` (atomically: a temp file renamed); returns
        the number of records."""
        from alignkit.data.io import write_jsonl

        return write_jsonl(path, self.export(**options), ensure_ascii=False)


def _agree(pairs: list[tuple[str, str]]) -> float | None:
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else None


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line; a bad line raises
    :class:`StoreInputError` naming ``path:line``. Required fields must be strings."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise StoreInputError(f"{path}: cannot read: {e.strerror}") from None
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreInputError(f"{where}: not UTF-8 text") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreInputError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise StoreInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key, value in record.items():
            # JSON may spell a lone surrogate ("\ud800"); it has no UTF-8 form, SQLite cannot
            # hold it, and the error would otherwise surface later without the line.
            if not is_text(json.dumps([key, value], ensure_ascii=False)):
                raise StoreInputError(
                    f"{where}: field {key!r} is not valid Unicode text (a lone surrogate)"
                )
        for key in required:
            if key not in record:
                raise StoreInputError(f"{where}: missing field {key!r}")
            if not isinstance(record[key], str):
                raise StoreInputError(f"{where}: field {key!r} must be a string")
        for key in ("model", "model_a", "model_b"):
            if not isinstance(record.get(key), (str, type(None))):
                raise StoreInputError(f"{where}: field {key!r} must be a string")
        if not isinstance(record.get("sampling"), (dict, type(None))):
            raise StoreInputError(f"{where}: field 'sampling' must be an object")
        records.append((lineno, record))
    return records
