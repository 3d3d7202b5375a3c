"""Server metrics: finished requests and engine gauges in, Prometheus text out.

    api_server, per request:  admitted (prompt tokens) ... finished (server-side times:
        arrival, first token out, last token out; output length; finish reason; the
        Request's TRANSFER_BEGAN/ENDED events)
      --ServerMetrics.observe_finished--> counters + histograms (TTFT, TPOT, e2e via jaxserve.slo)
    GET /metrics --ServerMetrics.render(engine, orchestrator)--> text exposition format 0.0.4

Names follow vLLM's (``vllm:`` -> ``jaxserve:``) so its dashboards fit:

    jaxserve:request_success_total{finished_reason}   counter (stop, length, abort, error)
    jaxserve:request_rejected_total{reason}           counter (invalid, queue_full, ...)
    jaxserve:prompt_tokens_total / generation_tokens_total   counters
    jaxserve:time_to_first_token_seconds      histogram  server arrival -> first token out
    jaxserve:time_per_output_token_seconds    histogram  slo.tpot; requests with >= 2 output tokens
    jaxserve:e2e_request_latency_seconds      histogram  server arrival -> last token out
    jaxserve:kv_transfer_seconds              histogram  TRANSFER_BEGAN -> TRANSFER_ENDED, per hand-off
    jaxserve:inter_token_latency_seconds      histogram  gaps between a request's TOKEN events
    jaxserve:request_queue_time_seconds       histogram  arrived -> first prefill began (slo.breakdown)
    jaxserve:request_prefill_time_seconds     histogram  prefill began -> ended (slo.breakdown)
    jaxserve:request_decode_time_seconds      histogram  first token -> last token
    jaxserve:request_inference_time_seconds   histogram  prefill + decode time
    jaxserve:request_prompt_tokens / request_generation_tokens   histograms (1-2-5 buckets)
    jaxserve:num_preemptions_total            counter    PREEMPTED events of finished requests
    jaxserve:prefix_cache_queries_total / prefix_cache_hits_total   counters, prompt tokens looked up
        in the instances' prefix caches / found there (vLLM's prefix_cache_queries / _hits)
    jaxserve:cache_config_info{instance, block_size, num_gpu_blocks, enable_prefix_caching}   gauge 1
    jaxserve:num_requests_running / num_requests_waiting   gauges: the total (no ``instance``
        label) and one series per instance (``instance="prefill-0"``); a scraper that adds its
        own ``instance`` label keeps ours as ``exported_instance``
    jaxserve:kv_cache_usage_perc              gauge, 0..1 (as vLLM's), total and per instance
    jaxserve:num_requests_in_flight           gauge, requests the server is streaming now

Only stop/length requests feed the latency histograms (an aborted or failed request has
no meaningful latency). Every series carries ``model_name``. Updates come from the
event loop only; instance gauges are the router's last ``InstanceStats`` of each instance
(a list swapped by the router's thread, read here without locks: fine for a gauge).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxserve import slo
from jaxserve.request import Event, Request
from jaxserve.runtime.api import InstanceStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PREFIX = "jaxserve:"


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out, m = [], 1
    while True:
        for b in (m, 2 * m, 5 * m):
            if b > limit:
                return tuple(out)
            out.append(b)
        m *= 10


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}" if labels else ""


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Histogram:
    """Cumulative-bucket histogram as Prometheus renders it."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        v = float(v)
        if not math.isfinite(v):
            return
        i = next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> Iterable[str]:
        acc = 0
        for b, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            acc += c
            yield f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {acc}"
        yield f"{name}_sum{_labels(labels)} {_num(self.sum)}"
        yield f"{name}_count{_labels(labels)} {self.count}"


def transfer_durations(request: Request) -> list[float]:
    """Seconds of each KV hand-off of ``request`` (TRANSFER_BEGAN paired with the next TRANSFER_ENDED)."""
    out, began = [], None
    for e in list(request.events):  # a copy: another thread may still stamp it
        if e.kind == Event.TRANSFER_BEGAN:
            began = e.time
        elif e.kind == Event.TRANSFER_ENDED and began is not None:
            out.append(e.time - began)
            began = None
    return out


