"""Choosing the next token from the full logits (on rank 0 only, so every rank follows it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before any choice
    grammar: str | None = None  # constrained output (engine/constrain.py): llguidance's grammar text
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest (k <= 20)


class Sampler:
    """Greedy, or temperature / top-k / top-p sampling from a seeded generator.

    Rank 0 holds the logits of the whole vocabulary in the checkpoint's order, so a seed gives
    the same tokens whatever the world size.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (vocab,) float32 -> a token id."""
        p = self.params
        logits = logits.float().cpu()
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            logits = logits.index_add(0, torch.tensor(ids), torch.tensor(bias, dtype=torch.float32))
        if p.temperature <= 0:  # numpy's argmax finds the first maximum, as torch's, 30 us sooner when cold
            return int(logits.numpy().argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
