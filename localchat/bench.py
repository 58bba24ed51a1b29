"""`localchat bench`: prefill and decode speed, first-token latency, load time and memory.

Measures through the engine's own `stream`, the path `localchat run` takes, so the figures are
what a user gets. Like llama-bench, prefill and decode are separate runs: prefill evaluates a
prompt of exactly `-p` tokens from an empty KV cache, decode generates `-n` tokens after a short
prompt (greedy, end-of-turn ignored). A warm-up run comes first and is not counted.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions, LoadInfo, context_hint
from localchat.engine.protocol import GenerationStats, Sampling
from localchat.errors import UsageError
from localchat.render import format_bytes

if TYPE_CHECKING:
    import numpy
    from numpy.typing import NDArray

    from localchat.models.gguf_reader import ModelInfo

Progress = Callable[[str, int, int], None]  # (what runs now, steps done, steps in all)
MB = 1_000_000  # every *_mb figure: decimal megabytes, as `list`, `show` and disks count them
KIB, MIB = 1024, 1024 * 1024  # the binary units the kernel reports in
# Ordinary prose, repeated to the prompt size: real text tokenizes like a user's prompt would.
FILLER = (
    "The keeper of the lighthouse climbed the stairs each evening, trimmed the wick and watched "
    "the ships pass along the rocky coast. In winter the storms came from the north, and the "
    "waves broke over the harbour wall while the village slept behind shuttered windows. "
)
DECODE_PROMPT = "Write a long story about the sea."
BANDWIDTH_ROUNDS = 5  # best of several passes: other processes share the memory bus
DROP_CACHES = Path("/proc/sys/vm/drop_caches")  # root only; empties the whole machine's cache
STILL_CACHED = 0.05  # more of the file than this left in the page cache: the load is not cold
WARMUP_TOKENS = 16  # enough to page in the weights and spin up llama.cpp's thread pool


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; each field maps to a `localchat bench` flag."""

    prompt_tokens: int = 512  # -p
    gen_tokens: int = 128  # -n
    repetitions: int = 5
    cold_load: bool = True  # also time a load after dropping the model from the page cache
    # When fadvise cannot evict the file, may root drop every clean page of the machine (every
    # program's cached files) instead? Never unasked: it slows the whole machine for a while.
    drop_all_caches: bool = False
    bandwidth: bool = True
    draft: str = "auto"  # the draft setting for the decode runs (--draft)

    def validate(self) -> None:
        """Refuse sizes that cannot be measured, with a usage error naming the flag."""
        if self.prompt_tokens < 1:
            raise UsageError(f"-p must be at least 1 (got {self.prompt_tokens})",
                             "give the prompt size in tokens, e.g. -p 512")
        if self.gen_tokens < 2:
            raise UsageError(f"-n must be at least 2 (got {self.gen_tokens})",
                             "decode speed is timed between the first and the last token")
        if self.repetitions < 1:
            raise UsageError(f"--repetitions must be at least 1 (got {self.repetitions})")


@dataclass(frozen=True)
class Measurement:
    """One timed run: a load, a prefill or a decode."""

    kind: str  # load | prefill | decode
    repetition: int  # 0 for loads
    tokens: int  # prompt tokens evaluated (prefill) or generated (decode); 0 for loads
    seconds: float  # load: the whole load; prefill: evaluation; decode: first to last token
    tokens_per_s: float | None
    ttft_s: float | None = None  # prefill only: from the call to the first generated token
    cache: str | None = None  # load only: cold | warm
    peak_rss_mb: float | None = None
    draft_acceptance: float | None = None  # decode only: drafted tokens accepted (None: none)


@dataclass(frozen=True)
class PageCacheDrop:
    """How (and whether) the model file was pushed out of the page cache before a cold load."""

    method: str  # fadvise | drop_caches | none
    resident_before: float | None  # fraction of the file in the page cache, None: unknown
    resident_after: float | None
    note: str

    @property
    def dropped(self) -> bool:
        """True when the next load reads the disk (or nothing tells us otherwise)."""
        return self.method != "none" and (self.resident_after is None
                                          or self.resident_after <= STILL_CACHED)


