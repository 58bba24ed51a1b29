#!/usr/bin/env python3
"""localchat beside native llama.cpp, on the same model, threads and sizes.

Builds `llama-bench` and `llama-cli` from the llama.cpp source vendored in the installed
llama-cpp-python version, with the CMake flags scripts/llama_build_flags.py prints (the ones
the Python binding was built with), and caches the build under
~/.cache/localchat-build/native-<version>-<hash of the flags>. Then it runs:

- `llama-bench` (kernels only, no sampling) beside `localchat bench --json`: prefill and decode;
- `llama-cli -st --simple-io --temp 0 --ignore-eos -n N` (end to end, sampling and printing
  included) beside `localchat run --ignore-eos -n N --json`, at each N of --gen;

and prints every figure with the ratio localchat / native.

    .venv/bin/python scripts/bench_native.py MODEL.gguf --threads 2
    .venv/bin/python scripts/bench_native.py MODEL.gguf --task grounded   # shipped workloads
    .venv/bin/python scripts/bench_native.py --build-only     # just build (and cache) the tools
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LOCALCHAT_BUILD_CACHE", Path.home() / ".cache" / "localchat-build"))
TARGETS = ("llama-bench", "llama-cli")
# Only the two tools: no tests, examples, web UI or network code. llama-cli is built on the
# server library in this llama.cpp, hence LLAMA_BUILD_SERVER; the UI options keep its build
# from downloading prebuilt web assets.
FIXED_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)
# Real prose, repeated, so the end-to-end runs process ordinary text.
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Row:
    """One compared figure."""

    label: str
    localchat: float | None
    native: float | None

    @property
    def ratio(self) -> float | None:
        """localchat / native, or None when either side is missing."""
        if not self.localchat or not self.native:
            return None
        return self.localchat / self.native


# --- parsers (tested on canned output in tests/test_bench.py) ---------------------------

def parse_llama_bench_json(text: str) -> dict[str, float]:
    """{"pp": t/s, "tg": t/s} from `llama-bench -o json` output (a JSON array of tests)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench output")
    tests, _ = json.JSONDecoder().raw_decode(text[start:])  # stderr's log may follow
    rates: dict[str, float] = {}
    for test in tests:
        kind = "pp" if test.get("n_prompt", 0) and not test.get("n_gen", 0) else "tg"
        if test.get("n_prompt", 0) and test.get("n_gen", 0):
            kind = "pg"
        rates[kind] = float(test["avg_ts"])
    return rates


_GENERATION = re.compile(r"Generation:\s*([0-9.]+)\s*t/s")
_EVAL_LINE = re.compile(r"^\S*\s*eval time\s*=.*?([0-9.]+) tokens per second", re.MULTILINE)


def parse_llama_cli_generation(text: str) -> float:
    """Generation tokens/s from llama-cli's output: "Generation: X t/s", else its eval timing."""
    found = _GENERATION.findall(text)
    if found:
        return float(found[-1])
    lines = [line for line in text.splitlines() if "prompt eval time" not in line]
    found = _EVAL_LINE.findall("\n".join(lines))
    if found:
        return float(found[-1])
    raise ValueError("no generation speed in llama-cli output")


# --- build ------------------------------------------------------------------------------

def build_flags() -> str:
    """The CMake arguments scripts/llama_build_flags.py prints for this machine."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_build_flags.py")],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().partition("\t")[2]


def binding_version() -> str:
    """The installed llama-cpp-python version."""
    return metadata.version("llama-cpp-python")


def vendored_source(version: str, explicit: Path | None) -> Path:
    """llama.cpp as vendored in llama-cpp-python==version: the sdist, downloaded once."""
    if explicit:
        return explicit
    source_root = CACHE / "src"
    tree = source_root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    source_root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    ":all:", f"llama-cpp-python=={version}", "-d", str(source_root)], check=True)
    archive = next(source_root.glob(f"llama_cpp_python-{version}.tar.gz"))
    with tarfile.open(archive) as sdist:
        sdist.extractall(source_root, filter="data")
    return tree


def build_tools(source: Path | None) -> Path:
    """Build llama-bench and llama-cli (cached); return the directory holding them."""
    version, flags = binding_version(), build_flags()
    digest = hashlib.sha256(" ".join([*FIXED_ARGS, flags]).encode()).hexdigest()[:12]
    build = CACHE / f"native-{version}-{digest}"
    bin_dir = build / "bin"
    stamp = build / "built.ok"
    if stamp.exists() and all((bin_dir / target).exists() for target in TARGETS):
        return bin_dir
    tree = vendored_source(version, source)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building {', '.join(TARGETS)} from {tree} into {build} (flags: {flags})",
          file=sys.stderr)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *generator, *FIXED_ARGS,
                    *flags.split()], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS,
                    "-j", str(os.cpu_count() or 2)], check=True)
    stamp.write_text(f"{version}\n{flags}\n")
    return bin_dir


# --- runs -------------------------------------------------------------------------------

def run_text(command: list[str], timeout: float = 1800) -> tuple[str, str]:
    """(stdout, stderr) of a command that must succeed."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout, result.stderr


