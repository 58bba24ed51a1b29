"""Files attached with -f and /file: read, refused or decoded by the policy, fenced and named."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from cli_runner import run_cli

from localchat.chat import attachments
from localchat.chat.attachments import (
    Attachment,
    AttachmentError,
    check_room,
    decode,
    message_with,
    read_attachment,
)
from localchat.errors import ContextOverflowError

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"


def test_a_text_file_is_read_and_fenced_under_its_name(tmp_path):
    path = tmp_path / "app.py"
    path.write_text("print('hi')\n")
    attachment = read_attachment(str(path), room_tokens=4096)
    assert attachment == Attachment(str(path), "print('hi')\n", 12)
    assert attachment.block() == f"File {path}:\n```\nprint('hi')\n```"
    assert attachment.note is None


def test_the_fence_is_longer_than_any_backtick_run_inside():
    block = Attachment("README.md", "a\n```python\nx\n```\n````\n", 20).block()
    assert block.startswith("File README.md:\n`````\n") and block.endswith("\n`````")


def test_files_come_first_in_the_order_given_then_the_text():
    first, second = Attachment("a.txt", "A", 1), Attachment("b.txt", "B", 1)
    message = message_with([first, second], "Review these")
    assert message.index("File a.txt") < message.index("File b.txt") < message.index("Review")
    assert message_with([first], "") == first.block()


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "missing.txt", "no such file: "),
    (lambda tmp: tmp, "is a directory, not a file"),
    (lambda tmp: Path("/dev/zero"), "/dev/zero is not a regular file (a character device)"),
])
def test_missing_files_directories_and_devices_are_refused(tmp_path, make, message):
    with pytest.raises(AttachmentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_attachment(str(make(tmp_path)), room_tokens=4096)


def test_an_unreadable_file_is_refused(tmp_path, as_unprivileged_user):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    tmp_path.chmod(0o755)
    with as_unprivileged_user(), pytest.raises(AttachmentError, match="cannot read .*secret.txt: "
                                                                      "Permission denied"):
        read_attachment(str(path), room_tokens=4096)


@pytest.mark.parametrize(("data", "kind"), [
    (PNG, "a PNG image"), (b"%PDF-1.7\n...", "a PDF document"),
    (b"GGUF\x03\x00\x00\x00", "a GGUF model"), (b"text\x00with a NUL", "it contains NUL bytes"),
    (bytes(range(1, 32)) * 10, "mostly control characters"),
])
def test_binary_files_are_refused_naming_what_they_look_like(tmp_path, data, kind):
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with pytest.raises(AttachmentError, match=f"is a binary file \\({kind}\\), not text"):
        read_attachment(str(path), room_tokens=4096)


def test_a_200_mb_file_is_refused_from_its_size_without_being_read(tmp_path, monkeypatch):
    path = tmp_path / "big.log"
    with path.open("wb") as handle:
        handle.truncate(200_000_000)  # sparse: no 200 MB written

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(attachments, "open", no_reading, raising=False)
    started = time.perf_counter()
    with pytest.raises(ContextOverflowError) as caught:
        read_attachment(str(path), room_tokens=4096)
    assert time.perf_counter() - started < 1
    assert caught.value.message == (f"{path} is about 50,000,000 tokens (200,000,000 bytes; "
                                    "estimated from its size), and the room left is 4,096 tokens")


def test_a_pipe_is_read_up_to_the_limit_and_no_further(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = os.fork()
    if writer == 0:  # a child writes more than the limit, then is killed by the closed pipe
        try:
            with open(fifo, "wb") as handle:
                handle.write(b"x" * 70_000)
        finally:
            os._exit(0)
    try:
        with pytest.raises(ContextOverflowError, match=r"pipe is over 4,000 tokens \(more than "
                                                       r"16,000 bytes; estimated from its size\)"):
            read_attachment(str(fifo), room_tokens=1000)  # 16 bytes a token at most: 16,000
    finally:
        os.waitpid(writer, 0)


def test_invalid_utf8_is_replaced_and_counted_and_boms_are_honoured():
    latin1 = decode("notes.txt", "café déjà vu".encode("latin-1"))
    assert latin1.text == "caf\ufffd d\ufffdj\ufffd vu" and latin1.replaced == 3
    assert latin1.note == ("notes.txt is not valid UTF-8: 3 byte(s) are shown to the model as "
                           "U+FFFD (the replacement character)")
    real_fffd = decode("ok.txt", "a \ufffd b".encode())  # one the file really holds: not counted
    assert real_fffd.replaced == 0 and real_fffd.note is None
    assert decode("bom.txt", b"\xef\xbb\xbfhello").text == "hello"
    assert decode("utf16.txt", "h\u00e9llo".encode("utf-16")).text == "h\u00e9llo"


def test_stdin_is_attached_as_dash():
    stdin = io.TextIOWrapper(io.BytesIO(b"piped text\n"), encoding="utf-8")
    attachment = read_attachment("-", stdin, room_tokens=4096)
    assert (attachment.name, attachment.text) == ("stdin", "piped text\n")


def test_check_room_gives_each_files_cost_and_refuses_the_first_that_does_not_fit():
    files = [Attachment("a", "x", 1), Attachment("b", "y", 1), Attachment("c", "z", 1)]
    sizes = [100, 150, 400, 900]  # prompt tokens with 0, 1, 2, 3 files
    assert check_room(files[:2], lambda k: sizes[k], room=500) == [50, 250]
    with pytest.raises(ContextOverflowError) as caught:
        check_room(files, lambda k: sizes[k], room=500)
    assert caught.value.message == "c is 500 tokens, and the room left is 100 tokens"


# ---- the command line ----------------------------------------------------------------------------


def test_bad_files_stop_run_before_the_model_loads(tmp_path):
    model = tmp_path / "never-loaded.gguf"
    model.write_bytes(b"not a model")  # loading it would fail: the file error must come first
    png = tmp_path / "logo.png"
    png.write_bytes(PNG)
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(200_000_000)
    for argument, message in [(str(tmp_path / "gone.txt"), "no such file"),
                              (str(tmp_path), "is a directory"),
                              ("/dev/zero", "is not a regular file"),
                              (str(png), "is a binary file (a PNG image)"),
                              (str(big), "is about 50,000,000 tokens")]:
        result = run_cli("run", str(model), "hi", "-f", argument, "--no-history")
        assert result.exit_code == 1, (argument, result.stderr)
        assert message in result.stderr and argument in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_files_are_attached_in_order_counted_and_recorded(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("app.py").write_text("def add(a, b):\n    return a + b\n")
    Path("notes.txt").write_bytes("r\xe9sum\xe9\n".encode("latin-1"))
    result = run_cli("run", str(smollm2_path), "Review these", "-f", "app.py", "-f", "-",
                     "-f", "notes.txt", "--temperature", "0", "-n", "4", "--json",
                     stdin="from stdin\n")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert [f["name"] for f in record["files"]] == ["app.py", "stdin", "notes.txt"]
    assert all(f["tokens"] > 3 for f in record["files"])
    assert "notes.txt is not valid UTF-8: 2 byte(s)" in result.stderr
    from localchat.history.records import open_history

    with open_history() as store:
        sent = store.messages(store.last_conversation().id)[0].content
    assert sent.startswith("File app.py:\n```\ndef add(a, b):")
    assert sent.index("File stdin:\n```\nfrom stdin\n```") < sent.index("File notes.txt")
    assert sent.endswith("r\ufffdsum\ufffd\n```\n\nReview these")


@pytest.mark.slow
def test_a_file_too_big_for_the_window_is_refused_with_its_tokens_and_the_room(smollm2_path,
                                                                                tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 600)  # about 600 tokens: small on disk, too big for --ctx 512
    result = run_cli("run", str(smollm2_path), "Summarize", "-f", str(long), "--ctx", "512",
                     "--no-history")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith(f"error: {long} is ") and " tokens, and the room left is " in line
    assert result.stdout == ""
