"""Packed causal prefill attention: Pallas kernel (interpret mode on CPU) vs reference vs numpy."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import prefill_attention, prefill_attention_reference

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 2e-2}


def make_packed(lens: list[int], pad: int, heads: int, head_dim: int, dtype=F32, seed: int = 0):
    """q, k, v for sequences of `lens` packed back to back plus `pad` trailing rows of garbage."""
    rng = np.random.default_rng(seed)
    tokens = sum(lens) + pad
    qkv = rng.standard_normal((3, tokens, heads, head_dim)).astype(np.float32)
    qkv[:, sum(lens) :] = 1e4  # padding rows: large garbage that must not leak anywhere
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v = (jnp.asarray(x, dtype) for x in qkv)
    return q, k, v, jnp.asarray(cu)


def naive_numpy(q, k, v, cu, sm_scale):
    """Each sequence on its own with a plain causal softmax, float64; padding rows zero."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    cu = np.asarray(cu)
    out = np.zeros_like(q)
    for start, end in itertools.pairwise(cu):
        if start == end:
            continue
        for h in range(q.shape[1]):
            s = q[start:end, h] @ k[start:end, h].T * sm_scale  # [n, n]
            s = np.where(np.tril(np.ones_like(s, bool)), s, -np.inf)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            out[start:end, h] = (w / w.sum(axis=1, keepdims=True)) @ v[start:end, h]
    return out


# (lens, trailing pad, heads, head_dim, block_q, block_k, dtype)
GRID = [
    ([1, 7, 33, 64], 0, 4, 64, 64, 64, F32),
    ([1, 7, 33, 64], 11, 1, 128, 16, 32, F32),
    ([1, 7, 33, 64], 23, 12, 64, 32, 16, F32),
    ([5], 0, 4, 128, 64, 64, F32),
    ([5], 3, 1, 64, 64, 64, F32),
    ([16, 16, 32], 0, 12, 128, 16, 16, F32),
    ([0, 20, 0, 3, 0], 5, 4, 64, 16, 16, F32),
    ([1, 7, 33, 64], 9, 4, 128, 32, 32, BF16),
    ([40, 1, 1, 50], 0, 12, 64, 64, 64, BF16),
]


