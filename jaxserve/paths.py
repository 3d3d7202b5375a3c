"""Where jaxserve keeps files between runs (no JAX import, so the earliest start-up code can ask).

    $JAXSERVE_CACHE, else ~/.cache/jaxserve --cache_root()--> demo model, xla/ (compiled programs),
    native/ (built CPU kernels)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The jaxserve cache root: ``$JAXSERVE_CACHE``, else ``~/.cache/jaxserve``."""
    return Path(os.environ.get("JAXSERVE_CACHE", Path.home() / ".cache" / "jaxserve"))
