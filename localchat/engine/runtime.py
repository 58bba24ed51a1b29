"""The llama.cpp runtime around the engine: importing it, its log lines, its backend, cores."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from localchat.errors import EngineError


def physical_core_count() -> int:
    """Physical cores this process may use: llama.cpp gains nothing from hyperthreads."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = ""
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((physical, core))
    except OSError:
        pass
    if not cores and hasattr(os, "sysconf"):
        return max(1, allowed)
    return max(1, min(allowed, len(cores) or allowed))


def import_llama_cpp() -> ModuleType:
    """Import llama_cpp, or say how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineError(
            f"llama-cpp-python is not installed or failed to load: {exc}",
            "run ./scripts/setup (see README: Troubleshooting)",
        ) from exc
    return llama_cpp


# Per-tensor and per-graph lines llama.cpp logs at info level: thousands of them per load.
_NOISY_LOG_PREFIXES = (b"llama_graph_n_input_tensors", b"create_tensor:", b"load_tensors: layer",
                       b"graph_reserve:", b"set_abort_callback", b".")
_log_callback: object = None  # kept alive: llama.cpp holds a raw pointer to it
_show_llama_logs = False
_captured_logs: list[str] | None = None  # set while `captured_llama_output` listens


def route_llama_logs(llama_cpp: ModuleType, verbose: bool) -> None:
    """Send llama.cpp's log lines to stderr only under --verbose.

    llama-cpp-python hides them by pointing the process's stdout/stderr file descriptors at
    /dev/null while it loads, which also swallows anything else printed meanwhile; we install
    our own log callback instead and disable that redirection.
    """
    global _log_callback, _show_llama_logs
    import sys

    _show_llama_logs = verbose
    if _log_callback is None:

        last_level = [0]

        def forward(level: int, text: bytes, _user_data: object) -> None:
            # ggml levels: 1 info, 2 warn, 3 error, 4 debug, 5 continues the previous line
            level = last_level[0] if level == 5 else level
            last_level[0] = level
            if _captured_logs is not None:
                _captured_logs.append(text.decode("utf-8", errors="replace"))
            if _show_llama_logs and level != 4 and not text.startswith(_NOISY_LOG_PREFIXES):
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()

        _log_callback = llama_cpp.llama_log_callback(forward)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        from llama_cpp import _internals
        from llama_cpp import llama as llama_module

        for module in (_internals, llama_module):
            if hasattr(module, "suppress_stdout_stderr"):
                # attr-defined: a patch of llama_cpp's private helper (a class, replaced by a
                # function); the loop's ModuleType declares no attribute to assign
                module.suppress_stdout_stderr = (  # type: ignore[attr-defined]
                    lambda disable=True: contextlib.nullcontext())


@contextlib.contextmanager
def captured_llama_output() -> Iterator[list[str]]:
    """Collect what llama.cpp says during the block: its log lines, and what it prints straight
    to the process's stderr (its grammar parser does), as text lines in the list yielded."""
    import sys
    import tempfile

    global _captured_logs
    lines: list[str] = []
    _captured_logs = []
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            printed = sink.read().decode("utf-8", errors="replace")
            lines.extend(line for line in (printed + "".join(_captured_logs)).splitlines()
                         if line.strip())
            _captured_logs = None


def compiled_backend() -> str:
    """The GPU backend llama.cpp was built with ("CUDA", "Metal", ...), or "CPU"."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return "not installed"
    names = " ".join(p.name.lower() for p in (Path(spec.origin).parent / "lib").glob("*"))
    for marker, backend in (("cuda", "CUDA"), ("metal", "Metal"), ("vulkan", "Vulkan"),
                            ("hip", "ROCm"), ("sycl", "SYCL")):
        if f"ggml-{marker}" in names:
            return backend
    return "CPU"


def available_memory_bytes() -> int | None:
    """Memory the OS can give us now (MemAvailable on Linux), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it.

    llama.cpp calls back into Python to log while it loads; a KeyboardInterrupt raised inside
    that callback is swallowed by ctypes ("Exception ignored"), so Ctrl-C would be lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