def localchat(*args: str) -> dict:
    """One `localchat ... --json` run of this checkout's package."""
    out, _ = run_text([sys.executable, "-m", "localchat", *args, "--json"])
    return json.loads(out)


def compare_bench(bin_dir: Path, model: str, threads: int, prompt: int, gen: int,
                  repetitions: int, flash_attn: bool, extra: Extra) -> list[Row]:
    """localchat bench vs llama-bench: prefill (pp) and decode (tg), same flash attention and
    cache type; tg at the depth localchat's decode starts at (its short chat prompt)."""
    fa = "on" if flash_attn else "off"
    ours = localchat("bench", model, "-p", str(prompt), "-n", str(gen),
                     "--repetitions", str(repetitions), "--threads", str(threads),
                     "--flash-attn" if flash_attn else "--no-flash-attn", *extra.localchat)
    depth = str(ours.get("decode_prompt_tokens") or 0)
    common = ["-m", model, "-t", str(threads), "-r", str(repetitions), "-fa", fa,
              *extra.native, "-o", "json"]
    pp = parse_llama_bench_json(run_text([str(bin_dir / "llama-bench"), "-p", str(prompt),
                                          "-n", "0", *common])[0])
    tg = parse_llama_bench_json(run_text([str(bin_dir / "llama-bench"), "-p", "0",
                                          "-n", str(gen), "-d", depth, *common])[0])
    return [Row(f"prefill pp{prompt} fa={fa} (bench)", ours["prefill_tokens_per_s"],
                pp.get("pp")),
            Row(f"decode tg{gen}@d{depth} fa={fa} (bench)", ours["decode_tokens_per_s"],
                tg.get("tg"))]


@dataclass(frozen=True)
class Extra:
    """The flags both sides take for --cache-type, and localchat's --draft."""

    localchat: tuple[str, ...]
    native: tuple[str, ...]

    @classmethod
    def of(cls, cache_type: str, draft: str) -> Extra:
        return cls(("--cache-type", cache_type, "--draft", draft),
                   ("-ctk", cache_type, "-ctv", cache_type))


def compare_tasks(bin_dir: Path, model: str, threads: int, ctx: int, group: str,
                  extra: Extra) -> list[Row]:
    """The shipped `bench --task` workloads: `localchat run` with drafts on and off vs
    `llama-cli` on the same message and token cap (--draft's mode, ngram for off); the texts
    agree where the mode keeps them exact."""
    import tempfile

    sys.path.insert(0, str(ROOT))  # this checkout's workloads
    from localchat.bench_tasks import tasks

    mode = extra.localchat[3] if extra.localchat[3] != "off" else "ngram"
    rows = []
    for task in tasks(group):
        message = task.message()
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as prompt:
            prompt.write(message)
            prompt.flush()
            native = parse_llama_cli_generation("\n".join(run_text([
                str(bin_dir / "llama-cli"), "-m", model, "-st", "--simple-io", "--temp", "0",
                "-n", str(task.max_tokens), "-t", str(threads), "-c", str(ctx), "-fa", "on",
                *extra.native, "-f", prompt.name])))
        runs = {}
        for draft in ("off", mode):
            runs[draft] = localchat("run", model, message, "-n", str(task.max_tokens),
                                    "--temperature", "0", "--threads", str(threads), "--ctx",
                                    str(ctx), "--no-history", *extra.localchat[:2],
                                    "--draft", draft)
        same = runs["off"]["text"] == runs[mode]["text"]
        accepted = runs[mode].get("draft_acceptance")
        note = f"{task.kind}, {runs[mode]['completion_tokens']} tok, same text: " \
               f"{'yes' if same else 'NO'}, accepted {accepted}"
        print(f"  {task.name}: {note}", flush=True)
        rows.append(Row(f"{task.name} draft {mode} (run/llama-cli)",
                        runs[mode]["decode_tokens_per_s"], native))
        rows.append(Row(f"{task.name} draft off (run/llama-cli)",
                        runs["off"]["decode_tokens_per_s"], native))
    return rows


