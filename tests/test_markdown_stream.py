"""Streaming markdown: what ends up on the screen, and how much rendering each token costs.

The terminal is real enough: rich writes its escape codes (live region, cursor moves, colours)
to a StringIO, and pyte, a VT100 emulator, replays them into the screen a person would see.
The yardstick is rich itself: streaming an answer must leave the same screen, characters and
colours, as printing `Markdown(answer)` once at the end.
"""

from __future__ import annotations

import io
import random

import pyte
import pytest
from rich.console import Console
from rich.markdown import Markdown
from rich.syntax import Syntax

from localchat.chat import markdown_stream
from localchat.chat.markdown_stream import SPLIT_CHARS, MarkdownStream
from localchat.render import PlainStream

WIDTH = 80

MIXED = """\
# Why is the sky blue?

Sunlight holds **many colours**; air `molecules` scatter the short wavelengths most.

- blue light scatters more

- so the sky looks blue
  from every direction

3. starts at three
4. four

   an indented paragraph in item four

   ```bash
   echo hi

   echo there
   ```
5. five
   - nested a
   - nested b

---

```python
def scatter(wavelength):
    # intensity goes as the inverse fourth power

    return 1 / wavelength ** 4
```

Setext heading
--------------

Text right before a fence:
```
code
```
| colour | wavelength |
|--------|------------|
| blue   | 450 nm     |

> a quote
continued lazily

A [link](https://example.org), _emphasis_, snake_case and ~~strike~~.
"""


class Clock:
    """Stands in for time.monotonic inside markdown_stream: tests decide when refreshes fall."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(markdown_stream, "_now", fake)
    return fake


class Renders:
    """Counts the characters handed to rich's Markdown and Syntax (real ones, subclassed)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sizes = self.sizes

        class CountedMarkdown(Markdown):
            def __init__(self, markup: str, **options: object) -> None:
                sizes.append(len(markup))
                super().__init__(markup, **options)  # type: ignore[arg-type]

        class CountedSyntax(Syntax):
            def __init__(self, code: str, lexer: str, **options: object) -> None:
                sizes.append(len(code))
                super().__init__(code, lexer, **options)  # type: ignore[arg-type]

        monkeypatch.setattr(markdown_stream, "Markdown", CountedMarkdown)
        monkeypatch.setattr(markdown_stream, "Syntax", CountedSyntax)


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> Renders:
    counter = Renders()
    counter.install(monkeypatch)
    return counter


def terminal(height: int = 24) -> Console:
    return Console(
        file=io.StringIO(), force_terminal=True, color_system="truecolor", width=WIDTH,
        height=height, legacy_windows=False, _environ={},
    )


def screen(output: str) -> tuple[list[str], list[tuple[object, ...]]]:
    """The text rows and the cells (character, colours, attributes) a VT100 shows for `output`."""
    rows = 3000
    display = pyte.Screen(WIDTH, rows)
    display.set_mode(pyte.modes.LNM)  # a tty turns "\n" into CR LF
    pyte.Stream(display).feed(output)
    text = [line.rstrip() for line in display.display]
    while text and not text[-1]:
        text.pop()
    assert len(text) < rows - 1, "the test screen is too short for this answer"
    cells = [tuple(display.buffer[y][x] for x in range(WIDTH)) for y in range(len(text))]
    return text, cells


def reference(answer: str) -> tuple[list[str], list[tuple[object, ...]]]:
    console = terminal()
    console.print(Markdown(answer))
    return screen(console.file.getvalue())  # type: ignore[attr-defined]


def streamed(answer: str, sizes: list[int], clock: Clock | None = None, height: int = 24) -> str:
    """Feed `answer` in pieces of `sizes` (cycled); the clock moves 1/60 s per piece."""
    console = terminal(height)
    stream = MarkdownStream(console)
    start = index = 0
    while start < len(answer):
        if clock is not None:
            clock.now += 1 / 60
        size = sizes[index % len(sizes)]
        stream.feed(answer[start : start + size])
        start, index = start + size, index + 1
    stream.finish()
    return console.file.getvalue()  # type: ignore[attr-defined]


