"""Helpers of the Ray tests."""

import time

from jaxserve.runtime.router import Router


def drained(eng: Router, tries: int = 200) -> dict:
    """KV blocks each live instance holds, once none does (or after ``tries`` x 50 ms): frees travel
    as messages, so a test waits for them before asserting 0."""
    for _ in range(tries):
        held = eng.held_blocks()
        if not any(held.values()):
            break
        time.sleep(0.05)
    return held
