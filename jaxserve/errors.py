"""Errors shared across layers without importing them (the server maps these to HTTP statuses).

    EngineUnavailable  raised by an engine that cannot take a request right now for reasons that are
                       not the request's fault (no live instance of a role after failures) -> 503
    InstanceLost       raised by an instance's core that can never step again (a process holding part
                       of it died): the instance reports itself failed and the router routes around it
"""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """The engine cannot serve any request now (e.g. every instance of a role has failed)."""


class InstanceLost(RuntimeError):
    """This instance can no longer serve: a part of it (a pipeline stage's process) is gone."""
