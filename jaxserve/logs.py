"""Where jaxserve's own log records go when a command-line tool or a Ray actor runs.

    logging.getLogger("jaxserve.<module>") records, INFO and above --> stderr, as "jaxserve: <message>"

A library leaves logging alone; the entry points (``python -m jaxserve.launch``,
``scripts/generate_offline.py``, each Ray actor process) call ``show_logs()`` once.
Records from other libraries (jax, ray) are not touched.
"""

from __future__ import annotations

import logging
import sys


def show_logs(level: int = logging.INFO) -> None:
    """Send the ``jaxserve`` loggers' records at ``level`` and above to stderr (once per process)."""
    root = logging.getLogger("jaxserve")
    root.setLevel(level)
    if not any(getattr(h, "_jaxserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("jaxserve: %(message)s"))
        handler._jaxserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
