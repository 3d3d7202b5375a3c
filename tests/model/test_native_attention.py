"""The native CPU decode kernel (jaxserve.native) against a dense float64 reference and the XLA path.

Grid: grouped-query ratios 1:1, 4:1 and 8:1, block sizes 8 and 16, head sizes 64 and 128, contexts
that end mid-block, padding rows (no context), scrambled block tables, bad block ids (read as the
null block, never outside the pages), and the engine's own attention seam under jit.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import native
from jaxserve.engine.attention_backends import make_attention
from jaxserve.model.attention import AttnGroup, AttnMeta, attention_xla, paged_decode_attention_xla

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def _case(rng, b, hq, hkv, d, bs, lens, mb):
    n = sum(-(-x // bs) for x in lens) + 3
    k = rng.standard_normal((n, bs, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, bs, hkv, d)).astype(np.float32)
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, n)))
    tables = np.zeros((b, mb), np.int32)
    for i, x in enumerate(lens):
        for j in range(-(-x // bs)):
            tables[i, j] = free.pop()
    return q, k, v, tables, np.asarray(lens, np.int32)


def _dense(q, k, v, tables, lens, scale):
    b, hq, d = q.shape
    _, bs, hkv, _ = k.shape
    out = np.zeros((b, hq, d))
    for i in range(b):
        if lens[i] == 0:
            continue
        blocks = tables[i, : -(-lens[i] // bs)]
        kk = k[blocks].reshape(-1, hkv, d)[: lens[i]].astype(np.float64)
        vv = v[blocks].reshape(-1, hkv, d)[: lens[i]].astype(np.float64)
        for h in range(hq):
            s = kk[:, h // (hq // hkv)] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vv[:, h // (hq // hkv)]
    return out


@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 4, 64, 16), (8, 2, 64, 8), (8, 1, 128, 16), (12, 12, 64, 16)])
def test_matches_dense_reference(hq, hkv, d, bs):
    rng = np.random.default_rng(hq * 100 + hkv)
    lens = [1, bs, bs + 1, 5 * bs - 3, 0, 200]
    q, k, v, tables, ctx = _case(rng, len(lens), hq, hkv, d, bs, lens, mb=-(-200 // bs) + 2)
    scale = d**-0.5
    f = jax.jit(lambda *a: native.paged_decode(*a, scale))
    got = np.asarray(f(q, k, v, tables, ctx))
    want = _dense(q, k, v, tables, ctx, scale)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    assert not got[4].any()  # the padding row (no context) is zeros


def test_equals_xla_path_on_the_engine_layout():
    rng = np.random.default_rng(3)
    lens = [300, 17, 64, 1, 129]
    q, k, v, tables, ctx = _case(rng, len(lens), 12, 12, 64, 16, lens, mb=24)
    group = AttnGroup(jnp.arange(len(lens), dtype=jnp.int32)[:, None], jnp.asarray(tables), jnp.asarray(ctx))
    want = paged_decode_attention_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), group, 0.125)[:, 0]
    got = native.paged_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), group.block_tables, group.context_lens, 0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_bad_block_ids_read_the_null_block():
    rng = np.random.default_rng(5)
    q, k, v, tables, ctx = _case(rng, 2, 4, 4, 64, 16, [40, 40], mb=3)
    bad = tables.copy()
    bad[0, 1] = 10**6
    bad[1, 2] = -7
    nulls = tables.copy()
    nulls[0, 1] = 0
    nulls[1, 2] = 0
    got = np.asarray(native.paged_decode(q, k, v, bad, ctx, 0.125))
    np.testing.assert_allclose(got, _dense(q, k, v, nulls, ctx, 0.125), atol=2e-6, rtol=1e-5)
    over = np.asarray(native.paged_decode(q, k, v, tables, np.array([10**6, 40], np.int32), 0.125))
    np.testing.assert_allclose(over[0], _dense(q, k, v, tables, np.array([48, 40]), 0.125)[0], atol=2e-6, rtol=1e-5)


def test_auto_backend_on_cpu_is_the_native_kernel_and_matches_xla():
    """Through the engine's seam: a decode group and a multi-query group in one step, as attention_xla."""
    rng = np.random.default_rng(9)
    lens = [33, 70, 5]
    _, k, v, tables, ctx = _case(rng, 3, 4, 4, 64, 16, lens, mb=6)
    t = 7
    qt = jnp.asarray(rng.standard_normal((t, 4, 64)).astype(np.float32))
    kt = jnp.zeros_like(qt)
    positions = jnp.asarray([32, 69, 2, 3, 4, 0, 0], jnp.int32)
    decode = AttnGroup(jnp.asarray([[0], [1]], jnp.int32), jnp.asarray(tables[:2]), jnp.asarray(ctx[:2]))
    chunk = AttnGroup(jnp.asarray([[2, 3, 4]], jnp.int32), jnp.asarray(tables[2:]), jnp.asarray([5], jnp.int32))
    meta = AttnMeta(jnp.zeros(t, jnp.int32), (decode, chunk))
    attn = make_attention("auto")
    assert attn is not attention_xla
    got = jax.jit(lambda *a: attn(*a, 0.125))(qt, kt, kt, jnp.asarray(k), jnp.asarray(v), positions, meta)
    want = attention_xla(qt, kt, kt, jnp.asarray(k), jnp.asarray(v), positions, meta, 0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_build_failure_falls_back_to_xla_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="jaxserve.native"):
        assert not native.available()
        assert not native.available()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "XLA path" in caplog.records[0].getMessage()
    assert make_attention("auto") is attention_xla
    with pytest.raises(ValueError, match="native attention kernel is unavailable"):
        make_attention("native")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.ENV_SWITCH, "off")
    assert not native.available() and native.unavailable_reason() == "$JAXSERVE_NATIVE_KERNELS is off"


