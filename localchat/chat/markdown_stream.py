"""Markdown on a terminal as it streams, at a cost per token that does not grow with the answer.

Rendering the whole answer on every token re-parses and re-wraps everything shown so far. Here the
text is cut into blocks (paragraphs, headings, lists, fenced code; a fence ends only at its closing
fence), each finished block is printed once, permanently, and only the block still growing is
shown in a transient `rich.live.Live` region, re-rendered at most `refresh_per_second` times.

A block that keeps growing (one long paragraph, a long code block or list) is not left to grow
the live region without end: its finished part is printed too, where that cannot show a seam:
- code: complete lines, highlighted with the block's earlier lines as lexer context;
- lists: whole items (ordered lists are renumbered to carry on);
- paragraphs: whole rendered rows, once the rest renders to exactly the same rows on its own and
  closers arriving later (of emphasis, code spans, links) could not restyle the printed rows.
Anything else (a huge table or quote) is printed whole when it ends; meanwhile the live region
renders only its tail, so the work per refresh stays bounded either way. The result is the
screen rich prints for the whole answer at once, colours included (the tests hold it to that).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from rich.console import Console, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.padding import PaddingDimensions
from rich.segment import ControlType, Segment, Segments
from rich.style import Style
from rich.syntax import Syntax

from localchat.render import terminal_safe

LIVE_LINES = 12  # code or list lines kept live before the finished ones are printed
SPLIT_CHARS = 800  # about ten rows: a paragraph this long prints its finished rows
PREVIEW_CHARS = 2000  # about a screen: a block that cannot be split shows only its tail live
# Printed code lines lexed again before each chunk, so a string or comment open across a chunk
# keeps its colour. A cut-off context can start inside a string and invert the colours after it,
# so this covers any code block a chat model writes; only past it is a chunk's cost capped.
CODE_CONTEXT = 400
PREVIEW_CONTEXT = 12  # the live preview, redrawn 15 times a second, makes do with fewer
_now = time.monotonic  # a module attribute so tests can drive the clock

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_ITEM = re.compile(r"^( *)([-+*]|(\d{1,9})[.)])([ \t]+|$)")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_PROBE = " x** x* x__ x_ x~~ x` x](x)"  # closes any emphasis, code span or link left open
_Rows = list[list[Segment]]


@dataclass
class _Block:
    """The block still growing; mutable on purpose, it gains lines and loses the printed ones."""

    kind: str  # paragraph, list, fence, other (tables, quotes...), heading, rule
    lines: list[str] = field(default_factory=list)
    size: int = 0  # characters in `lines`
    started: bool = False  # part of it is printed already
    split_at: int = SPLIT_CHARS  # paragraph: the size at which to try printing finished rows
    fence: str = ""  # fence: its marker; list: the marker of a fence open inside an item
    indent: int = 0  # fence: spaces to strip from its lines; list: where item content starts
    lexer: str = "text"
    context: list[str] = field(default_factory=list)  # fence: the last printed code lines
    marker: str = ""  # list: the bullet, or the delimiter of an ordered list
    number: int | None = None  # ordered list: the number of its first unprinted item
    items: list[int] = field(default_factory=list)  # list: where its items start in `lines`
    blanks: int = 0  # list: blank lines not yet known to belong to it

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line) + 1

    def keep(self, lines: list[str]) -> None:
        self.lines = lines
        self.size = sum(len(line) + 1 for line in lines)


class MarkdownStream:
    """Shows a markdown answer token by token: `feed` each piece, then `finish` (or `close`)."""

    def __init__(
        self, console: Console, code_theme: str = "monokai", refresh_per_second: float = 15.0
    ) -> None:
        self._console = console
        self._theme = code_theme
        self._interval = 1 / refresh_per_second
        self._block: _Block | None = None
        self._partial: list[str] = []  # pieces of the line still arriving
        self._partial_size = 0
        self._cut_line = False  # the start of the arriving line is printed (a paragraph split)
        self._last_kind: str | None = None  # the kind of the last printed block
        self._live: Live | None = None
        self._next_refresh = float("-inf")
        self._stale = False  # something was printed since the live rows were drawn
        self._done = False

    def __enter__(self) -> MarkdownStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()

    def feed(self, text: str) -> None:
        """Add a piece of the answer; work is per line and per refresh, never the whole answer."""
        if self._done:
            raise RuntimeError("feed() after finish()")
        text = text.replace("\r", "")
        if self._console.is_terminal:  # a model's escape sequences must not reach the terminal
            text = terminal_safe(text)
        if "\n" in text:
            first, *middle, last = text.split("\n")
            self._partial.append(first)
            lines = ["".join(self._partial), *middle]
            self._partial, self._partial_size = [], 0
            for line in lines:
                self._push_line(line)
            text = last
        if text:
            self._partial.append(text)
            self._partial_size += len(text)
        self._split_paragraph()
        self._refresh()

    def finish(self) -> None:
        """Print what is still live, permanently, and leave the terminal clean; safe to repeat.

        Also the way out on Ctrl-C: what was shown stays, nothing is left half-drawn.
        """
        if self._done:
            return
        self._done = True
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        partial = "".join(self._partial)
        self._partial = []
        if partial:
            self._push_line(partial)
        self._end_block()

    close = finish

    # --- cutting the text into blocks ---------------------------------------------------------

    def _push_line(self, line: str) -> None:
        cut, self._cut_line = self._cut_line, False
        block = self._block
        if block is not None:
            if block.kind == "fence":
                self._fence_line(block, line)
                return
            if block.kind == "list":
                if self._list_line(block, line):
                    return
            elif not line.strip():
                self._end_block()
                return
            elif block.kind == "paragraph" and not block.started and _SETEXT.match(line):
                block.add(line)
                block.kind = "heading"
                self._end_block()
                return
            elif cut or not _interrupts(block, line):
                block.add(line)
                return
            else:
                self._end_block()
        if line.strip():
            self._start_block(line)

    def _start_block(self, line: str) -> None:
        fence = _open_fence(line)
        item = _ITEM.match(line)
        stripped = line.lstrip(" ")
        if fence:
            info = fence.group(3).strip()
            self._block = _Block(
                "fence", fence=fence.group(2), indent=len(fence.group(1)),
                lexer=info.partition(" ")[0] or "text",
            )
            return
        if _HEADING.match(line) or _RULE.match(line):
            self._block = _Block("heading" if _HEADING.match(line) else "rule", [line])
            self._end_block()
            return
        if item and len(item.group(1)) < 4:
            number = int(item.group(3)) if item.group(3) else None
            self._block = _Block(
                "list", indent=item.end(2) + 1, marker=_marker(item), number=number, items=[0]
            )
        elif len(line) - len(stripped) >= 4 or stripped[0] in "|><":
            self._block = _Block("other")
        else:
            self._block = _Block("paragraph")
        self._block.add(line)

    def _fence_line(self, block: _Block, line: str) -> None:
        if _closes(line, block.fence):
            self._end_block()
            return
        block.add(_dedent(line, block.indent))
        if len(block.lines) > LIVE_LINES:
            self._print_code(block, last=False)

    def _list_line(self, block: _Block, line: str) -> bool:
        """Take `line` into the list, or end the list and return False."""
        if block.fence:
            block.add(line)
            if _closes(line.lstrip(" "), block.fence):
                block.fence = ""
            return True
        if not line.strip():
            block.blanks += 1
            return True
        stripped = line.lstrip(" ")
        top = len(line) - len(stripped) < block.indent
        item = _ITEM.match(line)
        if top and (
            _open_fence(line) or _HEADING.match(line) or _RULE.match(line)
            or (item and _marker(item) != block.marker) or (block.blanks and not item)
        ):
            self._end_block()
            return False
        for _ in range(block.blanks):
            block.add("")
        block.blanks = 0
        if top and item:
            block.items.append(len(block.lines))
        elif not top and (fence := _open_fence(stripped)):
            block.fence = fence.group(2)
        block.add(line)
        if len(block.items) > 1 and (len(block.lines) > LIVE_LINES or block.size > SPLIT_CHARS):
            self._print_list_items(block)
        return True

    # --- printing, permanently --------------------------------------------------------------

    def _end_block(self) -> None:
        block, self._block = self._block, None
        if block is None:
            return
        if block.kind == "fence":
            self._print_code(block, last=True)
        elif block.lines:
            self._print(block, self._render(self._markdown("\n".join(block.lines))))

    def _print(self, block: _Block, rows: _Rows) -> None:
        rows = self._separated(block, rows)
        if not rows:
            return
        if self._live is not None:
            # The live rows show what is printed now: hide them until the next refresh.
            self._live.update(_segments([]), refresh=False)
            self._stale = True
        self._console.print(_segments(rows))
        block.started = True
        self._last_kind = block.kind

    def _separated(self, block: _Block | None, rows: _Rows) -> _Rows:
        """Blank lines between blocks as rich puts them in a whole document.

        Rendered alone, a list, table or quote starts with an empty row (rich emits the blank
        line before a nested block early); it is the separator, except inside one block.
        """
        nested = bool(rows) and not rows[0]
        if block is not None and block.started:
            return rows[1:] if nested else rows
        if not nested and rows and self._last_kind not in (None, "rule"):
            return [[], *rows]
        return rows

    def _print_code(self, block: _Block, last: bool) -> None:
        lines = block.lines
        if last:
            # rich strips the end of a code block; do the same so chunks match a whole render
            code = "\n".join(lines).rstrip()
            chunk, rest = (code.split("\n") if code else []), []
        else:
            # Keep the last non-blank line back, so the closing chunk is never empty.
            end = max((i for i, line in enumerate(lines) if line.strip()), default=0)
            chunk, rest = lines[:end], lines[end:]
            if not chunk:
                return
        if not block.started and last:
            renderable = self._syntax("\n".join(chunk), block.lexer, padding=1)
        else:
            renderable = self._code(block, chunk, top=not block.started, bottom=last)
        self._print(block, self._render(renderable))
        block.context = [*block.context, *chunk][-CODE_CONTEXT:]
        block.keep(rest)

    def _print_list_items(self, block: _Block) -> None:
        start = block.items[-1]
        printed = block.lines[:start]
        while printed and not printed[-1].strip():
            printed.pop()
        self._print(block, self._render(self._markdown("\n".join(printed))))
        rest = block.lines[start:]
        if block.number is not None:
            # markdown numbers a list from its first item: carry the count on
            block.number += len(block.items) - 1
            item = _ITEM.match(rest[0])
            assert item is not None
            rest[0] = f"{item.group(1)}{block.number}{item.group(2)[-1]}{rest[0][item.end(2):]}"
        block.keep(rest)
        block.items = [0]

    def _split_paragraph(self) -> None:
        """Print the finished rows of a long paragraph, when that leaves no seam."""
        block = self._block
        if block is not None and block.kind != "paragraph":
            return
        size = self._partial_size + (block.size if block else 0)
        if size < (block.split_at if block else SPLIT_CHARS) or size > PREVIEW_CHARS:
            return
        partial = "".join(self._partial)
        self._partial = [partial]
        if block is None:
            if len(partial) < 12 or not _starts_paragraph(partial):
                return  # too short to know which block the line starts
            block = self._block = _Block("paragraph")
        use_partial = self._cut_line or (
            len(partial) >= 12 and not _interrupts(block, partial) and not _SETEXT.match(partial)
        )
        text = "\n".join([*block.lines, partial] if use_partial else block.lines)
        rows = _canonical(self._render(self._markdown(text)))
        # Closers that later text could bring: rows they restyle are not final yet.
        probed = _canonical(self._render(self._markdown(text + _PROBE)))
        for kept in (1, 2, 3):
            cut = len(rows) - kept
            if cut < 1:
                break
            offset = _word_start(text, sum(len(_plain(row).split()) for row in rows[:cut]))
            if offset is None or probed[:cut] != rows[:cut]:
                continue
            rest = text[offset:]
            if _canonical(self._render(self._markdown(rest))) != rows[cut:]:
                continue
            self._print(block, [[Segment(*run) for run in row] for row in rows[:cut]])
            remaining = rest.split("\n")
            if use_partial:
                self._cut_line = self._cut_line or offset > len(text) - len(partial)
                self._partial, self._partial_size = [remaining[-1]], len(remaining[-1])
                remaining.pop()
            block.keep(remaining)
            block.split_at = SPLIT_CHARS
            return
        block.split_at = size + SPLIT_CHARS // 2

    # --- the live region ----------------------------------------------------------------------

    def _refresh(self) -> None:
        now = _now()
        if not self._console.is_terminal or (not self._stale and now < self._next_refresh):
            return
        self._stale = False
        rows = self._preview()
        # A slow preview (a big table) refreshes less often: at most a fifth of the time
        # goes to redrawing, however heavy the block.
        self._next_refresh = now + max(self._interval, 4 * (_now() - now))
        if self._live is None:
            if not rows:
                return
            self._live = Live(
                console=self._console, auto_refresh=False, transient=True,
                redirect_stdout=False, redirect_stderr=False,
            )
            self._live.start()
        self._live.update(_live_segments(rows), refresh=True)

    def _preview(self) -> _Rows:
        """The growing block rendered on its own, its tail only when it is long."""
        block = self._block
        partial = "".join(self._partial)
        self._partial = [partial] if partial else []
        if block is not None and block.kind == "fence":
            lines = [*block.lines, _dedent(partial, block.indent)] if partial else block.lines
            lines = [line[-PREVIEW_CHARS:] for line in lines[-2 * LIVE_LINES :]]
            renderable: RenderableType = self._code(block, lines, top=not block.started,
                                                    bottom=True, live=True)
        else:
            lines = [*block.lines, partial] if block else [partial]
            # half a screen of source lines fills the region; a table keeps its header
            head = lines[:2] if block and block.kind == "other" and lines[0][:1] == "|" else []
            body = _tail("\n".join(lines[len(head) :][-max(4, self._console.height // 2) :]))
            if not (body.strip() or head):
                return []
            renderable = self._markdown("\n".join([*head, body]))
        rows = self._separated(block, self._render(renderable))
        return rows[-max(1, self._console.height - 1) :]

    # --- rendering ----------------------------------------------------------------------------

    def _render(self, renderable: RenderableType) -> _Rows:
        return self._console.render_lines(renderable, self._console.options, pad=False)

    def _markdown(self, text: str) -> Markdown:
        return Markdown(text, code_theme=self._theme)

    def _syntax(self, code: str, lexer: str, padding: PaddingDimensions,
                line_range: tuple[int, int] | None = None) -> Syntax:
        return Syntax(code, lexer, theme=self._theme, word_wrap=True, padding=padding,
                      line_range=line_range)

    def _code(
        self, block: _Block, lines: list[str], top: bool, bottom: bool, live: bool = False
    ) -> Syntax:
        """Some lines of a code block, lexed after the printed lines before them."""
        context = block.context[-PREVIEW_CONTEXT:] if live else block.context
        return self._syntax(
            "\n".join([*context, *lines]), block.lexer, padding=(int(top), 1, int(bottom), 1),
            line_range=(len(context) + 1, len(context) + max(len(lines), 1)),
        )


def _open_fence(line: str) -> re.Match[str] | None:
    fence = _FENCE.match(line)
    if fence and fence.group(2)[0] == "`" and "`" in fence.group(3):
        return None  # a backtick fence's info string cannot hold a backtick
    return fence


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    indent = len(line) - len(line.lstrip(" "))
    return indent < 4 and len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def _dedent(line: str, spaces: int) -> str:
    """`line` without up to `spaces` leading spaces, as markdown strips an indented fence."""
    return line[min(spaces, len(line) - len(line.lstrip(" "))) :]


def _marker(item: re.Match[str]) -> str:
    return item.group(2)[-1]  # the bullet, or "." / ")" after a number


def _interrupts(block: _Block, line: str) -> bool:
    """Whether `line` ends `block` and starts another (CommonMark, simplified)."""
    stripped = line.lstrip(" ")
    if len(line) - len(stripped) >= 4:
        return False
    if block.kind != "paragraph":
        return bool(_open_fence(line))
    return stripped[:1] in ("|", ">") or bool(
        _open_fence(line) or _HEADING.match(line) or _RULE.match(line) or _ITEM.match(line)
    )


def _starts_paragraph(line: str) -> bool:
    stripped = line.lstrip(" ")
    return (
        bool(stripped) and len(line) - len(stripped) < 4 and stripped[0] != "<"
        and not _interrupts(_Block("paragraph"), line) and not _SETEXT.match(line)
    )


def _word_start(text: str, index: int) -> int | None:
    for number, word in enumerate(re.finditer(r"\S+", text)):
        if number == index:
            return word.start()
    return None


def _segments(rows: _Rows) -> Segments:
    """Rows rendered earlier, to print as they are."""
    return Segments([segment for row in rows for segment in (*row, Segment.line())])


def _live_segments(rows: _Rows) -> Segments:
    """The live rows, leaving the cursor at the start of the last one rather than at its end.

    rich pads a paragraph's rows to the full width, so at the end of the last row the cursor
    waits at the right margin: the `^C` a terminal echoes for Ctrl-C (or a key typed while the
    reply streams) would wrap onto a new line that rich does not know about, and the last redraw
    would start one line too low, leaving the block's first row on the screen twice. From the
    start of the row, an echo stays inside the region, where the next redraw erases it.
    """
    segments = [segment for row in rows for segment in (*row, Segment.line())][:-1]
    return Segments([*segments, Segment("\r", control=((ControlType.CARRIAGE_RETURN,),))])


def _canonical(rows: _Rows) -> list[list[tuple[str, Style]]]:
    """Rows as runs of text and style, so equal-looking rows compare equal."""
    null = Style.null()
    simple = (Segment.simplify(Segment(seg.text, seg.style or null) for seg in row) for row in rows)
    return [[(seg.text, seg.style or null) for seg in row] for row in simple]


def _plain(row: list[tuple[str, Style]]) -> str:
    return "".join(text for text, _ in row)


def _tail(text: str) -> str:
    if len(text) <= PREVIEW_CHARS:
        return text
    start = len(text) - PREVIEW_CHARS
    cut = text.find("\n", start)
    if cut < 0:
        cut = text.find(" ", start)
    return text[cut + 1 :] if cut >= 0 else text[start:]
