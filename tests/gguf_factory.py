"""Tiny and malformed GGUF files for tests.

- `write_tiny_gguf` writes a small but complete model file with gguf.GGUFWriter.
- `gguf_bytes` and the `kv_*` / `tensor_entry` helpers assemble a file byte by byte, so a test can
  write exactly the inconsistency it wants (counts that lie, bad types, duplicate names...).
- `scan_layout` finds where each structural field of a *valid* file lives, and `malformed_variants`
  uses it to derive a seeded set of corrupted copies (truncations, bit flips, huge counts,
  impossible shapes, overlapping tensors, bad UTF-8, bad alignment) for fuzz tests.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
TINY_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "ab", "<x>"]
TINY_TOKEN_TYPES = [2, 3, 3, 3, 4, 1, 1, 1, 1, 4]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"


def write_tiny_gguf(
    path: Path,
    *,
    alignment: int | None = 64,
    endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
    extra_kv: dict[str, object] | None = None,
) -> Path:
    """Write a ~2 KB llama-shaped GGUF with a vocab, a template and F32/F16/Q4_1 tensors."""
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("tiny test model")
    writer.add_license("mit")
    writer.add_context_length(128)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_key_length(16)
    writer.add_value_length(8)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types(TINY_TOKEN_TYPES)
    writer.add_token_scores([float(-i) for i in range(len(TINY_TOKENS))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.add_array("tiny.nested", [[1, 2], [3]])
    writer.add_array("tiny.long_array", list(range(100)))
    writer.add_float64("tiny.float64", 0.5)
    for key, value in (extra_kv or {}).items():
        writer.add_string(key, str(value))
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((10, 32), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float16))
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    writer.add_tensor(
        "blk.0.attn_q.weight", rng.integers(0, 255, (32, 20), dtype=np.uint8), raw_dtype=q4_1
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- byte-level assembly -------------------------------------------------------------------


def gguf_string(text: str | bytes) -> bytes:
    """A GGUF string: u64 length then the bytes (str is UTF-8 encoded, bytes are used as is)."""
    raw = text.encode() if isinstance(text, str) else text
    return U64.pack(len(raw)) + raw


def kv_raw(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    """One metadata entry with an arbitrary type id and payload."""
    return gguf_string(key) + U32.pack(value_type) + payload


def kv_u32(key: str | bytes, value: int) -> bytes:
    """A uint32 metadata entry."""
    return kv_raw(key, 4, U32.pack(value))


def kv_str(key: str | bytes, value: str | bytes) -> bytes:
    """A string metadata entry."""
    return kv_raw(key, 8, gguf_string(value))


def kv_array(key: str | bytes, element_type: int, count: int, payload: bytes) -> bytes:
    """An array metadata entry whose count may lie about the payload."""
    return kv_raw(key, 9, U32.pack(element_type) + U64.pack(count) + payload)


def tensor_entry(name: str | bytes, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    """One tensor-table entry (shape given in GGUF order, fastest-varying dimension first)."""
    dims = b"".join(U64.pack(dim) for dim in shape)
    return gguf_string(name) + U32.pack(len(shape)) + dims + U32.pack(ggml_type) + U64.pack(offset)


def gguf_bytes(
    kvs: list[bytes],
    tensors: list[bytes],
    *,
    data: bytes = b"",
    alignment: int = 32,
    version: int = 3,
    magic: bytes = b"GGUF",
    kv_count: int | None = None,
    tensor_count: int | None = None,
) -> bytes:
    """Assemble a GGUF file; counts default to the real ones, data starts at the next boundary."""
    head = magic + U32.pack(version)
    head += U64.pack(len(tensors) if tensor_count is None else tensor_count)
    head += U64.pack(len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    padding = b"\0" * (-len(body) % alignment) if data else b""
    return body + padding + data


# ---- layout of a valid file, and variants of it --------------------------------------------


@dataclass
class Layout:
    """Byte offsets of the structural fields of a valid GGUF file."""

    kv_count_at: int = 16
    keys: list[tuple[str, int]] = field(default_factory=list)  # key, offset of its length
    value_types: list[int] = field(default_factory=list)  # offsets of each value-type field
    counts: list[int] = field(default_factory=list)  # offsets of array element counts
    element_types: list[int] = field(default_factory=list)  # offsets of array element types
    string_lengths: list[int] = field(default_factory=list)  # scalar string values' lengths
    alignment_at: int | None = None  # offset of general.alignment's value
    tensor_names: list[tuple[str, int]] = field(default_factory=list)
    n_dims: list[int] = field(default_factory=list)
    dims: list[list[int]] = field(default_factory=list)
    tensor_types: list[int] = field(default_factory=list)
    tensor_offsets: list[tuple[int, int]] = field(default_factory=list)  # field offset, value
    table_end: int = 0
    data_end: int = 0  # where the last tensor's data ends (absolute)


def _skip_value(data: bytes, pos: int, value_type: int, layout: Layout, top: bool) -> int:
    if value_type in SCALAR_SIZES:
        return pos + SCALAR_SIZES[value_type]
    if value_type == 8:
        if top:
            layout.string_lengths.append(pos)
        return pos + 8 + U64.unpack_from(data, pos)[0]
    element_type, count = U32.unpack_from(data, pos)[0], U64.unpack_from(data, pos + 4)[0]
    if top:
        layout.element_types.append(pos)
        layout.counts.append(pos + 4)
    pos += 12
    if element_type in SCALAR_SIZES:
        return pos + count * SCALAR_SIZES[element_type]
    for _ in range(count):
        pos = _skip_value(data, pos, element_type, layout, False)
    return pos


def scan_layout(data: bytes) -> Layout:
    """Walk a known-good GGUF prefix (trusted: no checks) and record where each field lives."""
    layout = Layout()
    tensor_count, kv_count = U64.unpack_from(data, 8)[0], U64.unpack_from(data, 16)[0]
    pos, alignment = 24, 32
    for _ in range(kv_count):
        length = U64.unpack_from(data, pos)[0]
        key = data[pos + 8 : pos + 8 + length].decode()
        layout.keys.append((key, pos))
        pos += 8 + length
        value_type = U32.unpack_from(data, pos)[0]
        layout.value_types.append(pos)
        if key == "general.alignment":
            layout.alignment_at = pos + 4
            alignment = U32.unpack_from(data, pos + 4)[0]
        pos = _skip_value(data, pos + 4, value_type, layout, True)
    ends = []
    for _ in range(tensor_count):
        length = U64.unpack_from(data, pos)[0]
        layout.tensor_names.append((data[pos + 8 : pos + 8 + length].decode(), pos))
        pos += 8 + length
        n_dims = U32.unpack_from(data, pos)[0]
        layout.n_dims.append(pos)
        layout.dims.append([pos + 4 + 8 * i for i in range(n_dims)])
        shape = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type = U32.unpack_from(data, pos)[0]
        layout.tensor_types.append(pos)
        offset = U64.unpack_from(data, pos + 4)[0]
        layout.tensor_offsets.append((pos + 4, offset))
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        ends.append(offset + int(np.prod(shape)) // block * size)
        pos += 12
    layout.table_end = pos
    layout.data_end = -(-pos // alignment) * alignment + max(ends, default=0)
    return layout


@dataclass(frozen=True)
class Variant:
    """A corrupted copy: write `data`, then set the file's length to `size` (sparse if longer)."""

    label: str
    data: bytes
    size: int
    must_refuse: bool  # False where the change may still leave a consistent file


