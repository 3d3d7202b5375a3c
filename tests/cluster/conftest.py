"""Fixtures of the Ray tests: one local Ray (2 CPUs) per test module."""

import os

import pytest
import ray


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for this module (left alone if one is already up)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="warning")
    yield
    if started:
        ray.shutdown()
