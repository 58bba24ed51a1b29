"""A strict, cheap reader of a GGUF file's header, metadata and tensor table.

Runs on every load before llama.cpp sees the file: model files come from strangers and llama.cpp's
parser has had memory-safety bugs, so anything inconsistent is refused with a one-line
ModelFileError. Only the header region is read (via mmap), never the tensor data.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from localchat.errors import ModelFileError
from localchat.render import terminal_safe

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # real files use 32; anything near a megabyte is a corruption
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_KEY_BYTES = 65535  # the GGUF spec's limit
MAX_NESTING = 4  # arrays of arrays exist in the spec but no model nests deeper than one level
MAX_ENTRIES = 1 << 20  # kv/tensor counts: large models have a few thousand tensors
MAX_LOOPED = 1 << 24  # strings or arrays in one array (a big vocab is 256k): bounds parse time
SHORT_ARRAY = 64  # longer metadata arrays are summarised, not materialised
INT64_MAX = (1 << 63) - 1  # ggml keeps dims and element counts in int64_t

HINT_DAMAGED = "the file is damaged; download it again"
HINT_NOT_GGUF = "this is not a GGUF model file; localchat runs .gguf files"

STRING, ARRAY, BOOL = 8, 9, 7
_NAMES = "uint8 int8 uint16 int16 uint32 int32 float32 bool string array uint64 int64 float64"
TYPE_NAMES = dict(enumerate(_NAMES.split(" ")))
_CODES = "BbHhIifB..Qqd"  # struct codes by GGUF value type; strings and arrays are not scalars
_STRUCTS = {vtype: struct.Struct("<" + code) for vtype, code in enumerate(_CODES) if code != "."}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
T = TypeVar("T")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; `offset` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of elements (the product of the shape)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ArraySummary:
    """Stands in for a long metadata array (e.g. 49k tokenizer tokens)."""

    element_type: str
    length: int


class _Key(Generic[T]):
    """A ModelInfo property: one metadata value of the given type, else None."""

    def __init__(self, key: str, kind: type[T]) -> None:
        self.key, self.kind = key, kind

    def __get__(self, info: ModelInfo | None, owner: type | None = None) -> T | None:
        if info is None:  # looked up on the class, e.g. by help()
            return None
        arch = info.metadata.get("general.architecture")
        value = info.metadata.get(self.key.format(arch=arch))
        # bool is an int subclass; a flag must not pass for a count, nor a count for a flag.
        if isinstance(value, self.kind) and isinstance(value, bool) == (self.kind is bool):
            return value
        return None


@dataclass(frozen=True)
class ModelInfo:
    """What the header of a validated GGUF file says."""

    path: Path
    file_size: int
    gguf_version: int
    alignment: int
    data_offset: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    special_tokens: frozenset[str]

    architecture = _Key("general.architecture", str)
    name = _Key("general.name", str)
    license = _Key("general.license", str)
    chat_template = _Key("tokenizer.chat_template", str)
    context_length = _Key("{arch}.context_length", int)
    block_count = _Key("{arch}.block_count", int)
    embedding_length = _Key("{arch}.embedding_length", int)
    head_count = _Key("{arch}.attention.head_count", int)  # None where given per layer
    head_count_kv = _Key("{arch}.attention.head_count_kv", int)
    key_length = _Key("{arch}.attention.key_length", int)
    value_length = _Key("{arch}.attention.value_length", int)
    bos_token_id = _Key("tokenizer.ggml.bos_token_id", int)
    eos_token_id = _Key("tokenizer.ggml.eos_token_id", int)
    add_bos_token = _Key("tokenizer.ggml.add_bos_token", bool)
    file_type = _Key("general.file_type", int)

    @property
    def parameter_count(self) -> int:
        """Total number of weights, summed over the tensor table."""
        return sum(tensor.n_elements for tensor in self.tensors)

    @property
    def quantization(self) -> str | None:
        """general.file_type's name (e.g. "Q4_K_M"), else the type holding the most bytes."""
        if self.file_type in _file_type_names():
            return _file_type_names()[self.file_type]
        totals: dict[str, int] = {}
        for tensor in self.tensors:
            totals[tensor.type_name] = totals.get(tensor.type_name, 0) + tensor.nbytes
        return max(totals, key=lambda type_name: totals[type_name]) if totals else None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to run a model: weights plus a K and V cache for n_ctx tokens."""

    weights_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    kv_cache_known: bool  # False when the file gives no attention layout to size the cache from
    kv_cache_type: str = "f16"  # --cache-type


@lru_cache(maxsize=1)
def _ggml_types() -> dict[int, tuple[str, int, int]]:
    # Imported here: gguf pulls in numpy, which `localchat --help` should not pay for.
    import gguf

    return {
        int(kind): (kind.name, *gguf.GGML_QUANT_SIZES[kind])
        for kind in gguf.GGMLQuantizationType
        if kind in gguf.GGML_QUANT_SIZES
    }


@lru_cache(maxsize=1)
def _file_type_names() -> dict[int, str]:
    import gguf

    return {
        int(kind): kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for kind in gguf.LlamaFileType
        if kind.name != "GUESSED"
    }


def _printable(text: str, limit: int = 200) -> str:
    # Names from a hostile file (and odd path names) must not break the one-line message.
    text = text if len(text) <= limit else text[:limit] + "..."
    return terminal_safe(text, keep="")


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; every failure is a refusal."""

    __slots__ = ("buf", "size", "pos", "shown")

    def __init__(self, buf: mmap.mmap, shown: str) -> None:
        self.buf, self.size, self.pos, self.shown = buf, len(buf), 0, shown

    def refuse(self, problem: str, hint: str = HINT_DAMAGED) -> ModelFileError:
        return ModelFileError(f"{self.shown}: {problem}", hint)

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.size - self.pos:
            raise self.refuse(
                f"{what} at byte {self.pos:,} needs {nbytes:,} bytes but the file ends at "
                f"{self.size:,} (truncated or corrupt)"
            )

    def number(self, packer: struct.Struct, what: str) -> Any:
        self.need(packer.size, what)
        self.pos += packer.size
        return packer.unpack_from(self.buf, self.pos - packer.size)[0]

    def u32(self, what: str) -> int:
        value: int = self.number(_U32, what)
        return value

    def u64(self, what: str) -> int:
        value: int = self.number(_U64, what)
        return value

    def text(self, what: str, max_bytes: int | None = None) -> str:
        length = self.u64(f"length of {what}")
        if max_bytes is not None and length > max_bytes:
            raise self.refuse(
                f"{what} is {length:,} bytes long, more than the {max_bytes:,} allowed"
            )
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            shown = _printable(raw.decode("utf-8", "backslashreplace"), 60)
            raise self.refuse(f"{what} {shown!r} is not valid UTF-8") from None