def _put(base: bytes, at: int, packer: struct.Struct, value: int) -> bytes:
    out = bytearray(base)
    packer.pack_into(out, at, value)
    return bytes(out)


def malformed_variants(base: bytes, size: int, seed: int, flips: int = 100) -> Iterator[Variant]:
    """Seeded corruptions of a valid file whose first bytes are `base` and full length `size`."""
    rng = random.Random(seed)
    lay = scan_layout(base)
    huge = (2**64 - 1, 2**63, 2**63 - 1, 2**32, size)

    def put(label: str, at: int, packer: struct.Struct, value: int, refuse: bool = True):
        return Variant(label, _put(base, at, packer, value), size, refuse)

    # Truncations: at every structural field, a few bytes either side, and in the data section.
    marks = [0, 3, 4, 8, 16, 24] + [at for _, at in lay.keys] + lay.value_types + lay.counts
    marks += [at for _, at in lay.tensor_names] + lay.n_dims + lay.tensor_types
    marks += [lay.table_end, lay.data_end - 1]
    cuts = {m + d for m in rng.sample(marks, min(len(marks), 45)) for d in (0, 1, 5)}
    cuts |= {rng.randrange(lay.table_end, lay.data_end) for _ in range(8)}
    for cut in sorted(c for c in cuts if 0 <= c < lay.data_end):
        yield Variant(f"truncated at {cut}", base[:cut], cut, True)
    # Bit flips: header, structural fields, anywhere in the header region.
    structural = marks + lay.element_types + lay.string_lengths + [o for o, _ in lay.tensor_offsets]
    for i in range(flips):
        out = bytearray(base)
        zone = i % 3
        if zone == 0:
            at = rng.randrange(24)
        elif zone == 1:
            at = min(rng.choice(structural) + rng.randrange(8), len(base) - 1)
        else:
            at = rng.randrange(lay.table_end)
        for bit in rng.sample(range(8), rng.randint(1, 3)):  # distinct bits: a real change
            out[at] ^= 1 << bit
        yield Variant(f"bit flip at {at}", bytes(out), size, False)
    # Header fields.
    yield Variant("bad magic", b"GGUG" + base[4:], size, True)
    yield Variant("text magic", b"Hell" + base[4:], size, True)
    for version in (0, 1, 4, 0x03000000, 2**32 - 1):
        yield put(f"version {version:#x}", 4, U32, version)
    for value in huge:
        yield put(f"tensor count {value}", 8, U64, value)
        yield put(f"kv count {value}", 16, U64, value)
    # Lying lengths and counts inside the metadata.
    for at in rng.sample(lay.counts, min(4, len(lay.counts))):
        for value in huge:
            yield put(f"array count {value} at {at}", at, U64, value)
    for at in rng.sample(lay.string_lengths, min(4, len(lay.string_lengths))):
        yield put(f"string length at {at}", at, U64, rng.choice(huge))
    for key, at in rng.sample(lay.keys, min(6, len(lay.keys))):
        yield put(f"key length of {key}", at, U64, rng.choice(huge))
    for at in rng.sample(lay.value_types, min(6, len(lay.value_types))):
        yield put(f"value type at {at}", at, U32, rng.choice((13, 99, 2**31, 2**32 - 1)))
    for at in lay.element_types[:4]:
        yield put(f"element type at {at}", at, U32, rng.choice((13, 200, 2**32 - 1)))
    # Bad UTF-8 and duplicate names.
    for key, at in rng.sample(lay.keys, min(5, len(lay.keys))):
        bad = bytearray(base)
        bad[at + 8] = rng.choice((0xFF, 0xC3, 0x80, 0xED))
        if bad[at + 8] == 0xC3:  # a lead byte needs a continuation byte: make it the end
            bad[at + 8 + len(key.encode()) - 1] = 0xC3
        yield Variant(f"bad UTF-8 in key {key}", bytes(bad), size, True)
    for name, at in rng.sample(lay.tensor_names, min(3, len(lay.tensor_names))):
        bad = bytearray(base)
        bad[at + 8] = 0xFE
        yield Variant(f"bad UTF-8 in tensor {name}", bytes(bad), size, True)
    by_length: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for kind, entries in (("key", lay.keys), ("tensor", lay.tensor_names)):
        for name, at in entries:
            by_length.setdefault((kind, len(name.encode())), []).append((name, at))
    for (kind, _), same in list(by_length.items())[:12]:
        if len(same) > 1:
            (first, _), (second, at) = same[0], same[1]
            dup = bytearray(base)
            dup[at + 8 : at + 8 + len(first.encode())] = first.encode()
            yield Variant(f"duplicate {kind} {first} (was {second})", bytes(dup), size, True)
    # Impossible tensor shapes and types.
    picks = rng.sample(range(len(lay.tensor_names)), min(6, len(lay.tensor_names)))
    for t in picks:
        name = lay.tensor_names[t][0]
        for n_dims in (0, 5, 2**32 - 1):
            yield put(f"{name} n_dims {n_dims}", lay.n_dims[t], U32, n_dims)
        for dim in (0, 2**64 - 1, 2**63, 2**40):
            yield put(f"{name} dim {dim}", rng.choice(lay.dims[t]), U64, dim)
        for ggml_type in (4, 5, 31, 99, 2**32 - 1):
            yield put(f"{name} type {ggml_type}", lay.tensor_types[t], U32, ggml_type)
        yield put(f"{name} first dim 33", lay.dims[t][0], U64, 33, refuse=False)
    # Tensor offsets: misaligned, overlapping, past the end.
    for t in picks:
        at, offset = lay.tensor_offsets[t]
        other = lay.tensor_offsets[(t + 1) % len(lay.tensor_offsets)][1]
        if other != offset:
            yield put(f"tensor {t} overlaps tensor {t + 1}", at, U64, other)
        yield put(f"tensor {t} misaligned", at, U64, offset + rng.choice((1, 2, 7, 16)))
        yield put(f"tensor {t} past the end", at, U64, 2**64 - 32)
    # Alignment values.
    if lay.alignment_at is not None:
        for value in (0, 3, 48, 2**31, 1 << 21, 2**32 - 1):
            yield put(f"alignment {value}", lay.alignment_at, U32, value)
        for value in (1, 8, 16, 128):
            yield put(f"alignment {value}", lay.alignment_at, U32, value, refuse=False)


def with_string_value(source: Path, target: Path, key: str, value: str,
                      header_region: int = 4 * 1024 * 1024) -> Path:
    """Copy a valid GGUF with the string metadata `key` set to `value` (tensor data unchanged)."""
    with source.open("rb") as file:
        head = file.read(header_region)
        lay = scan_layout(head)
        alignment = U32.unpack_from(head, lay.alignment_at)[0] if lay.alignment_at else 32
        data_start = -(-lay.table_end // alignment) * alignment
        at = dict(lay.keys)[key] + 8 + len(key.encode())
        assert U32.unpack_from(head, at)[0] == 8, f"{key} is not a string"
        value_end = at + 4 + 8 + U64.unpack_from(head, at + 4)[0]
        table = head[: at + 4] + gguf_string(value) + head[value_end : lay.table_end]
        with target.open("wb") as out:
            out.write(table + b"\0" * (-len(table) % alignment))
            file.seek(data_start)
            while chunk := file.read(1 << 22):
                out.write(chunk)
    return target
