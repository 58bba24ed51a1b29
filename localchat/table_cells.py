"""Table cells fitted to a terminal: the widest free columns narrowed first, a cut cell ended
with an ellipsis, and an emphasised run (a search match) kept in view."""

from __future__ import annotations

# A table cell: text, or runs of (text, emphasised) such as a search match in its passage.
Cell = str | tuple[tuple[str, bool], ...]
ELLIPSIS = "…"
_MIN_FITTED = 10  # a fitted column keeps at least this many cells (or its header's width)


def fitted(widths: list[int], free: list[int], headers: list[int], available: int) -> list[int]:
    """Column widths that fit `available` cells, narrowing the widest free columns first."""
    widths = list(widths)
    floor = {i: min(widths[i], max(headers[i], _MIN_FITTED)) for i in free}
    excess = sum(widths) + 2 * (len(widths) - 1) - available
    while excess > 0:
        candidates = [i for i in free if widths[i] > floor[i]]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: (widths[i], i))  # in a tie, the later one
        runner_up = max((widths[i] for i in candidates if i != widest), default=0)
        target = max(runner_up, floor[widest], widths[widest] - excess)
        if target == widths[widest]:  # tied with another: take one cell, then from the other
            target -= 1
        excess -= widths[widest] - target
        widths[widest] = target
    return widths


def cut(cell: tuple[tuple[str, bool], ...], width: int, styled: bool) -> str:
    """The cell padded to `width` cells, or cut with an ellipsis where it is wider.

    A cut keeps the first emphasised run (a search match) in view: when it lies beyond the
    width, the start of the cell goes instead, marked with an ellipsis too.
    """
    from rich.cells import cell_len

    if sum(cell_len(text) for text, _ in cell) > width:
        end = _emphasis_end(cell)
        if end is not None and end > width - 1:
            cell = ((ELLIPSIS, False), *_without_first_cells(cell, end - width + 2))
        if sum(cell_len(text) for text, _ in cell) > width:
            cell = (*_first_cells(cell, width - 1), (ELLIPSIS, False))
    used = sum(cell_len(text) for text, _ in cell)
    return "".join(f"\x1b[1m{text}\x1b[22m" if bold and styled and text else text
                   for text, bold in cell) + " " * (width - used)


def _emphasis_end(cell: tuple[tuple[str, bool], ...]) -> int | None:
    """How many cells into `cell` its first emphasised run ends, or None without one."""
    from rich.cells import cell_len

    used = 0
    for text, bold in cell:
        used += cell_len(text)
        if bold:
            return used
    return None


def _without_first_cells(cell: tuple[tuple[str, bool], ...],
                         count: int) -> tuple[tuple[str, bool], ...]:
    from rich.cells import cell_len

    kept: list[tuple[str, bool]] = []
    for text, bold in cell:
        if count <= 0:
            kept.append((text, bold))
            continue
        index = 0
        while index < len(text) and count > 0:
            count -= cell_len(text[index])
            index += 1
        if text[index:]:
            kept.append((text[index:], bold))
    return tuple(kept)


def _first_cells(cell: tuple[tuple[str, bool], ...],
                 room: int) -> tuple[tuple[str, bool], ...]:
    from rich.cells import cell_len

    kept: list[tuple[str, bool]] = []
    for text, bold in cell:
        if cell_len(text) > room:
            index = 0
            while index < len(text) and cell_len(text[index]) <= room:
                room -= cell_len(text[index])
                index += 1
            kept.append((text[:index], bold))
            break
        kept.append((text, bold))
        room -= cell_len(text)
    return tuple(kept)


def emphasis(text: str, spans: tuple[tuple[int, int], ...]) -> Cell:
    """`text` as runs, the (start, end) character spans emphasised."""
    runs: list[tuple[str, bool]] = []
    position = 0
    for start, end in sorted(spans):
        if start > position:
            runs.append((text[position:start], False))
        if end > max(start, position):
            runs.append((text[max(start, position):end], True))
        position = max(position, end)
    if position < len(text):
        runs.append((text[position:], False))
    return tuple(runs)