@dataclass(frozen=True)
class BenchResult:
    """Everything measured, including a partial run cut short by Ctrl-C."""

    settings: BenchSettings
    model_path: Path
    model_bytes: int
    weights_read_per_token: int
    kv_bytes_per_position: int
    n_ctx: int
    threads: int
    backend: str
    flash_attn: bool
    decode_prompt_tokens: int
    measurements: tuple[Measurement, ...]
    page_cache: PageCacheDrop | None
    bandwidth_gb_per_s: float | None
    cache_bytes: int | None  # the CPU's last-level cache: a model this small beats DRAM speed
    load_average: tuple[float, float, float]
    interrupted: bool
    cache_type: str = "f16"  # --cache-type

    def values(self, kind: str, field: str = "tokens_per_s",
               cache: str | None = None) -> list[float]:
        """One field of every measurement of a kind (and cache, for loads) that has it."""
        return [getattr(m, field) for m in self.measurements if m.kind == kind
                and (cache is None or m.cache == cache) and getattr(m, field) is not None]


@dataclass
class _Partial:
    """What has been measured so far: a Ctrl-C keeps it, a finished run freezes it."""

    measurements: list[Measurement] = field(default_factory=list)
    page_cache: PageCacheDrop | None = None
    bandwidth: float | None = None
    load: LoadInfo | None = None  # of the last load
    engine: LocalEngine | None = None
    decode_prompt_tokens: int = 0

    def load_engine(self, options: EngineOptions, cache: str) -> LocalEngine:
        from localchat.engine.loader import load_engine

        started = time.perf_counter()
        engine = load_engine(options)  # the header check counts: a user waits for it too
        seconds = time.perf_counter() - started
        self.engine, self.load = engine, engine.info
        self.measurements.append(Measurement("load", 0, 0, seconds, None, cache=cache))
        return engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def run_benchmark(settings: BenchSettings, options: EngineOptions,
                  progress: Progress | None = None) -> BenchResult:
    """Load the model (cold, then warm), warm up, measure; Ctrl-C returns what was measured."""
    from localchat.models.gguf_reader import estimate_memory, read_model_file

    settings.validate()
    info = read_model_file(options.model_path)
    partial = _Partial()
    interrupted = False
    try:
        _measure(settings, options, partial, progress or (lambda what, done, total: None))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        partial.close()
    load = partial.load
    return BenchResult(
        settings=settings, model_path=options.model_path, model_bytes=info.file_size,
        weights_read_per_token=weights_read_per_token(info),
        kv_bytes_per_position=estimate_memory(info, 1, options.cache_type).kv_cache_bytes,
        n_ctx=load.n_ctx if load else 0, threads=load.threads if load else 0,
        backend=load.backend if load else "", flash_attn=options.flash_attn,
        cache_type=options.cache_type,
        decode_prompt_tokens=partial.decode_prompt_tokens,
        measurements=tuple(partial.measurements), page_cache=partial.page_cache,
        bandwidth_gb_per_s=partial.bandwidth, cache_bytes=last_level_cache_bytes(),
        load_average=_load_average(),
        interrupted=interrupted,
    )


def _measure(settings: BenchSettings, options: EngineOptions, partial: _Partial,
             progress: Progress) -> None:
    steps = 2 + settings.repetitions + int(settings.cold_load) + int(settings.bandwidth)
    done = 0
    if settings.cold_load:
        progress("cold load", done, steps)
        partial.page_cache = drop_file_cache(options.model_path, settings.drop_all_caches)
        if partial.page_cache.dropped:  # a load from a warm cache is no cold figure
            cold = partial.load_engine(options, "cold").info
            partial.close()  # unmapped, so the next load finds the file cached but not mapped
            check_fits(settings, cold)  # a bad size costs one load, not two
        done += 1
    progress("warm load", done, steps)
    engine = partial.load_engine(options, "warm")
    check_fits(settings, engine.info)
    prompt = prompt_of_length(engine, settings.prompt_tokens)
    chat = [{"role": "user", "content": DECODE_PROMPT}]
    partial.decode_prompt_tokens = engine.count_tokens(chat)
    check_fits(settings, engine.info, partial.decode_prompt_tokens)
    progress("warm-up", done + 1, steps)
    _prefill(engine, prompt, 0)
    _decode(engine, chat, min(WARMUP_TOKENS, settings.gen_tokens), 0, settings.draft)
    for repetition in range(1, settings.repetitions + 1):
        progress(f"repetition {repetition}/{settings.repetitions}", done + 1 + repetition, steps)
        partial.measurements.append(_prefill(engine, prompt, repetition))
        partial.measurements.append(_decode(engine, chat, settings.gen_tokens, repetition,
                                            settings.draft))
    partial.close()
    if settings.bandwidth:
        progress("memory bandwidth", steps - 1, steps)
        # Last, so its buffer does not count in the peak resident memory measured above.
        partial.bandwidth = measure_memory_bandwidth(threads=engine.info.threads)
    progress("done", steps, steps)


