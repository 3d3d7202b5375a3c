"""Block manager and scheduler in pure Python (no jax): allocation, preemption order, chunking, abort."""

import pytest

from jaxserve.engine.block_manager import BlockManager, OutOfBlocks
from jaxserve.engine.scheduler import Scheduler, SeqStatus, Sequence
from jaxserve.request import Request, SamplingParams


def _seq(i, n, max_tokens=8):
    return Sequence(Request(f"r{i}", list(range(2, 2 + n)), SamplingParams(max_tokens=max_tokens)))


def _finish_step(sched, out):
    """Pretend the runner ran: mark computed, append a token to every sampling chunk."""
    sched.on_step_done(out.chunks)
    for c in out.chunks:
        if c.samples:
            c.seq.request.output_token_ids.append(7)


def test_block_manager_basics():
    bm = BlockManager(6, 4)
    assert bm.capacity == 5 and bm.num_free == 5
    t = bm.grow("a", 9)
    assert len(t) == 3 and 0 not in t
    assert bm.grow("a", 12) == t  # still 3 blocks
    assert len(bm.grow("a", 13)) == 4
    with pytest.raises(OutOfBlocks):
        bm.grow("b", 9)
    bm.check_invariants()
    assert bm.free("a") == 4 and bm.num_free == 5 and bm.free("a") == 0
    bm.check_invariants()
    with pytest.raises(ValueError, match="reserved"):
        BlockManager(1, 4)


def test_prefill_first_then_decode():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32)
    seqs = [_seq(i, n) for i, n in enumerate([10, 10, 10, 3, 3])]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq.id for c in out.chunks] == ["r0", "r1", "r2"]  # 30 tokens; the 4th would exceed 32
    _finish_step(sched, out)
    out = sched.schedule()  # r3 fits (3 tokens), r4 would exceed max_num_seqs
    assert [c.seq.id for c in out.chunks] == ["r3"]
    _finish_step(sched, out)
    out = sched.schedule()
    assert all(c.is_decode for c in out.chunks) and len(out.chunks) == 4
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 4 + [SeqStatus.WAITING]


def test_preemption_takes_latest_and_requeues_first():
    bm = BlockManager(8, 4)  # 7 usable blocks
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=32)
    a, b, c = _seq(0, 8, 20), _seq(1, 4, 20), _seq(2, 8, 20)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert len(out.chunks) == 3 and bm.num_free == 2  # 2 + 1 + 2 blocks
    _finish_step(sched, out)
    # each crossed a block boundary: 3 new blocks needed, 2 free -> the latest (c) is preempted
    out = sched.schedule()
    assert [s.id for s in out.preempted] == ["r2"]
    assert [ch.seq.id for ch in out.chunks] == ["r0", "r1"]
    assert list(sched.waiting) == [c] and c.num_computed == 0 and c.num_preemptions == 1
    bm.check_invariants()


def test_chunked_prefill_splits_long_prompt_and_keeps_decoding():
    sched = Scheduler(BlockManager(64, 4), policy="chunked", max_num_seqs=4, max_num_batched_tokens=8,
                      max_model_len=64)
    short, long_ = _seq(0, 3), _seq(1, 20)
    sched.add(short)
    sched.add(long_)
    out = sched.schedule()
    assert [(ch.seq.id, ch.start, ch.num_tokens) for ch in out.chunks] == [("r0", 0, 3), ("r1", 0, 5)]
    _finish_step(sched, out)
    out = sched.schedule()  # r0 decodes; r1 continues with the remaining budget 7
    assert [(ch.seq.id, ch.start, ch.num_tokens) for ch in out.chunks] == [("r0", 3, 1), ("r1", 5, 7)]
    assert not out.chunks[1].samples
    _finish_step(sched, out)
    out = sched.schedule()
    assert [(ch.seq.id, ch.start, ch.num_tokens) for ch in out.chunks] == [("r0", 4, 1), ("r1", 12, 7)]


def test_abort_and_finish_free_blocks():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32)
    s0, s1 = _seq(0, 9), _seq(1, 9)
    sched.add(s0)
    sched.add(s1)
    _finish_step(sched, sched.schedule())
    assert bm.num_used == 6
    assert sched.abort("r0") is s0 and bm.num_used == 3
    assert sched.abort("r0") is None
    sched.finish(s1)
    assert bm.num_used == 0 and not sched.has_work()


def test_check_fits_and_config_errors():
    sched = Scheduler(BlockManager(5, 4), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=32)
    with pytest.raises(ValueError, match="needs up to 20 tokens"):
        sched.add(_seq(0, 12, max_tokens=8))
    with pytest.raises(ValueError, match="limit is 31"):
        sched.add(_seq(1, 40))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(5, 4), max_num_batched_tokens=16, max_model_len=32)