def instance_gauges(stats: Sequence[InstanceStats]) -> list[dict[str, Any]]:
    """Per instance: name, held/capacity blocks, running/waiting requests (from the router's last
    batch of each instance: no remote calls at scrape time)."""
    return [{"name": s.name, "held": s.held_blocks, "capacity": s.held_blocks + s.free_blocks,
             "running": s.running, "waiting": s.waiting} for s in stats]


class ServerMetrics:
    """Counters and histograms of one server; ``render`` adds the engine gauges at scrape time."""

    def __init__(self, model_name: str = "", max_model_len: int = 1 << 20) -> None:
        self.model_name = model_name
        self.preemptions = 0
        self.itl = Histogram(TPOT_BUCKETS)
        self.phases = {k: Histogram(E2E_BUCKETS) for k in ("queue", "prefill", "decode", "inference")}
        self.prompt_len = Histogram(buckets_1_2_5(max_model_len))
        self.output_len = Histogram(buckets_1_2_5(max_model_len))
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.transfer = Histogram(TRANSFER_BUCKETS)

    # ---- recording (event loop) --------------------------------------------------------------
    def observe_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def observe_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens += int(num_prompt_tokens)

    def observe_finished(self, request: Request | None, *, arrival: float, first_token: float | None,
                         finish: float, num_output_tokens: int, finish_reason: str) -> None:
        """One request ended (any reason); times are ``time.perf_counter()`` seconds at the server."""
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        self.generation_tokens += int(num_output_tokens)
        if request is not None:
            for d in transfer_durations(request):
                self.transfer.observe(d)
            self.preemptions += sum(e.kind == Event.PREEMPTED for e in list(request.events))
        if finish_reason not in ("stop", "length") or first_token is None or num_output_tokens < 1:
            return
        if request is not None:
            self._observe_phases(request, num_output_tokens)
        t = slo.ttft(np.array([arrival]), np.array([first_token]))
        latency = finish - arrival
        self.ttft.observe(float(t[0]))
        self.e2e.observe(latency)
        if num_output_tokens > 1:  # one token has no decoding phase (slo.tpot says 0); keep it out
            self.tpot.observe(float(slo.tpot(t, np.array([latency]), np.array([num_output_tokens]))[0]))

    def _observe_phases(self, request: Request, num_output_tokens: int) -> None:
        """vLLM's per-request phase histograms, from the request's lifecycle events (engine clock)."""
        events = list(request.events)
        tokens = [e.time for e in events if e.kind == Event.TOKEN]
        for a, b in itertools.pairwise(tokens):
            self.itl.observe(b - a)
        stages = slo.breakdown([(e.kind, e.time) for e in events])
        decode = tokens[-1] - tokens[0] if tokens else 0.0
        for key, v in (("queue", stages["prefill_queue"]), ("prefill", stages["prefill_exec"]), ("decode", decode),
                       ("inference", stages["prefill_exec"] + decode)):
            self.phases[key].observe(v)
        self.prompt_len.observe(request.num_prompt_tokens)
        self.output_len.observe(num_output_tokens)

    # ---- exposition ---------------------------------------------------------------------------
    def render(self, instances: Sequence[InstanceStats] = (), num_in_flight: int | None = None) -> str:
        """Prometheus text; ``instances``: the router's last stats of each instance (``Router.stats()``)."""
        base = {"model_name": self.model_name}
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> str:
            full = PREFIX + name
            out.append(f"# HELP {full} {help_}")
            out.append(f"# TYPE {full} {kind}")
            return full

        n = family("request_success_total", "counter", "Finished requests by finish reason.")
        for reason in sorted({"stop", "length", *self.finished}):
            out.append(f"{n}{_labels({**base, 'finished_reason': reason})} {self.finished.get(reason, 0)}")
        n = family("request_rejected_total", "counter", "Requests answered with an error before running.")
        for reason, c in sorted(self.rejected.items()):
            out.append(f"{n}{_labels({**base, 'reason': reason})} {c}")
        n = family("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.")
        out.append(f"{n}{_labels(base)} {self.prompt_tokens}")
        n = family("generation_tokens_total", "counter", "Generated tokens streamed to clients.")
        out.append(f"{n}{_labels(base)} {self.generation_tokens}")
        for name, h, help_ in (
            ("time_to_first_token_seconds", self.ttft, "Server arrival to first token out (slo.ttft)."),
            ("time_per_output_token_seconds", self.tpot, "(latency - TTFT) / (output tokens - 1) (slo.tpot)."),
            ("e2e_request_latency_seconds", self.e2e, "Server arrival to last token out."),
            ("kv_transfer_seconds", self.transfer, "KV cache hand-off time, prefill to decode instance."),
            ("inter_token_latency_seconds", self.itl, "Time between consecutive tokens of a request."),
            ("request_queue_time_seconds", self.phases["queue"], "Arrival to the first prefill step."),
            ("request_prefill_time_seconds", self.phases["prefill"], "Prefill began to prefill ended."),
            ("request_decode_time_seconds", self.phases["decode"], "First token to last token."),
            ("request_inference_time_seconds", self.phases["inference"], "Prefill time plus decode time."),
            ("request_prompt_tokens", self.prompt_len, "Prompt tokens per finished request."),
            ("request_generation_tokens", self.output_len, "Generated tokens per finished request."),
        ):
            out.extend(h.lines(family(name, "histogram", help_), base))
        n = family("num_preemptions_total", "counter", "Times a running request was preempted (recomputed).")
        out.append(f"{n}{_labels(base)} {self.preemptions}")
        _instance_lines(out, family, base, instances, num_in_flight)
        return "\n".join(out) + "\n"


