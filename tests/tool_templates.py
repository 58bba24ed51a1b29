"""Real chat templates that render tools, for copies of the SmolLM2 test model.

The templates ship in llama-cpp-python's source distribution on PyPI
(`vendor/llama.cpp/models/templates/`): it is downloaded once at test time with pip, cached
under ~/.cache/localchat-test/ and checked by sha256; no third-party template text is committed
here. Each copy of the test model gets one as its `tokenizer.chat_template` (what
`gguf-new-metadata --chat-template-file` does).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama_cpp_python-0.3.36.tar.gz"
PIN = "llama-cpp-python==0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # pip-verified
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/{}.jinja"
TEMPLATES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct",
    "hermes3": "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct",
}


def cache_dir() -> Path:
    return Path.home() / ".cache" / "localchat-test"


def sdist() -> Path:
    """The sdist, downloaded once and checked."""
    path = cache_dir() / SDIST
    if not path.is_file() or _sha256(path) != SHA256:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", PIN, "-d", scratch, "--quiet"], check=True, timeout=600)
            (Path(scratch) / SDIST).replace(path)
    if _sha256(path) != SHA256:
        raise AssertionError(f"{path} does not have the pinned sha256")
    return path


def template(name: str) -> str:
    """The text of one template in TEMPLATES (all are extracted from the sdist at once)."""
    folder = cache_dir() / f"templates-{SHA256[:12]}"
    if not folder.is_dir():
        scratch = folder.with_suffix(".partial")
        scratch.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist()) as archive:
            for short, full in TEMPLATES.items():
                member = archive.extractfile(MEMBER.format(full))
                assert member is not None
                (scratch / f"{short}.jinja").write_bytes(member.read())
        scratch.replace(folder)
    return (folder / f"{name}.jinja").read_text(encoding="utf-8")


def model_with_template(source: Path, target: Path, name: str) -> Path:
    """A copy of the model at `source` whose chat template is `name`'s, made with the gguf
    package's gguf-new-metadata."""
    text_file = target.with_suffix(".jinja")
    text_file.write_text(template(name), encoding="utf-8")
    script = Path(sys.executable).parent / "gguf-new-metadata"
    command = [str(script)] if script.exists() else [
        sys.executable, "-m", "gguf.scripts.gguf_new_metadata"]
    subprocess.run([*command, str(source), str(target), "--chat-template-file", str(text_file),
                    "--force"], check=True, capture_output=True, timeout=300)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
