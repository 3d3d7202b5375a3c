"""How much memory this process may use, and zeroed buffers that cost nothing until written.

    host:   min(/proc/meminfo MemAvailable, cgroup memory.max - working set)  --> MemoryInfo (fraction 0.5)
    device: sum over devices of memory_stats() bytes_limit - bytes_in_use    --> MemoryInfo (fraction 0.9)
    MemoryInfo.share(n): one host measured once, split evenly between the n instances built on it

Consumers: the model loader checks that the weights fit before reading them
(``check_weights_fit``); the engine sizes its KV pool from a ``MemoryInfo``
(``jaxserve.engine.kv_budget``); tests pass a ``MemoryInfo`` of their own instead of
measuring this machine. ``zeros_untouched`` makes the KV pages: on a Linux CPU host
their memory goes back to the kernel right after the zero fill, so the resident size
grows with the blocks actually written, not with the pool.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import mmap
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ConfigError, ModelConfig

GiB = 2**30
HOST_FRACTION = 0.5  # of host memory free after the weights: the rest stays for activations, compiles, the OS
DEVICE_FRACTION = 0.9  # of device memory free after the weights (the device runs nothing else)


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """Bytes this instance may use for weights + KV, where the figure came from, and the default
    share of ``available - weights`` that the KV pool takes."""

    available: int
    source: str
    fraction: float = HOST_FRACTION

    def share(self, n: int) -> MemoryInfo:
        """This memory split evenly between ``n`` instances."""
        if n <= 1:
            return self
        return dataclasses.replace(self, available=self.available // n, source=f"{self.source} / {n} instances")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup (v2, else v1) memory limit, page cache counted as free."""
    rel = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].lstrip("/")
    except OSError:
        pass
    for base in dict.fromkeys([Path("/sys/fs/cgroup") / rel, Path("/sys/fs/cgroup")]):  # own cgroup first
        limit, used = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        if limit is not None and used is not None:
            return limit - used + _inactive_file(base / "memory.stat")
    v1 = Path("/sys/fs/cgroup/memory")
    limit, used = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is not None and used is not None and limit < 2**60:
        return limit - used + _inactive_file(v1 / "memory.stat")
    return None


def _inactive_file(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_memory() -> MemoryInfo | None:
    """Host memory available now (MemAvailable, lowered by a cgroup limit), or None if unknown."""
    avail, source = None, "host MemAvailable"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host free pages"
        except (ValueError, OSError):
            return None
    cg = _cgroup_available()
    if cg is not None and (avail is None or cg < avail):
        avail, source = cg, "cgroup memory.max"
    return None if avail is None else MemoryInfo(max(avail, 0), source, HOST_FRACTION)


def device_memory(devices: Sequence[jax.Device]) -> MemoryInfo | None:
    """Free device memory summed over ``devices`` (bytes_limit - bytes_in_use), or None if not reported."""
    total = 0
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        total += stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return MemoryInfo(total, f"{devices[0].platform} memory_stats x {len(devices)}", DEVICE_FRACTION)


def measure_memory(devices: Sequence[jax.Device]) -> MemoryInfo | None:
    """What ``devices`` can hold: host memory for CPU devices, the devices' own memory otherwise."""
    if all(d.platform == "cpu" for d in devices):
        return host_memory()
    return device_memory(devices)


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of the model's parameters in its dtype (from the shapes: nothing is read or allocated)."""
    from jaxserve.model.opt import dtype_of, is_shape_tuple, param_shapes

    shapes = jax.tree_util.tree_leaves(param_shapes(cfg), is_leaf=is_shape_tuple)
    return sum(math.prod(s) for s in shapes) * jnp.dtype(dtype_of(cfg.dtype)).itemsize


def check_weights_fit(cfg: ModelConfig, memory: MemoryInfo | None) -> None:
    """Raise ConfigError naming the numbers if the weights alone exceed ``memory``."""
    if memory is None:
        return
    need = weight_bytes(cfg)
    if need > memory.available:
        raise ConfigError(
            f"{cfg.name}: the weights need {need / GiB:.2f} GiB ({cfg.dtype}) but only "
            f"{memory.available / GiB:.2f} GiB is available ({memory.source}); use a smaller dtype "
            "(--dtype bfloat16), more devices (tp/pp), or a machine with more memory")


def zeros_untouched(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
    """Zeros with ``sharding``; on a Linux CPU host their pages go back to the kernel at once.

    The kernel maps a released private page again, zero-filled, on its next touch, so the
    contents stay zeros while the resident size counts only pages written since."""
    x = _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()
    if sys.platform.startswith("linux") and all(d.platform == "cpu" for d in sharding.device_set):
        x.block_until_ready()
        for shard in x.addressable_shards:
            _dont_need(shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
    return x


@functools.lru_cache(maxsize=64)
def _zeros_program(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    """One jitted zero fill per (shape, dtype, sharding): a pool's 2 x layers arrays trace and compile once."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


_MADV_DONTNEED = 4


def _dont_need(ptr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [ptr, ptr + nbytes) (best effort)."""
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass
