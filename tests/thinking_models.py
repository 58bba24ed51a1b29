"""Copies of the SmolLM2 test model that are "thinking models": a real chat template of one
(tests/data/*.jinja), and optionally `<think>` and `</think>` as special tokens of the vocabulary,
as Qwen3's and the R1 distills' are (two of SmolLM2's unused control tokens renamed).

SmolLM2 never learned to think, but a template whose generation prompt opens `<think>` makes
everything it writes reasoning until the block is closed for it (`--think-budget`); then it
answers. Built with the `gguf` package's metadata copier (what `gguf-new-metadata` runs).
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
# name -> (template file, markers as special tokens)
COPIES = {
    "r1": ("deepseek-r1-distill-llama-8b.jinja", True),  # the prompt opens <think>
    "r1-text": ("deepseek-r1-distill-llama-8b.jinja", False),  # markers cut across tokens
    "r1-old": ("deepseek-r1-distill-qwen-7b.jinja", True),  # the model opens the block itself
    "qwen3": ("qwen3.jinja", True),  # enable_thinking switch
}
# SmolLM2 control tokens no chat uses, renamed to the markers.
RENAMED = {"<jupyter_script>": "<think>", "<empty_output>": "</think>"}


def make_copy(source: Path, target: Path, template: str, think_tokens: bool) -> Path:
    """`source` with `template` as its chat template (and the markers in its vocabulary)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE]
    writer = gguf.GGUFWriter(target, arch=bytes(arch.parts[arch.data[0]]).decode(),
                             endianess=reader.endianess)
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING,
                                                              template)}
    if think_tokens:
        field = reader.fields[gguf.Keys.Tokenizer.LIST]
        tokens = [bytes(field.parts[index]).decode("utf-8") for index in field.data]
        tokens = [RENAMED.get(token, token) for token in tokens]
        new[gguf.Keys.Tokenizer.LIST] = MetadataDetails(
            gguf.GGUFValueType.ARRAY, tokens, sub_type=gguf.GGUFValueType.STRING)
    copy_with_new_metadata(reader, writer, new, [])
    return target


def make_copies(source: Path, folder: Path) -> dict[str, Path]:
    """Every copy in COPIES, under `folder`."""
    return {name: make_copy(source, folder / f"smollm2-{name}.gguf",
                            (DATA / template).read_text(encoding="utf-8"), tokens)
            for name, (template, tokens) in COPIES.items()}
