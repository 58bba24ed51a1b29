"""RemoteEngine against small stdlib servers that misbehave on purpose: no model needed."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli_runner import run_cli

from localchat.engine.protocol import Sampling
from localchat.engine.remote import (
    RemoteEngine,
    RemoteOptions,
    normalize_endpoint,
    remote_options,
)
from localchat.errors import EngineError, UsageError

GREEDY = Sampling(temperature=0, max_tokens=16)
HELLO = [{"role": "user", "content": "hi"}]


class FakeServer:
    """An HTTP server on a free loopback port; `routes` maps (method, path) to a handler."""

    def __init__(self, routes: dict) -> None:
        self.requests: list[dict] = []
        self.release = threading.Event()  # lets a deliberately hanging handler finish
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": body})
                routes[(self.command, self.path)](self)

            do_GET = do_POST = _handle

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # Polling every 50 ms, not the default 500: shutdown() waits for the next poll.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(routes: dict) -> FakeServer:
        server = FakeServer(routes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def send_json(handler, status: int, payload) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def models(*entries: dict):
    return lambda handler: send_json(handler, 200, {"object": "list", "data": list(entries)})


def start_events(handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True


def event(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(text: str | None = None, finish: str | None = None) -> dict:
    body = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": body, "finish_reason": finish}]}


def sse(*payloads, done: bool = True):
    def handle(handler) -> None:
        start_events(handler)
        for payload in payloads:
            handler.wfile.write(payload if isinstance(payload, bytes) else event(payload))
        if done:
            handler.wfile.write(b"data: [DONE]\n\n")
    return handle


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def collect(engine: RemoteEngine, sampling: Sampling = GREEDY) -> tuple[list[str], Exception]:
    pieces: list[str] = []
    try:
        for piece in engine.stream(HELLO, sampling):
            pieces.append(piece)
    except EngineError as exc:
        return pieces, exc
    return pieces, None


def test_streams_the_reply_and_takes_counts_from_usage(fake_server, monkeypatch):
    monkeypatch.setenv("LOCALCHAT_API_KEY", "s3cret-key")
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
             "prompt_tokens_details": {"cached_tokens": 3}}
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "qwen", "object": "model", "max_model_len": 32768},
                                      {"id": "other", "object": "model"}),
        ("POST", "/v1/chat/completions"): sse(
            b": keep-alive comment\r\n\r\n", delta(""), delta("Hel"),
            b"event: message\r\ndata: " + json.dumps(delta("lo")).encode() + b"\r\n\r\n",
            delta(finish="stop"), {"choices": [], "usage": usage}),
    })
    engine = RemoteEngine(remote_options(server.url, None, None))
    assert engine.info.model == "qwen"  # the first model listed
    assert engine.n_ctx == 32768 and engine.info.n_ctx_known
    pieces, error = collect(engine)
    assert error is None
    assert pieces == ["Hel", "lo"]
    stats = engine.last_stats
    assert (stats.prompt_tokens, stats.cached_tokens, stats.completion_tokens) == (7, 3, 2)
    assert not stats.tokens_estimated
    assert stats.finish_reason == "stop"
    assert stats.ttft_s > 0 and stats.decode_s >= 0
    sent = server.requests[-1]
    assert sent["headers"]["Authorization"] == "Bearer s3cret-key"
    assert sent["body"] == {"model": "qwen", "messages": HELLO, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0,
                            "max_tokens": 16}


def test_sampling_beyond_openai_goes_under_both_servers_names(fake_server):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): sse(delta("ok"), delta(finish="length")),
    })
    engine = RemoteEngine(remote_options(server.url, "m", None))
    sampling = Sampling(temperature=0.7, top_k=10, min_p=0.1, repeat_penalty=1.1, seed=5,
                        stop=("END",), ignore_eos=True, presence_penalty=0.5)
    pieces, error = collect(engine, sampling)
    assert (pieces, error) == (["ok"], None)
    body = server.requests[-1]["body"]
    assert body["top_k"] == 10 and body["min_p"] == 0.1 and body["top_p"] == 0.95
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.1
    assert body["seed"] == 5 and body["stop"] == ["END"] and body["ignore_eos"] is True
    assert body["presence_penalty"] == 0.5 and "frequency_penalty" not in body  # 0 is off
    assert "Authorization" not in server.requests[-1]["headers"]
    # without usage the counts fall back to what we saw and estimated
    assert engine.last_stats.completion_tokens == 1
    assert engine.last_stats.prompt_tokens == engine.count_tokens(HELLO)
    assert engine.last_stats.tokens_estimated  # and say so
    assert engine.last_stats.finish_reason == "length"


def test_refused_connection_is_one_line(monkeypatch):
    with pytest.raises(EngineError) as caught:
        RemoteEngine(remote_options(f"http://127.0.0.1:{free_port()}/v1", "m", None))
    assert "connection refused" in caught.value.message
    assert "\n" not in str(caught.value)


def test_slow_server_times_out_and_keeps_the_partial_reply(fake_server):
    def hang_after_one_piece(handler) -> None:
        start_events(handler)
        handler.wfile.write(event(delta("Once")))
        server.release.wait(10)

    server = fake_server({("GET", "/v1/models"): models({"id": "m"}),
                          ("POST", "/v1/chat/completions"): hang_after_one_piece})
    engine = RemoteEngine(RemoteOptions(server.url, "m", timeout_s=0.5))
    pieces, error = collect(engine)
    assert pieces == ["Once"]
    assert "no answer from" in error.message and "0.5 s" in error.message
    assert engine.last_stats.finish_reason == "interrupted"
    assert engine.last_stats.completion_tokens == 1


def test_slow_handshake_times_out(fake_server):
    server = fake_server({("GET", "/v1/models"): lambda handler: server.release.wait(10)})
    with pytest.raises(EngineError, match="no answer from .* within 0.3 s"):
        RemoteEngine(RemoteOptions(server.url, "m", timeout_s=0.3))


def test_server_error_500_carries_the_servers_words(fake_server):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): lambda handler: send_json(
            handler, 500, {"error": {"message": "CUDA error: out of memory\nat line 3"}}),
    })
    pieces, error = collect(RemoteEngine(remote_options(server.url, "m", None)))
    assert pieces == []
    assert "HTTP 500" in error.message and "CUDA error: out of memory at line 3" in error.message
    assert "\n" not in str(error)


def test_401_says_which_key_to_fix_without_showing_it(fake_server):
    def refuse(handler) -> None:
        given = handler.headers.get("Authorization", "")
        send_json(handler, 401, {"error": {"message": f"invalid key: {given}"}})

    server = fake_server({("GET", "/v1/models"): refuse})
    with pytest.raises(EngineError) as caught:
        RemoteEngine(remote_options(server.url, "m", "wrong-key-123"))
    text = str(caught.value)
    assert "refused the API key" in text and "HTTP 401" in text and "--api-key" in text
    assert "wrong-key-123" not in text  # the server echoed it; we blank it
    with pytest.raises(EngineError, match="wants an API key"):
        RemoteEngine(remote_options(server.url, "m", None))


@pytest.mark.parametrize("chunked", [False, True], ids=["connection-close", "chunked"])
def test_stream_closed_halfway_keeps_the_partial_reply(fake_server, chunked):
    def cut(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for text in ("The answer", " is"):
            data = event(delta(text))
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        if chunked:
            handler.wfile.write(b"40\r\ndata: {\"cho")  # a chunk that never finishes
        handler.close_connection = True

    server = fake_server({("GET", "/v1/models"): models({"id": "m"}),
                          ("POST", "/v1/chat/completions"): cut})
    engine = RemoteEngine(remote_options(server.url, None, None))
    pieces, error = collect(engine)
    assert pieces == ["The answer", " is"]
    assert error is not None and "closed" in error.message and "after 2 tokens" in error.message
    assert engine.last_stats.finish_reason == "interrupted"
    assert engine.last_stats.completion_tokens == 2


def test_error_event_mid_stream(fake_server):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): sse(delta("Hi"), {"error": {"message": "decode failed"}},
                                              done=False),
    })
    engine = RemoteEngine(remote_options(server.url, None, None))
    pieces, error = collect(engine)
    assert pieces == ["Hi"] and "failed mid-reply: decode failed" in error.message
    assert engine.last_stats.finish_reason == "interrupted"


def test_server_that_ignores_stream_still_answers(fake_server):
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole."},
                          "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
    server = fake_server({
        ("GET", "/v1/models"): lambda handler: send_json(handler, 404, {"detail": "Not Found"}),
        ("POST", "/v1/chat/completions"): lambda handler: send_json(handler, 200, reply),
    })
    engine = RemoteEngine(remote_options(server.url, "named", None))
    assert engine.info.model == "named"
    assert not engine.info.n_ctx_known  # no /models: the window is a guess
    assert collect(engine) == (["Whole."], None)
    assert engine.last_stats.completion_tokens == 2


def test_no_models_route_and_no_model_named_is_a_usage_error(fake_server):
    server = fake_server({("GET", "/v1/models"): lambda handler: send_json(handler, 404, {})})
    with pytest.raises(UsageError, match="lists no models"):
        RemoteEngine(remote_options(server.url, None, None))


def test_wrong_route_404_points_at_the_url(fake_server):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): lambda handler: send_json(
            handler, 404, {"error": {"message": "model 'm' not found"}}),
    })
    pieces, error = collect(RemoteEngine(remote_options(server.url, "m", None)))
    assert "was not found" in error.message and "model 'm' not found" in error.message
    assert "/v1" in error.hint


@pytest.mark.parametrize("url, expected", [
    ("http://gpu-box:8000/v1", "http://gpu-box:8000/v1"),
    ("http://gpu-box:8000/v1/", "http://gpu-box:8000/v1"),
    ("https://api.example.com", "https://api.example.com/v1"),
    ("http://[::1]:11434/", "http://[::1]:11434/v1"),
])
def test_endpoint_is_normalized(url, expected):
    assert normalize_endpoint(url) == expected


@pytest.mark.parametrize("url", ["ftp://host/v1", "gpu-box:8000", "http://user:pw@host/v1",
                                 "http://host/v1?key=1", "http://host:99999/v1"])
def test_bad_endpoint_is_a_usage_error(url):
    with pytest.raises(UsageError):
        normalize_endpoint(url)


def test_the_key_stays_out_of_reprs(monkeypatch):
    monkeypatch.setenv("LOCALCHAT_API_KEY", "env-secret")
    options = remote_options("http://h/v1", "m", None)
    assert options.api_key == "env-secret"
    assert "env-secret" not in repr(options)
    assert remote_options("http://h/v1", "m", "flag-secret").api_key == "flag-secret"
    monkeypatch.setenv("LOCALCHAT_API_KEY", "  ")
    assert remote_options("http://h/v1", "m", None).api_key is None


def test_token_counts_are_an_estimate_that_grows_with_the_text(fake_server):
    server = fake_server({("GET", "/v1/models"): models({"id": "m"})})
    engine = RemoteEngine(remote_options(server.url, None, None))
    short = engine.count_tokens([{"role": "user", "content": "hi"}])
    long = engine.count_tokens([{"role": "user", "content": "hi " * 400}])
    assert 0 < short < long and 250 < long < 350


def test_run_endpoint_prints_the_reply_and_json_counts(fake_server, isolated_home):
    usage = {"prompt_tokens": 11, "completion_tokens": 3}
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m", "max_model_len": 2048}),
        ("POST", "/v1/chat/completions"): sse(delta("Hello"), delta(" there"), delta(finish="stop"),
                                              {"choices": [], "usage": usage}),
    })
    secret = {"LOCALCHAT_API_KEY": "top-secret-value"}
    plain = run_cli("run", "--endpoint", server.url, "m", "hi", "--system", "Be brief.",
                    "--verbose", env=secret)
    assert plain.exit_code == 0, plain.stderr
    assert plain.stdout == "Hello there\n"
    assert server.requests[-1]["body"]["messages"][0] == {"role": "system",
                                                          "content": "Be brief."}
    as_json = run_cli("run", "--endpoint", server.url, "m", "hi", "--json", env=secret)
    record = json.loads(as_json.stdout)
    assert record["text"] == "Hello there"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 3)
    assert record["finish_reason"] == "stop" and record["n_ctx"] == 2048
    assert record["threads"] is None  # the server's business, not 0
    assert record["tokens_estimated"] is False  # the server's own usage
    for result in (plain, as_json):
        assert "top-secret-value" not in result.stdout + result.stderr
    files = [path for path in isolated_home.rglob("*") if path.is_file()]
    assert files  # the history was written...
    assert not any(b"top-secret-value" in path.read_bytes() for path in files)  # ...without it


def test_run_stop_reads_the_escapes_a_shell_passes_through(fake_server):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): sse(delta("ok"), delta(finish="stop")),
    })
    result = run_cli("run", "--endpoint", server.url, "m", "hi", "--stop", r"\n\n",
                     "--stop", r"tab\there", "--stop", r"a\\n")
    assert result.exit_code == 0, result.stderr
    assert server.requests[-1]["body"]["stop"] == ["\n\n", "tab\there", "a\\n"]


def test_run_endpoint_marks_counts_it_had_to_estimate(fake_server):
    server = fake_server({  # a server that sends no usage at all
        ("GET", "/v1/models"): models({"id": "m"}),
        ("POST", "/v1/chat/completions"): sse(delta("Hello"), delta(" there"),
                                              delta(finish="stop")),
    })
    record = json.loads(run_cli("run", "--endpoint", server.url, "m", "hi there", "--json").stdout)
    assert record["tokens_estimated"] is True
    assert (record["prompt_tokens"], record["completion_tokens"]) == (9, 2)  # 3+4+ceil(8/4); pieces
    verbose = run_cli("run", "--endpoint", server.url, "m", "hi there", "--verbose")
    assert "token counts estimated (the server sent none)" in verbose.stderr


def test_run_endpoint_faults_are_one_line_errors(fake_server):
    refused = run_cli("run", "--endpoint", f"http://127.0.0.1:{free_port()}/v1", "m", "hi")
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1 and "connection refused" in refused.stderr
    assert "Traceback" not in refused.stderr
    bad_url = run_cli("run", "--endpoint", "ftp://host", "m", "hi")
    assert bad_url.exit_code == 2 and "http:// or https://" in bad_url.stderr

    server = fake_server({("GET", "/v1/models"): models({"id": "m"}),
                          ("POST", "/v1/chat/completions"): sse(delta("Part"), done=False)})
    cut = run_cli("run", "--endpoint", server.url, "m", "hi")
    assert cut.exit_code == 1
    assert cut.stdout == "Part\n"  # what arrived was shown
    assert "closed the stream halfway" in cut.stderr and "Traceback" not in cut.stderr
    from localchat.history.records import open_history

    store = open_history()
    try:
        conversation = store.last_conversation()
        messages = store.messages(conversation.id)
    finally:
        store.close()
    assert [(m.role, m.content, m.interrupted) for m in messages] == [
        ("user", "hi", False), ("assistant", "Part", True)]  # kept, and marked


def test_run_endpoint_json_keeps_a_reply_cut_halfway(fake_server):
    server = fake_server({("GET", "/v1/models"): models({"id": "m"}),
                          ("POST", "/v1/chat/completions"): sse(delta("Part"), delta(" two"),
                                                                done=False)})
    cut = run_cli("run", "--endpoint", server.url, "m", "hi", "--json")
    assert cut.exit_code == 1
    record = json.loads(cut.stdout)  # what arrived, as Ctrl-C gives it
    assert (record["text"], record["finish_reason"]) == ("Part two", "interrupted")
    assert record["completion_tokens"] == 2
    assert cut.stderr.count("\n") == 1 and "Traceback" not in cut.stderr
    assert "closed the stream halfway (after 2 tokens)" in cut.stderr


@pytest.mark.parametrize("flags, named", [
    (["--ctx", "8192"], "--ctx applies"),
    (["--threads", "4", "--chat-format", "chatml"], "--threads, --chat-format apply"),
    (["--gpu-layers", "10", "--cpu", "--mlock"], "--gpu-layers, --cpu, --mlock apply"),
    (["--no-mmap", "--no-flash-attn"], "--no-mmap, --no-flash-attn apply"),
])
def test_local_only_flags_with_an_endpoint_are_usage_errors(flags, named):
    # Refused before any connection: nothing listens on port 9.
    result = run_cli("run", "--endpoint", "http://127.0.0.1:9/v1", "m", "hi", *flags)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert named in lines[0] and "only to a model run on this machine" in lines[0]


def test_local_only_flags_with_a_configured_server_point_at_local(isolated_home):
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('ctx = 2048\n[remote]\nendpoint = "http://127.0.0.1:9/v1"\nmodel = "m"\n')
    result = run_cli("run", "hi", "--threads", "2")  # config.toml's ctx is no flag: fine
    assert result.exit_code == 2, result.stderr
    assert "--threads applies only" in result.stderr and "config.toml" in result.stderr
    assert "--local" in result.stderr


def test_config_remote_section_is_the_default_and_local_overrides_it(fake_server, isolated_home,
                                                                     tmp_path):
    server = fake_server({
        ("GET", "/v1/models"): models({"id": "m", "max_model_len": 2048}),
        ("POST", "/v1/chat/completions"): sse(delta("From afar"), delta(finish="stop")),
    })
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[remote]\nendpoint = "{server.url}"\nmodel = "m"\n')
    remote = run_cli("run", "m", "hi")  # no --endpoint: the config's server
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout == "From afar\n"
    assert server.requests[-1]["body"]["model"] == "m"
    asked = len(server.requests)
    # --local: this machine, so the file is opened here (and found not to be a model)
    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_text("These are my notes, not a model.\n" * 20)
    local = run_cli("run", str(not_a_model), "hi", "--local")
    assert local.exit_code == 1 and "not a GGUF file" in local.stderr, local.stderr
    assert len(server.requests) == asked


def test_config_remote_section_refuses_a_key(isolated_home):
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[remote]\nendpoint = "http://127.0.0.1:9/v1"\napi_key = "s3cret"\n')
    result = run_cli("run", "hi")
    assert result.exit_code == 1
    assert "line 3" in result.stderr and "LOCALCHAT_API_KEY" in result.stderr
