"""Per-request sampling: seeds, top-k/top-p, temperature statistics, and stop rules."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.generate import generate
from jaxserve.model.sampling import SamplingArrays, sample
from jaxserve.request import FinishReason, SamplingError, SamplingParams
from jaxserve.stopping import OutputTracker
from jaxserve.tokenizer import Tokenizer

PROMPTS = [[2, 10, 20, 30], [2, 99], [2, *range(40, 80)]]


def _ids(gens):
    return [g.token_ids for g in gens]


def test_seeded_sampling_is_reproducible_whatever_the_batch(hf_model):
    _, _, cfg, params = hf_model
    sp = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    batch = _ids(generate(params, cfg, PROMPTS, sp))
    assert batch == _ids(generate(params, cfg, PROMPTS, sp))
    alone = _ids(generate(params, cfg, [PROMPTS[1]], sp))
    assert alone[0] == batch[1]
    other = _ids(generate(params, cfg, PROMPTS, SamplingParams(max_tokens=24, temperature=1.0, seed=99,
                                                              ignore_eos=True)))
    assert other != batch


def test_top_k_1_and_tiny_top_p_equal_greedy(hf_model):
    _, _, cfg, params = hf_model
    greedy = _ids(generate(params, cfg, PROMPTS, SamplingParams(max_tokens=16)))
    k1 = _ids(generate(params, cfg, PROMPTS, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3)))
    p0 = _ids(generate(params, cfg, PROMPTS, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=3)))
    assert greedy == k1 == p0


def _draws(logits, n=4000, **kw):
    sp = [SamplingParams(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                         top_p=kw.get("top_p", 1.0), min_p=kw.get("min_p", 0.0),
                         logit_bias=kw.get("logit_bias", ()))] * n
    a = SamplingArrays.from_params(sp, [7] * n, list(range(n)), n)
    toks = sample(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), *a.fields())
    return np.bincount(np.asarray(toks), minlength=len(logits)) / n


def test_sampler_statistics():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    n = 4000
    tol = 4 * np.sqrt(0.25 / n)  # 4 sigma of a Bernoulli frequency
    np.testing.assert_allclose(_draws(logits, n), probs, atol=tol)
    t2 = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(_draws(logits, n, temperature=2.0), t2, atol=tol)
    np.testing.assert_allclose(_draws(logits, n, top_k=2), [0.625, 0.375, 0, 0], atol=tol)
    # nucleus 0.6 keeps tokens whose preceding mass is < 0.6: the first two
    np.testing.assert_allclose(_draws(logits, n, top_p=0.6), [0.625, 0.375, 0, 0], atol=tol)


def test_stop_string_ends_output_before_it(hf_model):
    d, _, cfg, params = hf_model
    tok = Tokenizer.from_dir(d)
    prompt = tok.encode("The weather today")
    base = generate(params, cfg, [prompt], SamplingParams(max_tokens=40, ignore_eos=True), tokenizer=tok)[0]
    assert base.text == tok.decode(base.token_ids)
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    assert len(stop) == 3
    g = generate(params, cfg, [prompt], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]),
                 tokenizer=tok)[0]
    assert g.finish_reason == FinishReason.STOP
    assert g.text == base.text[: base.text.index(stop)]
    assert stop not in g.text
    assert g.token_ids == base.token_ids[: len(g.token_ids)]


def test_stop_token_ids_and_max_tokens(hf_model):
    _, _, cfg, params = hf_model
    base = generate(params, cfg, [PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert base.finish_reason == FinishReason.LENGTH and len(base.token_ids) == 20
    stop_tok = base.token_ids[5]
    g = generate(params, cfg, [PROMPTS[0]], SamplingParams(max_tokens=20, stop_token_ids=[stop_tok]))[0]
    assert g.finish_reason == FinishReason.STOP
    assert g.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]


class PieceDetok:
    """Test double: token i decodes to PIECES[i]; finish() flushes nothing."""

    PIECES: ClassVar[dict[int, str]] = {5: "hello", 6: " EN", 7: "D more", 8: "!"}

    def add(self, t):
        return self.PIECES.get(t, "")

    def finish(self):
        return ""


def _run(sp, tokens, eos=2):
    tr = OutputTracker(sp, eos, PieceDetok())
    deltas, reason = [], None
    for t in tokens:
        d, reason = tr.add(t)
        deltas.append(d)
        if reason:
            break
    assert "".join(deltas) == tr.text  # streamed pieces always add up to the final text
    return tr, deltas, reason


def test_output_tracker_rules():
    tr, _, r = _run(SamplingParams(max_tokens=3), [5, 2, 8])
    assert (r, tr.text, tr.token_ids) == (FinishReason.STOP, "hello", [5, 2])
    tr, _, r = _run(SamplingParams(max_tokens=3, ignore_eos=True), [5, 2, 8])
    assert (r, tr.text, tr.token_ids) == (FinishReason.LENGTH, "hello!", [5, 2, 8])
    tr, _, r = _run(SamplingParams(max_tokens=9, stop_token_ids=(6,)), [5, 6, 7])
    assert (r, tr.text) == (FinishReason.STOP, "hello")
    # the stop string spans two tokens; " EN" must not be streamed before we know
    tr, deltas, r = _run(SamplingParams(max_tokens=9, stop=("END",)), [5, 6, 7, 8])
    assert (r, tr.text) == (FinishReason.STOP, "hello ")
    assert deltas[:2] == ["hel", "lo "] and "EN" not in "".join(deltas)
    tr, _, r = _run(SamplingParams(max_tokens=9, stop=("END",), include_stop_str_in_output=True), [5, 6, 7])
    assert tr.text == "hello END"
    tr, deltas, r = _run(SamplingParams(max_tokens=2, stop=("zzz",)), [5, 8])
    assert (r, tr.text) == (FinishReason.LENGTH, "hello!")


@pytest.mark.parametrize("kw,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=2**31), "top_k"), (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_sampling_params_validation(kw, field):
    with pytest.raises(SamplingError, match=f"^{field}:"):
        SamplingParams(**kw)


def test_min_tokens_bans_eos_until_reached(hf_model):
    """min_tokens: EOS cannot be picked before that many tokens (HF's MinNewTokensLengthLogitsProcessor,
    greedy); the rows without it are unchanged; after min_tokens EOS may end the request again."""
    import torch
    from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    cfg = hf_model[2]
    eos = cfg.eos_token_id
    bias = np.zeros(cfg.vocab_size, np.float32)
    bias[eos] = 50.0  # make EOS the greedy choice everywhere
    logits = np.random.default_rng(0).normal(size=(3, cfg.vocab_size)).astype(np.float32) + bias
    sp = [SamplingParams(max_tokens=8, min_tokens=3), SamplingParams(max_tokens=8), SamplingParams(max_tokens=8,
                                                                                                    min_tokens=3)]
    a = SamplingArrays.from_params(sp, [1, 2, 3], [1, 1, 3], 4, eos)  # rows 0 and 2 at 1 and 3 tokens
    assert list(a.ban) == [eos, -1, -1, -1] and not a.all_greedy
    toks = np.asarray(sample(jnp.asarray(np.vstack([logits, logits[:1]])), *a.fields()))
    assert toks[0] != eos and toks[0] == np.argsort(-logits[0])[1] and toks[1] == eos and toks[2] == eos
    proc = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(1, 3, eos)])
    ref = proc(torch.tensor([[2, 5]]), torch.tensor(logits[:1]))  # 1 new token so far, min 3 new
    assert int(ref.argmax()) == int(toks[0])


def test_min_p_and_logit_bias_distributions():
    """min_p 0.2 drops tokens under 0.2 x the top probability (HF's MinPLogitsWarper); logit_bias adds to
    the raw logits before anything else (a bias of log 3 on the last token triples its weight)."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    n = 4000
    tol = 4 * np.sqrt(0.25 / n)
    np.testing.assert_allclose(_draws(logits, n, min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=tol)
    w = probs * np.array([1, 1, 1, 3.0])
    np.testing.assert_allclose(_draws(logits, n, logit_bias=((3, float(np.log(3.0))),)), w / w.sum(), atol=tol)
    a = SamplingArrays.from_params([SamplingParams(logit_bias={2: 100.0})], [0], [0], 2)
    assert not a.all_greedy and list(a.bias_ids[0, :2]) == [2, -1]
    assert int(np.asarray(sample(jnp.asarray(np.tile(logits, (2, 1)).astype(np.float32)), *a.fields()))[0]) == 2


def _reference_keep(x, top_k, top_p, min_p):
    """The kept set by sorting (float64): stable order, larger first, lower id first among equals."""
    v = len(x)
    order = np.argsort(-x, kind="stable")
    rank = np.empty(v, np.int64)
    rank[order] = np.arange(v)
    keep = rank < (top_k if 0 < top_k < v else v)
    if top_p < 1.0:
        w = np.where(keep, np.exp(x - x.max()), 0.0)
        probs = w / w.sum()
        before = np.cumsum(probs[order]) - probs[order]
        keep &= ((before < top_p) | (np.arange(v) == 0))[rank]
    with np.errstate(divide="ignore"):
        return keep & (x - x.max() >= np.log(min_p))


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_keep_mask_equals_sorting(impl):
    """The top-k / top-p / min-p filters keep exactly what a stable sort keeps, over a vocabulary of
    3,000 with continuous values, heavy ties (values rounded to 0.5) and -inf entries: the jnp
    bisections (any backend) and the CPU kernel (sorting only the kept prefix)."""
    from jaxserve import native
    from jaxserve.model.token_filters import keep_mask_xla

    keep_mask = keep_mask_xla if impl == "xla" else native.keep_mask
    if impl == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")

    rng = np.random.default_rng(0)
    v, rows = 3000, []
    for r in range(24):
        x = rng.normal(0, 2.0, v)
        if r % 3 == 1:
            x = np.round(x * 2) / 2  # ~30 distinct values: every threshold is a tie
        if r % 4 == 2:
            x[rng.choice(v, 500, replace=False)] = -np.inf
        if r % 5 == 3:  # the cut among many exact zeros of both signs (-0.0 ties with +0.0)
            x[rng.choice(v, 1500, replace=False)] = rng.choice([0.0, -0.0], 1500)
            x = np.maximum(x, -0.0) if r % 2 else x
        k = [0, 1, 7, 50, 2999, 3000, 5000][r % 7]
        p = [1.0, 0.9, 0.5, 1e-6, 0.999, 0.3][r % 6]
        m = [0.0, 0.0, 0.05, 0.3][r % 4]
        rows.append((x.astype(np.float32), k, p, m))
    x = jnp.asarray(np.stack([r[0] for r in rows]))
    got = np.asarray(keep_mask(x, jnp.asarray([r[1] for r in rows], jnp.int32),
                               jnp.asarray([r[2] for r in rows], jnp.float32), jnp.asarray([r[3] for r in rows],
                                                                                        jnp.float32)))
    for i, (xi, k, p, m) in enumerate(rows):
        want = _reference_keep(xi.astype(np.float64), k, p, m)
        assert (got[i] == want).all(), (i, k, p, m, int(got[i].sum()), int(want.sum()))
    if impl == "native":  # the dispatcher, under jit, picks the kernel on this CPU and agrees
        from jaxserve.model.token_filters import keep_mask as dispatch

        args = (x, jnp.asarray([r[1] for r in rows], jnp.int32), jnp.asarray([r[2] for r in rows], jnp.float32),
                jnp.asarray([r[3] for r in rows], jnp.float32))
        assert (np.asarray(jax.jit(dispatch)(*args)) == got).all()


def test_sampling_a_large_vocabulary_matches_the_kept_distribution():
    """Over 2,000 tokens with top-p 0.8 and temperature 0.7, draws land only on kept tokens and in
    proportion to their probability (total variation distance small for 20,000 draws)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3.0, 2000).astype(np.float32)
    n = 20000
    freq = _draws(logits, n, temperature=0.7, top_p=0.8)
    x = logits.astype(np.float64) / 0.7
    keep = _reference_keep(x, 0, 0.8, 0.0)
    w = np.where(keep, np.exp(x - x.max()), 0.0)
    assert freq[~keep].sum() == 0
    assert 0.5 * np.abs(freq - w / w.sum()).sum() < 0.03
