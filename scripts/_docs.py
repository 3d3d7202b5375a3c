"""Shared by the benchmark scripts: write one marked block of a markdown file, keep the rest.

    body --write_block(path, name)--> "<!-- NAME begin -->\nBODY<!-- NAME end -->" replaced in place
    (or appended), so each script owns its section of docs/performance.md and reruns overwrite it.
"""

from __future__ import annotations

from pathlib import Path


def write_block(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block between ``name``'s markers; everything else in the file stays."""
    begin, end = f"<!-- {name} begin -->", f"<!-- {name} end -->"
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