def _read_array(
    cur: _Cursor, key: str, depth: int, starts: array[int] | None = None
) -> tuple[Any, ...] | ArraySummary:
    """Read (or, when long, bounds-check and skip) an array; `key` is the quoted key, `starts`
    collects string offsets."""
    if depth > MAX_NESTING:
        raise cur.refuse(f"metadata {key} nests arrays more than {MAX_NESTING} deep")
    element_type = cur.u32(f"element type of {key}")
    count = cur.u64(f"length of {key}")
    short = count <= SHORT_ARRAY
    if element_type in (STRING, ARRAY) and count > MAX_LOOPED:
        raise cur.refuse(f"metadata {key} claims {count:,} entries, an absurd number")
    buf = cur.buf
    if element_type in _STRUCTS:
        code = _STRUCTS[element_type].format[1:]
        nbytes = count * _STRUCTS[element_type].size
        cur.need(nbytes, f"the {count:,} values of {key}")
        start, cur.pos = cur.pos, cur.pos + nbytes
        if element_type == BOOL and buf[start : cur.pos].translate(None, b"\x00\x01"):
            raise cur.refuse(f"metadata {key} holds a bool that is neither 0 nor 1")
        if not short:
            return ArraySummary(TYPE_NAMES[element_type], count)
        values = struct.unpack_from(f"<{count}{code}", buf, start)
        return tuple(bool(v) for v in values) if element_type == BOOL else values
    if element_type == STRING:
        # Each string needs at least its 8-byte length: refuse lying counts before looping.
        cur.need(count * 8, f"the {count:,} strings of {key}")
        if short:
            items = []
            for _ in range(count):
                if starts is not None:
                    starts.append(cur.pos)
                items.append(cur.text(f"string in {key}"))
            return tuple(items)
        # The hot loop (~100k vocab strings): no decoding and no explicit bounds check, because
        # pos only grows: a string that runs past the end makes the next unpack_from fail, or
        # the check after the loop catch the last one.
        pos, unpack = cur.pos, _U64.unpack_from
        try:
            if starts is None:
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
            else:
                for _ in range(count):
                    starts.append(pos)
                    pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):
            pos = cur.size + 1
        if pos > cur.size:
            raise cur.refuse(f"the strings of {key} run past the end of the file (truncated?)")
        cur.pos = pos
        return ArraySummary("string", count)
    if element_type == ARRAY:
        cur.need(count * 12, f"the {count:,} arrays of {key}")  # each: u32 type + u64 length
        nested = [_read_array(cur, key, depth + 1) for _ in range(count)]
        return tuple(nested) if short else ArraySummary("array", count)
    raise cur.refuse(f"metadata {key} has arrays of unknown type {element_type}")


