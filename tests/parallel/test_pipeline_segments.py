"""Segments of one pipeline (what the processes of a pipeline spanning nodes hold): chained, they
equal one device; their KV pages are numbered from their own first layer; a staged hand-off's parts
re-split onto any destination's layers."""

import numpy as np
import pytest

from jaxserve.cluster.stages import layers_of, overlapping
from jaxserve.engine.kv_transfer import KVPayload
from jaxserve.engine.pipeline import PipelineExecutor
from tests.parallel.scenario import BS, DECODES, NUM_BLOCKS, Scenario, max_kv_diff


class Chain:
    """Segments run one after another, x handed over as host numpy (the data flow of
    ``jaxserve.cluster.stages`` without the processes)."""

    def __init__(self, *segs):
        self.segs = segs

    def execute(self, inputs):
        h = self.segs[0].execute(inputs)
        for s in self.segs[1:]:
            h = s.execute_from(inputs, np.asarray(h))
        return h


def test_chained_segments_equal_one_device(tiny, reference, devices):
    """pp=4 as stage 0 (tp=1) + stages 1-3 (tp=2): logits and KV within 1e-5 of one device."""
    cfg, params = tiny("pre_ln")
    ref_logits, ref_kv = reference("pre_ln")
    a = PipelineExecutor(cfg, params, devices[:1], tp=1, pp=4, stages=range(0, 1))
    b = PipelineExecutor(cfg, params, devices[2:8], tp=2, pp=4, stages=range(1, 4))
    assert (a.layers, b.layers) == (range(0, 1), range(1, 4))
    assert (a.holds_first, a.holds_last, b.holds_first, b.holds_last) == (True, False, False, True)
    assert "embed_tokens" in a.stage_params[0] and "final_layer_norm" not in a.stage_params[0]
    assert "embed_positions" not in b.stage_params[0] and "final_layer_norm" in b.stage_params[-1]
    for ex in (a, b):
        ex.init_kv(NUM_BLOCKS, BS)
    sc, chain = Scenario(cfg.vocab_size), Chain(a, b)
    for step in range(DECODES + 1):
        got = np.asarray(chain.execute(sc.inputs(step)))[: len(sc.prompts)]
        assert np.max(np.abs(got - ref_logits[step])) <= 1e-5, f"step {step}"
    assert max_kv_diff(a.kv + b.kv, ref_kv) <= 1e-5
    assert [r for _, r in b.kv_stages()] == [range(0, 1), range(1, 2), range(2, 3)]  # from its first layer
    ids = [1, 2]
    blocks = b.gather_blocks(ids)
    assert len(blocks) == 3
    b.scatter_blocks([5, 6], blocks)  # the segment's own layers only
    for (k, v), (k2, v2) in zip(blocks, b.gather_blocks([5, 6]), strict=True):
        np.testing.assert_array_equal(np.asarray(k), np.asarray(k2))
        np.testing.assert_array_equal(np.asarray(v), np.asarray(v2))
    with pytest.raises(ValueError, match="3 layers"):
        b.scatter_blocks([5], blocks[:1])
    with pytest.raises(ValueError, match="not a segment"):
        PipelineExecutor(cfg, params, devices[:1], pp=2, stages=range(1, 3))


def test_staged_parts_re_split_onto_any_layers():
    def part(a, b):
        return KVPayload(3, 4, [(np.full(2, i), np.full(2, -i)) for i in range(a, b)])

    parts = [(0, 1, "p0"), (1, 4, "p1")]
    payloads = [part(0, 1), part(1, 4)]
    assert [int(k[0]) for k, _ in layers_of(parts, payloads, range(0, 4))] == [0, 1, 2, 3]
    assert overlapping(parts, range(2, 4)) == [(1, 4, "p1")]
    assert [int(k[0]) for k, _ in layers_of(parts[1:], payloads[1:], range(2, 4))] == [2, 3]
    assert [int(k[0]) for k, _ in layers_of(parts, payloads, range(0, 2))] == [0, 1]
    with pytest.raises(ValueError, match="do not cover"):
        layers_of(parts[1:], payloads[1:], range(0, 2))
