"""Autoregressive generation over a static KV cache: prefill the prompt, then one decode step per new token.

A generation = one prefill of the prompt (media already merged into its embeddings) into the cache, then one
decode step per new token that reads the cache and never recomputes the prompt. On a GPU the decode step is
captured once per (batch, cache bucket) as a CUDA graph (`ming.layers.CapturedStep`) and reused across requests.

A prompt may start from a `CachePrefix`: keys and values computed earlier (a compressed video, say), copied into the
cache's first slots, so that only the new tokens are prefilled.

This module knows the language model (`BailingMoeForCausalLM`) and nothing of media: `MingOmni` embeds the prompt
and calls it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .layers import CapturedStep, KVCache, cache_bucket, cache_mask, decode_mask, prompt_mask, use_triton
from .llm import BailingMoeForCausalLM
from .sampling import NgramGuard, SamplingConfig, select_next_token


@dataclass
class CachePrefix:
    """The start of a prompt already in key/value form, reusable by any number of later prompts.

    keys / values: per layer [1, kv_heads, N, head_dim] (keys rotated for positions 0..N-1 as stored; a compressed
    prefix may have had its keys moved to contiguous positions); `next_position` is the RoPE position of the token
    that follows it. Keep it on the GPU while it fits, or `.to("cpu")` between requests."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    next_position: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def to(self, device: torch.device | str) -> "CachePrefix":
        pin = torch.device(device).type == "cpu" and torch.cuda.is_available()
        move = (lambda t: t.to(device).pin_memory()) if pin else (lambda t: t.to(device))
        return CachePrefix([move(k) for k in self.keys], [move(v) for v in self.values], self.next_position)


