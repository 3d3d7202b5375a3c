"""How many KV blocks one instance gets: from the config, capped by the machine's memory.

    EngineConfig.num_blocks | kv_cache_gb      --> that many (must fit beside the weights)
    otherwise: fraction x (available - weights) --> capped by max_num_seqs x max_model_len
        (MemoryInfo: measured by the caller, or given by a test; None: memory not reported)
    --> KVPlan(num_blocks, nbytes, why), or ConfigError naming weights, one sequence's KV, available

The minimum is one sequence of ``max_model_len`` tokens (plus the null block): a pool
that cannot hold it could never run a full-length request. The check runs before
anything is placed, so an oversized model fails with a message, not the kernel's
OOM killer.
"""

from __future__ import annotations

import dataclasses

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.block_manager import blocks_needed
from jaxserve.memory import GiB, MemoryInfo, weight_bytes

MORE = "use --dtype bfloat16, or spread the model over more devices (tp/pp)"


@dataclasses.dataclass(frozen=True)
class KVPlan:
    num_blocks: int  # including the null block
    nbytes: int
    why: str

    def describe(self) -> str:
        return f"KV pool {self.num_blocks} blocks = {self.nbytes / GiB:.2f} GiB ({self.why})"


def plan_kv(cfg: ModelConfig, config: EngineConfig, max_len: int, per_block: int,
            memory: MemoryInfo | None) -> KVPlan:
    """The KV pool for one instance (``per_block``: bytes of one block over all layers)."""
    weights = weight_bytes(cfg)
    one_seq = blocks_needed(max_len, config.block_size) + 1
    if memory is not None and weights >= memory.available:
        raise ConfigError(f"{cfg.name} does not fit: {weights / GiB:.2f} GiB of weights ({cfg.dtype}), "
                          f"{memory.available / GiB:.2f} GiB available ({memory.source}); {MORE}")
    if config.num_blocks is not None or config.kv_cache_gb is not None:
        n = config.num_blocks if config.num_blocks is not None else int(config.kv_cache_gb * GiB // per_block)
        why = "num_blocks" if config.num_blocks is not None else "--kv-cache-gb"
        if n < 2:
            raise ConfigError(f"KV cache of {n} blocks is too small (a block of {config.block_size} tokens takes "
                              f"{per_block} bytes); raise --kv-cache-gb")
        if memory is not None and weights + n * per_block > memory.available:
            left = max(memory.available - weights, 0)
            raise ConfigError(f"{_needs(cfg, weights, n * per_block, f'KV ({why})', memory)}; lower "
                              f"{why} (at most {left / GiB:.2f} GiB of KV fits), or {MORE}")
        return KVPlan(n, n * per_block, why)
    cap = config.max_num_seqs * blocks_needed(max_len, config.block_size) + 1
    limit = f"max_num_seqs {config.max_num_seqs} x max_model_len {max_len}"
    if config.workload_blocks is not None and config.workload_blocks + 1 < cap:
        cap, limit = config.workload_blocks + 1, f"the {config.workload_blocks} blocks the workload can use at once"
    if memory is None:
        return KVPlan(cap, cap * per_block, f"{limit}; memory not reported")
    budget = int(memory.fraction * (memory.available - weights))
    if budget < one_seq * per_block:
        left = max(memory.available - weights, 0)
        raise ConfigError(
            f"{_needs(cfg, weights, one_seq * per_block, f'KV for one sequence of max_model_len {max_len}', memory)}"
            f", and by default the KV pool takes at most {memory.fraction:.0%} of the {left / GiB:.2f} GiB the "
            f"weights leave; lower --max-model-len, give --kv-cache-gb (up to {left / GiB:.2f}), or {MORE}")
    n = budget // per_block
    rule = (f"{memory.fraction:.0%} of the {(memory.available - weights) / GiB:.2f} GiB that "
            f"{weights / GiB:.2f} GiB of weights leave of {memory.source}")
    if n >= cap:
        return KVPlan(cap, cap * per_block, f"capped by {limit}; {rule} would be {budget / GiB:.2f} GiB")
    return KVPlan(n, n * per_block, rule)


def _needs(cfg: ModelConfig, weights: int, kv: int, what: str, memory: MemoryInfo) -> str:
    return (f"{cfg.name} does not fit: {weights / GiB:.2f} GiB of weights ({cfg.dtype}) + {kv / GiB:.2f} GiB of "
            f"{what}; {memory.available / GiB:.2f} GiB available ({memory.source})")