def _read_value(cur: _Cursor, key: str, value_type: int, starts: array[int] | None) -> Any:
    if value_type in _STRUCTS:
        value = cur.number(_STRUCTS[value_type], f"value of {key}")
        if value_type == BOOL:
            if value > 1:
                raise cur.refuse(f"metadata {key} is a bool of {value}, not 0 or 1")
            return bool(value)
        return value
    if value_type == STRING:
        return cur.text(f"value of {key}")
    if value_type == ARRAY:
        return _read_array(cur, key, 1, starts)
    raise cur.refuse(f"metadata {key} has unknown value type {value_type}")


ArrayInfo = tuple[int, int, int]  # element type, length, offset of the first element


def _read_metadata(
    cur: _Cursor, kv_count: int
) -> tuple[dict[str, Any], dict[str, ArrayInfo], array[int]]:
    """Read every key; also note each array's layout and where each vocab token starts."""
    metadata: dict[str, Any] = {}
    arrays: dict[str, ArrayInfo] = {}
    token_starts = array("Q")
    for index in range(kv_count):
        key = cur.text(f"metadata key #{index}", MAX_KEY_BYTES)
        if not key:
            raise cur.refuse(f"metadata key #{index} is empty")
        if key in metadata:
            raise cur.refuse(f"metadata key {key[:60]!r} appears twice")
        label = repr(key if len(key) <= 60 else key[:60] + "...")  # for messages
        value_type = cur.u32(f"type of {label}")
        if key == "general.alignment" and value_type != 4:
            # llama.cpp reads this key as a uint32 without checking its type.
            raise cur.refuse(
                f"general.alignment has type {TYPE_NAMES.get(value_type, value_type)}, not uint32"
            )
        start = cur.pos
        starts = token_starts if key == "tokenizer.ggml.tokens" else None
        metadata[key] = _read_value(cur, label, value_type, starts)
        if value_type == ARRAY:
            element_type, count = (
                _U32.unpack_from(cur.buf, start)[0],
                _U64.unpack_from(cur.buf, start + 4)[0],
            )
            arrays[key] = (element_type, count, start + 12)
    return metadata, arrays, token_starts


# Arrays llama.cpp reads with a type assertion (a failed one aborts the process) or indexes by
# token id without checking their length: element types allowed, and whether one per token.
_VOCAB_ARRAYS = {
    "tokenizer.ggml.tokens": ((STRING,), True),
    "tokenizer.ggml.token_type": ((5,), True),
    "tokenizer.ggml.scores": ((6,), True),
    "tokenizer.ggml.merges": ((STRING,), False),
    "tokenizer.ggml.precompiled_charsmap": ((0, 1), False),
}


def _check_vocab(cur: _Cursor, metadata: Mapping[str, Any], arrays: dict[str, ArrayInfo]) -> None:
    n_tokens = arrays.get("tokenizer.ggml.tokens", (0, 0, 0))[1]
    for key, (wanted, per_token) in _VOCAB_ARRAYS.items():
        if key not in metadata:
            continue
        found = arrays.get(key)
        if found is None or found[0] not in wanted:
            names = " or ".join(TYPE_NAMES[kind] for kind in wanted)
            raise cur.refuse(f"{key} is not an array of {names}")
        if per_token and found[1] != n_tokens:
            raise cur.refuse(f"{key} has {found[1]:,} entries for {n_tokens:,} tokens")


