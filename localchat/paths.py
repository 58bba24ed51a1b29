"""Where localchat keeps its files: config, data, cache, and the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "localchat"


def _home_override() -> Path | None:
    """`LOCALCHAT_HOME` puts every localchat directory under one folder (tests, portable use)."""
    value = os.environ.get("LOCALCHAT_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    """The directory that holds `config.toml` and a user's own `models.toml`."""
    home = _home_override()
    if home:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """The directory for history and other data the user would miss if it were deleted."""
    home = _home_override()
    if home:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """The directory for things that can be rebuilt: KV snapshots, test models, build caches."""
    home = _home_override()
    if home:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def config_file() -> Path:
    """The user's defaults file."""
    return config_dir() / "config.toml"


def user_catalog_file() -> Path:
    """A user's own `models.toml`, which adds to or overrides the shipped catalog."""
    return config_dir() / "models.toml"


def hf_hub_cache() -> Path:
    """The shared Hugging Face cache, honouring `HF_HUB_CACHE` and `HF_HOME` as the hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable only by the user, and return it."""
    # mkdir(parents=True) gives the parents the umask's mode; under umask 000 a world-writable
    # parent would let anyone swap our directory for theirs. XDG asks for 0700 throughout.
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
    return path
