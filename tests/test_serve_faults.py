"""The load and fault suite against a running `localchat serve` on 127.0.0.1: concurrent
clients, stalled connections, disconnects mid-stream and in the queue, malformed, deeply nested
and oversized bodies, unknown models, a full queue. Afterwards the server still answers and its
log holds no traceback. Bounded: a few hundred sockets, a few seconds each."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest
from serve_process import ServeProcess, environment

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1"
CLIENT_TIMEOUT = 2  # --client-timeout: stalled clients are cut after this
THREADS = ["--threads", "1"]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("faults-home")
    serve = ServeProcess([str(smollm2_path), "--port", "0", "--client-timeout",
                          str(CLIENT_TIMEOUT), "--queue", "40", *THREADS],
                         environment(home)).started()
    yield serve
    assert serve.stop(signal.SIGTERM) == 130  # `kill` ends it as Ctrl-C does
    assert not any("Traceback" in line for line in serve.log), "\n".join(serve.log)


def post(port: int, path: str, body: bytes | str | dict, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict, bytes]:
    data = json.dumps(body) if isinstance(body, dict) else body
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def chat_body(prompt: str, tokens: int = 4, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": tokens, **extra}


def answers_normally(server) -> None:
    status, _, body = post(server.port, "/v1/chat/completions", chat_body("hi", 2), timeout=60)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


def test_32_concurrent_clients_each_get_their_own_intact_answer(server):
    prompts = ["What is the capital of Italy?", "Say something about cats.",
               "Name a colour.", "Count to three."]
    alone = {prompt: json.loads(post(server.port, "/v1/chat/completions", chat_body(prompt))[2])
             ["choices"][0]["message"]["content"] for prompt in prompts}
    results: dict[int, tuple[int, str]] = {}

    def ask(index: int) -> None:
        prompt = prompts[index % len(prompts)]
        if index % 2:  # half through Ollama's API
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                    "stream": False, "options": {"temperature": 0, "num_predict": 4}}
            status, _, raw = post(server.port, "/api/chat", body)
            results[index] = (status, json.loads(raw)["message"]["content"])
        else:
            status, _, raw = post(server.port, "/v1/chat/completions", chat_body(prompt))
            results[index] = (status, json.loads(raw)["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 32
    for index, (status, text) in results.items():
        assert (status, text) == (200, alone[prompts[index % len(prompts)]]), index


def test_500_stalled_connections_are_cut_and_others_are_answered_meanwhile(server):
    mark = len(server.drain())
    sockets = []
    for index in range(500):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        if index % 5 in (1, 2):  # half a request head
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        elif index % 5 == 3:  # the head, then part of the body
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        sockets.append(sock)  # the rest: connected, silent
    started = time.monotonic()
    answers_normally(server)
    assert time.monotonic() - started < CLIENT_TIMEOUT + 30
    time.sleep(CLIENT_TIMEOUT + 1.5)
    closed = timed_out = 0
    for sock in sockets:
        sock.settimeout(10)
        try:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            data = b"?"
        finally:
            sock.close()
        closed += 1
        timed_out += data.startswith(b"HTTP/1.1 408")
    assert closed == 500 and timed_out == 100  # those mid-body get a 408 first
    answers_normally(server)
    lines = server.drain()[mark:]
    assert sum(" 408 " in line for line in lines) == 100
    assert len(lines) < 150  # a silent client costs no log line


def open_stream(port: int, path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = json.dumps(body)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n{data}").encode())
    return sock


def test_clients_that_leave_mid_stream_or_in_the_queue_stop_their_generation(server):
    mark = len(server.drain())
    long = chat_body("Count to one hundred.", 64, stream=True, ignore_eos=True)
    for path, body, marker in [
            ("/v1/chat/completions", long, b"data: "),
            ("/api/chat", {"model": MODEL, "messages": long["messages"],
                           "options": {"num_predict": 64, "temperature": 0}}, b'"done":false')]:
        for _ in range(4):
            sock = open_stream(server.port, path, body)
            received = b""
            while received.count(marker) < 3:
                received += sock.recv(4096)
            sock.close()
    holder = open_stream(server.port, "/v1/chat/completions", long)  # keeps the model busy
    holder.recv(4096)
    queued = open_stream(server.port, "/v1/chat/completions", chat_body("hi"))
    time.sleep(0.5)
    queued.close()  # leaves while waiting for its turn
    holder.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gone = [line for line in server.drain()[mark:] if "client went away" in line]
        if len(gone) == 10:
            break
        time.sleep(0.2)
    assert len(gone) == 10, server.log[mark:]
    for line in gone:
        assert " 499 · " in line
        if "reply " in line:
            assert int(line.split("reply ")[1].split(" tok")[0]) < 64 and "interrupted" in line
    assert sum("reply " not in line for line in gone) == 1  # the one that never started
    answers_normally(server)


@pytest.mark.parametrize(("raw", "status", "words"), [
    (b"GARBAGE\r\n\r\n", 400, b"Invalid HTTP request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", 413,
     b"the limit is"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
     400, b""),
])
def test_broken_http_is_answered_and_closed(server, raw, status, words):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(f"HTTP/1.1 {status}".encode()) and words in answer, answer[:300]


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe", 400, "not valid JSON"),
    ("/v1/chat/completions", b"", 400, "empty"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nests"),
    ("/api/chat", b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 100_000, 400,
     "nests"),
    ("/v1/chat/completions", json.dumps(chat_body("hi", max_tokens="4")), 400, "integer"),
    ("/v1/chat/completions", json.dumps({"model": "nonesuch", "messages": []}), 404,
     "nonesuch"),
    ("/api/generate", json.dumps({"model": "qwen2.5", "prompt": "hi"}), 404, "qwen2.5"),
    ("/v1/nowhere", b"{}", 404, "no route"),
    ("/api/pull", json.dumps({"model": "smollm2"}), 501, "localchat pull"),
])
def test_malformed_bodies_and_unknown_models_get_json_errors(server, path, body, status, words):
    answer_status, headers, raw = post(server.port, path, body)
    assert answer_status == status and headers["content-type"] == "application/json"
    payload = json.loads(raw)
    message = payload["error"] if path.startswith("/api/") else payload["error"]["message"]
    assert words in message


def test_an_oversized_body_is_refused_while_it_streams_in(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunk = b"x" * (1 << 20)

    def body():
        for _ in range(17):
            yield chunk

    try:
        connection.request("POST", "/v1/chat/completions", body=body(),
                           headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        status = connection.getresponse().status
    except (BrokenPipeError, ConnectionResetError):
        status = 413  # closed on us after its 413, before the rest was sent
    finally:
        connection.close()
    assert status == 413


def read_all(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(30)
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def test_a_full_queue_is_429_and_ctrl_c_lets_replies_end_cleanly(smollm2_path, tmp_path):
    serve = ServeProcess([str(smollm2_path), "--port", "0", "--queue", "1", *THREADS],
                         environment(tmp_path)).started()
    try:
        holder = open_stream(serve.port, "/v1/chat/completions",
                             chat_body("Count.", 3000, stream=True, ignore_eos=True))
        holder.recv(4096)
        queued = open_stream(serve.port, "/api/chat", {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]})
        time.sleep(0.3)
        status, headers, raw = post(serve.port, "/v1/chat/completions", chat_body("hi", 1))
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert json.loads(raw)["error"]["type"] == "rate_limit_error"
        status, _, raw = post(serve.port, "/api/generate", {"model": MODEL, "prompt": "hi"})
        assert status == 429 and "queued" in json.loads(raw)["error"]
        started = time.monotonic()
        code = serve.stop()  # Ctrl-C: 5 s of grace for the reply in flight, then it is stopped
    finally:
        code = serve.stop()
    assert code == 130 and time.monotonic() - started < 15
    streamed = read_all(holder)
    assert streamed.endswith(b"0\r\n\r\n")  # a whole chunked body, not a cut connection
    assert b"the server is stopping" in streamed and b'"content":' in streamed
    assert b"503" in read_all(queued)  # its turn never came
    assert any("server stopping, generation stopped" in line for line in serve.log)
    assert not any("Traceback" in line or "Exception" in line for line in serve.log), serve.log


def test_still_answering_after_all_of_it(server):
    answers_normally(server)
