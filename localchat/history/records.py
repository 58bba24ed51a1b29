"""The SQLite store of conversations and messages, and the index of KV-cache snapshot files."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localchat.errors import LocalchatError, UsageError
from localchat.history import database as history_db
from localchat.history.database import default_history_path

ROLES = ("system", "user", "assistant")
PREVIEW_CHARS = 80
# ASCII only and a leading letter or digit: a name is safe in a file name and on any terminal.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ConversationNotFound(LocalchatError):
    """A conversation that is not, or no longer, in the history (another localchat deleted it)."""


@dataclass(frozen=True)
class ConversationRecord:
    """A stored conversation's header."""

    id: int
    name: str | None
    model: str
    system_prompt: str | None
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def label(self) -> str:
        """The name if it has one, else `#id`."""
        return self.name or f"#{self.id}"


@dataclass(frozen=True)
class MessageRecord:
    """One stored message."""

    id: int
    conversation_id: int
    role: str
    content: str
    token_count: int | None
    timings: dict[str, Any] | None
    interrupted: bool
    created_at: datetime
    reasoning: str | None = None  # a thinking model's thinking before this answer


@dataclass(frozen=True)
class ConversationSummary:
    """One line of `localchat history`."""

    id: int
    name: str | None
    model: str
    turn_count: int
    last_message: str | None
    updated_at: datetime


@dataclass(frozen=True)
class SearchHit:
    """A message matching a search: `snippet`, the passage around the match on one line, and
    `matches`, the (start, end) character spans of the matched words in it."""

    conversation_id: int
    conversation_name: str | None
    message_id: int
    role: str
    snippet: str
    created_at: datetime
    matches: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SnapshotRecord:
    """The index entry of one KV-cache snapshot file."""

    id: int
    conversation_id: int | None  # None: a one-shot's prefix, found by its tokens
    path: Path
    model_identity: str
    n_ctx: int
    llama_cpp_version: str
    prefix_hash: str
    token_count: int
    size_bytes: int
    last_used_at: datetime


def validate_name(name: str) -> str:
    """Return `name` if it can name a conversation, else raise UsageError."""
    if not _NAME_PATTERN.fullmatch(name) or name.isdigit():
        raise UsageError(
            f"invalid conversation name {name!r}",
            hint="use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, "
            "and not only digits (those are ids)",
        )
    return name


def open_history(path: Path | None = None) -> HistoryStore:
    """Open the history database (default: the data dir's), creating or migrating it."""
    db_path = path if path is not None else default_history_path()
    return HistoryStore(history_db.connect(db_path), db_path)


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _fts_query(text: str) -> str:
    # Each word becomes a quoted phrase, so quotes, `*`, `-`, AND/OR/NEAR are plain text.
    return " ".join('"' + word.replace('"', '""') + '"' for word in text.split())


# snippet() brackets each matched word with these; private-use characters, so that a `**` or a
# control character in the text itself is never taken for a marker.
_MATCH_START, _MATCH_END = "\ue000", "\ue001"


