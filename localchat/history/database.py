"""The history database file: where it lives, its schema and migrations, how it is opened,
and SQLite's errors as one-line messages. The records and queries are in `history`."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from localchat import paths
from localchat.errors import DiskFullError, LocalchatError

# Long enough to wait out another localchat's commit or checkpoint, short enough to report a hang.
BUSY_TIMEOUT_S = 5.0
_SQLITE_MAGIC = b"SQLite format 3\x00"
# MIGRATIONS[n] takes a database from schema version n to n + 1 (PRAGMA user_version).
# Append new steps; never edit one that has shipped.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT UNIQUE,
            model TEXT NOT NULL,
            system_prompt TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        "CREATE INDEX conversations_by_update ON conversations (updated_at)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            token_count INTEGER,
            timings TEXT,
            interrupted INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL)""",
        "CREATE INDEX messages_by_conversation ON messages (conversation_id, id)",
        """CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages',
            content_rowid='id', tokenize='porter unicode61 remove_diacritics 2')""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content); END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content); END""",
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            path TEXT NOT NULL UNIQUE,
            model_identity TEXT NOT NULL,
            n_ctx INTEGER NOT NULL,
            llama_cpp_version TEXT NOT NULL,
            prefix_hash TEXT NOT NULL,
            token_count INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            last_used_at REAL NOT NULL,
            UNIQUE (conversation_id, model_identity, n_ctx, llama_cpp_version))""",
    ),
    # 2: a thinking model's reasoning, kept apart from its answer (`content`).
    ("ALTER TABLE messages ADD COLUMN reasoning TEXT",),
    (  # 3: snapshots of a one-shot's fixed prefix (system prompt, preset, files), by its tokens
        """CREATE TABLE prefix_snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            model_identity TEXT NOT NULL,
            n_ctx INTEGER NOT NULL,
            llama_cpp_version TEXT NOT NULL,
            prefix_hash TEXT NOT NULL,
            token_count INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            last_used_at REAL NOT NULL,
            UNIQUE (model_identity, n_ctx, llama_cpp_version, prefix_hash))""",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_history_path() -> Path:
    """Where the history database lives unless told otherwise."""
    return paths.data_dir() / "history.db"


def connect(db_path: Path) -> sqlite3.Connection:
    """Open the database at `db_path`, creating or migrating it; refuse a corrupt or newer one."""
    prepare_location(db_path)
    _check_existing(db_path)
    try:
        connection = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate_error(exc, db_path) from exc
    try:
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL already survives a killed process (a commit is in the WAL file
        # once write() returns); FULL adds an fsync per commit so a finished turn also
        # survives power loss. Two commits per turn make that cost invisible.
        connection.execute("PRAGMA synchronous = FULL")
        _migrate(connection)
    except sqlite3.Error as exc:
        connection.close()
        raise translate_error(exc, db_path) from exc
    except BaseException:
        connection.close()
        raise
    return connection


def prepare_location(db_path: Path) -> None:
    directory = db_path.parent
    try:
        paths.ensure_private_dir(directory)
    except OSError as exc:
        raise _read_only_error(directory, exc.strerror) from exc
    effective = os.access in os.supports_effective_ids
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=effective) or (
        db_path.exists() and not os.access(db_path, os.R_OK | os.W_OK, effective_ids=effective)
    ):
        raise _read_only_error(directory, "not writable")
    try:
        # SQLite gives -wal and -shm the database file's mode, so creating it 0600 here keeps
        # all three private whatever the umask. An empty file is a valid new database.
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise _read_only_error(directory, exc.strerror) from exc
    os.fchmod(fd, 0o600)
    os.close(fd)


def _check_existing(db_path: Path) -> None:
    """Refuse a file that is not our database, without writing a byte to it."""
    try:
        with db_path.open("rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise LocalchatError(f"cannot read the history database {db_path}: {exc.strerror}") from exc
    if not header:
        return
    if header != _SQLITE_MAGIC:
        raise _corrupt_error(db_path, "not an SQLite database")
    # Read-only, so a leftover WAL from a crash is never checkpointed into a file we refuse.
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    try:
        probe = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            probe.close()
    except sqlite3.Error as exc:
        raise translate_error(exc, db_path) from exc
    if version > len(MIGRATIONS):
        raise LocalchatError(
            f"the history database {db_path} has schema version {version}, newer than this "
            f"localchat knows ({len(MIGRATIONS)}); it was left untouched",
            hint="upgrade localchat, or move the file aside to start a new history",
        )


def _migrate(connection: sqlite3.Connection) -> None:
    current = connection.execute("PRAGMA user_version").fetchone()[0]
    while current < len(MIGRATIONS):
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Another localchat may have migrated while this one waited for the lock.
            current = connection.execute("PRAGMA user_version").fetchone()[0]
            if current < len(MIGRATIONS):
                for statement in MIGRATIONS[current]:
                    connection.execute(statement)
                current += 1
                connection.execute(f"PRAGMA user_version = {current}")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


def _corrupt_error(db_path: Path, detail: str) -> LocalchatError:
    return LocalchatError(
        f"the history database {db_path} is damaged ({detail}); it was left untouched "
        "for inspection",
        hint="move it aside to start a new history (`sqlite3 FILE .recover` may save its data)",
    )


def _read_only_error(directory: Path, detail: str | None) -> LocalchatError:
    return LocalchatError(
        f"cannot write the history in {directory}: {detail or 'read-only'}",
        hint=f"make it writable (chmod u+w {directory}) or run with --no-history",
    )


def translate_error(exc: sqlite3.Error, db_path: Path) -> LocalchatError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return _corrupt_error(db_path, str(exc))
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return LocalchatError(
            f"the history database {db_path} is busy: another localchat is writing to it",
            hint="wait a moment and try again",
        )
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return _read_only_error(db_path.parent, str(exc))
    # SQLite reports ENOSPC as SQLITE_FULL only for its main writes; a -shm file that cannot grow,
    # a failed fsync or a write past a file size limit (EFBIG) are all SQLITE_IOERR.
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _nearly_full(db_path)):
        return DiskFullError(f"no space left on the disk holding {db_path}",
                             hint="free some space")
    if code == sqlite3.SQLITE_IOERR:
        return LocalchatError(
            f"cannot read or write the history database {db_path} ({exc})",
            hint="its disk may be failing, or a file size limit (`ulimit -f`) is in the way",
        )
    return LocalchatError(f"the history database {db_path} failed: {exc}")


def _nearly_full(db_path: Path) -> bool:
    try:
        return shutil.disk_usage(db_path.parent).free < 1 << 20  # less than SQLite may need
    except OSError:
        return False
