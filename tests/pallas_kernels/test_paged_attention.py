"""Paged decode attention: Pallas kernel (interpret mode on CPU) vs the jnp reference vs numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import paged_decode_attention, paged_decode_attention_reference

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 2e-2}


def make_paged(
    lens: list[int],
    heads: int,
    head_dim: int,
    block_size: int,
    max_blocks: int,
    dtype=F32,
    seed: int = 0,
    num_blocks: int | None = None,
):
    """Random q and a paged cache whose null block and unused slots hold NaN.

    Pages are handed out from a shuffled pool (so tables are non-contiguous); table
    entries past a sequence's length are 0, the null block. num_blocks (default: just
    enough plus three spare) fixes the cache size so that shapes stay put across draws.
    """
    rng = np.random.default_rng(seed)
    batch = len(lens)
    used = [-(-n // block_size) for n in lens]
    assert max(used, default=0) <= max_blocks
    num_blocks = num_blocks or 1 + sum(used) + 3
    assert num_blocks > sum(used)
    shape = (num_blocks, block_size, heads, head_dim)
    k_pages = np.full(shape, np.nan, np.float32)
    v_pages = np.full(shape, np.nan, np.float32)
    pool = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((batch, max_blocks), np.int32)
    next_page = 0
    for b, n in enumerate(lens):
        for j in range(used[b]):
            page = pool[next_page]
            next_page += 1
            tables[b, j] = page
            valid = min(block_size, n - j * block_size)  # the tail of the last page stays NaN
            k_pages[page, :valid] = rng.standard_normal((valid, heads, head_dim))
            v_pages[page, :valid] = rng.standard_normal((valid, heads, head_dim))
    q = rng.standard_normal((batch, heads, head_dim)).astype(np.float32)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(tables),
        jnp.asarray(np.asarray(lens, np.int32)),
    )


def naive_numpy(q, k_pages, v_pages, tables, lens, sm_scale):
    """One (sequence, head) at a time, keys fetched position by position, float64."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    tables, lens = np.asarray(tables), np.asarray(lens)
    block_size = k_pages.shape[1]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(lens[b])
        if n == 0:
            continue
        pages = [tables[b, p // block_size] for p in range(n)]
        slots = [p % block_size for p in range(n)]
        for h in range(q.shape[1]):
            keys = np.stack([k_pages[pg, sl, h] for pg, sl in zip(pages, slots, strict=True)])
            vals = np.stack([v_pages[pg, sl, h] for pg, sl in zip(pages, slots, strict=True)])
            s = keys @ q[b, h] * sm_scale
            w = np.exp(s - s.max())
            out[b, h] = (w / w.sum()) @ vals
    return out


def lengths_for(batch: int, block_size: int, max_blocks: int) -> list[int]:
    """Ragged lengths covering 1, exact multiples of the block size, mid-block ends, the max."""
    pool = [
        1,
        block_size,
        block_size + 1,
        3 * block_size - 1,
        2 * block_size,
        max_blocks * block_size,
        block_size // 2 + 3,
        (max_blocks - 1) * block_size + 2,
    ]
    return [pool[i % len(pool)] for i in range(batch)]


# (batch, heads, head_dim, block_size, pages_per_chunk, dtype): every value of each axis
# appears, without the full product.
GRID = [
    (1, 1, 64, 8, None, F32),
    (3, 4, 128, 16, 1, F32),
    (8, 12, 64, 32, None, F32),
    (3, 12, 128, 8, 4, F32),
    (8, 4, 64, 16, 2, BF16),
    (1, 12, 128, 32, None, BF16),
    (3, 1, 64, 16, 8, BF16),
]


@pytest.mark.parametrize(("batch", "heads", "head_dim", "block_size", "ppc", "dtype"), GRID)
def test_kernel_matches_reference(batch, heads, head_dim, block_size, ppc, dtype):
    max_blocks = 6
    lens = lengths_for(batch, block_size, max_blocks)
    args = make_paged(lens, heads, head_dim, block_size, max_blocks, dtype, seed=batch * heads)
    scale = head_dim**-0.5
    out = paged_decode_attention(*args, sm_scale=scale, interpret=True, pages_per_chunk=ppc)
    ref = paged_decode_attention_reference(*args, sm_scale=scale)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype]
    )


@pytest.mark.parametrize(
    ("lens", "heads", "head_dim", "block_size"),
    [([1, 16, 17, 47, 0], 3, 64, 16), ([8, 3, 24], 2, 128, 8), ([64, 33], 1, 64, 32)],
)
def test_reference_matches_naive_numpy(lens, heads, head_dim, block_size):
    args = make_paged(lens, heads, head_dim, block_size, max_blocks=4, seed=7)
    ref = paged_decode_attention_reference(*args, sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(ref), naive_numpy(*args, 0.3), atol=1e-5, rtol=1e-5)


