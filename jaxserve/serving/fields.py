"""Request-body fields, one at a time: typed getters that answer a bad value with a 400 naming the field.

    body dict --get_int / get_num / get_bool / get_stop / get_logit_bias / check_token_ids--> a value, or
    ApiError(400, "field: why", param=field) in OpenAI's error shape (``ApiError.response()``)

What the fields mean and which exist per route: ``jaxserve.serving.protocol``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from jaxserve.request import MAX_LOGIT_BIAS

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An answer in OpenAI's error shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        resp = web.json_response(self.body(), status=self.status, headers=self.headers)
        if self.headers and self.headers.get("Connection") == "close":  # e.g. a body that never came
            resp.force_close()
        return resp


def bad(param: str, why: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code=code)


def show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- field parsing ---------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _given(body: dict[str, Any], key: str, ok: Callable[[Any], bool], what: str) -> Any:
    """The field's value (None if absent or null); a value failing ``ok`` is a 400 saying ``what`` it must be."""
    v = body.get(key)
    if v is not None and not ok(v):
        raise bad(key, f"must be {what}, got {show(v)}")
    return v


def get_int(body: dict[str, Any], key: str, default: int | None, lo: int | None = None) -> int | None:
    v = _given(body, key, is_int, "an integer")
    if v is None:
        return default
    if lo is not None and v < lo:
        raise bad(key, f"must be >= {lo}, got {v}")
    return v


def get_num(body: dict[str, Any], key: str, default: float) -> float:
    v = _given(body, key, lambda x: isinstance(x, int | float) and not isinstance(x, bool), "a number")
    if v is None:
        return default
    try:
        f = float(v)
    except OverflowError:  # an integer past float range
        f = math.inf
    if not math.isfinite(f):
        raise bad(key, f"must be a finite number, got {show(v)}")
    return f


def get_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = _given(body, key, lambda x: isinstance(x, bool), "true or false")
    return default if v is None else v


def get_stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"must be a string or a list of strings, got {show(v)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if not all(stops):
        raise bad("stop", "stop strings must not be empty")
    return tuple(stops)


def get_logit_bias(body: dict[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: {"token id": bias in [-100, 100]}, at most ``MAX_LOGIT_BIAS`` entries."""
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise bad("logit_bias", f"must be an object mapping token ids to numbers, got {show(v)}")
    if len(v) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries on this server, got {len(v)}")
    out = []
    for key, b in v.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < vocab_size):
            raise bad("logit_bias", f"keys must be token ids in [0, {vocab_size}), got {show(key)}")
        if not (isinstance(b, int | float) and not isinstance(b, bool) and -100 <= b <= 100):
            raise bad("logit_bias", f"values must be numbers in [-100, 100], got {show(b)}")
        out.append((int(key), float(b)))
    return tuple(out)


def check_token_ids(ids: list[Any], param: str, vocab_size: int) -> list[int]:
    for i, t in enumerate(ids):
        if not is_int(t):
            raise bad(param, f"item {i} must be an integer token id, got {show(t)}")
        if not 0 <= t < vocab_size:
            raise bad(param, f"token id {t} at position {i} is outside the vocabulary [0, {vocab_size})")
    return list(ids)
