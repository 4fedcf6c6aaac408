"""Content-addressed cache under $VLMSAFE_CACHE: entries keyed by a hash of what determines them.

An entry is a directory built in a temporary sibling and renamed into place, so a reader never
sees a half-written entry; a `COMPLETE` marker holds the key. An entry that fails to load is
deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
MARKER = "COMPLETE"


def cache_root() -> Path:
    """The cache directory: $VLMSAFE_CACHE, default ~/.cache/vlmsafe."""
    return Path(os.environ.get("VLMSAFE_CACHE") or Path.home() / ".cache" / "vlmsafe").expanduser()


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), truncated to `length` hex digits."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def entry_path(kind: str, key: dict) -> Path:
    """Where the entry of `kind` keyed by `key` lives."""
    return cache_root() / kind / stable_hash(key)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _build(path: Path, key: dict, build: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(key, sort_keys=True, default=str, indent=1))
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def get_or_build(
    kind: str,
    key: dict,
    build: Callable[[Path], None],
    load: Callable[[Path], T],
) -> T:
    """Load the cached entry for (kind, key); build it first if missing; rebuild it if corrupt.

    `build(tmp_dir)` writes the entry's files into `tmp_dir`; `load(entry_dir)` reads them back and
    raises on anything wrong, which marks the entry corrupt.
    """
    path = entry_path(kind, key)
    if is_complete(path):
        try:
            return load(path)
        except Exception as err:  # a corrupt or stale entry is rebuilt, never used
            log.warning("cache entry %s is corrupt (%s: %s); rebuilding", path, type(err).__name__, err)
            shutil.rmtree(path, ignore_errors=True)
    log.info("building cache entry %s", path)
    _build(path, key, build)
    return load(path)
