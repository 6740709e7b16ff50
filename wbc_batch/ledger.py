"""The watch ledger: one SQLite file in OUT that says, per inbox file, what has been done with it.

`wbc-batch watch` is exactly-once because every decision lives here, and every decision that
changes what the reports count is one transaction:

- A row per relative path (forward slashes) with the identity of the file version it describes:
  size, mtime and ctime (ns) and the sha256 of its content. The ctime is there because a copy
  that keeps the old mtime (`cp -p`, `rsync -t`) can replace a file with the same size; the
  copy cannot set ctime back. A new ctime alone (a chmod, a rename, a restore) only costs
  a re-read of the file: unchanged bytes keep their result.
- `status` is one of

  ``pending``    seen, not analysed yet (or a retry is scheduled at `next_retry`);
  ``done``       analysed; `result` holds the `ImageResult.to_dict()` JSON;
  ``error``      given up after `attempts` tries; `error` says why (listed in the Errors sheet);
  ``duplicate``  byte-identical to the file at `duplicate_of`, which is the one counted.

- An image's result and its ``done`` status are written in the same transaction, so a kill at
  any moment leaves the image either pending (analysed again on restart) or done (never again):
  it is neither lost nor counted twice. Reports are derived from `results()`, never the other
  way round, so a restart rebuilds them from here.

Journal: WAL, so readers (a report rebuild, `sqlite3` in a terminal) never block the writer.
Durability: ``synchronous=NORMAL``. In WAL mode that survives any crash of the process (kill -9
included) without losing a committed transaction; only an OS crash or power cut may roll back
the last few commits, and a rolled-back ``done`` turns the image back into ``pending``, which
is analysed again: still exactly once, at the cost of repeating a little work. FULL would add
an fsync per image for no gain in correctness. WAL needs shared memory, so OUT must be on a
local disk (the inbox may be a network share).

The decisions (what a changed, copied, renamed or deleted file means) are taken by
`wbc_batch.watch`, which sees the disk; this module only stores them atomically.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import WbcBatchError
from .results import ImageResult, duplicate_note

LEDGER_NAME = "ledger.sqlite"
SCHEMA_VERSION = 3
#: schema 1 had no ctime_ns; its rows are upgraded in place with ctime unknown (NULL), so each
#: file is hashed once more at the first scan, and a file replaced meanwhile is seen. Schema 3
#: changes no table: its results may hold fields (`margins_left`) that versions reading schema
#: 2 cannot take, so those refuse it with a clear message instead of a traceback.
_MIGRATIONS = {1: "ALTER TABLE files ADD COLUMN ctime_ns INTEGER", 2: "SELECT 1"}

PENDING, DONE, ERROR, DUPLICATE = "pending", "done", "error", "duplicate"
STATUSES = (PENDING, DONE, ERROR, DUPLICATE)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    rel          TEXT PRIMARY KEY,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    sha256       TEXT,
    status       TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT NOT NULL DEFAULT '',
    next_retry   REAL NOT NULL DEFAULT 0,
    duplicate_of TEXT,
    result       TEXT,
    first_seen   REAL NOT NULL,
    updated      REAL NOT NULL,
    ctime_ns     INTEGER
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_status ON files (status);
"""


#: seconds a write waits for another connection's lock on the ledger before it fails
LEDGER_WAIT_S = 30


class LedgerError(WbcBatchError, RuntimeError):
    """The ledger file cannot be used (another schema, another inbox, unreadable)."""


@dataclass(frozen=True)
class Entry:
    """One row of the ledger."""

    rel: str
    size: int
    mtime_ns: int
    sha256: Optional[str]
    status: str
    attempts: int = 0
    error: str = ""
    next_retry: float = 0.0
    duplicate_of: Optional[str] = None
    result: Optional[ImageResult] = None
    ctime_ns: Optional[int] = None   # None: not known (a row from schema 1)

    @property
    def version(self) -> tuple:
        """(size, mtime_ns, ctime_ns): compare with `watch`'s stat key."""
        return (self.size, self.mtime_ns, self.ctime_ns)


_COLUMNS = ("rel, size, mtime_ns, sha256, status, attempts, error, next_retry, duplicate_of, "
            "result, ctime_ns")


def _entry(row) -> Entry:
    rel, size, mtime_ns, sha, status, attempts, error, next_retry, dup, result, ctime_ns = row
    return Entry(rel=rel, size=size, mtime_ns=mtime_ns, sha256=sha, status=status,
                 attempts=attempts, error=error, next_retry=next_retry, duplicate_of=dup,
                 result=ImageResult.from_dict(json.loads(result)) if result else None,
                 ctime_ns=ctime_ns)


