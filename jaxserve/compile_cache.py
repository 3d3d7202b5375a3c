"""Where this process's XLA programs come from: JAX's persistent compilation cache, and counters.

    spec ("DIR" | "off" | None)
      --resolve_cache_dir: spec, else $JAXSERVE_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR,
        else <jaxserve cache root>/xla ($JAXSERVE_CACHE or ~/.cache/jaxserve, as for the demo model)-->
    Path | None (off)
      --enable_compilation_cache: the directory created and checked writable (else a warning, and off),
        jax_compilation_cache_dir set, every program cached (no minimum compile time or size)-->
    each jit compile: a key hit loads the executable from DIR; a miss compiles and writes it there

It has to run before the process compiles anything: JAX decides once, at the first compile, whether
the persistent cache is used (``enable_compilation_cache`` resets that decision when it changes the
directory later). The launcher, ``scripts/generate_offline.py``, ``jaxserve.LLM`` and every Ray
instance actor (with the driver's resolved setting) call it.

Counters, process-wide, from ``jax.monitoring`` events: JAX emits
``/jax/core/compile/backend_compile_duration`` for every executable it obtains, *including* persistent
cache hits (the event wraps ``compile_or_get_cached``), and ``/jax/compilation_cache/cache_hits`` for
each hit. So ``program_count()`` counts executables obtained (compiled or loaded: what warm-up must
leave at zero while serving), ``cache_hit_count()`` the loads and ``compile_count()`` the difference:
programs XLA really compiled. ``thread_cache_hit_count()`` counts the loads of the calling thread only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "JAXSERVE_COMPILATION_CACHE"
OFF = "off"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_counts = {_BACKEND_COMPILE: 0, _CACHE_HIT: 0}
_thread_hits: dict[int, int] = {}  # cache hits by the thread that compiled (events fire on it)
_lock = threading.Lock()
_installed = False


def resolve_cache_dir(spec: str | os.PathLike[str] | None = None) -> Path | None:
    """The cache directory ``spec`` names (None: the default chain in the module docstring); None = off."""
    if spec is None:
        spec = os.environ.get(ENV_VAR) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if spec is None:
        from jaxserve.paths import cache_root

        return cache_root() / "xla"
    text = os.fspath(spec).strip()
    if text.lower() in (OFF, ""):
        return None
    return Path(text).expanduser().resolve()


def setting(path: Path | None) -> str:
    """The spec that resolves to ``path`` again in another process (a Ray actor): the path, or "off"."""
    return OFF if path is None else str(path)


def _writable(path: Path) -> str | None:
    """None if ``path`` is (made) a writable directory, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".jaxserve-probe-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def enable_compilation_cache(spec: str | os.PathLike[str] | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``spec`` (see ``resolve_cache_dir``) and cache every
    program; returns the directory, or None when off (asked for, or the directory is not writable:
    then a warning says so and the process compiles without a cache)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    _install_counters()
    path = resolve_cache_dir(spec)
    why = None if path is None else _writable(path)
    if why is not None:
        log.warning("compilation cache %s is not usable (%s); compiling without a persistent cache", path, why)
        path = None
    before = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size minimum at all
    if before != (None if path is None else str(path)):
        cc.reset_cache()  # JAX fixed its choice at the first compile (if there was one): choose again
    log.info("%s", describe(path))
    return path


def describe(path: Path | None) -> str:
    """One line for a log: where compiled programs are kept, or that they are not."""
    if path is None:
        return f"compilation cache: off (every start compiles every program; {ENV_VAR} or " \
               "--compilation-cache DIR turns it on)"
    return f"compilation cache: {path}"


# ---- counters -------------------------------------------------------------------------------------
def _on_event(name: str, *_: Any, **__: Any) -> None:
    if name in _counts:
        with _lock:
            _counts[name] += 1
            if name == _CACHE_HIT:
                tid = threading.get_ident()
                _thread_hits[tid] = _thread_hits.get(tid, 0) + 1


def _install_counters() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_event)  # backend compile (a duration)
    jax.monitoring.register_event_listener(_on_event)  # cache hits (a plain event)


def program_count() -> int:
    """Executables this process obtained since the counters were installed: compiled or cache loads."""
    _install_counters()
    return _counts[_BACKEND_COMPILE]


def cache_hit_count() -> int:
    """Executables loaded from the persistent compilation cache since the counters were installed."""
    _install_counters()
    return _counts[_CACHE_HIT]


def thread_cache_hit_count() -> int:
    """Cache loads by the calling thread only: what one instance's warm-up (on its own thread) obtained
    from the cache while others warm up beside it."""
    _install_counters()
    with _lock:
        return _thread_hits.get(threading.get_ident(), 0)


def compile_count() -> int:
    """Programs XLA really compiled since the counters were installed (persistent-cache hits excluded)."""
    _install_counters()
    with _lock:
        return _counts[_BACKEND_COMPILE] - _counts[_CACHE_HIT]