def words(rng: random.Random, count: int) -> str:
    vocabulary = ["light", "wave", "air", "blue", "sky", "scatter", "photon", "the", "of"]
    picked = [rng.choice(vocabulary) for _ in range(count)]
    for spot in rng.sample(range(count), count // 12):
        picked[spot] = rng.choice(
            [f"**{picked[spot]} it**", f"`{picked[spot]}()`", f"*{picked[spot]}*",
             f"[{picked[spot]}](https://x.org/{spot})", "5 * 3", "- dash", "1. one"]
        )
    return " ".join(picked)


def long_paragraph(chars: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        text += words(rng, rng.randint(6, 16)).capitalize() + ". "
    return "Intro.\n\n" + text.strip() + "\n\nAfter.\n"


def long_code(lines: int) -> str:
    body = [f"    t += f({i}, 'v{i}')  # {i}" if i % 6 else "" for i in range(lines)]
    # A string over 16 lines: printed in chunks, its colour needs the lines before each chunk.
    body[lines // 3 : lines // 3 + 16] = ['    s = """', *(f"    text {i} # not a comment" for i
                                                           in range(14)), '    """']
    return "Code:\n\n```python\ndef run():\n" + "\n".join(body) + "\n```\n"


def tricky_paragraph(chars: int, seed: int = 3) -> str:
    """Long emphasis and code spans, and words that would start a list or heading on a new row."""
    rng = random.Random(seed)
    text = ""
    while len(text) < chars:
        sentence = words(rng, rng.randint(18, 30))  # spans over two rows or more
        shape = rng.choice(["**{}**", "*{}*", "`{}`", "{} - {} # {} 1. {} > {}"])
        text += shape.format(*[sentence] * shape.count("{}")) + ". "
    return text.strip() + "\n"


def long_list(items: int, seed: int = 2) -> str:
    rng = random.Random(seed)
    return "Steps:\n\n" + "\n\n".join(f"- {words(rng, 12)}." for _ in range(items)) + "\n"


# --- what the screen shows --------------------------------------------------------------------


def test_headings_lists_and_code_are_rendered(clock: Clock) -> None:
    text, cells = screen(streamed(MIXED, [3], clock))
    joined = "\n".join(text)
    assert "Why is the sky blue?" in joined and "# Why" not in joined
    assert " • blue light scatters more" in text
    assert " 3 starts at three" in text
    assert "**many" not in joined and "```" not in joined
    code_row = next(y for y, line in enumerate(text) if "def scatter(wavelength):" in line)
    column = text[code_row].index("def")
    assert cells[code_row][column].bg != "default", "code has the theme's background"
    assert cells[code_row][column].fg != cells[code_row][column + 4].fg, "and is highlighted"


@pytest.mark.parametrize(
    "sizes", [[len(MIXED)], [1], [4], [3, 10, 2, 7, 1, 12]], ids=["whole", "chars", "4", "mixed"]
)
def test_streaming_leaves_the_screen_that_printing_the_whole_answer_does(
    sizes: list[int], clock: Clock
) -> None:
    assert screen(streamed(MIXED, sizes, clock)) == reference(MIXED)


def test_a_code_fence_spanning_blank_lines_stays_one_block(clock: Clock) -> None:
    answer = "Look:\n\n```\n# not a heading\n\n- not a list\n\n\n> not a quote\n```\n\nEnd.\n"
    text, cells = screen(streamed(answer, [1], clock))
    assert (text, cells) == reference(answer)
    first = text.index(" # not a heading")
    last = text.index(" > not a quote")
    # One background from the fence's top padding row to its bottom one, blank lines included.
    background = cells[first][0].bg
    assert background != "default"
    assert all(cells[y][0].bg == background for y in range(first - 1, last + 2))


@pytest.mark.parametrize("cut", [40, 120, 190, 260, 330, 420, 500, 560, 640])
def test_an_answer_cut_anywhere_shows_what_rich_shows_for_that_much(cut: int, clock: Clock) -> None:
    """What Ctrl-C leaves: the same as printing the partial answer, unclosed fences included."""
    partial = MIXED[:cut]
    assert screen(streamed(partial, [2, 5], clock)) == reference(partial)


def test_a_long_paragraph_prints_finished_rows_without_a_seam(
    clock: Clock, renders: Renders
) -> None:
    answer = long_paragraph(3000)
    for sizes in ([4], [2, 7, 3]):
        renders.sizes.clear()
        assert screen(streamed(answer, sizes, clock)) == reference(answer)
        # Printed in pieces as it grew: nothing near the whole paragraph was rendered at once.
        assert max(renders.sizes) < 3 * SPLIT_CHARS


def test_a_paragraph_with_long_spans_and_markup_looking_words_splits_cleanly(
    clock: Clock, renders: Renders
) -> None:
    answer = tricky_paragraph(2500)
    for sizes in ([3, 1, 6],):
        renders.sizes.clear()
        assert screen(streamed(answer, sizes, clock)) == reference(answer)
        # Open spans hold splits back, yet it was still printed in parts.
        assert max(renders.sizes) < len(answer) * 3 // 4


def test_a_long_code_block_prints_finished_lines_without_a_seam(clock: Clock) -> None:
    # Colours included: the string across chunk boundaries is lexed with the lines before it.
    answer = long_code(100)
    assert screen(streamed(answer, [8], clock)) == reference(answer)


@pytest.mark.parametrize(
    ("answer", "printed_early"),
    [(long_code(100), "t += f(20, 'v20')"), (long_list(40), "photon"),
     (long_paragraph(4000), "After.")],
    ids=["code", "list", "paragraph"],
)
def test_long_blocks_are_printed_in_parts_before_they_end(answer: str, printed_early: str) -> None:
    """Without a terminal there is no live region: the output holds only what is final."""
    console = Console(file=io.StringIO(), width=WIDTH, _environ={})
    stream = MarkdownStream(console)
    cut = int(len(answer) * 0.7)
    for start in range(0, cut, 4):
        stream.feed(answer[start : min(start + 4, cut)])
    early = console.file.getvalue()  # type: ignore[attr-defined]
    assert len(early) > 0.4 * len(answer)
    assert (printed_early in early) is (printed_early != "After.")


def test_a_long_list_prints_finished_items_without_a_seam(clock: Clock, renders: Renders) -> None:
    answer = long_list(40)
    assert screen(streamed(answer, [4], clock)) == reference(answer)
    assert max(renders.sizes) < len(answer) // 2


def scrollback(output: str, rows: int = 24) -> list[str]:
    """Scrollback plus screen of a terminal `rows` high: long answers scroll, as they do."""
    display = pyte.HistoryScreen(WIDTH, rows, history=10_000, ratio=0.5)
    display.set_mode(pyte.modes.LNM)
    pyte.Stream(display).feed(output)
    lines = [*display.history.top, *(display.buffer[y] for y in range(rows))]
    text = ["".join(line[x].data for x in range(WIDTH)).rstrip() for line in lines]
    while text and not text[-1]:
        text.pop()
    return text


def test_an_answer_taller_than_the_terminal_scrolls_cleanly(clock: Clock) -> None:
    """The live region never reaches above the top of the screen, where it could not be erased."""
    answer = MIXED + long_code(40)
    console = terminal(height=24)
    console.print(Markdown(answer))
    expected = scrollback(console.file.getvalue())  # type: ignore[attr-defined]
    assert len(expected) > 3 * 24
    assert scrollback(streamed(answer, [6], clock, height=24)) == expected


def test_an_ordered_list_printed_in_parts_keeps_counting(clock: Clock) -> None:
    # Models often number every item "1."; markdown counts on from the first number.
    answer = "\n".join(f"1. item {n} " + "word " * 25 for n in range(1, 25)) + "\n"
    text, _ = screen(streamed(answer, [6], clock))
    numbers = [int(line.split()[0]) for line in text if line.split()[1:2] == ["item"]]
    assert numbers == list(range(1, 25))


def test_the_live_block_is_visible_before_it_is_finished(clock: Clock) -> None:
    console = terminal()
    stream = MarkdownStream(console)
    stream.feed("First paragraph, done.\n\nSecond one, still arri")
    text, _ = screen(console.file.getvalue())  # type: ignore[attr-defined]
    assert text == ["First paragraph, done.", "", "Second one, still arri"]
    clock.now += 1
    stream.feed("ving.")
    stream.finish()
    text, _ = screen(console.file.getvalue())  # type: ignore[attr-defined]
    assert text == ["First paragraph, done.", "", "Second one, still arriving."]


def test_ctrl_c_mid_answer_keeps_what_was_shown_and_restores_the_cursor(clock: Clock) -> None:
    answer = long_code(40)
    fed: list[str] = []

    def pieces():  # an engine whose user presses Ctrl-C halfway through a code block
        for start in range(0, len(answer) // 2, 4):
            clock.now += 1 / 60
            fed.append(answer[start : start + 4])
            yield fed[-1]
        raise KeyboardInterrupt

    console = terminal()
    with pytest.raises(KeyboardInterrupt), MarkdownStream(console) as stream:
        for piece in pieces():
            stream.feed(piece)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert output.rindex("\x1b[?25h") > output.rindex("\x1b[?25l"), "cursor hidden, then shown"
    assert screen(output) == reference("".join(fed))
    stream.finish()  # a second finish does nothing
    assert console.file.getvalue() == output  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        stream.feed("more")


@pytest.mark.parametrize(
    "answer",
    ["The sky is blue because sunlight is scattered by the molecules of the air, and blue "
     "light is scattered more than red light, so",
     MIXED[:150], long_paragraph(1500), long_code(30)[:300]],
    ids=["first-paragraph", "after-a-heading", "long-paragraph", "code"],
)
def test_the_ctrl_c_a_terminal_echoes_is_erased_with_the_live_rows(answer: str,
                                                                   clock: Clock) -> None:
    """A tty echoes `^C` where the cursor is; rich pads a paragraph's rows to the full width, so
    at the end of the live rows that echo would wrap to a new line and the last redraw would
    leave the live block's first row on the screen twice."""
    console = terminal()
    stream = MarkdownStream(console)
    for start in range(0, len(answer), 5):
        clock.now += 1 / 60
        stream.feed(answer[start : start + 5])
    console.file.write("^C")  # type: ignore[attr-defined]  # what the terminal driver echoes
    stream.finish()
    assert screen(console.file.getvalue()) == reference(answer)  # type: ignore[attr-defined]


def test_without_a_terminal_blocks_are_printed_once_without_escape_codes() -> None:
    console = Console(file=io.StringIO(), width=WIDTH, _environ={})
    stream = MarkdownStream(console)
    for start in range(0, len(MIXED), 3):
        stream.feed(MIXED[start : start + 3])
    stream.finish()
    expected = Console(file=io.StringIO(), width=WIDTH, _environ={})
    expected.print(Markdown(MIXED))
    assert console.file.getvalue() == expected.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in console.file.getvalue()  # type: ignore[attr-defined]


def test_carriage_returns_are_ignored(clock: Clock) -> None:
    answer = "# Title\r\n\r\nSome text.\r\n"
    assert screen(streamed(answer, [2], clock)) == reference(answer.replace("\r", ""))


# --- what it costs ------------------------------------------------------------------------------


def code_blocks(chars: int) -> str:
    """An answer of 30-line code blocks with a sentence between them."""
    answer = ""
    while len(answer) < chars:
        answer += long_code(max(4, min(30, (chars - len(answer)) // 25)))
    return answer


def rendered_per_token(answer: str, renders: Renders, clock: Clock) -> list[int]:
    """Characters handed to Markdown/Syntax during each 4-character token (40 tokens/s)."""
    stream = MarkdownStream(terminal())
    per_token = []
    for start in range(0, len(answer), 4):
        clock.now += 1 / 40
        before = len(renders.sizes)
        stream.feed(answer[start : start + 4])
        per_token.append(sum(renders.sizes[before:]))
    stream.finish()
    return per_token


@pytest.mark.parametrize(
    "shape",
    [long_paragraph, code_blocks, lambda chars: long_list(chars // 70)],
    ids=["paragraph", "code", "list"],
)
def test_rendering_work_per_token_does_not_grow_with_the_answer(
    shape, renders: Renders, clock: Clock
) -> None:
    short, long = shape(400), shape(5000)  # about 100 and 1,250 tokens
    short_costs = rendered_per_token(short, renders, clock)
    long_costs = rendered_per_token(long, renders, clock)
    assert len(long) > 8 * len(short)
    # The most any token costs is bounded by the block, not the answer: 2,000 characters,
    # where re-rendering the whole answer would reach len(long). (Within one code block,
    # printing a chunk lexes the block so far, up to CODE_CONTEXT lines, to keep its colours.)
    assert max(long_costs) < 2000 < len(long) // 2
    # And on average late tokens cost what early ones do.
    late = long_costs[-len(short_costs) :]
    assert sum(late) / len(late) < 3 * max(1, sum(short_costs) / len(short_costs)) + 300


def test_refreshes_are_throttled_not_per_token(renders: Renders, clock: Clock) -> None:
    stream = MarkdownStream(terminal(), refresh_per_second=15)
    stream.feed("A paragraph that ")
    assert len(renders.sizes) == 1  # the first piece is shown at once
    for piece in ["keeps ", "coming ", "in ", "small ", "pieces "]:
        stream.feed(piece)
    assert len(renders.sizes) == 1  # the clock has not moved: no refresh
    clock.now += 1 / 15
    stream.feed("and then.")
    assert len(renders.sizes) == 2
    stream.finish()


# --- plain text ---------------------------------------------------------------------------------


class CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_plain_stream_writes_raw_text_and_flushes_each_piece() -> None:
    file = CountingFile()
    stream = PlainStream(file)
    stream.feed("# Not ")
    stream.feed("rendered **at all**")
    assert file.getvalue() == "# Not rendered **at all**"
    assert file.flushes == 2
    stream.finish()
    stream.finish()
    assert file.getvalue() == "# Not rendered **at all**\n"


def test_plain_stream_adds_no_newline_when_the_answer_ends_with_one() -> None:
    file = CountingFile()
    with PlainStream(file) as stream:
        stream.feed("line\n")
    assert file.getvalue() == "line\n"
    empty = CountingFile()
    PlainStream(empty).finish()
    assert empty.getvalue() == ""
