"""KV blocks move between executors of different layouts (the core of prefill -> decode transfer).

A source instance prefills a request; ``gather_blocks`` copies its blocks out (per layer, layer order);
a destination with another (tp, pp) layout and other block ids ``scatter_blocks`` them in and decodes.
The destination's decode logits must equal the source's and the single-device reference. The transport
(``export_kv`` on the source, ``import_kv`` on the destination; on CPU meshes a one-pass import that
reads the export through zero-copy views) must write exactly the same bytes, touch no other block,
write the destination's pages in place, and never keep the source from donating its own pages.
"""

import jax
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.engine.executor import ModelExecutor
from jaxserve.engine.kv_transfer import HostTransport, LocalTransport, one_pass_ok
from jaxserve.engine.pipeline import PipelineExecutor
from jaxserve.model.inputs import SeqChunk
from jaxserve.model.opt import abstract_params
from tests.parallel.scenario import BS, DECODES, NUM_BLOCKS, Scenario, step_inputs

SEQ = 2  # the 20-token prompt: 3 blocks
DST_BLOCKS = [9, 4, 12]


def _make(cfg, params, devs, tp, pp):
    if pp == 1:
        return ModelExecutor(cfg, params, devs, tp=tp)
    return PipelineExecutor(cfg, params, devs, tp=tp, pp=pp)


def _prefilled_pair(cfg, params, devices, src, dst):
    """Source (tp, pp) and destination executors on disjoint devices; the source has prefilled SEQ."""
    sc = Scenario(cfg.vocab_size)
    n_src = src[0] * src[1]
    a = _make(cfg, params, devices[:n_src], *src)
    b = _make(cfg, params, devices[n_src:n_src + dst[0] * dst[1]], *dst)
    a.init_kv(NUM_BLOCKS, BS)
    b.init_kv(16, BS)  # another pool size: only block size and layout of a block must agree
    a.execute(sc.inputs(0, [SEQ]))
    return sc, a, b


PAIRS = [
    pytest.param("pre_ln", (2, 1), (1, 1), id="tp2-to-tp1"),
    pytest.param("post_ln_project", (1, 2), (4, 1), id="pp2-to-tp4"),
    pytest.param("pre_ln", (4, 1), (2, 2), id="tp4-to-tp2pp2"),
    pytest.param("post_ln_project", (1, 4), (1, 2), id="pp4-to-pp2"),
]


@pytest.mark.parametrize(("variant", "src", "dst"), PAIRS)
def test_blocks_round_trip_between_layouts(variant, src, dst, tiny, reference, devices):
    """src/dst are (tp, pp) on disjoint devices; prefill on src, decode 3 steps on both."""
    cfg, params = tiny(variant)
    ref_logits, ref_kv = reference(variant)
    sc, a, b = _prefilled_pair(cfg, params, devices, src, dst)

    src_ids = sc.tables[SEQ]
    blocks = a.gather_blocks(src_ids)
    assert len(blocks) == cfg.num_hidden_layers
    n = len(sc.prompts[SEQ])
    for (k, v), (rk, rv) in zip(blocks, ref_kv, strict=True):  # the prompt's slots of the reference pages
        assert k.shape == (len(src_ids), BS, cfg.num_attention_heads, cfg.head_dim)
        for got, want in ((k, rk), (v, rv)):
            got = np.asarray(got).reshape(-1, *got.shape[2:])[:n]  # [n, H, Dh] in position order
            np.testing.assert_allclose(got, want[src_ids].reshape(-1, *want.shape[2:])[:n], atol=1e-5, rtol=0)
    b.scatter_blocks(DST_BLOCKS, blocks)
    for (k, v), (sk, sv) in zip(b.kv, blocks, strict=True):
        np.testing.assert_array_equal(np.asarray(k)[DST_BLOCKS], np.asarray(sk))
        np.testing.assert_array_equal(np.asarray(v)[DST_BLOCKS], np.asarray(sv))
        assert not np.asarray(k)[[1, 2, 3]].any()  # other blocks untouched

    prompt = sc.prompts[SEQ]
    for step in range(1, DECODES + 1):
        tok, pos = sc.next_tokens[step - 1][SEQ], len(prompt) + step - 1
        got_a = np.asarray(a.execute(step_inputs([SeqChunk([tok], pos, src_ids)], packed=False)))[0]
        got_b = np.asarray(b.execute(step_inputs([SeqChunk([tok], pos, DST_BLOCKS)], packed=False)))[0]
        assert np.max(np.abs(got_b - got_a)) <= 1e-5, f"decode {step}"
        assert np.max(np.abs(got_b - ref_logits[step][SEQ])) <= 1e-5, f"decode {step}"


def test_scatter_rejects_wrong_layer_count(tiny, devices):
    cfg, params = tiny("pre_ln")
    ex = PipelineExecutor(cfg, params, devices[:2], pp=2)
    ex.init_kv(8, BS)
    blocks = ex.gather_blocks([1, 2])
    with pytest.raises(ValueError, match="3 layers of blocks for an executor of 4 layers"):
        ex.scatter_blocks([3, 4], blocks[:3])


def _shard_pointers(ex):
    return [s.data.unsafe_buffer_pointer() for k, v in ex.kv for a in (k, v) for s in a.addressable_shards]


