"""Files attached to a message (`-f PATH`, `/file PATH`): read, checked and fenced, no printing.

The policy, decided before any token is generated:
- directories, devices (`/dev/zero`), binary files (a NUL byte or mostly control characters in
  the first 8 KB; PNG, PDF, ZIP... are named) and unreadable files are refused;
- a file whose size alone says it cannot fit the context window is refused from its size, before
  a byte is read (a token is taken as 4 bytes, and only a file 4 times over is refused so);
- UTF-8 is expected (a BOM is dropped; UTF-16 and UTF-32 with a BOM are read too); bytes that
  are not UTF-8 become U+FFFD, and `Attachment.replaced` says how many, for a note;
- every file goes into the user message in the order given, named and fenced (`block`).
The exact token count is the engine's, once a model is loaded (`check_room`).
"""

from __future__ import annotations

import codecs
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from localchat.errors import ContextOverflowError, LocalchatError

BYTES_PER_TOKEN = 4  # a rough average for text and code, for estimates from a size
SNIFF_BYTES = 8192
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"GIF8", "a GIF image"), (b"%PDF-", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"),
          (b"\x1f\x8b", "gzip data"), (b"\x7fELF", "a program (ELF)"), (b"GGUF", "a GGUF model"),
          (b"SQLite format 3\x00", "an SQLite database"), (b"RIFF", "audio or video (RIFF)"))
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\b\x1b")


@dataclass(frozen=True)
class FileRef:
    """A file to attach as the user named it, and where a relative path starts (a preset's
    folder; None: the current directory)."""

    argument: str
    base: Path | None = None


class AttachmentError(LocalchatError):
    """A file that cannot be attached: missing, unreadable, binary, a directory, too big."""


@dataclass(frozen=True)
class Attachment:
    """One attached file's text, as it goes into the message."""

    name: str  # the path as given; "stdin" for `-`
    text: str
    size_bytes: int
    replaced: int = 0  # bytes that were not valid in the file's encoding, now U+FFFD

    def block(self) -> str:
        """The file named and fenced: a fence longer than any run of backticks inside it."""
        longest, run = 0, 0
        for char in self.text:
            run = run + 1 if char == "`" else 0
            longest = max(longest, run)
        fence = "`" * max(3, longest + 1)
        body = self.text if self.text.endswith("\n") or not self.text else self.text + "\n"
        return f"File {self.name}:\n{fence}\n{body}{fence}"

    @property
    def note(self) -> str | None:
        """What to tell the user about its decoding, if anything."""
        if not self.replaced:
            return None
        return (f"{self.name} is not valid UTF-8: {self.replaced} byte(s) are shown to the model "
                "as U+FFFD (the replacement character)")


def read_attachment(argument: str, stdin: IO[str] | None = None, *, room_tokens: int,
                    base: Path | None = None) -> Attachment:
    """Read one `-f` argument (`-` is stdin); refuse what cannot be text or cannot fit.

    `room_tokens` is the most the window could hold (its size, when nothing is counted yet);
    `base` is where relative paths start (a preset's folder), else the current directory.
    """
    limit = room_tokens * BYTES_PER_TOKEN * 4  # past this, no tokenizer makes it fit
    if argument == "-":
        if stdin is None:
            raise AttachmentError("-f -: there is no standard input to read")
        return _from_stdin(stdin, limit, room_tokens)
    path = Path(argument).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AttachmentError(f"no such file: {argument}") from None
    except OSError as exc:
        raise AttachmentError(f"cannot read {argument}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise AttachmentError(f"{argument} is a directory, not a file",
                              f"attach its files one by one, e.g. -f {argument.rstrip('/')}/NAME")
    regular = stat.S_ISREG(info.st_mode)
    if not regular and not stat.S_ISFIFO(info.st_mode):  # a pipe, as from <(command), is fine
        raise AttachmentError(f"{argument} is not a regular file ({_kind(info.st_mode)})",
                              "attach text files")
    if regular and info.st_size > limit:
        raise _too_big(argument, info.st_size // BYTES_PER_TOKEN, room_tokens, estimated=True,
                       size=info.st_size)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise AttachmentError(f"cannot read {argument}: {exc.strerror}") from None
    if len(data) > limit:
        raise _too_big(argument, len(data) // BYTES_PER_TOKEN, room_tokens, estimated=True,
                       size=len(data), at_least=True)
    return decode(argument, data)