@pytest.mark.parametrize("lens,pad,h,d", [([1], 15, 4, 64), ([17, 40, 3, 100], 0, 12, 64), ([300, 5], 11, 2, 128),
                                          ([16, 16, 16], 16, 3, 32)])
def test_packed_prefill_matches_the_xla_path(lens, pad, h, d):
    """Prompts packed from position 0 (and padding, segment -1): each attends causally to its own tokens."""
    from jaxserve.model.attention import packed_attention_xla

    rng = np.random.default_rng(sum(lens))
    t = sum(lens) + pad
    q, k, v = (jnp.asarray(rng.standard_normal((t, h, d)).astype(np.float32)) for _ in range(3))
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lens)] + [np.full(pad, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens] + [np.zeros(pad)]).astype(np.int32)
    scale = d**-0.5
    got = np.asarray(jax.jit(lambda *a: native.packed_prefill(*a, scale))(q, k, v, jnp.asarray(seg)))
    want = np.asarray(packed_attention_xla(q, k, v, jnp.asarray(pos), jnp.asarray(seg), scale))
    real = seg >= 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-6, rtol=1e-5)
    assert not got[~real].any()


def test_packed_prefill_grouped_query_heads_match_dense():
    """Llama-style grouped-query heads (8 query heads over 2 KV heads) in the packed kernel."""
    rng = np.random.default_rng(11)
    lens, hq, hkv, d = [37, 70], 8, 2, 64
    t = sum(lens)
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((t, hkv, d)).astype(np.float32) for _ in range(2))
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lens)]).astype(np.int32)
    got = np.asarray(native.packed_prefill(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg), 0.125))
    start = 0
    for n in lens:
        for i in range(n):
            for h in range(hq):
                s = k[start:start + i + 1, h // (hq // hkv)].astype(np.float64) @ q[start + i, h] * 0.125
                p = np.exp(s - s.max())
                want = (p / p.sum()) @ v[start:start + i + 1, h // (hq // hkv)]
                np.testing.assert_allclose(got[start + i, h], want, atol=2e-6, rtol=1e-5)
        start += n


@pytest.mark.parametrize("chunks,bs", [([(40, 9), (0, 17), (130, 64)], 16), ([(5, 3)], 8), ([(16, 16), (31, 1)], 16)])
def test_paged_prefill_matches_the_xla_group_path(chunks, bs):
    """Prompt chunks after a cached prefix ((cached tokens, new tokens) per sequence), against
    paged_group_attention_xla; padding queries and a wider block table than needed."""
    from jaxserve.model.attention import paged_group_attention_xla

    rng = np.random.default_rng(len(chunks) * bs)
    h, d = 4, 64
    ends = [c + n for c, n in chunks]
    _, k, v, tables, ctx = _case(rng, len(chunks), h, h, d, bs, ends, mb=max(-(-e // bs) for e in ends) + 2)
    t = sum(n for _, n in chunks) + 5  # 5 padding tokens
    qn = max(n for _, n in chunks) + 3  # padding queries per sequence
    q = jnp.asarray(rng.standard_normal((t, h, d)).astype(np.float32))
    qidx = np.full((len(chunks), qn), t, np.int32)
    positions = np.zeros(t, np.int32)
    row = 0
    for b, (cached, n) in enumerate(chunks):
        qidx[b, :n] = np.arange(row, row + n)
        positions[row:row + n] = np.arange(cached, cached + n)
        row += n
    group = AttnGroup(jnp.asarray(qidx), jnp.asarray(tables), jnp.asarray(ctx))
    want = np.asarray(paged_group_attention_xla(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions), group, 0.125))
    got = np.asarray(jax.jit(lambda *a: native.paged_prefill(*a, 0.125))(
        q, jnp.asarray(k), jnp.asarray(v), group.query_index, jnp.asarray(positions), group.block_tables,
        group.context_lens))
    real = qidx < t
    np.testing.assert_allclose(got[real], want[real], atol=2e-6, rtol=1e-5)
    assert not got[~real].any()
