"""PipelineExecutor: stages hold only their layers, numbers equal one device, micro-batches overlap safely."""

import collections

import jax
import numpy as np
import pytest

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.executor import ModelExecutor
from jaxserve.engine.pipeline import PipelineExecutor, split_layers, split_microbatches
from jaxserve.microbatch import wavefront
from jaxserve.model.demo import random_params_numpy
from jaxserve.model.inputs import SeqChunk
from jaxserve.model.sampling import SamplingArrays
from jaxserve.parallel.sharding import replicated
from jaxserve.request import Request, SamplingParams
from tests.parallel.scenario import BS, DECODES, NUM_BLOCKS, Scenario, max_kv_diff, run_executor, step_inputs


@pytest.mark.parametrize(("variant", "tp", "pp"), [
    ("pre_ln", 1, 2), ("pre_ln", 1, 4), ("pre_ln", 2, 2), ("post_ln_project", 2, 2),
])
def test_pp_forward_equals_single_device(variant, tp, pp, tiny, reference, devices):
    """Packed prefill + 3 paged decode steps: logits and every stage's KV within 1e-5 of one device."""
    cfg, params = tiny(variant)
    ref_logits, ref_kv = reference(variant)
    ex = PipelineExecutor(cfg, params, devices[:tp * pp], tp=tp, pp=pp)
    logits = run_executor(ex, Scenario(cfg.vocab_size))
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert np.max(np.abs(got - want)) <= 1e-5, f"step {step}"
    assert max_kv_diff(ex.kv, ref_kv) <= 1e-5
    for s, kv in enumerate(ex.stage_kv):  # each stage's pages live on its own sub-mesh
        for k, v in kv:
            assert k.sharding.device_set == v.sharding.device_set == set(devices[s * tp:(s + 1) * tp])


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)])
def test_execute_many_equals_one_by_one(tp, pp, tiny, reference, devices):
    """3 micro-batches (one sequence each) through execute_many == execute one at a time == one device."""
    cfg, params = tiny("pre_ln")
    ref_logits, ref_kv = reference("pre_ln")
    sc = Scenario(cfg.vocab_size)
    many = PipelineExecutor(cfg, params, devices[:tp * pp], tp=tp, pp=pp)
    one = PipelineExecutor(cfg, params, devices[8 - tp * pp:], tp=tp, pp=pp)
    many.init_kv(NUM_BLOCKS, BS)
    one.init_kv(NUM_BLOCKS, BS)
    for step in range(DECODES + 1):
        mbs = [sc.inputs(step, [b]) for b in range(3)]
        got = many.execute_many(mbs)
        for b, mb in enumerate(mbs):
            want = np.asarray(one.execute(mb))[0]
            np.testing.assert_array_equal(np.asarray(got[b])[0], want)
            assert np.max(np.abs(want - ref_logits[step][b])) <= 1e-5, f"step {step} seq {b}"
    assert max_kv_diff(many.kv, ref_kv) <= 1e-5
    assert max_kv_diff(one.kv, [(np.asarray(k), np.asarray(v)) for k, v in many.kv]) == 0.0


def test_execute_many_with_uneven_microbatches(tiny, reference, devices):
    """split_microbatches output (different sizes) through pp=4 still gives the reference logits."""
    cfg, params = tiny("post_ln_project")
    ref_logits, _ = reference("post_ln_project")
    sc = Scenario(cfg.vocab_size)
    ex = PipelineExecutor(cfg, params, devices[4:], pp=4, microbatches=2)
    ex.init_kv(NUM_BLOCKS, BS)
    for step in range(2):
        chunks = sc.chunks(step)
        mbs = split_microbatches(chunks, ex.microbatches)
        assert [len(m) for m in mbs] == [2, 1]
        logits = np.concatenate([np.asarray(lg)[:len(m)] for lg, m in
                                 zip(ex.execute_many([step_inputs(m, step == 0) for m in mbs]), mbs,
                                     strict=True)])
        assert np.max(np.abs(logits - ref_logits[step])) <= 1e-5


