"""The Pallas serving path (kernels in interpret mode on CPU) and the native CPU kernel give the XLA path's tokens."""

import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.frontend import run_requests
from jaxserve.request import Request, SamplingParams


@pytest.mark.parametrize("tp", [1, 2])
def test_kernel_paths_equal_xla_path(tiny, workload, tp):
    _, _, cfg, params, _ = tiny
    prompts, _, refs = workload
    picks = [0, 4, 9, 13]  # lengths 1, 299 and two random ones
    outs = {}
    for backend in ("xla", "native", "pallas-interpret"):
        eng = LLMEngine(cfg, params, EngineConfig(max_num_seqs=8, max_model_len=512, tp=tp, attention=backend))
        reqs = [Request(f"{backend}-{i}", prompts[i], SamplingParams(max_tokens=6)) for i in picks]
        outs[backend] = [t.token_ids for t in run_requests(eng, reqs)]
        assert eng.num_held_blocks == 0
    assert outs["pallas-interpret"] == outs["native"] == outs["xla"] == [refs[i][:6] for i in picks]


def test_a_native_build_that_fails_after_the_engine_chose_it_falls_back_to_xla(tiny, workload):
    """The engine picks the native kernels while they may still be building (a compiler exists); if the
    build then fails, the kernels' callers trace the XLA path and the tokens are the same."""
    from jaxserve import native

    _, _, cfg, params, _ = tiny
    prompts, _, refs = workload
    assert native.expected()
    eng = LLMEngine(cfg, params, EngineConfig(max_num_seqs=8, max_model_len=512))
    saved = dict(native._state)
    native._state.update(ok=False, why="test: the build failed")  # as a failed background build leaves it
    try:
        out = run_requests(eng, [Request(f"f{i}", prompts[i], SamplingParams(max_tokens=6)) for i in (4, 9)])
    finally:
        native._state.clear()
        native._state.update(saved)
    assert [t.token_ids for t in out] == [refs[i][:6] for i in (4, 9)]
