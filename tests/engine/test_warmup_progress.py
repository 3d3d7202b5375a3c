"""Warm-up progress: the reporter's lines for known events, and an engine's warm-up reported shape by shape."""

import io

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.model.demo import random_params_numpy
from jaxserve.runtime.instance import LocalInstance
from jaxserve.warmup_progress import WarmupProgress


class Fake:
    """A clock and a cache-hit counter the test moves by hand."""

    def __init__(self, hits: int = 0) -> None:
        self.now, self.hits = 100.0, hits

    def clock(self) -> float:
        return self.now

    def hit_count(self) -> int:
        return self.hits


def _reporter(fake: Fake, **kw) -> tuple[WarmupProgress, io.StringIO]:
    out = io.StringIO()
    return WarmupProgress("w", stream=out, clock=fake.clock, hits=fake.hit_count, **kw), out


def test_log_lines_every_tenth_with_hits_elapsed_and_estimate():
    fake = Fake(hits=5)  # hits before the reporter was made do not count
    report, out = _reporter(fake, tty=False)
    for done in range(21):
        fake.now, fake.hits = 100.0 + 2 * done, 5 + done // 2
        report(done, 20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the start, every 10 %, the end
    assert lines[0] == "w: 0/20 shapes (0%), 0 cache hits, 0 s elapsed"
    assert lines[1] == "w: 2/20 shapes (10%), 1 cache hits, 4 s elapsed, about 36 s left"
    assert lines[5] == "w: 10/20 shapes (50%), 5 cache hits, 20 s elapsed, about 20 s left"
    assert lines[-1] == "w: 20 shapes ready in 40 s (10 from the compilation cache)"
    assert (report.done, report.total, report.hits) == (20, 20, 10)


def test_log_lines_for_an_uneven_total_and_long_estimates():
    fake = Fake()
    report, out = _reporter(fake, tty=False, steps=4)
    for done in range(8):
        fake.now = 100.0 + 50 * done
        report(done, 7)
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["0/7", "2/7", "4/7", "6/7", "7"]
    assert lines[1] == "w: 2/7 shapes (28%), 0 cache hits, 1 min 40 s elapsed, about 4 min 10 s left"
    assert lines[-1] == "w: 7 shapes ready in 5 min 50 s (0 from the compilation cache)"


def test_nothing_to_compile_is_one_line():
    report, out = _reporter(Fake(), tty=False)
    report(0, 0)
    assert out.getvalue() == "w: 0 shapes ready in 0 s (0 from the compilation cache)\n"


def test_a_terminal_gets_one_bar_that_ends_full():
    fake = Fake()
    report, out = _reporter(fake, tty=True)
    for done in range(6):
        fake.hits = done // 2
        report(done, 5)
    text = out.getvalue()
    assert "\r" in text and text.endswith("\n")  # rewritten in place, then left on its own line
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("w: 100%") and "5/5" in last and "2 cache hits" in last


def test_engine_warmup_reports_each_shape_and_hand_off_and_ends_at_total(capsys):
    """A decode instance: step shapes and hand-off buckets counted; done goes 0..total by one; the
    instance's own reporter (``warmup(progress=True)``) writes its lines on stderr, ending at the total."""
    cfg = ModelConfig(name="t", vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32)
    engine = LLMEngine(cfg, random_params_numpy(cfg, seed=3, std=0.2),
                       EngineConfig(mode="decode", max_num_seqs=2, max_model_len=32), name="decode-0")
    calls = []
    n = engine.warmup(lambda done, total: calls.append((done, total)))
    steps = len(engine.runner.buckets.shapes(decode=True, prefill=True, chunks=False))
    assert n == steps + 2  # 2 hand-off block buckets (1 and 2 blocks of 16 for 32 positions)
    assert calls == [(d, n) for d in range(n + 1)]
    inst = LocalInstance(engine)
    inst.start()
    try:
        assert inst.warmup(progress=True) == n  # every shape compiled already: quick
        assert inst.warmup() == n
    finally:
        inst.shutdown()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"decode-0 warm-up: 0/{n} shapes (0%), 0 cache hits, 0 s elapsed"
    assert lines[-1].startswith(f"decode-0 warm-up: {n} shapes ready in ")
    assert len(lines) == 1 + len({d * 10 // n for d in range(1, n + 1)})  # the start, then once per tenth
