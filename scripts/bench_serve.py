#!/usr/bin/env python3
"""`localchat serve` under load: requests per second and time to first token for 1, 4 and 16
concurrent clients, memory with one and two models loaded, and the time to switch models.

    .venv/bin/python scripts/bench_serve.py [--model PATH] [--requests 32] [--threads N]

The server runs in a subprocess on 127.0.0.1 with its own user directory, serving the test model
(SmolLM2-135M Q4_1, scripts/fetch_test_model.py) and, for the memory and switch figures, a copy
of it under another name (a real copy: its pages are its own). Each request streams a short
prompt's reply of exactly 32 tokens (ignore_eos); time to first token is measured by the client,
queueing included: the server answers one request per model at a time, so with 16 clients the
last one waits for 15 replies. Warm-up first, as nanoGPT's bench does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_process import COPY_ID, ServeProcess, environment, plant_models  # noqa: E402

PROMPT = "Write a short poem about the sea."
TOKENS = 32


def stream_once(port: int, model: str) -> tuple[float, float]:
    """(time to the first text, whole time) of one streamed reply of TOKENS tokens."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0.7,
                       "stream": True})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    for line in response:
        if first is None and line.startswith(b"data: ") and b'"content":"' in line \
                and b'"content":""' not in line:
            first = time.perf_counter() - started
    connection.close()
    assert response.status == 200 and first is not None
    return first, time.perf_counter() - started


def load_round(port: int, model: str, clients: int, requests: int) -> dict[str, float]:
    """`requests` replies from `clients` concurrent clients."""
    ttfts: list[float] = []
    lock = threading.Lock()
    remaining = [requests]

    def client() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            first, _ = stream_once(port, model)
            with lock:
                ttfts.append(first)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ttfts.sort()
    return {"clients": clients, "requests": requests, "rps": requests / wall,
            "tok_per_s": requests * TOKENS / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ollama_generate(port: int, model: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/api/generate", body=json.dumps(
        {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}))
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file (default: the test model)")
    parser.add_argument("--requests", type=int, default=32, help="replies per round")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: physical cores)")
    args = parser.parse_args()
    model = args.model or Path(subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_test_model.py")], check=True,
        capture_output=True, text=True).stdout.strip())
    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        plant_models(home, model)  # smollm2, and a copy of it as a second model (own pages)
        first_id, second_id = "smollm2", COPY_ID
        env = environment(home)
        os.chdir(ROOT)

        # throughput and first token: one model
        serve = ServeProcess(["smollm2", "--port", "0", "--queue", "64", *threads],
                             env).started()
        try:
            for _ in range(2):
                stream_once(serve.port, first_id)  # warm-up
            rounds = [load_round(serve.port, first_id, clients, args.requests)
                      for clients in (1, 4, 16)]
        finally:
            serve.stop()

        # memory and switching: two models
        serve = ServeProcess(["--port", "0", "--max-loaded", "1", *threads], env).started()
        try:
            pid = serve.process.pid
            idle = rss_mib(pid)
            ollama_generate(serve.port, first_id)
            one = rss_mib(pid)
            switches = []
            for name in (second_id, first_id, second_id, first_id):
                started = time.perf_counter()
                answer = ollama_generate(serve.port, name)
                switches.append((time.perf_counter() - started, answer["load_duration"] / 1e9))
            stays = []
            for _ in range(3):
                started = time.perf_counter()
                ollama_generate(serve.port, first_id)
                stays.append(time.perf_counter() - started)
        finally:
            serve.stop()
        serve = ServeProcess(["smollm2", COPY_ID, "--port", "0", *threads], env).started()
        try:
            for name in (first_id, second_id):
                ollama_generate(serve.port, name)
            two = rss_mib(serve.process.pid)
        finally:
            serve.stop()

    print(f"localchat serve, {model.name}, {TOKENS} tokens out, {args.requests} requests a round")
    print("| clients | requests/s | tokens/s | first token p50 | first token p95 |")
    print("| --- | --- | --- | --- | --- |")
    for row in rounds:
        print(f"| {row['clients']} | {row['rps']:.2f} | {row['tok_per_s']:.0f} | "
              f"{row['ttft_p50'] * 1000:.0f} ms | {row['ttft_p95'] * 1000:.0f} ms |")
    print(f"memory (RSS): {idle:.0f} MiB serving, nothing loaded; {one:.0f} MiB with 1 model; "
          f"{two:.0f} MiB with 2 (the second a copy of the first)")
    request_s = statistics.median(t for t, _ in switches)
    load_s = statistics.median(s for _, s in switches)
    print(f"switching models (--max-loaded 1): a 1-token request that unloads one model and "
          f"loads the other takes {request_s * 1000:.0f} ms (load {load_s * 1000:.0f} ms), one "
          f"that finds its model loaded {statistics.median(stays) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
