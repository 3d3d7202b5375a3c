"""A fixed serving scenario (a packed prefill then paged decodes) and its single-device reference.

    Scenario: 3 prompts of different lengths, shuffled non-contiguous block tables,
    step 0 = packed prefill, steps 1..DECODES = one decode token each (fixed token ids).
    reference_run: plain jitted ``forward`` on one device -> logits per step + final KV (numpy).
    run_executor: the same steps through any executor (``execute``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.generate import jit_forward
from jaxserve.model.inputs import SeqChunk, StepInputs, StepShape, build_step_inputs
from jaxserve.model.opt import init_kv_cache

BS = 8  # block size
NUM_BLOCKS = 24
DECODES = 3
MB = 4  # max blocks per sequence in a decode step


class Scenario:
    def __init__(self, vocab: int, lens: tuple[int, ...] = (3, 11, 20), seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.prompts = [[2, *rng.integers(3, vocab, n - 1).tolist()] for n in lens]
        self.next_tokens = rng.integers(3, vocab, (DECODES, len(lens))).tolist()
        perm = rng.permutation(np.arange(1, NUM_BLOCKS)).tolist()
        self.tables, i = [], 0
        for n in lens:
            k = -(-(n + DECODES) // BS)
            self.tables.append(perm[i:i + k])
            i += k

    def chunks(self, step: int, seqs: list[int] | None = None) -> list[SeqChunk]:
        """The chunks of ``step`` (0 = prefill) for the sequences ``seqs`` (default all)."""
        seqs = list(range(len(self.prompts))) if seqs is None else seqs
        if step == 0:
            return [SeqChunk(self.prompts[b], 0, self.tables[b]) for b in seqs]
        return [SeqChunk([self.next_tokens[step - 1][b]], len(self.prompts[b]) + step - 1, self.tables[b])
                for b in seqs]

    def inputs(self, step: int, seqs: list[int] | None = None) -> StepInputs:
        return step_inputs(self.chunks(step, seqs), packed=step == 0)


def step_inputs(chunks: list[SeqChunk], packed: bool) -> StepInputs:
    """One bucketed step: packed prefill (T=40) or a [4, 1] decode group, with padding rows."""
    if packed:
        shape = StepShape(40, 4, True)
    else:
        shape = StepShape(8, 4, False, ((4, 1, MB),))
    return build_step_inputs([chunks], shape, BS)


def reference_run(cfg, params, sc: Scenario) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    dev = jax.devices()[0]
    params = jax.device_put(params, dev)
    kv = jax.device_put(init_kv_cache(cfg, NUM_BLOCKS, BS), dev)
    out = []
    for step in range(DECODES + 1):
        inp = sc.inputs(step)
        logits, kv = jit_forward(params, cfg, jnp.asarray(inp.tokens), jnp.asarray(inp.positions), kv,
                                 jax.tree_util.tree_map(jnp.asarray, inp.meta), jnp.asarray(inp.logits_index))
        out.append(np.asarray(logits)[: len(sc.prompts)])
    return out, [(np.asarray(k), np.asarray(v)) for k, v in kv]


def run_executor(ex, sc: Scenario) -> list[np.ndarray]:
    """All scenario steps through ``ex.execute`` on a fresh cache; logits per step (real rows only)."""
    ex.init_kv(NUM_BLOCKS, BS)
    return [np.asarray(ex.execute(sc.inputs(step)))[: len(sc.prompts)] for step in range(DECODES + 1)]


def max_kv_diff(kv, ref) -> float:
    assert len(kv) == len(ref)
    return max(float(np.max(np.abs(np.asarray(a) - b))) for layer, rl in zip(kv, ref, strict=True)
               for a, b in zip(layer, rl, strict=True))
