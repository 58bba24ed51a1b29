"""Render a model file's chat template as untrusted code.

The template inside a GGUF file is Jinja source written by whoever made the file. jinja2's
immutable sandbox already refuses Python internals (`__class__`, `__globals__`, mutating
methods); on top of it this module

- makes every refused attribute an error at once, where the stock sandbox quietly renders an
  empty string and lets the template go on probing;
- has no loader, so `{% import %}`, `{% include %}` and `{% extends %}` cannot reach files;
- bounds the work a template can make: numbers and sizes passed to calls and filters, string
  and list repetition, powers, `range` items over the whole render, namespace values, the
  output length, and the wall time. A template that asks for more is stopped with an error
  instead of taking the machine's memory or a core for hours.

Real chat templates stay far below every bound (they loop over the messages once).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_SIZE = 16_000_000  # characters or items in any value a call, filter or operator makes or takes
MAX_NUMBER = 1_000_000  # integer argument of a call or filter (widths, counts, repeats)
MAX_RANGE_ITEMS = 1_000_000  # all `range` items of one render together
MAX_OUTPUT = 16_000_000  # characters of rendered prompt (a million-token prompt is ~4M)
TIME_LIMIT_S = 5.0
_LONG_WIDTH = re.compile(r"\d{7,}")  # a format width of a million or more


class TemplateLimitError(SecurityError):
    """The template asked for more time or memory than a chat prompt can need."""


class _Budget:
    def __init__(self, time_limit: float) -> None:
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.range_items = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran for more than {self.time_limit:g} s")


_local = threading.local()


def _budget() -> _Budget:
    # Outside render() (a template rendered by hand) each check gets a fresh budget: a stored
    # one would keep its deadline and fail every later render on this thread.
    return getattr(_local, "budget", None) or _Budget(TIME_LIMIT_S)


def _check_value(value: Any, what: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > MAX_NUMBER:
        raise TemplateLimitError(f"{what} was given the number {value}")
    if isinstance(value, str | bytes | list | tuple | dict | set) and len(value) > MAX_SIZE:
        raise TemplateLimitError(f"{what} was given a value of {len(value):,} items")


def _check_format(text: Any, what: str) -> None:
    """A printf or str.format pattern may not ask for a width of a million or more."""
    if isinstance(text, str) and _LONG_WIDTH.search(text):
        raise TemplateLimitError(f"{what} was given a format with a huge width")


def _check_arguments(what: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    _budget().check_time()
    for value in (*args, *kwargs.values()):
        _check_value(value, what)


def _guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(f"the filter '{name}'", args, kwargs)
        if name == "format" and args:
            _check_format(args[0], "the filter 'format'")
        return function(*args, **kwargs)

    return guarded


def _range(*args: int) -> range:
    """`range`, counted against the render's budget of items (nested loops multiply)."""
    budget = _budget()
    _check_arguments("range()", args, {})
    numbers = range(*args)
    budget.range_items += len(numbers)
    if budget.range_items > MAX_RANGE_ITEMS:
        raise TemplateLimitError(f"its loops asked for more than {MAX_RANGE_ITEMS:,} range items")
    return numbers


class _Namespace(Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        _budget().check_time()
        _check_value(value, "a namespace value")
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with errors for refused attributes and bounds on the work done."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        self.globals.clear()  # no lipsum (its size argument) nor anything else we did not vet
        self.globals.update(
            range=_range,
            dict=dict,
            namespace=_Namespace,
            cycler=jinja2.utils.Cycler,
            joiner=jinja2.utils.Joiner,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__, f"{value.__name__}()")
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", type(__obj).__name__)
        _check_arguments(f"{name}()", args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget().check_time()
        if operator == "*":
            for sized, times in ((left, right), (right, left)):
                repeats = isinstance(sized, str | list | tuple) and isinstance(times, int)
                if repeats and len(sized) * times > MAX_SIZE:
                    raise TemplateLimitError(f"it repeated a value {times:,} times")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 64 * 1024:
                raise TemplateLimitError(f"it raised {left} to the power {right}")
        elif operator == "%":
            _check_format(left, "the % operator")
        elif operator == "+":
            for value in (left, right):
                _check_value(value, "the + operator")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=8)
def compile_template(text: str) -> jinja2.Template:
    """Parse once; syntax errors surface as jinja2.TemplateError."""
    return GuardedSandbox().from_string(text)


def render(text: str, time_limit: float = TIME_LIMIT_S, **variables: Any) -> str:
    """Render `text` with `variables` within the bounds above; raises jinja2 errors."""
    template = compile_template(text)
    previous = getattr(_local, "budget", None)
    _local.budget = budget = _Budget(time_limit)
    try:
        parts: list[str] = []
        length = 0
        for part in template.generate(**variables):
            length += len(part)
            if length > MAX_OUTPUT:
                raise TemplateLimitError(f"its output passed {MAX_OUTPUT:,} characters")
            budget.check_time()
            parts.append(part)
        return "".join(parts)
    finally:
        _local.budget = previous
