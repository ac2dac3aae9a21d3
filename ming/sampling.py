"""Choosing the next token: greedy or sampled (temperature, top-k, top-p), with a repetition guard."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it.
    from . import kernels
except ImportError:
    kernels = None


@dataclass
class SamplingConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0  # the release's demo uses 10 to stop loops
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


class NgramGuard:
    """transformers' no_repeat_ngram_size rule: ban any token that would complete an n-gram already in the sequence
    (prompt included). The n-grams are indexed as tokens arrive, so a step costs O(1), not O(sequence length):
    a 9,000-token video prompt must not slow every decode step down."""

    def __init__(self, n: int, history: list[int]):
        self.n = n
        self.history: list[int] = []
        self.next_tokens: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for token in history:
            self.append(token)

    def append(self, token: int) -> None:
        self.history.append(token)
        if len(self.history) >= self.n:
            gram = self.history[-self.n :]
            self.next_tokens[tuple(gram[:-1])].add(gram[-1])

    def banned(self) -> list[int]:
        if len(self.history) < self.n - 1:
            return []
        prefix = tuple(self.history[len(self.history) - self.n + 1 :])
        return sorted(self.next_tokens.get(prefix, ()))


def most_likely(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of logits [B, V]; on a GPU through one Triton kernel, several times faster
    than torch's argmax over a vocabulary-long row."""
    if logits.is_cuda and kernels is not None:
        return kernels.argmax_rows(logits)
    return logits.argmax(dim=-1)


def select_next_token(
    logits: torch.Tensor, cfg: SamplingConfig, guards: list[NgramGuard] | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, V] (float32) -> next token ids [B]. `guards`: one NgramGuard per row when the repetition guard
    is on."""
    if guards:
        logits = logits.clone()  # the bans below write in place; everything after makes new tensors
    for row, guard in enumerate(guards or []):
        banned = guard.banned()
        if banned:
            logits[row, banned] = float("-inf")
    if not cfg.do_sample:
        return most_likely(logits)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # once: each launch here is a pause in the decode loop
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        # The draw stays in vocabulary order: in sorted order, logits that differ in their last bits (one prompt
        # decoded alone or in a batch) could swap two near-equal tokens and send the same seed elsewhere.
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