class Ledger:
    """The ledger file `OUT/ledger.sqlite`. One process writes it at a time (the watcher holds a
    lock beside it); every public method that writes is a single transaction."""

    def __init__(self, path: Path, upgrade: bool = True):
        """Open (or create) the ledger at `path`. An older schema is upgraded at once, or, with
        `upgrade=False`, by `upgrade()`: a caller that may still refuse the ledger (another
        inbox) reads its meta first and leaves a ledger it refuses as it was."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves. One thread at a
            # time uses a Ledger, but not necessarily the one that opened it.
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=LEDGER_WAIT_S,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc}") from None
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
            return
        self._version = int(version)
        if self._version > SCHEMA_VERSION or any(
                v not in _MIGRATIONS for v in range(self._version, SCHEMA_VERSION)):
            self.close()
            raise LedgerError(f"{self.path} has ledger schema {version}; this version of "
                              f"wbc-batch reads schema {SCHEMA_VERSION}")
        if upgrade:
            self.upgrade()

    _version = SCHEMA_VERSION

    def upgrade(self) -> None:
        """Bring an older ledger up to `SCHEMA_VERSION`, step by step, in one transaction."""
        version = self._version
        if version == SCHEMA_VERSION:
            return
        with self._tx() as db:
            for v in range(version, SCHEMA_VERSION):
                db.execute(_MIGRATIONS[v])
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                       (str(SCHEMA_VERSION),))
        self._version = SCHEMA_VERSION

    @classmethod
    def in_dir(cls, out_dir: Path) -> "Ledger":
        return cls(Path(out_dir) / LEDGER_NAME)

    def close(self) -> None:
        self._db.close()  # again after `restore`: sqlite3 takes a second close as nothing

    def restore(self) -> None:
        """Write this ledger back at `path` from the open connection, after its file was deleted
        or replaced there while it was open (`watch._Watcher._check_out`; the caller holds
        OUT's lock). The connection is closed: its own WAL files at the path go with it, and
        any others are removed, as they belong to no ledger now."""
        from .atomic import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            copy = sqlite3.connect(str(tmp))
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            self.close()
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------------

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
            return False

    def _tx(self) -> "_Tx":
        return self._Tx(self._db)

    # --- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # --- reading ------------------------------------------------------------------------------

    def get(self, rel: str) -> Optional[Entry]:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE rel = ?", (rel,)).fetchone()
        return _entry(row) if row else None

    def entries(self, status: Optional[str] = None) -> list:
        """All rows (or those of one status), ordered by relative path."""
        if status is None:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY rel")
        else:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE status = ? ORDER BY rel",
                                    (status,))
        return [_entry(r) for r in rows]

    def versions(self) -> dict:
        """rel -> ((size, mtime_ns, ctime_ns), status, next_retry) for every row: what a scan
        compares against."""
        return {rel: ((size, mtime_ns, ctime_ns), status, next_retry)
                for rel, size, mtime_ns, ctime_ns, status, next_retry in self._db.execute(
                    "SELECT rel, size, mtime_ns, ctime_ns, status, next_retry FROM files")}

    def owner_of(self, sha256: str, exclude: str = "") -> Optional[Entry]:
        """The row, other than `exclude`, that already accounts for this content: status done
        (the first seen) or else error. (Two pending copies are not owners of each other:
        whichever is analysed first becomes the owner.)"""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE sha256 = ? AND rel != ? AND status IN (?, ?) "
            "ORDER BY status = ? DESC, first_seen, rel LIMIT 1",
            (sha256, exclude, DONE, ERROR, DONE)).fetchone()
        return _entry(row) if row else None

    def duplicates_of(self, rel: str) -> list:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE duplicate_of = ? ORDER BY rel",
                                (rel,))
        return [_entry(r) for r in rows]

    def counts(self) -> dict:
        """status -> number of rows, every status present."""
        out = {s: 0 for s in STATUSES}
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM files GROUP BY status"):
            out[status] = n
        return out

    def results(self) -> list:
        """The `ImageResult`s the reports show, ordered by relative path: every done image, every
        image given up on (status error), and every duplicate (status duplicate, naming the file
        that is counted instead, so each inbox file has one row and none is counted twice)."""
        out = []
        for rel, status, error, dup, result, dup_status in self._db.execute(
                "SELECT f.rel, f.status, f.error, f.duplicate_of, f.result, o.status "
                "FROM files AS f LEFT JOIN files AS o ON o.rel = f.duplicate_of "
                "WHERE f.status != ? ORDER BY f.rel", (PENDING,)):
            if status == DUPLICATE:
                out.append(ImageResult.duplicate(rel, duplicate_note(dup, dup_status == ERROR)))
            elif result:
                out.append(ImageResult.from_dict(json.loads(result)))
            else:
                out.append(ImageResult.failed(rel, error or "unknown error"))
        return out

    # --- writing ------------------------------------------------------------------------------

    @staticmethod
    def _release_duplicates(db, rel: str) -> list:
        """`rel` stops counting its old content: its duplicates must be analysed in its place,
        in the same transaction, or that content would be counted by nobody. Returns their paths."""
        released = [r for (r,) in db.execute("SELECT rel FROM files WHERE duplicate_of = ?",
                                               (rel,))]
        db.execute("UPDATE files SET status = ?, duplicate_of = NULL, attempts = 0, error = '', "
                   "next_retry = 0, updated = ? WHERE duplicate_of = ?",
                   (PENDING, time.time(), rel))
        return released

    def observe(self, files) -> None:
        """Note files seen for the first time: `files` is an iterable of (rel, size, mtime_ns)
        or (rel, size, mtime_ns, ctime_ns). Each gets a pending row (content hash not known
        yet); paths that have a row are left alone. One transaction for the lot."""
        now = time.time()
        rows = [(f[0], f[1], f[2], f[3] if len(f) > 3 else None, PENDING, now, now)
                for f in files]
        with self._tx() as db:
            db.executemany("INSERT INTO files (rel, size, mtime_ns, ctime_ns, status, first_seen,"
                           " updated) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rel) DO NOTHING",
                           rows)

    def touch(self, rel: str, size: int, mtime_ns: int, ctime_ns: Optional[int] = None) -> None:
        """The file at `rel` has a new size/mtime/ctime but the same content: keep its status
        and result."""
        with self._tx() as db:
            db.execute("UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, updated = ? "
                       "WHERE rel = ?", (size, mtime_ns, ctime_ns, time.time(), rel))

    def set_pending(self, rel: str, size: int, mtime_ns: int, sha256: Optional[str],
                    ctime_ns: Optional[int] = None) -> list:
        """(Re)queue the file at `rel` as a new version: attempts reset, any old result dropped
        (a changed file replaces its old rows once analysed again). Returns the paths of files
        that were duplicates of it and are pending now (see `_release_duplicates`)."""
        now = time.time()
        with self._tx() as db:
            released = self._release_duplicates(db, rel)
            db.execute(
                "INSERT INTO files (rel, size, mtime_ns, ctime_ns, sha256, status, first_seen, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rel) DO UPDATE SET "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "ctime_ns = excluded.ctime_ns, sha256 = excluded.sha256, "
                "status = excluded.status, attempts = 0, error = '', next_retry = 0, "
                "duplicate_of = NULL, result = NULL, updated = excluded.updated",
                (rel, size, mtime_ns, ctime_ns, sha256, PENDING, now, now))
        return released

    def mark_duplicate(self, rel: str, size: int, mtime_ns: int, sha256: str,
                       original: str, ctime_ns: Optional[int] = None) -> list:
        """Record `rel` as a byte-identical copy of `original` (which stays the one counted).
        Returns the paths of files that were duplicates of `rel` and are pending now."""
        now = time.time()
        with self._tx() as db:
            released = self._release_duplicates(db, rel)
            db.execute(
                "INSERT INTO files (rel, size, mtime_ns, ctime_ns, sha256, status, duplicate_of, "
                "first_seen, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rel) DO "
                "UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "ctime_ns = excluded.ctime_ns, sha256 = excluded.sha256, "
                "status = excluded.status, attempts = 0, error = '', next_retry = 0, "
                "duplicate_of = excluded.duplicate_of, result = NULL, updated = excluded.updated",
                (rel, size, mtime_ns, ctime_ns, sha256, DUPLICATE, original, now, now))
        return released

    def rename(self, old: str, new: str, size: int, mtime_ns: int,
               released: Optional[list] = None, ctime_ns: Optional[int] = None
               ) -> Optional[Entry]:
        """Move the row of `old` (its status and result) to `new`, whose previous row, if any, is
        replaced; the stored result is relabelled with the new name. Duplicates that pointed at
        `old` now point at `new`; those that pointed at `new`'s replaced content must be analysed
        in its place (pending again; their paths are appended to `released`). Returns the moved
        entry, or None when `old` has no row."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM files WHERE rel = ?", (old,)).fetchone()
            if row is None:
                return None
            entry = _entry(row)
            result = None
            if entry.result is not None:
                relabelled = entry.result.to_dict()
                relabelled["image"] = new
                result = json.dumps(relabelled)
            freed = self._release_duplicates(db, new)
            if released is not None:
                released.extend(freed)
            db.execute("DELETE FROM files WHERE rel = ?", (new,))
            db.execute("UPDATE files SET rel = ?, size = ?, mtime_ns = ?, ctime_ns = ?, "
                       "result = ?, updated = ? WHERE rel = ?",
                       (new, size, mtime_ns, ctime_ns, result, time.time(), old))
            db.execute("UPDATE files SET duplicate_of = ? WHERE duplicate_of = ?", (new, old))
        return self.get(new)

    def record_done(self, rel: str, result: ImageResult) -> None:
        """Store an analysed image: its result and status done, in one transaction."""
        if result.image != rel:
            raise ValueError(f"result is for {result.image!r}, not {rel!r}")
        with self._tx() as db:
            cur = db.execute("UPDATE files SET status = ?, result = ?, error = '', attempts = "
                             "attempts + 1, next_retry = 0, updated = ? WHERE rel = ?",
                             (DONE, json.dumps(result.to_dict()), time.time(), rel))
            if cur.rowcount != 1:
                raise KeyError(rel)

    def record_failure(self, rel: str, error: str, max_attempts: int, retry_at: float = 0.0,
                       final_result: Optional[ImageResult] = None,
                       version: Optional[tuple] = None,
                       retry_in: Optional[Callable[[int], float]] = None) -> Entry:
        """Count one failed attempt. Below `max_attempts` the file stays pending until `retry_at`,
        or, with `retry_in`, `retry_in(attempt)` seconds from now (`attempt`: the number this
        failure was counted as, from 1); at `max_attempts` it becomes an error (with
        `final_result` as its report row, or a plain failed result). Returns the updated entry,
        whose `next_retry` says when.

        `version`: the (size, mtime_ns, ctime_ns) tried, stored with the failure, so that a
        version given up on is settled (a scan sees no change) however it was first seen (half
        written, say). A failure of another version than the row's starts again from attempt
        one, as a file that changes does."""
        with self._tx() as db:
            row = db.execute("SELECT attempts, size, mtime_ns, ctime_ns FROM files WHERE rel = ?",
                             (rel,)).fetchone()
            if row is None:
                raise KeyError(rel)
            stored = tuple(row[1:])
            version = stored if version is None else tuple(version)
            attempts = (row[0] if version == stored else 0) + 1
            now = time.time()
            if retry_in is not None:
                retry_at = now + retry_in(attempts)
            if attempts >= max_attempts:
                final = final_result or ImageResult.failed(rel, error)
                db.execute("UPDATE files SET status = ?, attempts = ?, error = ?, next_retry = 0,"
                           " result = ?, size = ?, mtime_ns = ?, ctime_ns = ?, updated = ? "
                           "WHERE rel = ?", (ERROR, attempts, error, json.dumps(final.to_dict()),
                                             *version, now, rel))
            else:
                db.execute("UPDATE files SET status = ?, attempts = ?, error = ?, next_retry = ?,"
                           " size = ?, mtime_ns = ?, ctime_ns = ?, updated = ? WHERE rel = ?",
                           (PENDING, attempts, error, retry_at, *version, now, rel))
        return self.get(rel)

    def retry_errors(self, reason: str) -> int:
        """Turn the errors whose message starts with `reason` back into pending files, from
        attempt one: failures that were not the file's (OUT could not be written) are tried
        again. Returns how many."""
        with self._tx() as db:
            cur = db.execute("UPDATE files SET status = ?, attempts = 0, error = '', "
                             "next_retry = 0, result = NULL, updated = ? WHERE status = ? AND "
                             "substr(error, 1, ?) = ?",
                             (PENDING, time.time(), ERROR, len(reason), reason))
        return cur.rowcount

    def forget(self, rel: str) -> list:
        """Drop the row of `rel` (a pending, failed or duplicate file that left the inbox); files
        that were duplicates of it are queued to be analysed in its place (their paths are
        returned)."""
        with self._tx() as db:
            released = self._release_duplicates(db, rel)
            db.execute("DELETE FROM files WHERE rel = ?", (rel,))
        return released

