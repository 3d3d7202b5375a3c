"""``n`` and ``best_of``: several samples of one prompt in one answer.

    body --get_samples--> (n, best_of) (400 naming the field; best_of > n cannot stream)
    a prompt's Job --fan_out--> best_of Jobs (best_of defaults to n): seeds seed, seed + 1, ...
      (a sample equals a single request with its seed; no seed: each its own random one), choice
      index prompt * n + j; with best_of > n each keeps its token logprobs (hidden unless asked) to
      be ranked
    batch.run_batch runs them; a prompt's later samples are admitted once its first has its first
      token, so the prompt's full blocks come from the prefix cache: computed once
    --pick_best--> per prompt the n samples with the highest cumulative logprob, re-indexed

Usage counts every sample generated, best_of's discarded ones included (they were computed), and
each prompt once (``prompt_tokens``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxserve.request import Request
from jaxserve.serving.fields import bad, get_bool, get_int

MAX_SAMPLES = 16  # n and best_of per prompt


def get_samples(body: dict[str, Any], chat: bool) -> tuple[int, int]:
    """(n, best_of) of a body; best_of is completions-only and defaults to n."""
    n = get_int(body, "n", 1, lo=1)
    if n > MAX_SAMPLES:
        raise bad("n", f"at most {MAX_SAMPLES}, got {n}")
    best_of = n if chat else get_int(body, "best_of", n, lo=1)
    if best_of < n:
        raise bad("best_of", f"must be >= n ({n}), got {best_of}")
    if best_of > MAX_SAMPLES:
        raise bad("best_of", f"at most {MAX_SAMPLES}, got {best_of}")
    if best_of > n and get_bool(body, "stream", False):
        raise bad("best_of", "cannot be streamed when greater than n (the best are known only at the end)")
    return n, best_of


def fan_out(job: Any, n: int, best_of: int, prompt_index: int) -> list[Any]:
    """The jobs of one prompt's samples (the job itself when there is one)."""
    job.index, job.group, job.n = prompt_index * n, prompt_index, n
    if best_of == 1:
        return [job]
    sp, req = job.request.sampling, job.request
    out = []
    for j in range(best_of):
        lp = sp.logprobs if sp.logprobs is not None else (0 if best_of > n else None)
        sampling = dataclasses.replace(sp, seed=None if sp.seed is None else (sp.seed + j) % 2**63, logprobs=lp)
        child = Request(f"{req.request_id}-{j}", list(req.prompt_token_ids), sampling, prompt=req.prompt,
                        arrival_time=req.arrival_time)
        out.append(dataclasses.replace(job, request=child, index=prompt_index * n + j,
                                       hide_logprobs=sp.logprobs is None and lp is not None))
    return out


def prompt_tokens(jobs: Sequence[Any]) -> int:
    """An answer's prompt tokens: each prompt once, however many samples it has (as OpenAI counts)."""
    return sum({j.group: j.request.num_prompt_tokens for j in jobs}.values())


def cumulative_logprob(lps: Sequence[tuple[float, Any]]) -> float:
    return float(sum(lp for lp, _ in lps))


def pick_best(runs: Sequence[Any]) -> list[Any]:
    """Each prompt's n best samples by cumulative logprob (``runs``: batch._Run, with ``job`` and
    ``lps``), their jobs re-indexed prompt * n + rank; prompts without best_of pass through."""
    out: list[Any] = []
    groups: dict[int, list[Any]] = {}
    for r in runs:
        groups.setdefault(r.job.group, []).append(r)
    for g, members in sorted(groups.items()):
        n = members[0].job.n
        if len(members) > n:
            members = sorted(members, key=lambda r: cumulative_logprob(r.lps), reverse=True)[:n]
            for rank, r in enumerate(members):
                r.job.index = g * n + rank
        out.extend(members)
    return out