def test_zero_length_rows_give_zeros():
    args = make_paged([0, 5, 0, 16], heads=2, head_dim=64, block_size=8, max_blocks=3)
    for out in (
        paged_decode_attention(*args, sm_scale=0.125, interpret=True),
        paged_decode_attention_reference(*args, sm_scale=0.125),
    ):
        out = np.asarray(out)
        assert np.isfinite(out).all()
        assert (out[[0, 2]] == 0).all()
        assert np.abs(out[[1, 3]]).sum() > 0


def test_interpret_default_on_cpu():
    assert jax.default_backend() == "cpu"  # conftest pins the CPU platform
    args = make_paged([9, 2], heads=2, head_dim=64, block_size=8, max_blocks=2)
    out = paged_decode_attention(*args, sm_scale=0.125)  # interpret=None -> interpreter here
    ref = paged_decode_attention_reference(*args, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 40), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_random_lengths_and_tables(lens, seed):
    # Fixed shapes (one compilation); lengths and page placement vary.
    args = make_paged(lens, heads=2, head_dim=64, block_size=8, max_blocks=5, seed=seed, num_blocks=24)
    out = paged_decode_attention(*args, sm_scale=0.125, interpret=True, pages_per_chunk=2)
    np.testing.assert_allclose(np.asarray(out), naive_numpy(*args, 0.125), atol=1e-5, rtol=1e-5)


def _good(**over):
    args = dict(
        q=jnp.zeros((2, 4, 64), F32),
        k_pages=jnp.zeros((5, 8, 4, 64), F32),
        v_pages=jnp.zeros((5, 8, 4, 64), F32),
        block_tables=jnp.zeros((2, 3), jnp.int32),
        context_lens=jnp.zeros((2,), jnp.int32),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"q": jnp.zeros((2, 64), F32)}, "q must be"),
        ({"k_pages": jnp.zeros((5, 8, 3, 64), F32), "v_pages": jnp.zeros((5, 8, 3, 64), F32)}, "head count"),
        ({"v_pages": jnp.zeros((5, 8, 4, 32), F32)}, "v_pages shape"),
        (
            {"k_pages": jnp.zeros((5, 8, 4, 32), F32), "v_pages": jnp.zeros((5, 8, 4, 32), F32)},
            "head_dim mismatch",
        ),
        (
            {
                "q": jnp.zeros((2, 4, 12), F32),
                "k_pages": jnp.zeros((5, 8, 4, 12), F32),
                "v_pages": jnp.zeros((5, 8, 4, 12), F32),
            },
            "multiple of 8",
        ),
        (
            {"k_pages": jnp.zeros((5, 8, 4, 64), BF16), "v_pages": jnp.zeros((5, 8, 4, 64), BF16)},
            "dtype mismatch",
        ),
        ({"block_tables": jnp.zeros((2, 3), jnp.float32)}, "block_tables must be int32"),
        ({"block_tables": jnp.zeros((3, 3), jnp.int32)}, "block_tables must be"),
        ({"context_lens": jnp.zeros((3,), jnp.int32)}, "context_lens must be"),
        ({"context_lens": jnp.zeros((2,), jnp.float32)}, "context_lens must be int32"),
    ],
)
def test_shape_checks(over, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_good(**over), sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_reference(**_good(**over), sm_scale=1.0)


def test_gpu_only_checks_need_powers_of_two():
    bad = _good(k_pages=jnp.zeros((5, 12, 4, 64), F32), v_pages=jnp.zeros((5, 12, 4, 64), F32))
    with pytest.raises(ValueError, match="block_size to be a power of two"):
        paged_decode_attention(**bad, sm_scale=1.0, interpret=False)
    # ...while the interpreter accepts any block size.
    paged_decode_attention(**bad, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="pages_per_chunk"):
        paged_decode_attention(**_good(), sm_scale=1.0, interpret=True, pages_per_chunk=0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_lowers_to_triton_for_cuda(dtype):
    """The compiled path lowers through Pallas' Triton backend (checked here without a GPU)."""
    specs = [
        jax.ShapeDtypeStruct((3, 12, 64), dtype),
        jax.ShapeDtypeStruct((40, 16, 12, 64), dtype),
        jax.ShapeDtypeStruct((40, 16, 12, 64), dtype),
        jax.ShapeDtypeStruct((3, 5), jnp.int32),
        jax.ShapeDtypeStruct((3,), jnp.int32),
    ]
    fn = jax.jit(lambda *a: paged_decode_attention(*a, sm_scale=0.125, interpret=False))
    text = fn.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.gpu
@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU backend (run with JAX_PLATFORMS=cuda)"
)
@pytest.mark.parametrize(("dtype", "block_size"), [(F32, 16), (BF16, 16), (BF16, 32)])
def test_compiled_kernel_on_gpu(dtype, block_size):
    lens = [*lengths_for(8, block_size, 8), 0]
    args = make_paged(lens, heads=12, head_dim=128, block_size=block_size, max_blocks=8, dtype=dtype)
    out = paged_decode_attention(*args, sm_scale=128**-0.5)
    ref = paged_decode_attention_reference(*args, sm_scale=128**-0.5)
    tol = 1e-4 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