def compare_run(bin_dir: Path, model: str, threads: int, gen: int, ctx: int,
                flash_attn: bool, extra: Extra) -> Row:
    """localchat run --ignore-eos vs llama-cli --ignore-eos: end-to-end generation speed."""
    fa = "on" if flash_attn else "off"
    native = parse_llama_cli_generation("\n".join(run_text([
        str(bin_dir / "llama-cli"), "-m", model, "-st", "--simple-io", "--temp", "0",
        "--ignore-eos", "-n", str(gen), "-t", str(threads), "-c", str(ctx), "-fa", fa,
        *extra.native, "-p", PROMPT])))
    ours = localchat("run", model, PROMPT, "--ignore-eos", "-n", str(gen), "--temperature", "0",
                     "--threads", str(threads), "--ctx", str(ctx), "--no-history",
                     "--flash-attn" if flash_attn else "--no-flash-attn", *extra.localchat)
    if ours["completion_tokens"] != gen:
        raise SystemExit(f"localchat run made {ours['completion_tokens']} tokens, not {gen}")
    return Row(f"decode n={gen} fa={fa} (run/llama-cli)", ours["decode_tokens_per_s"], native)


def best_rows(rounds: list[list[Row]]) -> list[Row]:
    """Per figure, each side's best over the rounds: other processes only ever slow a run."""
    best = []
    for same in zip(*rounds, strict=True):
        ours = [row.localchat for row in same if row.localchat]
        native = [row.native for row in same if row.native]
        best.append(Row(same[0].label, max(ours, default=None), max(native, default=None)))
    return best


def format_rows(rows: list[Row]) -> str:
    """A plain table: figure, localchat, native, ratio."""
    lines = [f"{'figure':40} {'localchat t/s':>14} {'native t/s':>11} {'ratio':>7}"]
    for row in rows:
        ours = f"{row.localchat:.1f}" if row.localchat else "-"
        native = f"{row.native:.1f}" if row.native else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio else "-"
        lines.append(f"{row.label:40} {ours:>14} {native:>11} {ratio:>7}")
    return "\n".join(lines)


def main() -> int:
    """Parse arguments, build (cached), compare, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="path to a .gguf file")
    parser.add_argument("--threads", "-t", type=int, default=2)
    parser.add_argument("-p", "--prompt-tokens", type=int, default=512)
    parser.add_argument("-n", "--gen-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--gen", type=int, nargs="+", default=[128, 256, 2048],
                        help="generated tokens for the end-to-end runs")
    parser.add_argument("--ctx", type=int, default=4096, help="context for the end-to-end runs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat everything; the summary keeps each side's best")
    parser.add_argument("--flash-attn", choices=("on", "off", "both"), default="both",
                        help="flash attention on both sides (llama.cpp's default is on)")
    parser.add_argument("--cache-type", choices=("f16", "q8_0", "q4_0"), default="f16",
                        help="KV cache type on both sides")
    parser.add_argument("--draft", choices=("auto", "ngram", "off"), default="auto",
                        help="localchat's prompt-lookup drafts (llama.cpp's tools have none)")
    parser.add_argument("--task", choices=("grounded", "open", "all"),
                        help="instead: the shipped `bench --task` workloads, run vs llama-cli")
    parser.add_argument("--source", type=Path, help="a llama.cpp tree (default: the sdist's)")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    bin_dir = build_tools(args.source)
    print(f"native tools: {bin_dir}", file=sys.stderr)
    if args.build_only:
        return 0
    if not args.model:
        parser.error("MODEL is required unless --build-only")
    rounds = []
    for number in range(1, args.rounds + 1):
        load = os.getloadavg()
        print(f"round {number}/{args.rounds}, load average {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}", flush=True)
        rows = []
        extra = Extra.of(args.cache_type, args.draft)
        if args.task:
            rows += compare_tasks(bin_dir, args.model, args.threads, args.ctx, args.task, extra)
        for flash_attn in {"on": [True], "off": [False], "both": [True, False]}[args.flash_attn]:
            if args.task:
                break
            rows += compare_bench(bin_dir, args.model, args.threads, args.prompt_tokens,
                                  args.gen_tokens, args.repetitions, flash_attn, extra)
            rows += [compare_run(bin_dir, args.model, args.threads, gen, args.ctx, flash_attn,
                                 extra) for gen in args.gen]
        print(format_rows(rows), flush=True)
        rounds.append(rows)
    if args.rounds > 1:
        print(f"best of {args.rounds} rounds")
        print(format_rows(best_rows(rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
