"""Cross-process KV hand-off, measured: the collective path against a plain collective copy of the same
bytes and against Ray's object store, between the same two processes.

    driver: CoordinatorService(2) -> two HandoffBench actors (one CPU device each) join the group
    per request size and repetition, in turn (so load from elsewhere hits all three alike):
      collective:   src.export(n)  [gather per power-of-two piece: CollectiveTransport.export_kv]
                    then at once src.send(handle) / dst.fetch_import(handle)  [a ppermute per piece,
                    then the import into the pages; fetch and import timed apart]
      plain copy:   at once src.plain(n) / dst.plain(n): exchange() of 2L arrays already in place
      object store: src.export_store(n)  [gather to numpy + ray.put], dst.import_store(ref)
                    [ray.get + numpy -> device + scatter]
    each side times its own part (no Ray call overhead); a path's time is the sum of its parts
    (the two ends of an exchange overlap: the destination's time covers it).

The KV is OPT-1.3b-shaped (24 layers x 32 heads x 64, blocks of 16: 393,216 bytes per token, float32);
the executors carry zero weights with a tiny vocabulary and FFN (only the KV moves).
"""

from __future__ import annotations

import time
from typing import Any

BLOCK = 16


def kv_config() -> Any:
    from jaxserve.config import model_preset

    return model_preset("opt-1.3b").replace(vocab_size=512, ffn_dim=256)


class HandoffBench:
    """One end of the benchmark, in its own process (a Ray actor)."""

    def __init__(self, spec: Any, process_id: int, max_tokens: int) -> None:
        from jaxserve.cluster.collective import join_group

        join_group(spec, process_id)
        import jax
        import numpy as np

        from jaxserve.cluster.actors import ObjectStoreTransport
        from jaxserve.cluster.collective import CollectiveTransport
        from jaxserve.engine.executor import ModelExecutor
        from jaxserve.model.opt import abstract_params

        cfg = kv_config()
        params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
        self.ex = ModelExecutor(cfg, params, jax.local_devices()[:1], tp=1)
        self.ex.init_kv(max_tokens // BLOCK + 2, BLOCK)
        self.pid = process_id
        self.coll, self.store = CollectiveTransport(process_id), ObjectStoreTransport()
        self._plain: dict[int, Any] = {}

    def _ids(self, n: int) -> list[int]:
        from jaxserve.engine.block_manager import blocks_needed

        k = blocks_needed(n, BLOCK)
        return list(range(1, k + 1)) if self.pid == 0 else list(range(self.ex.num_blocks - 1, self.ex.num_blocks - 1 - k, -1))

    # ---- the collective path -------------------------------------------------------------------
    def export(self, n: int) -> tuple[Any, float]:

        t0 = time.perf_counter()
        h = self.coll.export_kv(self.ex, self._ids(n), n, request_id="bench")  # waits for its gathers
        return h, time.perf_counter() - t0

    def send(self, h: Any, dst: int) -> float:
        t0 = time.perf_counter()
        self.coll.send(h, dst)
        return time.perf_counter() - t0

    def fetch_import(self, h: Any) -> tuple[float, float]:
        """(fetch s, import s): the exchange (waiting for the source included), then the page writes."""
        import jax

        t0 = time.perf_counter()
        fetched = self.coll.fetch(h)
        t1 = time.perf_counter()
        self.coll.import_kv(self.ex, self._ids(h.num_tokens), fetched)
        jax.block_until_ready(self.ex.kv)
        return t1 - t0, time.perf_counter() - t1

    # ---- a plain collective copy of the same bytes ---------------------------------------------
    def plain(self, n: int, src: int, dst: int) -> float:
        import jax
        import jax.numpy as jnp

        from jaxserve.cluster.collective import exchange, first_device

        if n not in self._plain:
            shape = (1, n, self.ex.cfg.num_attention_heads, self.ex.cfg.head_dim)  # per layer, k and v
            one = jax.device_put(jnp.ones(shape, jnp.float32), first_device(self.pid))
            self._plain[n] = [one] * (2 * self.ex.cfg.num_hidden_layers)
        t0 = time.perf_counter()
        exchange(src, dst, self._plain[n], True)
        return time.perf_counter() - t0

    # ---- the object-store path -----------------------------------------------------------------
    def export_store(self, n: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        ref = self.store.export_kv(self.ex, self._ids(n), n)
        return [ref], time.perf_counter() - t0  # in a list: the caller passes the ref on, unresolved

    def import_store(self, refs: list[Any], n: int) -> float:
        import jax

        t0 = time.perf_counter()
        self.store.import_kv(self.ex, self._ids(n), refs[0])  # ray.get with a deadline, then the numpy import
        jax.block_until_ready(self.ex.kv)
        return time.perf_counter() - t0

    def check(self, n: int) -> float:
        """Max |difference| between this side's destination blocks and the source's pattern."""
        import numpy as np

        got = np.asarray(self.ex.gather_blocks(self._ids(n))[0][0])
        return float(np.abs(got.reshape(-1)[: n * 32 * 64] - 1.0).max())

    def fill(self, n: int) -> None:
        """Write ones into the source blocks (so the destination's check sees real bytes)."""
        import jax.numpy as jnp

        ids = self._ids(n)
        blocks = [(jnp.ones_like(k), jnp.ones_like(v)) for k, v in self.ex.gather_blocks(ids)]
        self.ex.scatter_blocks(ids, blocks)


def run(sizes: list[int], reps: int, log: Any = print) -> dict[int, dict[str, list[float]]]:
    """Times per size and path (seconds per repetition), and the exactness check, in one Ray session."""
    import ray

    from jaxserve.cluster.collective import CoordinatorService

    service = CoordinatorService(2, host=ray.util.get_node_ip_address())
    env = {"env_vars": {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}}
    cls = ray.remote(HandoffBench).options(num_cpus=0.5, runtime_env=env, max_restarts=0)
    src, dst = (cls.remote(service.spec, i, max(sizes)) for i in range(2))
    out: dict[int, dict[str, list[float]]] = {}
    try:
        ray.get(src.fill.remote(max(sizes)), timeout=300)
        for n in sizes:
            res: dict[str, list[float]] = {k: [] for k in ("collective", "plain", "object store", "export",
                                                            "exchange", "import")}
            for rep in range(reps + 1):  # the first round compiles: not counted
                h, t_exp = ray.get(src.export.remote(n), timeout=300)
                _, (t_xch, t_imp) = ray.get([src.send.remote(h, 1), dst.fetch_import.remote(h)], timeout=300)
                _, t_plain = ray.get([src.plain.remote(n, 0, 1), dst.plain.remote(n, 0, 1)], timeout=300)
                refs, t_sexp = ray.get(src.export_store.remote(n), timeout=300)
                t_simp = ray.get(dst.import_store.remote(refs, n), timeout=300)
                if rep:
                    for k, v in (("collective", t_exp + t_xch + t_imp), ("plain", t_plain),
                                 ("object store", t_sexp + t_simp), ("export", t_exp), ("exchange", t_xch),
                                 ("import", t_imp)):
                        res[k].append(v)
            res["error"] = [ray.get(dst.check.remote(n), timeout=300)]
            log(f"{n} tokens: " + ", ".join(f"{k} {1e3 * min(v):.1f} ms" for k, v in res.items() if k != "error"))
            out[n] = res
    finally:
        for a in (src, dst):
            ray.kill(a)
        service.shutdown()
    return out