def read_files(refs: Sequence[FileRef], stdin: IO[str] | None, *,
               room_tokens: int) -> list[Attachment]:
    """Read every file in order; the first that is refused stops it all."""
    return [read_attachment(ref.argument, stdin, room_tokens=room_tokens, base=ref.base)
            for ref in refs]


def _from_stdin(stdin: IO[str], limit: int, room_tokens: int) -> Attachment:
    buffer = getattr(stdin, "buffer", None)
    if buffer is not None:
        data = buffer.read(limit + 1)
    else:
        data = stdin.read(limit + 1).encode("utf-8", "surrogateescape")
    if len(data) > limit:
        raise _too_big("stdin", len(data) // BYTES_PER_TOKEN, room_tokens, estimated=True,
                       size=len(data), at_least=True)
    return decode("stdin", data)


def decode(name: str, data: bytes) -> Attachment:
    """Bytes as text by the policy above; binary data is refused."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), None)
    if encoding is None:
        kind = _binary_kind(data[:SNIFF_BYTES])
        if kind is not None:
            raise AttachmentError(f"{name} is a binary file ({kind}), not text",
                                  "attach text files; convert other formats to text first")
        encoding = "utf-8"
    text, replaced = _decode_counting(data, encoding)
    return Attachment(name, text, len(data), replaced)


def _decode_counting(data: bytes, encoding: str) -> tuple[str, int]:
    """`data` decoded with U+FFFD for each bad sequence, and how many bytes those were."""
    decoder = codecs.getdecoder(encoding)
    view, parts, replaced, position = memoryview(data), [], 0, 0
    while True:
        try:
            text, _ = decoder(view[position:], "strict")
        except UnicodeDecodeError as exc:
            good, _ = decoder(view[position:position + exc.start], "strict")
            parts += [good, "\ufffd"]
            replaced += exc.end - exc.start
            position += exc.end
            continue
        parts.append(text)
        return "".join(parts), replaced


def _binary_kind(head: bytes) -> str | None:
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\x00" in head:
        return "it contains NUL bytes"
    controls = sum(1 for byte in head if byte < 32 and byte not in _TEXT_CONTROLS)
    if head and controls / len(head) > 0.1:
        return "mostly control characters"
    return None


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def _too_big(name: str, tokens: int, room: int, *, estimated: bool = False, size: int = 0,
             at_least: bool = False) -> ContextOverflowError:
    amount = f"{'over ' if at_least else 'about ' if estimated else ''}{tokens:,} tokens"
    if at_least:
        amount += f" (more than {size - 1:,} bytes; estimated from its size)"
    elif estimated:
        amount += f" ({size:,} bytes; estimated from its size)"
    return ContextOverflowError(
        f"{name} is {amount}, and the room left is {max(room, 0):,} tokens",
        "attach a smaller part of it, or raise --ctx (up to the model's trained length)")


def check_room(attachments: Sequence[Attachment], count: Callable[[int], int],
               room: int) -> list[int]:
    """Each attachment's exact cost in tokens; refuse the first one that does not fit.

    `count(k)` is the prompt's token count with the first k attachments in it; `room` is what
    the window holds for the whole prompt (the window less the reply's share).
    """
    costs: list[int] = []
    before = count(0)
    for index, attachment in enumerate(attachments, start=1):
        after = count(index)
        if after > room:
            raise _too_big(attachment.name, after - before, room - before)
        costs.append(after - before)
        before = after
    return costs


def message_with(attachments: Sequence[Attachment], text: str) -> str:
    """The user message: the files first, in order, then the text (piped input and prompt)."""
    parts = [attachment.block() for attachment in attachments]
    if text:
        parts.append(text)
    return "\n\n".join(parts)


def file_room(n_ctx: int, used: int, reply_room: int) -> int:
    """Tokens a file may still take: the window less what is used and the reply's share."""
    return max(n_ctx - used - reply_room, 0)
