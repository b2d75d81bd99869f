"""Where the project keeps files of its own: one cache folder for decoded datasets and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """$SPARSETRAIN_CACHE, or ~/.cache/sparsetrain."""
    return Path(os.environ.get("SPARSETRAIN_CACHE", Path.home() / ".cache" / "sparsetrain"))