def _instance_lines(out: list[str], family: Any, base: dict[str, str], instances: Sequence[InstanceStats],
                    num_in_flight: int | None) -> None:
    """The per-instance series: prefix-cache counters, request gauges, KV usage (totals and per instance)."""
    reported = [i for i in instances if i.block_size]
    if reported:
        n = family("cache_config_info", "gauge", "KV cache configuration of each instance (the labels; value 1).")
        for i in reported:
            labels = {**base, "instance": i.name, "block_size": str(i.block_size),
                      "num_gpu_blocks": str(i.free_blocks + i.held_blocks),
                      "enable_prefix_caching": str(i.prefix_caching)}
            out.append(f"{n}{_labels(labels)} 1")
    for key, name, help_ in (("prefix_cache_queries", "prefix_cache_queries_total",
                              "Prompt tokens looked up in the prefix cache."),
                             ("prefix_cache_hits", "prefix_cache_hits_total",
                              "Prompt tokens found in the prefix cache (their prefill skipped).")):
        n = family(name, "counter", help_)
        out.append(f"{n}{_labels(base)} {sum(getattr(i, key) for i in instances)}")

    gauges = instance_gauges(instances)
    if num_in_flight is not None:
        n = family("num_requests_in_flight", "gauge", "Requests the server is streaming now.")
        out.append(f"{n}{_labels(base)} {int(num_in_flight)}")
    for key, name, help_ in (("running", "num_requests_running", "Requests in a running batch."),
                             ("waiting", "num_requests_waiting",
                              "Requests queued for prefill, or prefilled and waiting for a decode instance.")):
        have = [g for g in gauges if key in g]
        n = family(name, "gauge", help_ + " Without an instance label: the total.")
        if have:
            out.append(f"{n}{_labels(base)} {sum(g[key] for g in have)}")
        for g in have:
            out.append(f"{n}{_labels({**base, 'instance': g['name']})} {g[key]}")
    have = [g for g in gauges if g.get("capacity")]
    n = family("kv_cache_usage_perc", "gauge", "KV cache blocks in use, 0..1. Without an instance label: total.")
    if have:
        total = sum(g["held"] for g in have) / sum(g["capacity"] for g in have)
        out.append(f"{n}{_labels(base)} {_num(total)}")
    for g in have:
        out.append(f"{n}{_labels({**base, 'instance': g['name']})} {_num(g['held'] / g['capacity'])}")
