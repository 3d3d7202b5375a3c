"""Pallas attention kernels, each with the jnp reference the CPU serving path uses.

- `paged_decode_attention`: one query token per sequence, K/V read through block tables.
- `prefill_attention`: causal attention over packed variable-length sequences.
"""

from pallas_kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "prefill_attention",
    "prefill_attention_reference",
]