def test_stages_hold_only_their_layers(tiny, devices):
    cfg, params = tiny("pre_ln")  # 4 layers, final layer norm
    ex = PipelineExecutor(cfg, params, devices[:4], pp=4)
    assert [len(p["layers"]) for p in ex.stage_params] == [1, 1, 1, 1]
    assert set(ex.stage_params[0]) == {"layers", "embed_tokens", "embed_positions"}
    assert set(ex.stage_params[1]) == set(ex.stage_params[2]) == {"layers"}
    assert set(ex.stage_params[3]) == {"layers", "final_layer_norm", "embed_tokens"}
    for s, p in enumerate(ex.stage_params):
        np.testing.assert_array_equal(np.asarray(p["layers"][0]["fc1"]["kernel"]),
                                      params["layers"][s]["fc1"]["kernel"])
        for leaf in jax.tree_util.tree_leaves(p):
            assert leaf.sharding.device_set == {devices[s]}

    cfg, params = tiny("post_ln_project")  # no final LN, project_in/out
    ex = PipelineExecutor(cfg, params, devices[2:6], tp=2, pp=2)
    assert [len(p["layers"]) for p in ex.stage_params] == [2, 2]
    assert set(ex.stage_params[0]) == {"layers", "embed_tokens", "embed_positions", "project_in"}
    assert set(ex.stage_params[1]) == {"layers", "project_out", "embed_tokens"}
    h = cfg.num_attention_heads
    for s, p in enumerate(ex.stage_params):
        q = p["layers"][0]["q"]["kernel"]
        assert {sh.device for sh in q.addressable_shards} == set(devices[2 + 2 * s:4 + 2 * s])
        assert [sh.data.shape[1] for sh in q.addressable_shards] == [h // 2, h // 2]
    assert ex.devices == list(devices[2:6])
    assert ex.mesh.shape == {"pp": 2, "tp": 2}


def test_split_layers():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError, match="pp=5 stages need at least 5 layers"):
        split_layers(4, 5)
    with pytest.raises(ValueError):
        split_layers(4, 0)


def test_split_microbatches_keeps_order_and_balance():
    def c(n):
        return SeqChunk([5] * n, 0, [1] * 8)

    chunks = [c(10), c(10), c(10), c(10)]
    assert [len(m) for m in split_microbatches(chunks, 2)] == [2, 2]
    assert [len(m) for m in split_microbatches(chunks, 4)] == [1, 1, 1, 1]
    assert [len(m) for m in split_microbatches(chunks, 9)] == [1, 1, 1, 1]
    assert [len(m) for m in split_microbatches([c(30), c(1), c(1), c(1)], 3)] == [1, 1, 2]
    assert [len(m) for m in split_microbatches([c(1), c(1), c(1), c(30)], 2)] == [3, 1]
    flat = [x for m in split_microbatches(chunks, 3) for x in m]
    assert flat == chunks
    with pytest.raises(ValueError):
        split_microbatches(chunks, 0)


def test_pipeline_errors(tiny, devices):
    cfg, params = tiny("pre_ln")
    with pytest.raises(ValueError, match="needs 4 devices, got 3"):
        PipelineExecutor(cfg, params, devices[:3], tp=2, pp=2)
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        PipelineExecutor(cfg, params, devices[:6], tp=3, pp=2)
    with pytest.raises(ValueError, match="pp=8 stages need at least 8 layers"):
        PipelineExecutor(cfg, params, devices[:8], tp=1, pp=8)