class DecodeStep:
    """Feeds one token per row, row b at cache slot `index[b]`, and returns the next-token logits [B, V] (float32).

    Owns the input buffers, and the static cache unless given one (the scheduler's steps of several batch sizes
    share the first rows of one slotted cache), so the same step can be replayed from a CUDA graph. Each row has
    its own slot, so rows at different points of their sequences decode together; the row's valid slots must all
    be at or before its new one. A row that only fills the batch (`keep` False) leaves its slot invalid again."""

    def __init__(self, llm: BailingMoeForCausalLM, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, capture: bool, cache: KVCache | None = None):
        self.llm = llm
        self.cache = cache if cache is not None else llm.new_cache(batch, capacity, dtype, device)
        # token, position, slot and keep (1/0) of every row in one buffer: one host-to-device copy per step.
        self.inputs = torch.zeros(4, batch, dtype=torch.long, device=device)
        self.token, self.position, self.index, self.keep = self.inputs
        if capture:
            llm.normalize_head_()  # mutates the weight: never inside a capture
        self.run = CapturedStep(self._step, device) if capture else self._step

    def _step(self) -> torch.Tensor:
        slots = self.index[:, None]  # [B, 1]: each row's own slot
        self.cache.valid.scatter_(1, slots, True)
        embeds = self.llm.model.word_embeddings(self.token[:, None])
        hidden = self.llm.model(embeds, self.position[:, None], decode_mask(self.cache.valid), None, self.cache,
                                slots, final_norm=False)
        self.cache.valid.scatter_(1, slots, self.keep[:, None] != 0)
        return self.llm.logits(hidden[:, -1], norm=self.llm.model.norm)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, index: int | torch.Tensor,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """index: one slot for all rows, or [B] slots, one per row; keep: [B] (default: every row)."""
        self.token.copy_(tokens)
        self.position.copy_(positions)
        if isinstance(index, int):
            self.index.fill_(index)
        else:
            self.index.copy_(index)
        if keep is None:
            self.keep.fill_(1)
        else:
            self.keep.copy_(keep)
        return self.run()

    def load(self, rows: torch.Tensor) -> None:
        """Set every row's token, position, slot and keep (1/0) from rows [4, B] on the host, in one copy that does
        not wait for the GPU's queue (from pinned memory): the scheduler keeps a step queued ahead of this one."""
        if self.inputs.is_cuda:
            rows = rows.pin_memory()
        self.inputs.copy_(rows, non_blocking=True)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] (on the device) one position and one slot after the last call's, each row kept as it
        was: a generation's next step in two small launches before the graph instead of four (each a few
        microseconds the GPU idles between steps)."""
        self.token.copy_(tokens)
        self.inputs[1:3] += 1  # position and index
        return self.run()


def decode_step_for(llm: BailingMoeForCausalLM, captured_steps: dict, batch: int, needed: int, dtype: torch.dtype,
                    device: torch.device) -> DecodeStep:
    """A DecodeStep whose cache holds `needed` slots, all invalid. With the GPU kernels, steps are captured once per
    (batch, power-of-two bucket) and kept in `captured_steps` for later requests; elsewhere each generation gets a
    cache of exactly the size it needs."""
    limit = llm.config.max_position_embeddings
    if needed > limit:
        raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the model's context of {limit} tokens")
    fast = use_triton(llm.lm_head.weight)
    if not fast:
        return DecodeStep(llm, batch, needed, dtype, device, capture=False)
    key = (batch, min(cache_bucket(needed), limit))
    if key not in captured_steps:
        captured_steps[key] = DecodeStep(llm, *key, dtype, device, capture=True)
    step = captured_steps[key]
    step.cache.valid.zero_()
    return step


class Decoder:
    """One generation over a batch: prefill, then `step()` per token. Rows keep their prompt's cache slots (left
    padding stays masked) and all rows decode at the same slot."""

    def __init__(
        self,
        llm: BailingMoeForCausalLM,
        captured_steps: dict,
        inputs_embeds: torch.Tensor,
        router_ids: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cfg: SamplingConfig,
        prefix: CachePrefix | None = None,
    ):
        self.llm, self.cfg = llm, cfg
        device = inputs_embeds.device
        self.eos = llm.config.eos_token_id
        B, L = input_ids.shape
        start = 0 if prefix is None else prefix.length
        if prefix is not None and B != 1:
            raise ValueError("a cache prefix serves one prompt at a time")
        self.step_fn = decode_step_for(llm, captured_steps, B, start + L + cfg.max_new_tokens, inputs_embeds.dtype,
                                       device)
        cache = self.step_fn.cache
        valid = key_valid_of(attention_mask, input_ids, device)
        first_position = 0 if prefix is None else prefix.next_position
        positions = first_position + (valid.long().cumsum(-1) - 1).clamp(min=0)
        slots = torch.arange(start, start + L, device=device)
        cache.valid[:, start:start + L] = valid
        if prefix is None:
            mask = prompt_mask(valid)
        else:
            copy_prefix(prefix, cache)
            mask = cache_mask(cache.valid, slots)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None

        hidden = llm.model(inputs_embeds, positions, mask, router_ids, cache, slots)
        # What the talker is conditioned on: the merged input embeddings plus the prompt's last hidden states.
        self.thinker_states = inputs_embeds + hidden
        self.logits = llm.logits(hidden[:, -1])
        # The first decode step's positions and slot; later steps each go one further (`DecodeStep.advance`).
        self.next_position = positions[:, -1] + 1
        self.cache_index = start + L
        self.guards = None
        if cfg.no_repeat_ngram_size > 0:
            self.guards = [NgramGuard(cfg.no_repeat_ngram_size, row.tolist()) for row in input_ids]
        self.finished = [False] * B
        self.generated = 0
        # The chosen tokens reach the host through a pinned buffer, while the next step already runs (see `step`).
        self.host_tokens = torch.empty(B, dtype=torch.long, pin_memory=device.type == "cuda")

    @property
    def done(self) -> bool:
        return all(self.finished) or self.generated >= self.cfg.max_new_tokens

    def step(self) -> list[int | None]:
        """Choose the next token of every unfinished row (None for finished rows) and feed it to the model.

        The chosen tokens are fed to the next step on the GPU before the host reads them, so the host's reading and
        bookkeeping overlap that step instead of leaving the GPU idle between steps (at one row, tens of
        microseconds a token). Rows that ended earlier feed <|endoftext|>, a row ending now feeds its own
        <|endoftext|>; a step launched after the last row ended is simply never read."""
        tokens = select_next_token(self.logits, self.cfg, self.guards, self.generator)
        if any(self.finished):
            ended = torch.tensor(self.finished).to(tokens.device, non_blocking=True)
            tokens = tokens.masked_fill(ended, self.eos)
        self.host_tokens.copy_(tokens, non_blocking=True)
        chosen = torch.cuda.Event() if tokens.is_cuda else None
        if chosen is not None:
            chosen.record()
        self.generated += 1
        if not self.done:
            if self.generated == 1:
                self.logits = self.step_fn(tokens, self.next_position, self.cache_index)
            else:
                self.logits = self.step_fn.advance(tokens)
        if chosen is not None:
            chosen.synchronize()
        out: list[int | None] = []
        for row, token in enumerate(self.host_tokens.tolist()):
            if self.finished[row] or token == self.eos:
                self.finished[row] = True
                out.append(None)
                continue
            if self.guards is not None:
                self.guards[row].append(token)
            out.append(token)
        return out


def copy_prefix(prefix: CachePrefix, cache: KVCache) -> None:
    """Put a prefix's keys and values into the cache's first slots and mark them valid."""
    n = prefix.length
    for layer_keys, layer_values, keys, values in zip(cache.keys, cache.values, prefix.keys, prefix.values):
        layer_keys[:, :, :n].copy_(keys, non_blocking=True)
        layer_values[:, :, :n].copy_(values, non_blocking=True)
    cache.valid[:, :n] = True


def key_valid_of(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=device)
    return attention_mask.to(device).bool()


class TokenStream:
    """Iterator over the new token ids of one prompt. Prefill runs in the constructor, so `thinker_states` is ready
    before the first token is read. Stops at <|endoftext|>, max_new_tokens or `stop_event`."""

    def __init__(self, decoder: Decoder, stop_event: threading.Event | None = None):
        self.decoder = decoder
        self.stop_event = stop_event
        self.thinker_states: torch.Tensor = decoder.thinker_states  # what the talker is conditioned on
        self.finish_reason: str | None = None  # "eos" | "length" | "stopped"

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self.stop_event is not None and self.stop_event.is_set():
            self.finish_reason = "stopped"
            raise StopIteration
        if self.decoder.done:
            self.finish_reason = "eos" if self.decoder.finished[0] else "length"
            raise StopIteration
        token = self.decoder.step()[0]
        if token is None:
            self.finish_reason = "eos"
            raise StopIteration
        return token
