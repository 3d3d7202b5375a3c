"""Warm-up covers every packed prefill shape the runner can ask for (no jax needed)."""

import pytest

from jaxserve.engine.runner import Buckets


@pytest.mark.parametrize("max_num_seqs", [1, 16, 32, 64])
def test_every_packed_call_shape_is_warmed_up(max_num_seqs):
    b = Buckets.for_limits(max_num_seqs=max_num_seqs, max_model_len=512, max_num_batched_tokens=512, block_size=16)
    warm = set(b.shapes(decode=False, prefill=True, chunks=False))
    for tokens in range(1, 513):
        for rows in range(1, min(tokens, max_num_seqs) + 1):
            assert b.packed_shape(tokens, rows) in warm, (tokens, rows)
    # 17 one-token prompts pad to 32 tokens and 64 rows: a shape with more rows than tokens
    if max_num_seqs == 64:
        assert (b.packed_shape(17, 17).num_tokens, b.packed_shape(17, 17).logits_rows) == (32, 64)
