"""`localchat show` and `localchat run` on hundreds of malformed model files, each in a process.

tests/fuzz_cli_driver.py writes each variant (tests/gguf_factory.malformed_variants: truncations,
bit flips, huge counts and sizes, bad types, overlapping or misaligned tensors, bad UTF-8, bad
alignment) and runs both commands on it in forked children, so a crash in llama.cpp would show
as a signal here instead of taking the test run down. Every command must end by itself within
seconds with exit code 0 or 1; a refusal is one `error:` line and never a traceback. Variants
that break the file's structure must be refused before llama.cpp sees them (exit 1 for both).
Bit flips that leave a consistent file (a letter in a token, a value in a float) may be accepted:
`show` then prints the file, and `run` either answers or reports llama.cpp's own refusal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.gguf_factory import write_tiny_gguf

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("fuzz_cli_driver.py")
RUN = ["run", "hi", "--max-tokens", "2", "--temperature", "0", "--no-history", "--ctx", "256",
       "--threads", "1"]
COMMANDS = [["show"], RUN]


def fuzz(base: Path, tmp_path: Path, *, header_bytes: int, seed: int, flips: int) -> list[dict]:
    spec = {"base": str(base), "header_bytes": header_bytes, "seed": seed, "flips": flips,
            "work": str(tmp_path), "commands": COMMANDS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "spec.json")],
                            capture_output=True, text=True, timeout=1500, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def check(records: list[dict], name: str) -> str:
    assert records
    for record in records:
        where = f"{record['command']} on '{record['label']}'"
        assert record["signal"] is None, f"{where}: killed by signal {record['signal']}"
        assert record["code"] is not None, f"{where}: still running after the time limit"
        assert record["code"] in (0, 1), f"{where}: exit {record['code']}: {record['stderr']}"
        assert "Traceback" not in record["stderr"], f"{where}: {record['stderr']}"
        if record["code"] == 1:
            # A flipped trained length can earn a --ctx warning first; the refusal is one line.
            lines = [line for line in record["stderr"].strip().splitlines()
                     if not line.startswith("warning: --ctx ")]
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{where}: {lines}"
            assert "(a bug: " not in lines[0], f"{where}: reached the CLI's catch-all: {lines}"
            assert record["stdout"] == "", where
        elif record["command"] == "show":
            assert record["stdout"].startswith("name "), where
        if record["must_refuse"]:
            assert record["code"] == 1, f"{where}: accepted a broken file"
            assert "llama.cpp could not load" not in record["stderr"], f"{where}: reached it"
    variants = len(records) // len(COMMANDS)
    outcomes = Counter((r["command"], "refused" if r["code"] else "accepted") for r in records)
    llama_refusals = sum("llama.cpp could not load" in r["stderr"] for r in records)
    slowest = max(records, key=lambda r: r["seconds"])
    summary = (f"{name}: {variants} variants x show/run in child processes: "
               + ", ".join(f"{c} {o} {n}" for (c, o), n in sorted(outcomes.items()))
               + f"; {llama_refusals} refused by llama.cpp itself; no crash, no hang; slowest "
               f"{slowest['seconds']:.2f} s ({slowest['command']} on '{slowest['label']}')")
    print(summary)
    return summary


def test_fuzz_the_cli_with_a_tiny_model(tmp_path):
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    records = fuzz(base, tmp_path, header_bytes=0, seed=8, flips=150)
    summary = check(records, "tiny GGUF")
    assert len(records) // 2 >= 300, summary


def test_fuzz_the_cli_with_the_real_model(smollm2_path, tmp_path):
    # The variants rewrite the metadata and tensor table (the first 2 MB) and keep the size;
    # the weights read back as zeros, which is fine for a 2-token run.
    records = fuzz(smollm2_path, tmp_path, header_bytes=2 * 1024 * 1024, seed=2, flips=60)
    summary = check(records, "SmolLM2")
    assert len(records) // 2 >= 200, summary
    accepted_runs = [r for r in records if r["command"] == "run" and r["code"] == 0]
    assert accepted_runs, "no variant got as far as a model run: the harness is not exercising it"


def test_the_forked_children_behave_like_the_real_command(tmp_path):
    """The driver's children give the same exit code and message as the console script."""
    base = write_tiny_gguf(tmp_path / "tiny.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(base.read_bytes()[:100])
    spec_dir = tmp_path / "driver"
    spec_dir.mkdir()
    from tests import fuzz_cli_driver as driver

    for argv in (["show", str(broken)], ["run", str(broken), *RUN[1:]], ["show", str(base)]):
        real = subprocess.run([sys.executable, "-m", "localchat", *argv], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ))
        out, err = spec_dir / "out", spec_dir / "err"
        code, killed_by, _ = driver.run_child(argv, out, err)
        assert (code, killed_by) == (real.returncode, None)
        assert err.read_text() == real.stderr
        assert available(out.read_text()) == available(real.stdout)


def available(text: str) -> str:
    """`show` output with the free-memory figure blanked: it moves between two runs."""
    return re.sub(r"[0-9.]+ [kMGT]?B available now", "N available now", text)
