"""Automatic prefix caching (issue 16): the block manager's cache, and the engine's exact tokens with it.

Block manager: a prefix is found in whole blocks only, never its last token; shared blocks are ref
counted; released cached blocks count as free and are evicted oldest first when plain free blocks run
out; the invariants hold throughout. Engine: requests sharing a long prefix compute it once (the
request's ``num_cached_tokens``), give the tokens they give without the cache (and HF's), hold no
block after, compile nothing after warm-up; the same on a prefill instance of a disaggregated pair.
"""

import jax
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Request, SamplingParams


def test_lookup_share_register_and_evict():
    bm = BlockManager(num_blocks=6, block_size=4, caching=True)
    toks = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    assert bm.lookup(toks, len(toks) - 1) == []
    bm.grow("a", len(toks))
    bm.register("a", toks, 11)  # blocks 0, 1 full and computed; the third is partial
    assert bm.num_cached == 2
    a_blocks = list(bm.table("a"))
    assert bm.lookup(toks, 10) == a_blocks[:2]
    assert bm.lookup(toks, 7) == a_blocks[:1]  # only whole blocks within the limit
    assert bm.lookup([*toks[:4], 0, *toks[5:]], 10) == a_blocks[:1]  # a different second block
    bm.share("b", bm.lookup(toks, 10), toks)
    bm.grow("b", 11)
    assert bm.table("b")[:2] == a_blocks[:2] and bm.table("b")[2] != a_blocks[2]
    bm.check_invariants()
    bm.free("a")
    bm.free("b")
    assert bm.num_free == 5 and bm.num_used == 0  # cached blocks count as free
    bm.check_invariants()
    bm.grow("c", 4 * 3)  # 3 blocks: the 3 plain free ones first, the cache survives
    assert bm.lookup(toks, 10) == a_blocks[:2]
    bm.grow("d", 4)  # now the oldest cached block goes (and its key with it): the prefix's tail first
    assert bm.num_cached == 1 and bm.lookup(toks, 10) == a_blocks[:1]
    bm.grow("e", 4)
    assert bm.num_cached == 0 and bm.lookup(toks, 10) == []
    bm.check_invariants()


def test_cache_off_finds_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.grow("a", 8)
    bm.register("a", list(range(8)), 8)
    assert bm.num_cached == 0 and bm.lookup(list(range(8)), 7) == []


def _engine(tiny, **kw):
    _, _, cfg, params, _ = tiny
    return LLMEngine(cfg, params, EngineConfig(**{"max_num_seqs": 8, "max_model_len": 256, **kw}))


@pytest.mark.parametrize("mode", ["colocated", "chunked"])
def test_shared_prefix_is_computed_once_with_the_same_tokens(tiny, mode):
    from tests.model_fixtures import hf_greedy

    _, model, _cfg, _, _ = tiny
    system = [2, *range(10, 10 + 70)]  # a 71-token "system prompt": 4 full blocks of 16
    prompts = [[*system, 200 + i, 300 + i, 5 + i] for i in range(3)] + [system[:40]]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    off = _engine(tiny, mode=mode, prefix_caching=False)
    want = [t.token_ids for t in run_requests(off, [Request(f"o{i}", p, sp) for i, p in enumerate(prompts)])]
    eng = _engine(tiny, mode=mode)
    eng.warmup()
    first = Request("first", prompts[0], sp)
    assert run_requests(eng, [first])[0].token_ids == want[0] and first.num_cached_tokens == 0
    rest = [Request(f"r{i}", p, sp) for i, p in enumerate(prompts[1:], 1)]
    got = [t.token_ids for t in run_requests(eng, rest)]
    assert got == want[1:]
    assert [r.num_cached_tokens for r in rest] == [64, 64, 32]  # whole blocks, never the last token
    assert want[0] == hf_greedy(model, prompts[0], 6)
    assert eng.num_held_blocks == 0 and eng.compilations_since_warmup == 0
    assert eng.blocks.hit_tokens == 160 and eng.blocks.query_tokens == 3 * 73 + 39  # each admission once
    eng.blocks.check_invariants()
    from jaxserve.serving.metrics import ServerMetrics

    text = ServerMetrics("m").render([eng.stats()])
    assert 'jaxserve:prefix_cache_hits_total{model_name="m"} 160' in text
    assert f'jaxserve:prefix_cache_queries_total{{model_name="m"}} {eng.blocks.query_tokens}' in text
    assert (f'jaxserve:cache_config_info{{model_name="m",instance="engine-0",block_size="16",num_gpu_blocks='
            f'"{eng.blocks.capacity}",enable_prefix_caching="True"}} 1') in text


def test_prefill_instance_caches_for_a_disaggregated_pair(tiny):
    from jaxserve.engine.build import build_local

    _, _, cfg, params, _ = tiny
    prompt = [2, *range(30, 90)]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = run_requests(_engine(tiny, prefix_caching=False), [Request("ref", prompt, sp)])[0].token_ids
    roles = [(r, EngineConfig(mode=r, max_num_seqs=8, max_model_len=256)) for r in ("prefill", "decode")]
    rt = build_local(cfg, params, roles, jax.devices())
    reqs = [Request(f"d{i}", prompt, sp) for i in range(3)]
    got = [run_requests(rt, [r])[0].token_ids for r in reqs]
    assert got == [ref] * 3
    assert [r.num_cached_tokens for r in reqs] == [0, 48, 48]
    assert all(v == 0 for v in rt.held_blocks().values())