def check_fits(settings: BenchSettings, load: LoadInfo, decode_prompt_tokens: int = 0) -> None:
    """Refuse -p (or, given the decode prompt's size, -n) that overflows the context window."""
    if settings.prompt_tokens >= load.n_ctx:
        flag, size, needed = "-p", settings.prompt_tokens, settings.prompt_tokens + 1
    elif decode_prompt_tokens and decode_prompt_tokens + settings.gen_tokens > load.n_ctx:
        flag, size, needed = "-n", settings.gen_tokens, decode_prompt_tokens + settings.gen_tokens
    else:
        return
    raise UsageError(
        f"{flag} {size} does not fit the context window of {load.n_ctx} tokens "
        f"(the run needs {needed})", context_hint(load.n_ctx, load.n_ctx_train, f"lower {flag}"))


def prompt_of_length(engine: LocalEngine, n_tokens: int) -> list[dict[str, str]]:
    """A one-message chat whose formatted prompt is `n_tokens` tokens (chat template included)."""
    words = FILLER.split()

    def chat(k: int, pad: int = 0) -> list[dict[str, str]]:
        text = " ".join(words[i % len(words)] for i in range(k)) + " the" * pad
        return [{"role": "user", "content": text}]

    overhead = engine.count_tokens(chat(1))
    if overhead > n_tokens:
        raise UsageError(f"-p {n_tokens} is smaller than the chat template's own "
                         f"{overhead} tokens", f"use -p {overhead} or more")
    low, high = 1, n_tokens  # a word is at least one token: k words never fit under k tokens
    while low < high:  # the most words whose prompt fits in n_tokens
        middle = (low + high + 1) // 2
        if engine.count_tokens(chat(middle)) <= n_tokens:
            low = middle
        else:
            high = middle - 1
    # Top up with a word that is one token on its own; keep the closest prompt that fits.
    best, best_count = chat(low), engine.count_tokens(chat(low))
    for pad in range(1, n_tokens - best_count + 1):
        count = engine.count_tokens(chat(low, pad))
        if count > n_tokens:
            break
        best, best_count = chat(low, pad), count
    return best


def _reply(engine: LocalEngine, messages: list[dict[str, str]], max_tokens: int,
           draft: str = "off") -> GenerationStats:
    """GenerationStats of one greedy reply to `messages`, evaluated from an empty KV cache."""
    engine.reset_cache()  # nothing reused from the previous run
    for _ in engine.stream(messages, Sampling(temperature=0, ignore_eos=True,
                                              max_tokens=max_tokens, draft=draft)):
        pass
    assert engine.last_stats is not None  # set when the stream ends
    return engine.last_stats


def _prefill(engine: LocalEngine, messages: list[dict[str, str]], repetition: int) -> Measurement:
    stats = _reply(engine, messages, 1)
    return Measurement("prefill", repetition, stats.prefill_tokens, stats.prefill_s,
                       stats.prefill_tokens_per_s, ttft_s=stats.ttft_s, peak_rss_mb=peak_rss_mb())


def _decode(engine: LocalEngine, messages: list[dict[str, str]], n_tokens: int,
            repetition: int, draft: str) -> Measurement:
    stats = _reply(engine, messages, n_tokens, draft)
    return Measurement("decode", repetition, stats.completion_tokens, stats.decode_s,
                       stats.decode_tokens_per_s, peak_rss_mb=peak_rss_mb(),
                       draft_acceptance=stats.draft_acceptance)


def weights_read_per_token(info: ModelInfo) -> int:
    """Weight bytes one decoded token reads: all, but one row of an untied input embedding."""
    names = {tensor.name for tensor in info.tensors}
    untied = "output.weight" in names
    return sum(t.nbytes for t in info.tensors if not (untied and t.name == "token_embd.weight"))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM, else getrusage)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KIB / MB  # "kB" there means KiB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * KIB) / MB  # bytes on macOS, KiB else


