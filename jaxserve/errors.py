"""Errors shared across layers without importing them (the server maps these to HTTP statuses).

    EngineUnavailable  raised by an engine that cannot take a request right now for reasons that are
                       not the request's fault (no live instance of a role after failures) -> 503
"""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """The engine cannot serve any request now (e.g. every instance of a role has failed)."""
