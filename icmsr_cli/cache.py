"""Where icmsr keeps derived data (prompt embeddings, merged weights) and what it holds there.
Torch-free, so `icmsr weights list` stays light. The caches only save time: a folder that cannot
be written is warned about once and the run goes on without it."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: written last into a merged-weights entry: an entry without it is incomplete
MERGED_READY = "entry.json"


def cache_dir() -> Path:
    """$ICMSR_CACHE_DIR, else the platform's user cache dir."""
    if env := os.environ.get("ICMSR_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("icmsr"))


_unusable: set[Path] = set()


def writable_cache_dir() -> Path | None:
    """cache_dir() if files can be written there, else None, with one warning per process: a
    read-only home or a path under a file must not stop a run."""
    root = cache_dir()
    if root in _unusable:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
        return root
    except OSError as exc:
        _unusable.add(root)
        logger.warning("cache folder %s is not usable (%s); running without caches (set ICMSR_CACHE_DIR to a writable folder)",
                       root, exc.strerror or exc)
        return None


def merged_entries(root: Path) -> list[Path]:
    """The complete merged-weights entries under `root`."""
    return [p for p in root.iterdir() if (p / MERGED_READY).is_file()] if root.is_dir() else []


def merged_usage(root: Path) -> tuple[int, int]:
    """(complete entries, bytes on disk) under `root`."""
    entries = merged_entries(root)
    return len(entries), sum(f.stat().st_size for p in entries for f in p.iterdir() if f.is_file())