def _special_tokens(buf: mmap.mmap, arrays: dict[str, ArrayInfo],
                    starts: array[int]) -> frozenset[str]:
    token_types = arrays.get("tokenizer.ggml.token_type")
    if token_types is None or not starts:
        return frozenset()
    import numpy

    kinds = numpy.frombuffer(buf, dtype="<i4", count=len(starts), offset=token_types[2])
    special = numpy.flatnonzero((kinds == TOKEN_CONTROL) | (kinds == TOKEN_USER_DEFINED)).tolist()
    del kinds  # a live view into the mmap would stop it from closing
    found = set()
    for index in special:
        start = starts[index]
        length = _U64.unpack_from(buf, start)[0]
        found.add(buf[start + 8 : start + 8 + length].decode("utf-8", "replace"))
    return frozenset(found)


def _read_tensor(cur: _Cursor, index: int, alignment: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.text(f"name of tensor #{index}", MAX_TENSOR_NAME_BYTES)
    shown = f"tensor {name!r}"
    n_dims = cur.u32(f"dimension count of {shown}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.refuse(f"{shown} has {n_dims:,} dimensions; GGUF allows 1 to {MAX_DIMS}")
    cur.need(8 * n_dims, f"shape of {shown}")
    shape = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
    cur.pos += 8 * n_dims
    n_elements = 1
    for dim in shape:
        if dim == 0 or dim > INT64_MAX:
            raise cur.refuse(f"{shown} has an impossible dimension {dim:,} in shape {list(shape)}")
        n_elements *= dim
    if n_elements > INT64_MAX:
        raise cur.refuse(f"{shown} has {n_elements:,} elements, more than ggml can address")
    ggml_type = cur.u32(f"type of {shown}")
    if ggml_type not in _ggml_types():
        raise cur.refuse(f"{shown} has unknown tensor type {ggml_type}")
    relative = cur.u64(f"offset of {shown}")
    if relative % alignment:
        raise cur.refuse(
            f"{shown} starts at data offset {relative:,}, not a multiple of {alignment}"
        )
    return name, shape, ggml_type, relative


def _read_tensors(cur: _Cursor, count: int, alignment: int) -> list[TensorInfo]:
    table = [_read_tensor(cur, index, alignment) for index in range(count)]
    data_offset = -(-cur.pos // alignment) * alignment
    types = _ggml_types()
    tensors, seen = [], set()
    for name, shape, ggml_type, relative in table:
        if name in seen:
            raise cur.refuse(f"tensor {name!r} appears twice")
        seen.add(name)
        type_name, block_size, type_size = types[ggml_type]
        if shape[0] % block_size:
            raise cur.refuse(
                f"tensor {name!r} is {type_name} with a first dimension of {shape[0]:,}, "
                f"not a multiple of its block size {block_size}"
            )
        nbytes = math.prod(shape) // block_size * type_size
        tensors.append(
            TensorInfo(name, shape, ggml_type, type_name, data_offset + relative, nbytes)
        )
    ordered = sorted(tensors, key=lambda tensor: tensor.offset)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.offset < before.offset + before.nbytes:
            raise cur.refuse(f"tensors {before.name!r} and {after.name!r} overlap in the file")
    needed = max((tensor.offset + tensor.nbytes for tensor in tensors), default=0)
    if needed > cur.size:
        raise cur.refuse(
            f"truncated: needs {needed:,} bytes, the file has {cur.size:,}", "download it again"
        )
    return tensors


def _read_alignment(cur: _Cursor, metadata: Mapping[str, Any]) -> int:
    alignment: int = metadata.get("general.alignment", DEFAULT_ALIGNMENT)  # read as a uint32
    if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
        raise cur.refuse(f"general.alignment is {alignment:,}, not a power of two up to 1 MiB")
    return alignment


def _parse(buf: mmap.mmap, path: Path, shown: str) -> ModelInfo:
    cur = _Cursor(buf, shown)
    if len(buf) < 4 or buf[:4] != MAGIC:
        raise cur.refuse("not a GGUF file (it does not start with 'GGUF')", HINT_NOT_GGUF)
    cur.pos = 4
    version = cur.u32("GGUF version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and int.from_bytes(_U32.pack(version), "big") <= 3:
            raise cur.refuse("a big-endian GGUF file", "use the little-endian build of this model")
        raise cur.refuse(
            f"GGUF version {version:,} is not supported (only 2 and 3)",
            "download a file made by a current llama.cpp",
        )
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    # A key costs at least 13 bytes and a tensor entry 32: refuse counts the file cannot hold.
    room = cur.size - cur.pos
    if tensor_count > MAX_ENTRIES or tensor_count * 32 > room:
        raise cur.refuse(f"claims {tensor_count:,} tensors, more than the file can hold")
    if kv_count > MAX_ENTRIES or kv_count * 13 + tensor_count * 32 > room:
        raise cur.refuse(f"claims {kv_count:,} metadata entries, more than the file can hold")
    metadata, arrays, token_starts = _read_metadata(cur, kv_count)
    alignment = _read_alignment(cur, metadata)
    _check_vocab(cur, metadata, arrays)
    tensors = _read_tensors(cur, tensor_count, alignment)
    return ModelInfo(
        path=path,
        file_size=cur.size,
        gguf_version=version,
        alignment=alignment,
        data_offset=-(-cur.pos // alignment) * alignment,
        metadata=MappingProxyType(metadata),
        tensors=tuple(tensors),
        special_tokens=_special_tokens(buf, arrays, token_starts),
    )


_OPEN_ERRORS = {
    FileNotFoundError: ("no such file", "check the path"),
    NotADirectoryError: ("no such file", "check the path"),
    IsADirectoryError: ("is a directory, not a model file", "give the path of a .gguf file"),
    PermissionError: ("permission denied", "check the file's permissions"),
}


def _open_regular(path: Path, shown: str) -> int:
    """Open without following a FIFO or device into a blocking read; refuse non-files."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        default = (f"cannot open ({error.strerror})", "check the path")
        problem, hint = _OPEN_ERRORS.get(type(error), default)
        raise ModelFileError(f"{shown}: {problem}", hint) from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode) or not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ModelFileError(
            f"{shown}: is {what}, not a model file", "give the path of a .gguf file"
        )
    return fd


def read_model_file(path: str | Path) -> ModelInfo:
    """Validate a GGUF file's header, metadata and tensor table; refuse it with ModelFileError."""
    path = Path(path)
    shown = _printable(str(path), 400)
    fd = _open_regular(path, shown)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ModelFileError(f"{shown}: the file is empty", "download it again")
        try:
            buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise ModelFileError(f"{shown}: cannot be read ({error})", "check the file") from None
    finally:
        os.close(fd)
    try:
        return _parse(buf, path, shown)
    except (struct.error, IndexError, ValueError, OverflowError, MemoryError) as error:
        # Defence in depth: every case should be caught by a named check above; the fuzz tests
        # fail if this line is ever reached.
        raise ModelFileError(
            f"{shown}: malformed GGUF data (unexpected {type(error).__name__})", HINT_DAMAGED
        ) from error
    finally:
        buf.close()


def _per_layer(value: Any, n_layer: int) -> list[int] | None:
    # Some architectures give head counts per layer, as an array.
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_layer
    if isinstance(value, tuple) and len(value) == n_layer and all(type(v) is int for v in value):
        return list(value)
    return None


# Bytes per block and elements per block of the KV cache types (ggml's type traits).
KV_CACHE_BLOCKS = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}


def kv_row_bytes(cache_type: str, elements: int) -> int:
    """Bytes of one cache row of `elements` values of a type, as ggml_row_size counts them."""
    block_bytes, block = KV_CACHE_BLOCKS[cache_type]
    return -(-elements // block) * block_bytes


def estimate_memory(info: ModelInfo, n_ctx: int, cache_type: str = "f16") -> MemoryEstimate:
    """Weights plus a K and V cache of `cache_type` for n_ctx tokens (an upper bound for
    sliding-window models)."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    weights = sum(tensor.nbytes for tensor in info.tensors)
    n_layer = info.block_count or 0
    prefix = f"{info.architecture}.attention."
    heads = _per_layer(info.metadata.get(prefix + "head_count"), n_layer)
    heads_kv = _per_layer(info.metadata.get(prefix + "head_count_kv"), n_layer) or heads
    head_dim = info.embedding_length // max(heads) if heads and info.embedding_length else None
    key_length = info.key_length or head_dim
    value_length = info.value_length or head_dim
    if not (n_layer and heads_kv and key_length and value_length):
        return MemoryEstimate(weights, 0, weights, kv_cache_known=False,
                              kv_cache_type=cache_type)
    kv_cache = sum(n_ctx * (kv_row_bytes(cache_type, n_kv * key_length)
                            + kv_row_bytes(cache_type, n_kv * value_length)) for n_kv in heads_kv)
    return MemoryEstimate(weights, kv_cache, weights + kv_cache, kv_cache_known=True,
                          kv_cache_type=cache_type)
