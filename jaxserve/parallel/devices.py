"""Explicit split of the local devices into disjoint per-instance sets.

    "0,1,4-5" --parse_device_ids()--> [0, 1, 4, 5] --devices_by_ids()--> [Device, ...]
    [Device x N], sizes [2, 4] --split_devices()--> [[d0, d1], [d2, d3, d4, d5]]  (d6, d7 unused)

Every instance (prefill, decode, colocated) gets its own list of devices, in the
order given; meshes are then built from that list (``sharding.make_mesh`` for one
stage, ``engine.pipeline.PipelineExecutor`` for ``pp`` stages). Nothing here guesses: a
split that does not fit, an id given twice or a device that does not exist is a
``ValueError`` saying which.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax


def split_devices(devices: Sequence[jax.Device], sizes: Sequence[int]) -> list[list[jax.Device]]:
    """Consecutive disjoint slices of ``devices``, one of each size; leftover devices stay unused."""
    sizes = list(sizes)
    for i, n in enumerate(sizes):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"instance {i}: device count must be a positive integer, got {n!r}")
    if len(set(devices)) != len(devices):
        raise ValueError("the device list names a device more than once")
    need = sum(sizes)
    if need > len(devices):
        raise ValueError(f"instances of {sizes} devices need {need} devices, only {len(devices)} available")
    out, start = [], 0
    for n in sizes:
        out.append(list(devices[start:start + n]))
        start += n
    return out


def parse_device_ids(spec: str) -> list[int]:
    """Parse ``"0,1,2"`` or ``"0-3,6"`` into device ids, in the order written (no repeats)."""
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"device ids {spec!r}: empty entry")
        try:
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if hi < lo:
                    raise ValueError
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(f"device ids {spec!r}: {part!r} is not an id or a range lo-hi") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"device ids {spec!r}: ids must be >= 0")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"device ids {spec!r}: {dup} given more than once")
    return ids


def devices_by_ids(ids: Sequence[int], devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices with these ids (from ``jax.local_devices()`` unless given), in the order of ``ids``."""
    pool = {d.id: d for d in (jax.local_devices() if devices is None else devices)}
    missing = [i for i in ids if i not in pool]
    if missing:
        raise ValueError(f"no device with id {missing}; available: {sorted(pool)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"device ids {list(ids)} repeat an id")
    return [pool[i] for i in ids]
