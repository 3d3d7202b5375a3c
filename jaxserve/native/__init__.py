"""Native CPU kernels, built on this machine the first time they are needed and registered with XLA.

    kernels.cc (paged_decode.cc + packed_prefill.cc + paged_prefill.cc + token_filters.cc) --c++ -O3 -march=native
      (once per sources, compiler, jaxlib and CPU; ~4 s)-->
    <cache>/native/kernels-<key>.so --ctypes + jax.ffi.register_ffi_target-->
    "jaxserve_paged_decode", "jaxserve_packed_prefill", "jaxserve_paged_prefill", "jaxserve_keep_mask"
      (XLA CPU custom calls)

``paged_decode(q, k_pages, v_pages, block_tables, context_lens, scale)`` is the decode attention of
``jaxserve.model.attention.paged_decode_attention_xla`` (same inputs, same result to float32
rounding) as one custom call that streams each sequence's pages once, at close to copy bandwidth.
``packed_prefill(q, k, v, segment_ids, scale)`` is ``packed_attention_xla`` (prompts packed from
position 0, causal within each) computing only each prompt's own causal triangle.
``paged_prefill(q, k_pages, v_pages, group, positions, scale)`` is ``paged_group_attention_xla`` for
groups of several queries per sequence (prompt chunks after a cached prefix), reading only each
sequence's real context: one block-table width serves every call. ``keep_mask(x, top_k, top_p, min_p)``
is ``jaxserve.model.token_filters.keep_mask`` (the sampler's top-k / top-p / min-p), sorting only
as much of each row as its kept prefix needs.

The library is compiled with the C++ compiler found as ``$CXX`` or ``c++`` against the XLA FFI
headers that jaxlib ships (``jax.ffi.include_dir()``), into ``$JAXSERVE_NATIVE_CACHE`` or
``<jaxserve cache root>/native`` (~/.cache/jaxserve/native), written to a temporary name and renamed,
so processes that build at once (Ray actors) never load a half-written file. ``available()`` says
whether the kernel can be used (``build_in_background()`` starts that early, overlapping the model
load, in the launcher, the offline script and each Ray instance actor): it is False (with the reason, logged once as a warning) when
``$JAXSERVE_NATIVE_KERNELS`` is ``off``, when no compiler is found or the build fails; callers then
use the XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jaxlib  # light (no jax): its version and headers key and build the library
import numpy as np

if TYPE_CHECKING:
    import jax

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("paged_decode.cc", "packed_prefill.cc", "paged_prefill.cc",
                                                     "token_filters.cc"))
HEADERS = tuple(Path(__file__).with_name(n) for n in ("fast_exp.h", "attend_tile.h", "pool_for.h"))
UNITY = Path(__file__).with_name("kernels.cc")  # includes the sources: one compile (the headers parsed once)
TARGETS = {"jaxserve_paged_decode": "JaxservePagedDecode", "jaxserve_packed_prefill": "JaxservePackedPrefill",
           "jaxserve_paged_prefill": "JaxservePagedPrefill", "jaxserve_keep_mask": "JaxserveKeepMask"}
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-fPIC", "-shared", "-w")
ENV_SWITCH = "JAXSERVE_NATIVE_KERNELS"
ENV_CACHE = "JAXSERVE_NATIVE_CACHE"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "lib": the loaded library (kept alive)


def cache_dir() -> Path:
    """Where built libraries live: $JAXSERVE_NATIVE_CACHE, else <jaxserve cache root>/native."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    from jaxserve.paths import cache_root

    return cache_root() / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx)


def _key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in (UNITY, *SOURCES, *HEADERS)), " ".join(FLAGS).encode(), version.encode(), jaxlib.__version__.encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _include_dir() -> str:
    """jaxlib's bundled headers (``jax.ffi.include_dir()``), found without importing jax."""
    return os.path.join(os.path.dirname(os.path.abspath(jaxlib.__file__)), "include")


