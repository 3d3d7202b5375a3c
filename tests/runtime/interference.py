"""The interference scenario shared by the in-process and the Ray test: a burst of prompts while requests decode."""

import itertools
import time

from jaxserve.request import Event, Request, SamplingParams

PREFILL_S, DECODE_S = 0.4, 0.01


def decode_gaps_during_burst(router, n_decoding=2, n_burst=4):
    """Start ``n_decoding`` long requests; once they decode, add ``n_burst`` prompts (each a 400 ms
    prefill step); return (the decoding requests' inter-token gaps while the burst is prefilled,
    the burst's requests, the decoding requests)."""
    decoding = [Request(f"d{i}", [2, 5, 7], SamplingParams(max_tokens=10_000)) for i in range(n_decoding)]
    for r in decoding:
        router.add_request(r)
    t0 = time.monotonic()
    while min(len(r.output_token_ids) for r in decoding) < 5:
        assert time.monotonic() - t0 < 30, "requests did not start decoding"
        router.step()
    burst = [Request(f"b{i}", [2, *range(10, 40)], SamplingParams(max_tokens=3)) for i in range(n_burst)]
    for r in burst:
        router.add_request(r)
    while not all(r.finished for r in burst):
        assert time.monotonic() - t0 < 60, "the burst did not finish"
        router.step()
    start = min(e.time for r in burst for e in r.events if e.kind == Event.PREFILL_BEGAN)
    end = max(e.time for r in burst for e in r.events if e.kind == Event.PREFILL_ENDED)
    gaps = []
    for r in decoding:
        times = [e.time for e in r.events if e.kind == Event.TOKEN and start <= e.time <= end]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    for r in decoding:
        router.abort_request(r.request_id)
    return gaps, burst, decoding, end - start