def resident_fraction(path: Path) -> float | None:
    """The fraction of a file's pages in the page cache (mincore), or None where unknown."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, vector) != 0:
            return None
        return sum(byte & 1 for byte in vector.raw) / pages
    finally:
        libc.munmap(address, size)


def drop_file_cache(path: Path, drop_all: bool = False) -> PageCacheDrop:
    """Push a file out of the page cache so the next load reads the disk; say how it went.

    Only this file's pages are dropped (fadvise). `drop_all` (`--drop-all-caches`) lets root
    fall back to dropping every clean cached page of the machine, when asked and only then.
    """
    before = resident_fraction(path)
    if not hasattr(os, "posix_fadvise"):
        return PageCacheDrop("none", before, before, "not measured: this OS cannot drop one "
                                                     "file's cache")
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    after, method = resident_fraction(path), "fadvise"
    if after is None:
        return PageCacheDrop(method, before, after, "dropped (not verified: mincore unavailable)")
    if after <= STILL_CACHED:
        return PageCacheDrop(method, before, after, "dropped")
    # Pages another process maps stay cached whatever we do; otherwise the filesystem ignored
    # fadvise.
    if mapped_by_others(path):
        why = "another process maps the file"
    elif not drop_all:
        why = ("the filesystem ignores fadvise; --drop-all-caches lets root drop the whole "
               "machine's page cache instead")
    elif os.geteuid() != 0:
        why = "the filesystem ignores fadvise, and --drop-all-caches needs root"
    else:
        try:
            with open(DROP_CACHES, "w", encoding="ascii") as drop:
                drop.write("1\n")
        except OSError as exc:
            why = f"the filesystem ignores fadvise, and {DROP_CACHES}: {exc.strerror or exc}"
        else:
            after = resident_fraction(path)
            if after is None or after <= STILL_CACHED:
                return PageCacheDrop("drop_caches", before, after, "dropped (the whole machine's "
                                                                   "page cache, as asked)")
            why = "the page cache kept it even after dropping the whole machine's"
    return PageCacheDrop("none", before, after,
                         f"not measured: {after:.0%} of the file stayed cached ({why})")


def mapped_by_others(path: Path) -> bool:
    """True when another process has the file mapped (Linux /proc; False where unknown)."""
    target, own = str(path.resolve()), str(os.getpid())
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if maps.parent.name != own and target in maps.read_text(errors="replace"):
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def measure_memory_bandwidth(size_mb: int = 256, rounds: int = BANDWIDTH_ROUNDS,
                             threads: int = 1) -> float:
    """Read bandwidth in GB/s: best of `rounds` passes over a buffer, split across threads."""
    import numpy

    # Several times a typical last-level cache, so the reads come from DRAM.
    buffer = numpy.ones(size_mb * MB // 8)
    parts = numpy.array_split(buffer, max(1, threads))
    best = float("inf")
    for _ in range(rounds):
        start = threading.Event()
        # max() is numpy's cheapest full read (vectorised compare, no pairwise-sum bookkeeping)
        # and releases the GIL, so threads read in parallel like llama.cpp's do.
        workers = [threading.Thread(target=_read_after, args=(start, part)) for part in parts]
        for worker in workers:
            worker.start()
        began = time.perf_counter()
        start.set()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - began)
    return buffer.nbytes / best / 1e9


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest cache (Linux sysfs), or None where unknown."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text(encoding="ascii").strip().upper()
        except OSError:
            continue
        scale = {"K": KIB, "M": MIB}.get(text[-1:], 1)
        if text.rstrip("KM").isdigit():
            sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=None)


def _read_after(start: threading.Event, part: NDArray[numpy.float64]) -> None:
    start.wait()
    part.max()


def _load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return (0.0, 0.0, 0.0)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": round(min(values), 4), "max": round(max(values), 4),
            "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def decode_ceiling(result: BenchResult) -> float | None:
    """Tokens/s the memory bandwidth allows: bandwidth / (weights + KV cache read per token)."""
    if not result.bandwidth_gb_per_s:
        return None
    average_depth = result.decode_prompt_tokens + result.settings.gen_tokens / 2
    per_token = result.weights_read_per_token + result.kv_bytes_per_position * average_depth
    return result.bandwidth_gb_per_s * 1e9 / per_token


def bench_record(result: BenchResult) -> dict[str, Any]:
    """The `--json` object: medians at the top, spreads, and every measurement under `runs`."""
    metrics = {
        "prefill_tokens_per_s": result.values("prefill"),
        "decode_tokens_per_s": result.values("decode"),
        "ttft_s": result.values("prefill", "ttft_s"),
        "load_s": result.values("load", "seconds", cache="warm"),
        "peak_rss_mb": result.values("prefill", "peak_rss_mb")
        + result.values("decode", "peak_rss_mb"),
    }
    ceiling = decode_ceiling(result)
    decode = _median(metrics["decode_tokens_per_s"])
    cold = result.values("load", "seconds", cache="cold")
    return {
        "model": str(result.model_path),
        "model_size_mb": round(result.model_bytes / MB, 1),
        "prompt_tokens": result.settings.prompt_tokens,
        "gen_tokens": result.settings.gen_tokens,
        "decode_prompt_tokens": result.decode_prompt_tokens,  # the depth decode starts at
        "repetitions": result.settings.repetitions,
        "n_ctx": result.n_ctx, "threads": result.threads, "backend": result.backend,
        "flash_attn": result.flash_attn, "cache_type": result.cache_type,
        "draft": result.settings.draft,
        "draft_acceptance": _median(result.values("decode", "draft_acceptance")),
        **{name: _median(values) for name, values in metrics.items()},
        "load_cold_s": _median(cold),
        "kv_cache_mb": round(result.kv_bytes_per_position * result.n_ctx / MB, 1),
        "spread": {name: _spread(values) for name, values in metrics.items()},
        "page_cache": asdict(result.page_cache) if result.page_cache else None,
        "memory_bandwidth_gb_per_s": _round(result.bandwidth_gb_per_s),
        "weights_read_per_token_mb": round(result.weights_read_per_token / MB, 1),
        "cpu_cache_mb": round(result.cache_bytes / MB, 1) if result.cache_bytes else None,
        "decode_ceiling_tokens_per_s": _round(ceiling),
        "decode_fraction_of_ceiling": _round(decode / ceiling if decode and ceiling else None),
        "load_average": [round(value, 2) for value in result.load_average],
        "interrupted": result.interrupted,
        "runs": [asdict(measurement) for measurement in result.measurements],
    }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, median, spread or note) rows for the table `localchat bench` prints."""
    spread = record["spread"]

    def span(name: str, unit: str, digits: int) -> str:
        values = spread.get(name)
        return f"{values['min']:,.{digits}f} - {values['max']:,.{digits}f} {unit}" if values else ""

    def value(name: str, unit: str, digits: int) -> str:
        found = record.get(name)
        return f"{found:,.{digits}f} {unit}" if found is not None else "-"

    def megabytes(name: str) -> str:  # as render.format_bytes writes sizes everywhere else
        found = record.get(name)
        return format_bytes(found * MB) if found is not None else "-"

    page_cache = record["page_cache"]
    if page_cache is None:
        cold_note = "not measured"
    elif record["load_cold_s"] is None:
        cold_note = page_cache["note"]  # says why it was not measured
    else:
        cold_note = f"{page_cache['method']}: {page_cache['note']}"
    fraction = record["decode_fraction_of_ceiling"]
    reached = f"decode reaches {fraction:.0%} of it" if fraction is not None else ""
    if reached and (record["cpu_cache_mb"] or 0) >= record["weights_read_per_token_mb"]:
        reached += (f"; the weights fit in the CPU's {megabytes('cpu_cache_mb')} cache, "
                    "so decode can beat this DRAM ceiling")
    return [
        (f"prefill ({record['prompt_tokens']} tokens)",
         value("prefill_tokens_per_s", "tok/s", 1), span("prefill_tokens_per_s", "tok/s", 1)),
        (f"decode ({record['gen_tokens']} tokens)",
         value("decode_tokens_per_s", "tok/s", 1), span("decode_tokens_per_s", "tok/s", 1)),
        ("time to first token", value("ttft_s", "s", 3), span("ttft_s", "s", 3)),
        ("load, warm page cache", value("load_s", "s", 3), span("load_s", "s", 3)),
        ("load, cold page cache", value("load_cold_s", "s", 3), cold_note),
        ("peak resident memory", megabytes("peak_rss_mb"),
         f"model file {megabytes('model_size_mb')} + KV cache {megabytes('kv_cache_mb')}"
         + (f" ({record['cache_type']})" if record["cache_type"] != "f16" else "")),
        ("memory read bandwidth", value("memory_bandwidth_gb_per_s", "GB/s", 1),
         f"{record['threads']} threads, best of {BANDWIDTH_ROUNDS}"),
        ("decode ceiling from bandwidth", value("decode_ceiling_tokens_per_s", "tok/s", 1),
         reached),
        ("set-up", f"{record['threads']} threads, {record['backend']}, ctx {record['n_ctx']:,}",
         f"flash attention {'on' if record['flash_attn'] else 'off'}, draft {record['draft']}"
         + (f" ({record['draft_acceptance']:.0%} accepted)"
            if record["draft_acceptance"] is not None else "")),
        ("load average", " ".join(f"{value:.2f}" for value in record["load_average"]),
         "other busy processes make every figure lower and noisier"),
    ]
