"""Shared by the benchmark scripts: HF transformers' batched, left-padded greedy ``generate``.

    prompts [token ids], outputs [tokens wanted] --batches of batch_size (sorted by (output, prompt length)
    if asked)--> OPTForCausalLM.generate (greedy, min_new_tokens = max_new_tokens = the batch's longest)
    --> {request index: its own requested tokens}, tokens generated in all, (rows, prompt len, new, s) per batch

Static batching runs every row to its batch's longest request; the caller counts useful vs raw tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def batches(prompts: Sequence[Sequence[int]], outputs: Sequence[int], batch_size: int, sort: bool) -> list[list[int]]:
    """Request indices in batches of ``batch_size``: workload order, or by (output, prompt length)."""
    order = list(range(len(prompts)))
    if sort:
        order.sort(key=lambda i: (outputs[i], len(prompts[i])))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def left_padded_generate(model: Any, prompts: Sequence[Sequence[int]], outputs: Sequence[int], batch_size: int,
                         sort: bool, pad_id: int, stopping: Any = None
                         ) -> tuple[dict[int, list[int]], int, list[tuple[int, int, int, float]]]:
    import torch

    tokens: dict[int, list[int]] = {}
    raw, walls = 0, []
    for batch in batches(prompts, outputs, batch_size, sort):
        t_batch = time.perf_counter()
        plen = max(len(prompts[i]) for i in batch)
        new = max(outputs[i] for i in batch)
        ids = torch.full((len(batch), plen), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), plen), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding
            ids[row, plen - len(prompts[i]):] = torch.tensor(list(prompts[i]))
            mask[row, plen - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 min_new_tokens=new, max_new_tokens=new, pad_token_id=pad_id,
                                 stopping_criteria=stopping)
        for row, i in enumerate(batch):
            tokens[i] = out[row, plen:plen + outputs[i]].tolist()
        raw += len(batch) * new
        walls.append((len(batch), plen, new, time.perf_counter() - t_batch))
    return tokens, raw, walls