@pytest.mark.parametrize(("lens", "pad", "heads", "head_dim", "block_q", "block_k", "dtype"), GRID)
def test_kernel_matches_reference(lens, pad, heads, head_dim, block_q, block_k, dtype):
    q, k, v, cu = make_packed(lens, pad, heads, head_dim, dtype, seed=len(lens) + pad)
    scale = head_dim**-0.5
    out = prefill_attention(q, k, v, cu, sm_scale=scale, interpret=True, block_q=block_q, block_k=block_k)
    ref = prefill_attention_reference(q, k, v, cu, sm_scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    out32 = np.asarray(out, np.float32)
    assert np.isfinite(out32).all()
    assert (out32[sum(lens) :] == 0).all()  # padding rows
    np.testing.assert_allclose(out32, np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    ("lens", "pad"), [([1, 7, 33, 64], 0), ([1, 7, 33, 64], 6), ([0, 4, 0], 2), ([12], 0)]
)
def test_reference_matches_naive_numpy(lens, pad):
    q, k, v, cu = make_packed(lens, pad, heads=3, head_dim=64, seed=3)
    ref = prefill_attention_reference(q, k, v, cu, sm_scale=0.2)
    np.testing.assert_allclose(np.asarray(ref), naive_numpy(q, k, v, cu, 0.2), atol=1e-5, rtol=1e-5)


def test_no_attention_across_sequences():
    # Changing one sequence's tokens leaves every other sequence's output unchanged.
    q, k, v, cu = make_packed([9, 30, 17], 4, heads=2, head_dim=64, seed=1)
    out = prefill_attention(q, k, v, cu, sm_scale=0.125, interpret=True, block_q=16, block_k=16)
    k2 = k.at[9:39].set(-k[9:39])
    v2 = v.at[9:39].set(3.0)
    out2 = prefill_attention(q, k2, v2, cu, sm_scale=0.125, interpret=True, block_q=16, block_k=16)
    same = np.r_[0:9, 39:60]
    np.testing.assert_array_equal(np.asarray(out)[same], np.asarray(out2)[same])
    assert not np.allclose(np.asarray(out)[9:39], np.asarray(out2)[9:39])


def test_interpret_default_on_cpu_and_tiny_inputs():
    assert jax.default_backend() == "cpu"  # conftest pins the CPU platform
    q, k, v, cu = make_packed([1], 0, heads=2, head_dim=64)
    out = prefill_attention(q, k, v, cu, sm_scale=0.125)  # interpret=None; T=1 caps the tiles
    np.testing.assert_allclose(np.asarray(out), np.asarray(v), atol=1e-6)  # one key -> its value


def _qkv(tokens=8, heads=2, head_dim=64, dtype=F32):
    return jnp.zeros((tokens, heads, head_dim), dtype)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((_qkv()[0], _qkv(), _qkv(), jnp.array([0, 8], jnp.int32)), "q must be"),
        ((_qkv(), _qkv(heads=3), _qkv(), jnp.array([0, 8], jnp.int32)), "share one"),
        ((_qkv(), _qkv(), _qkv(tokens=9), jnp.array([0, 8], jnp.int32)), "share one"),
        (
            (_qkv(head_dim=12), _qkv(head_dim=12), _qkv(head_dim=12), jnp.array([0, 8], jnp.int32)),
            "multiple of 8",
        ),
        ((_qkv(), _qkv(dtype=BF16), _qkv(), jnp.array([0, 8], jnp.int32)), "dtype mismatch"),
        ((_qkv(), _qkv(), _qkv(), jnp.array([0, 8], jnp.float32)), "cu_seqlens must be int32"),
        ((_qkv(), _qkv(), _qkv(), jnp.array([8], jnp.int32)), r"cu_seqlens must be \[B\+1\]"),
        ((_qkv(), _qkv(), _qkv(), jnp.zeros((2, 2), jnp.int32)), r"cu_seqlens must be \[B\+1\]"),
    ],
)
def test_shape_checks(args, match):
    with pytest.raises(ValueError, match=match):
        prefill_attention(*args, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=match):
        prefill_attention_reference(*args, sm_scale=1.0)


def test_tile_sizes_must_be_powers_of_two():
    q, k, v, cu = make_packed([8], 0, heads=1, head_dim=64)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        prefill_attention(q, k, v, cu, sm_scale=1.0, interpret=True, block_q=24)
    with pytest.raises(ValueError, match="head_dim to be a power of two"):
        qkv = _qkv(head_dim=96)
        prefill_attention(qkv, qkv, qkv, cu, sm_scale=1.0, interpret=False)


@pytest.mark.parametrize(("tokens", "head_dim", "dtype"), [(100, 64, F32), (256, 128, BF16)])
def test_lowers_to_triton_for_cuda(tokens, head_dim, dtype):
    """The compiled path lowers through Pallas' Triton backend (checked here without a GPU)."""
    specs = [jax.ShapeDtypeStruct((tokens, 12, head_dim), dtype)] * 3 + [
        jax.ShapeDtypeStruct((5,), jnp.int32)
    ]
    fn = jax.jit(lambda *a: prefill_attention(*a, sm_scale=0.125, interpret=False))
    text = fn.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.gpu
@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a GPU backend (run with JAX_PLATFORMS=cuda)"
)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_compiled_kernel_on_gpu(dtype):
    q, k, v, cu = make_packed([1, 7, 33, 64, 200, 129], 78, heads=12, head_dim=128, dtype=dtype)
    out = prefill_attention(q, k, v, cu, sm_scale=128**-0.5)
    ref = prefill_attention_reference(q, k, v, cu, sm_scale=128**-0.5)
    tol = 1e-4 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