def test_sample_on_last_stage_matches_model_executor(tiny, devices):
    """Greedy and seeded sampling from logits on the last stage equal ModelExecutor's on the same logits."""
    cfg, params = tiny("pre_ln")
    pp = PipelineExecutor(cfg, params, devices[:4], tp=2, pp=2)
    ref = ModelExecutor(cfg, params, devices[4:6], tp=2)
    logits = np.random.default_rng(0).normal(size=(4, cfg.vocab_size)).astype(np.float32)
    sps = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20),
           SamplingParams(temperature=1.0, top_p=0.9)]
    arrays = SamplingArrays.from_params(sps, [1, 2, 3], [0, 4, 7], batch=4)
    got = pp.sample(jax.device_put(logits, replicated(pp.stage_meshes[-1])), arrays).tokens
    np.testing.assert_array_equal(got, ref.sample(jax.device_put(logits, replicated(ref.mesh)), arrays).tokens)
    assert got[0] == np.argmax(logits[0])


def test_pallas_attention_per_stage_under_tp(tiny, reference, devices):
    """attention="pallas-interpret": each stage shard_maps the kernels over its own tp sub-mesh."""
    cfg, params = tiny("pre_ln")
    ref_logits, ref_kv = reference("pre_ln")
    ex = PipelineExecutor(cfg, params, devices[4:], tp=2, pp=2, attention="pallas-interpret")
    logits = run_executor(ex, Scenario(cfg.vocab_size))
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert np.max(np.abs(got - want)) <= 1e-5, f"step {step}"
    assert max_kv_diff(ex.kv, ref_kv) <= 1e-5


def _schedule_figures(calls: list[dict]) -> list[tuple[bool, float, float, float]]:
    """Per call: (stage 1 of micro-batch 0 overlaps stage 0 of micro-batch 1, measured makespan,
    the wavefront makespan of the measured stage times, their plain sum)."""
    out = []
    for c in calls:
        mbs = 1 + max(m for _, m in c)
        durations = [[c[s, m].end - c[s, m].start for s in range(2)] for m in range(mbs)]
        makespan = max(sp.end for sp in c.values()) - min(sp.start for sp in c.values())
        overlap = c[1, 0].start < c[0, 1].end and c[0, 1].start < c[1, 0].end
        out.append((overlap, makespan, wavefront(durations)[-1][-1][1], sum(map(sum, durations))))
    return out


def test_serving_path_overlaps_stages_in_the_planners_schedule(devices):
    """pp=2 engine steps of 4 prompts: the runner cuts each packed prefill call into 2 micro-batches and
    stage 1 runs micro-batch 0 while stage 0 runs micro-batch 1. The measured call takes about what
    the planner's schedule (``jaxserve.microbatch.wavefront``) gives for the measured stage times, well
    under those times run one after another. Ratios within each call, medians over 5 calls: a loaded
    host slows the stages, not the schedule."""
    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                      word_embed_proj_dim=256, max_position_embeddings=256)
    engine = LLMEngine(cfg, random_params_numpy(cfg), EngineConfig(
        pp=2, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=512), devices=devices[:2])
    spans = engine.executor.record_timeline()
    rng = np.random.default_rng(0)
    for r in range(6):
        for i in range(4):
            engine.add_request(Request(f"{r}-{i}", [2, *rng.integers(3, 512, 119).tolist()],
                                       SamplingParams(max_tokens=1)))
        while engine.has_unfinished():
            engine.step()
    calls: dict[int, dict] = collections.defaultdict(dict)
    for sp in spans:
        calls[sp.call][sp.stage, sp.mb] = sp
    assert len(calls) == 6 and all(sorted(c) == [(0, 0), (0, 1), (1, 0), (1, 1)] for c in calls.values())
    figs = _schedule_figures([calls[k] for k in sorted(calls)][1:])  # the first call compiled
    print("overlap, makespan / wavefront, makespan / sum:",
          [(o, round(m / w, 3), round(m / s, 3)) for o, m, w, s in figs])
    assert sum(o for o, *_ in figs) >= 3
    assert np.median([m / w for _, m, w, _ in figs]) < 1.25
    assert np.median([m / s for _, m, _, s in figs]) < 0.9