@pytest.mark.parametrize(("variant", "src", "dst"), [
    *PAIRS,
    pytest.param("pre_ln", (1, 1), (2, 1), id="tp1-to-tp2"),
    pytest.param("pre_ln", (1, 2), (2, 2), id="pp2-to-tp2pp2"),
    pytest.param("pre_ln", (2, 1), (4, 1), id="tp2-to-tp4"),
    pytest.param("pre_ln", (4, 1), (1, 1), id="tp4-to-tp1"),
])
def test_one_pass_import_writes_the_same_bytes_in_place(variant, src, dst, tiny, devices):
    cfg, params = tiny(variant)
    sc, a, b = _prefilled_pair(cfg, params, devices, src, dst)
    src_ids = sc.tables[SEQ]
    want = [(np.asarray(k), np.asarray(v)) for k, v in a.gather_blocks(src_ids)]
    t = LocalTransport()
    handle = t.export_kv(a, src_ids, len(sc.prompts[SEQ]))
    assert one_pass_ok(handle, b)
    before_a, before_b = _shard_pointers(a), _shard_pointers(b)

    assert t.import_kv(b, DST_BLOCKS, handle) == sum(k.nbytes + v.nbytes for k, v in want)

    assert _shard_pointers(b) == before_b  # written in place (donated), no fresh pages
    others = [i for i in range(16) if i not in DST_BLOCKS]
    for (k, v), (wk, wv) in zip(b.kv, want, strict=True):
        np.testing.assert_array_equal(np.asarray(k)[DST_BLOCKS], wk)
        np.testing.assert_array_equal(np.asarray(v)[DST_BLOCKS], wv)
        assert not np.asarray(k)[others].any() and not np.asarray(v)[others].any()
    # the source's next step waits for the read and then still updates its pages in place
    prompt = sc.prompts[SEQ]
    a.execute(step_inputs([SeqChunk([sc.next_tokens[0][SEQ]], len(prompt), src_ids)], packed=False))
    assert _shard_pointers(a) == before_a


@pytest.mark.parametrize("transport", [LocalTransport(), LocalTransport(one_pass=False), HostTransport()],
                         ids=["one-pass", "staged", "host"])
def test_block_sizes_differ_the_kv_is_repaged(transport, tiny, devices):
    cfg, params = tiny("pre_ln")
    a, b = ModelExecutor(cfg, params, devices[:1]), ModelExecutor(cfg, params, devices[1:2])
    a.init_kv(8, BS)
    b.init_kv(8, BS // 2)
    a.scatter_blocks([1, 2], [(np.full((2, BS, cfg.num_attention_heads, cfg.head_dim), 3.0, np.float32),) * 2]
                     * cfg.num_hidden_layers)
    n = BS + 3  # two source blocks, three destination blocks
    transport.import_kv(b, [5, 6, 7], transport.export_kv(a, [1, 2], n))
    k = np.asarray(b.kv[0][0])
    assert (k[5:7] == 3.0).all() and (k[7, :3] == 3.0).all() and not k[7, 3:].any() and not k[[1, 2, 3, 4]].any()


def test_source_donates_in_place_while_an_import_is_in_flight(devices):
    """A source step dispatched right after an export whose import is still running must neither corrupt
    the import nor push XLA into copying the whole source pool. It cannot race: the import reads the
    export (a compact copy no one donates), never the source's pages (once a guarded in-place read that
    failed 1 run in 3 here)."""
    cfg = ModelConfig(name="wide", vocab_size=64, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                      ffn_dim=64, word_embed_proj_dim=1024, max_position_embeddings=64)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(cfg))
    n = 250  # 262 MB of K+V: the import takes far longer than dispatching the next scatter
    a = ModelExecutor(cfg, params, devices[:2], tp=2)
    b = ModelExecutor(cfg, params, devices[2:4], tp=2)  # tp>1: the import runs asynchronously
    a.init_kv(n + 2, BS)
    b.init_kv(n + 2, BS)
    page = (n, BS, cfg.num_attention_heads, cfg.head_dim)
    a.scatter_blocks(list(range(1, n + 1)), [(np.ones(page, np.float32),) * 2] * cfg.num_hidden_layers)
    one = (1, *page[1:])
    a.scatter_blocks([n], [(np.ones(one, np.float32),) * 2] * cfg.num_hidden_layers)  # compile both programs
    t = LocalTransport()
    ids = list(range(1, n + 1))
    t.import_kv(b, ids, t.export_kv(a, ids, n * BS))  # compiles export and import for this bucket
    jax.block_until_ready((a.kv, b.kv))
    before = _shard_pointers(a)

    for _ in range(3):
        t.import_kv(b, ids, t.export_kv(a, ids, n * BS))
        # at once, before anything waits: the source reuses the last block the import reads
        a.scatter_blocks([n], [(np.full(one, 2.0, np.float32),) * 2] * cfg.num_hidden_layers)
        assert _shard_pointers(a) == before  # donated in place
        for k, v in b.kv:
            assert np.asarray(k)[n].min() == 1.0 and np.asarray(v)[n].max() == 1.0  # the export was taken before
        assert np.asarray(a.kv[0][0])[n].min() == 2.0
        a.scatter_blocks([n], [(np.ones(one, np.float32),) * 2] * cfg.num_hidden_layers)