def _unmark(snippet: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The snippet on one line without its markers, and the spans they bracketed."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, None
    for piece in re.split(f"([{_MATCH_START}{_MATCH_END}])", " ".join(snippet.split())):
        if piece == _MATCH_START:
            start = length
        elif piece == _MATCH_END:
            if start is not None and length > start:
                spans.append((start, length))
            start = None
        else:
            parts.append(piece)
            length += len(piece)
    return "".join(parts), tuple(spans)


def _preview(content: str | None) -> str | None:
    if content is None:
        return None
    flat = " ".join(content.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


def _remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LocalchatError(f"cannot remove the snapshot {path}: {exc.strerror}") from exc
    return True


def _conversation(row: sqlite3.Row) -> ConversationRecord:
    return ConversationRecord(
        id=row["id"], name=row["name"], model=row["model"], system_prompt=row["system_prompt"],
        settings=json.loads(row["settings"]), created_at=_time(row["created_at"]),
        updated_at=_time(row["updated_at"]),
    )


def _message(row: sqlite3.Row) -> MessageRecord:
    return MessageRecord(
        id=row["id"], conversation_id=row["conversation_id"], role=row["role"],
        content=row["content"], token_count=row["token_count"],
        timings=json.loads(row["timings"]) if row["timings"] is not None else None,
        interrupted=bool(row["interrupted"]), created_at=_time(row["created_at"]),
        reasoning=row["reasoning"],
    )


def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        id=row["id"], conversation_id=row["conversation_id"], path=Path(row["path"]),
        model_identity=row["model_identity"], n_ctx=row["n_ctx"],
        llama_cpp_version=row["llama_cpp_version"], prefix_hash=row["prefix_hash"],
        token_count=row["token_count"], size_bytes=row["size_bytes"],
        last_used_at=_time(row["last_used_at"]),
    )


class HistoryStore:
    """An open history database; every write is its own committed transaction."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; SQLite folds the WAL back into the file."""
        self._db.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.Error as exc:
            raise history_db.translate_error(exc, self.path) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so two localchats never deadlock mid-way.
        with self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._guard():
            return self._db.execute(sql, parameters).fetchall()

    # Conversations

    def create_conversation(
        self, model: str, system_prompt: str | None = None,
        settings: Mapping[str, Any] | None = None, name: str | None = None,
    ) -> ConversationRecord:
        """Start a conversation; a name that is taken already raises UsageError."""
        if name is not None:
            validate_name(name)
        now = time.time()
        encoded = json.dumps(dict(settings or {}), sort_keys=True)
        with self._write() as db:
            try:
                cursor = db.execute(
                    "INSERT INTO conversations (name, model, system_prompt, settings, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, model, system_prompt, encoded, now, now),
                )
            except sqlite3.IntegrityError:
                raise _name_taken(name) from None
        assert cursor.lastrowid is not None  # set by the INSERT (None only before one)
        return self._require(cursor.lastrowid)

    def find_conversation(self, name_or_id: str | int) -> ConversationRecord | None:
        """The conversation with this id (digits) or name, or None."""
        if isinstance(name_or_id, int) or (name_or_id.isascii() and name_or_id.isdigit()):
            rows = self._rows("SELECT * FROM conversations WHERE id = ?", (int(name_or_id),))
        else:
            rows = self._rows("SELECT * FROM conversations WHERE name = ?", (name_or_id,))
        return _conversation(rows[0]) if rows else None

    def last_conversation(self) -> ConversationRecord | None:
        """The most recently updated conversation, or None if there is none."""
        rows = self._rows("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1")
        return _conversation(rows[0]) if rows else None

    def list_conversations(self, limit: int = 20) -> list[ConversationSummary]:
        """The most recently updated conversations, newest first."""
        rows = self._rows(
            "SELECT c.id, c.name, c.model, c.updated_at,"
            " (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id"
            "  AND m.role = 'user') AS turn_count,"
            " (SELECT content FROM messages m WHERE m.conversation_id = c.id"
            "  ORDER BY m.id DESC LIMIT 1) AS last_message"
            " FROM conversations c ORDER BY c.updated_at DESC, c.id DESC LIMIT ?",
            (limit,),
        )
        return [
            ConversationSummary(
                id=row["id"], name=row["name"], model=row["model"], turn_count=row["turn_count"],
                last_message=_preview(row["last_message"]), updated_at=_time(row["updated_at"]),
            )
            for row in rows
        ]

    def rename_conversation(self, conversation_id: int, name: str | None) -> ConversationRecord:
        """Give a conversation a new name, or none."""
        if name is not None:
            validate_name(name)
        try:
            return self._update(conversation_id, "name", name)
        except sqlite3.IntegrityError:
            raise _name_taken(name) from None

    def set_system_prompt(
        self, conversation_id: int, system_prompt: str | None
    ) -> ConversationRecord:
        """Replace a conversation's system prompt."""
        return self._update(conversation_id, "system_prompt", system_prompt)

    def update_settings(
        self, conversation_id: int, changes: Mapping[str, Any]
    ) -> ConversationRecord:
        """Merge `changes` into a conversation's settings."""
        merged = {**self._require(conversation_id).settings, **changes}
        return self._update(conversation_id, "settings", json.dumps(merged, sort_keys=True))

    def _update(self, conversation_id: int, column: str, value: Any) -> ConversationRecord:
        with self._write() as db:
            db.execute(
                f"UPDATE conversations SET {column} = ?, updated_at = ? WHERE id = ?",
                (value, time.time(), conversation_id),
            )
        return self._require(conversation_id)

    def _require(self, name_or_id: str | int) -> ConversationRecord:
        found = self.find_conversation(name_or_id)
        if found is None:
            raise ConversationNotFound(
                f"no conversation {name_or_id!r} in the history",
                hint="list them with `localchat history`",
            )
        return found

    def delete_conversation(self, name_or_id: str | int) -> list[Path]:
        """Delete a conversation, its messages and its snapshot files; return the files removed."""
        conversation = self._require(name_or_id)
        with self._write() as db:
            rows = db.execute(
                "SELECT path FROM snapshots WHERE conversation_id = ?", (conversation.id,)
            ).fetchall()
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation.id,))
            # Files go before the commit: a crash in between leaves rows naming missing files,
            # which the index drops, never files nothing points to.
            return [Path(row["path"]) for row in rows if _remove_file(Path(row["path"]))]

    # Messages

    def add_message(
        self, conversation_id: int, role: str, content: str, token_count: int | None = None,
        timings: Mapping[str, Any] | None = None, interrupted: bool = False,
        reasoning: str | None = None,
    ) -> MessageRecord:
        """Append a message (a reply's thinking in `reasoning`) and commit it before returning."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        now = time.time()
        encoded = json.dumps(dict(timings), sort_keys=True) if timings is not None else None
        with self._write() as db:
            try:
                cursor = db.execute(
                    "INSERT INTO messages (conversation_id, role, content, token_count, timings,"
                    " interrupted, created_at, reasoning) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, role, content, token_count, encoded, int(interrupted), now,
                     reasoning),
                )
            except sqlite3.IntegrityError:
                raise ConversationNotFound(f"no conversation {conversation_id} in the history",
                                           hint="it was deleted, maybe by another localchat"
                                           ) from None
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
        assert cursor.lastrowid is not None  # set by the INSERT (None only before one)
        return MessageRecord(
            id=cursor.lastrowid, conversation_id=conversation_id, role=role, content=content,
            token_count=token_count, timings=dict(timings) if timings is not None else None,
            interrupted=interrupted, created_at=_time(now), reasoning=reasoning,
        )

    def messages(self, conversation_id: int) -> list[MessageRecord]:
        """A conversation's messages, oldest first."""
        rows = self._rows(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [_message(row) for row in rows]

    def delete_messages_after(self, message_id: int) -> int:
        """Delete the messages that follow `message_id` in its conversation; return how many."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM messages WHERE id > ? AND conversation_id ="
                " (SELECT conversation_id FROM messages WHERE id = ?)",
                (message_id, message_id),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id ="
                " (SELECT conversation_id FROM messages WHERE id = ?)",
                (time.time(), message_id),
            )
            return cursor.rowcount

    def delete_last_exchange(self, conversation_id: int) -> list[MessageRecord]:
        """Delete the last user message and everything after it (/undo); return what went."""
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM messages WHERE conversation_id = ? AND id >= (SELECT max(id)"
                " FROM messages WHERE conversation_id = ? AND role = 'user') ORDER BY id",
                (conversation_id, conversation_id),
            ).fetchall()
            if rows:
                db.execute(
                    "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                    (conversation_id, rows[0]["id"]),
                )
                db.execute(
                    "UPDATE conversations SET updated_at = ? WHERE id = ?",
                    (time.time(), conversation_id),
                )
        return [_message(row) for row in rows]

    def search(self, query: str, limit: int = 20) -> list[SearchHit]:
        """Messages containing every word of `query` (stemmed), best match first."""
        match = _fts_query(query)
        if not match:
            return []
        rows = self._rows(
            "SELECT m.id, m.conversation_id, c.name, m.role, m.created_at,"
            " snippet(messages_fts, 0, ?, ?, '…', 12) AS snippet"
            " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ? ORDER BY rank, m.id DESC LIMIT ?",
            (_MATCH_START, _MATCH_END, match, limit),
        )
        hits = []
        for row in rows:
            snippet, matches = _unmark(row["snippet"])
            hits.append(SearchHit(
                conversation_id=row["conversation_id"], conversation_name=row["name"],
                message_id=row["id"], role=row["role"], snippet=snippet,
                created_at=_time(row["created_at"]), matches=matches,
            ))
        return hits

    def export_conversation(self, name_or_id: str | int, format: str) -> str:
        """The whole conversation as Markdown or JSON (`format` md or json, else a UsageError)."""
        conversation = self._require(name_or_id)
        messages = self.messages(conversation.id)
        if format == "json":
            data = asdict(conversation) | {"messages": [asdict(m) for m in messages]}
            return json.dumps(data, indent=2, ensure_ascii=False, default=datetime.isoformat)
        if format != "md":
            raise UsageError(f"unknown export format {format!r}", hint="use md or json")
        lines = [f"# {conversation.label}", "", f"- model: {conversation.model}"]
        lines += [f"- started: {conversation.created_at.isoformat(timespec='seconds')}", ""]
        if conversation.system_prompt:
            lines += ["## System", "", conversation.system_prompt, ""]
        for message in messages:
            lines += [f"## {message.role.capitalize()}", ""]
            if message.reasoning:  # a quoted block, so it reads as apart from the answer
                lines += ["> **Thinking**", ">", *(f"> {line}".rstrip()
                                                   for line in message.reasoning.splitlines()), ""]
            lines += [message.content, ""]
            if message.interrupted:
                lines += ["*(interrupted)*", ""]
        return "\n".join(lines)

    # KV-cache snapshot index

    def record_snapshot(
        self, conversation_id: int, path: Path, model_identity: str, n_ctx: int,
        llama_cpp_version: str, prefix_hash: str, token_count: int,
    ) -> SnapshotRecord:
        """Index a snapshot file just written; it replaces (and deletes) the one with its key."""
        path = path.resolve()
        key = (conversation_id, model_identity, n_ctx, llama_cpp_version)
        same = (
            "WHERE (conversation_id = ? AND model_identity = ? AND n_ctx = ?"
            " AND llama_cpp_version = ?) OR path = ?"
        )
        size_bytes, now = path.stat().st_size, time.time()
        with self._write() as db:
            old = db.execute(f"SELECT path FROM snapshots {same}", (*key, str(path))).fetchall()
            db.execute(f"DELETE FROM snapshots {same}", (*key, str(path)))
            try:
                cursor = db.execute(
                    "INSERT INTO snapshots (conversation_id, path, model_identity, n_ctx,"
                    " llama_cpp_version, prefix_hash, token_count, size_bytes, last_used_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, str(path), model_identity, n_ctx, llama_cpp_version,
                     prefix_hash, token_count, size_bytes, now),
                )
            except sqlite3.IntegrityError:  # the only constraint left: the conversation is gone
                raise ConversationNotFound(f"no conversation {conversation_id} in the history",
                                           hint="it was deleted, maybe by another localchat"
                                           ) from None
            for row in old:
                if row["path"] != str(path):
                    _remove_file(Path(row["path"]))
            found = db.execute("SELECT * FROM snapshots WHERE id = ?", (cursor.lastrowid,))
            return _snapshot(found.fetchone())

    def find_snapshot(
        self, conversation_id: int, model_identity: str, n_ctx: int, llama_cpp_version: str
    ) -> SnapshotRecord | None:
        """The snapshot for this conversation, model, n_ctx and llama.cpp, if its file exists."""
        rows = self._rows(
            "SELECT * FROM snapshots WHERE conversation_id = ? AND model_identity = ?"
            " AND n_ctx = ? AND llama_cpp_version = ?",
            (conversation_id, model_identity, n_ctx, llama_cpp_version),
        )
        if not rows:
            return None
        if not Path(rows[0]["path"]).is_file():
            with self._write() as db:
                db.execute("DELETE FROM snapshots WHERE id = ?", (rows[0]["id"],))
            return None
        return _snapshot(rows[0])

    def snapshot_paths(self) -> set[Path]:
        """Every snapshot file the index names (whether or not it still exists)."""
        return {Path(row["path"]) for row in self._rows(
            "SELECT path FROM snapshots UNION ALL SELECT path FROM prefix_snapshots")}

    def touch_snapshot(self, snapshot_id: int) -> None:
        """Mark a snapshot as just used, so eviction keeps it longest."""
        with self._write() as db:
            db.execute(
                "UPDATE snapshots SET last_used_at = ? WHERE id = ?", (time.time(), snapshot_id)
            )

    def evict_snapshots(self, cap_bytes: int) -> list[Path]:
        """Delete least recently used snapshot files, of conversations and of one-shot prefixes
        alike, until the rest fit in `cap_bytes`."""
        removed: list[Path] = []
        with self._write() as db:
            present: list[tuple[str, int, Path, int]] = []
            rows = db.execute(
                "SELECT 'snapshots' AS tab, id, path, last_used_at FROM snapshots UNION ALL"
                " SELECT 'prefix_snapshots', id, path, last_used_at FROM prefix_snapshots"
                " ORDER BY last_used_at, id").fetchall()
            for row in rows:
                path = Path(row["path"])
                try:
                    present.append((row["tab"], row["id"], path, path.stat().st_size))
                except FileNotFoundError:
                    db.execute(f"DELETE FROM {row['tab']} WHERE id = ?", (row["id"],))
            total = sum(size for _, _, _, size in present)
            for table, snapshot_id, path, size in present:
                if total <= cap_bytes:
                    break
                db.execute(f"DELETE FROM {table} WHERE id = ?", (snapshot_id,))
                _remove_file(path)
                removed.append(path)
                total -= size
        return removed

    # Snapshots of one-shot prefixes: no conversation, found by the hash of their tokens

    def record_prefix_snapshot(self, path: Path, model_identity: str, n_ctx: int,
                               llama_cpp_version: str, prefix_hash: str,
                               token_count: int) -> SnapshotRecord:
        """Index a prefix snapshot file just written (replacing one with the same key)."""
        path = path.resolve()
        key = (model_identity, n_ctx, llama_cpp_version, prefix_hash)
        same = ("WHERE (model_identity = ? AND n_ctx = ? AND llama_cpp_version = ?"
                " AND prefix_hash = ?) OR path = ?")
        size_bytes, now = path.stat().st_size, time.time()
        with self._write() as db:
            old = db.execute(f"SELECT path FROM prefix_snapshots {same}",
                             (*key, str(path))).fetchall()
            db.execute(f"DELETE FROM prefix_snapshots {same}", (*key, str(path)))
            cursor = db.execute(
                "INSERT INTO prefix_snapshots (path, model_identity, n_ctx, llama_cpp_version,"
                " prefix_hash, token_count, size_bytes, last_used_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (str(path), *key, token_count, size_bytes, now))
            for row in old:
                if row["path"] != str(path):
                    _remove_file(Path(row["path"]))
            found = db.execute("SELECT *, NULL AS conversation_id FROM prefix_snapshots"
                               " WHERE id = ?", (cursor.lastrowid,))
            return _snapshot(found.fetchone())

    def find_prefix_snapshot(self, model_identity: str, n_ctx: int, llama_cpp_version: str,
                             prefix_hash: str) -> SnapshotRecord | None:
        """The snapshot of exactly these prefix tokens for this model, n_ctx and llama.cpp."""
        rows = self._rows(
            "SELECT *, NULL AS conversation_id FROM prefix_snapshots WHERE model_identity = ?"
            " AND n_ctx = ? AND llama_cpp_version = ? AND prefix_hash = ?",
            (model_identity, n_ctx, llama_cpp_version, prefix_hash))
        if not rows:
            return None
        if not Path(rows[0]["path"]).is_file():
            with self._write() as db:
                db.execute("DELETE FROM prefix_snapshots WHERE id = ?", (rows[0]["id"],))
            return None
        return _snapshot(rows[0])

    def touch_prefix_snapshot(self, snapshot_id: int) -> None:
        """Mark a prefix snapshot as just used, so eviction keeps it longest."""
        with self._write() as db:
            db.execute("UPDATE prefix_snapshots SET last_used_at = ? WHERE id = ?",
                       (time.time(), snapshot_id))


def _name_taken(name: str | None) -> UsageError:
    return UsageError(
        f"a conversation named {name!r} exists already",
        hint="resume it by that name, or choose another",
    )
