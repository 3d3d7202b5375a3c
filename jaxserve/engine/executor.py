"""One instance's model on its devices: sharded params, the paged KV pytree, jitted steps.

    StepInputs (numpy, host) --device_put(replicated on this mesh)--> the stage programs (KV donated;
        ``engine.stage``: embed, groups of layers, head) --> logits [R, V] (on this mesh) --sample()--> token ids (numpy)

The executor owns a ``('pp', 'tp')`` mesh with ``pp == 1`` (pipeline stages live
in ``jaxserve.engine.pipeline``, which offers the same methods). Parameters and
KV pages are placed by the logical-axis table (``jaxserve.parallel.sharding``), so
tensor parallelism is XLA's SPMD partitioning of the same pure model functions.
Programs are counted process-wide (``jaxserve.compile_cache``: ``program_count()``, compiled or
loaded from the persistent cache) so the engine can prove that serving after warm-up builds nothing new.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import ModelConfig
from jaxserve.engine.attention_backends import make_attention
from jaxserve.engine.stage import run_stage
from jaxserve.memory import zeros_untouched
from jaxserve.model.inputs import StepInputs
from jaxserve.model.opt import KVCache, Params, dtype_of
from jaxserve.model.sampling import Sampled, SamplingArrays, sample_tokens
from jaxserve.parallel.sharding import kv_sharding, make_mesh, param_shardings, replicated


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, num_layers: int | None = None,
                       dtype: str | None = None) -> int:
    layers = cfg.num_hidden_layers if num_layers is None else num_layers
    itemsize = jnp.dtype(dtype_of(dtype or cfg.dtype)).itemsize
    return 2 * layers * block_size * cfg.hidden_size * itemsize


class ModelExecutor:
    """Params + paged KV of one instance on a (pp=1, tp) mesh."""

    def __init__(self, cfg: ModelConfig, params: Params, devices: Sequence[jax.Device], tp: int = 1,
                 attention: str = "auto") -> None:
        self.cfg = cfg
        self.mesh = make_mesh(list(devices), tp, 1)
        self.tp = tp
        self.pp = 1
        self.microbatches = 1  # one stage: nothing to overlap
        self.params = jax.device_put(params, param_shardings(cfg, self.mesh))
        self._repl = replicated(self.mesh)
        self._kv_sharding = kv_sharding(self.mesh)
        self.attn_fn = make_attention(attention, self.mesh)
        self.kv: KVCache = []
        self.num_blocks = 0
        self.block_size = 0

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    def kv_stages(self) -> list[tuple[Mesh, range]]:
        """(mesh, layers) of each part of the pages: one part here."""
        return [(self.mesh, range(self.cfg.num_hidden_layers))]

    def set_stage_kv(self, stage: int, kv: KVCache) -> None:
        if stage != 0:
            raise ValueError(f"a single-stage executor has no stage {stage}")
        self.kv = kv

    def init_kv(self, num_blocks: int, block_size: int) -> None:
        """Allocate zeroed pages ``[num_blocks, block_size, H, Dh]`` per layer, heads split over tp."""
        shape = (num_blocks, block_size, self.cfg.num_attention_heads, self.cfg.head_dim)
        dt = dtype_of(self.cfg.dtype)
        self.kv = []  # the old pages go first; on CPU the new ones cost memory only where written
        self.kv = [(zeros_untouched(shape, dt, self._kv_sharding), zeros_untouched(shape, dt, self._kv_sharding))
                   for _ in range(self.cfg.num_hidden_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, inputs: StepInputs) -> jax.Array:
        """Run one step; returns logits [R, V] (float32, on this mesh). Updates the KV in place."""
        tokens, positions, meta, logits_index = jax.device_put(
            (inputs.tokens, inputs.positions, inputs.meta, inputs.logits_index), self._repl)
        logits, self.kv = run_stage(self.params, self.cfg, self.attn_fn, tokens, positions, self.kv, meta,
                                    logits_index, first=True, last=True, replicated=self._repl)
        return logits

    def sample(self, logits: jax.Array, arrays: SamplingArrays) -> Sampled:
        return sample_tokens(logits, arrays, self._repl)

    # ---- KV blocks as host/device arrays (transfer between instances) ----------------------
    def gather_blocks(self, block_ids: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
        """Per-layer (k, v) ``[n, bs, H, Dh]`` copies of the given blocks (on this mesh)."""
        idx = jax.device_put(np.asarray(block_ids, np.int32), self._repl)
        return gather_pages(self.kv, idx)

    def scatter_blocks(self, block_ids: Sequence[int], blocks: list[tuple[jax.Array, jax.Array]]) -> None:
        """Write per-layer (k, v) ``[n, bs, H, Dh]`` into the given blocks (donating the cache)."""
        idx = jax.device_put(np.asarray(block_ids, np.int32), self._repl)
        blocks = jax.device_put(blocks, self._kv_sharding)
        self.kv = scatter_pages(self.kv, idx, blocks)


@jax.jit
def gather_pages(kv: KVCache, idx: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per-layer (k, v) ``[n, bs, H, Dh]`` copies of pages ``idx`` (int32 ``[n]``) of ``kv``."""
    return [(k[idx], v[idx]) for k, v in kv]


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_pages(kv: KVCache, idx: jax.Array, blocks: list[tuple[jax.Array, jax.Array]]) -> KVCache:
    """``kv`` with pages ``idx`` overwritten by per-layer (k, v) ``[n, bs, H, Dh]``; ``kv`` is donated."""
    return [(k.at[idx].set(bk), v.at[idx].set(bv)) for (k, v), (bk, bv) in zip(kv, blocks, strict=True)]