def _build(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{_include_dir()}", str(UNITY), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[bool, str]:
    if _switched_off():
        return False, f"${ENV_SWITCH} is off"
    cxx = _compiler()
    if cxx is None:
        return False, "no C++ compiler ($CXX or c++) on PATH"
    try:
        lib_path = cache_dir() / f"kernels-{_key(cxx)}.so"
        if not lib_path.exists():
            t0 = time.perf_counter()
            _build(cxx, lib_path)
            log.info("built the native CPU attention kernels in %.1f s: %s", time.perf_counter() - t0, lib_path)
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
        import jax

        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return False, str(e)
    _state["lib"] = lib
    return True, ""


def available() -> bool:
    """Whether the native kernel is built and registered (building it on the first call)."""
    with _lock:
        if "ok" not in _state:
            ok, why = _load()
            _state["ok"], _state["why"] = ok, why
            if not ok and not why.startswith("$"):
                log.warning("native CPU attention kernels unavailable (%s); attention uses the slower XLA path "
                            "(set $%s=off to skip the build)", why, ENV_SWITCH)
        return bool(_state["ok"])


def expected() -> bool:
    """Whether the kernels can be counted on, without waiting for a build in progress: the result when
    known, else whether they are switched on and a compiler exists (if that build then fails, the
    first kernel call raises, naming the reason; ``available()`` callers fall back instead)."""
    if "ok" in _state:
        return bool(_state["ok"])
    return not _switched_off() and _compiler() is not None


def require() -> None:
    """Wait for the kernels (building them if no one has); raise RuntimeError if they cannot be had."""
    if not available():
        raise RuntimeError(f"the native CPU kernels are unavailable ({_state['why']}); set ${ENV_SWITCH}=off "
                           "to serve with the XLA attention path")


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no")


def build_in_background() -> None:
    """Start building (or loading) the kernel on a daemon thread, so it overlaps model loading;
    ``available()`` then waits for that result instead of building again."""
    if "ok" not in _state and _serves_on_cpu():
        threading.Thread(target=available, name="jaxserve-native-build", daemon=True).start()


def _serves_on_cpu() -> bool:
    """Whether this process will likely run on the CPU, asked without starting a JAX backend (that
    would fix the device count before the launcher sets it): JAX_PLATFORMS, else no GPU plugin."""
    first = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if first:
        return first == "cpu"
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def unavailable_reason() -> str:
    """Why ``available()`` is False ('' when it is True)."""
    available()
    return str(_state["why"])


def paged_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                 context_lens: jax.Array, scale: float) -> jax.Array:
    """Decode attention of q [B, Hq, D] over pages [N, bs, Hkv, D] (float32): [B, Hq, D]."""
    import jax
    import jax.numpy as jnp

    require()

    call = jax.ffi.ffi_call("jaxserve_paged_decode", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_pages, v_pages, block_tables.astype(jnp.int32),
                context_lens.astype(jnp.int32), scale=np.float32(scale))


def packed_prefill(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float) -> jax.Array:
    """Causal attention of packed prompts over their own keys, q / k / v [T, H, D]: [T, H, D] float32
    (rows with segment id -1 are zeros)."""
    import jax
    import jax.numpy as jnp

    require()

    call = jax.ffi.ffi_call("jaxserve_packed_prefill", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    f32 = jnp.float32
    return call(q.astype(f32), k.astype(f32), v.astype(f32), segment_ids.astype(jnp.int32), scale=np.float32(scale))


def paged_prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, query_index: jax.Array,
                  positions: jax.Array, block_tables: jax.Array, context_lens: jax.Array, scale: float) -> jax.Array:
    """Queries ``query_index`` [B, Q] of q [T, Hq, D] over their sequences' pages, causal by position:
    [B, Q, Hq, D] float32 (padding queries, index T, are zeros)."""
    import jax
    import jax.numpy as jnp

    require()

    b, qn = query_index.shape
    call = jax.ffi.ffi_call("jaxserve_paged_prefill", jax.ShapeDtypeStruct((b, qn, *q.shape[1:]), jnp.float32))
    i32 = jnp.int32
    return call(q.astype(jnp.float32), k_pages, v_pages, query_index.astype(i32), positions.astype(i32),
                block_tables.astype(i32), context_lens.astype(i32), scale=np.float32(scale))


def keep_mask(x: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """``jaxserve.model.token_filters.keep_mask`` on the CPU: x [B, V] float32 -> keep [B, V] bool."""
    import jax
    import jax.numpy as jnp

    require()

    call = jax.ffi.ffi_call("jaxserve_keep_mask", jax.ShapeDtypeStruct(x.shape, jnp.bool_))
    return call(x.astype(jnp.float32), top_k.astype(jnp.int32), top_p.astype(jnp.float32), min_p.astype(jnp.float32))
