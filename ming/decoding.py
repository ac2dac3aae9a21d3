"""Autoregressive decoding over a static KV cache, optionally replayed as a CUDA graph.

A generation = one prefill of the prompt (media merged in) into the cache, then one decode step per new token that
reads the cache and never recomputes the prompt. On a GPU the decode step is captured once per (batch, cache
bucket) in a CUDA graph: a step then costs one graph launch instead of hundreds of kernel launches from Python,
which is what bounds batch-1 decoding otherwise. (ZeroGPU forbids torch.compile at run time; CUDA graphs are fine.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .generation import NgramGuard, SamplingConfig, select_next_token
from .llm import BailingMoeForCausalLM, decode_mask, prefill_mask, use_triton

if TYPE_CHECKING:
    from .modeling import MingOmni

MIN_BUCKET = 1024


def graphs_allowed(device: torch.device) -> bool:
    """CUDA graphs on this device, unless MING_CUDA_GRAPHS=0 (for the thinker, the talker and the flow decoder)."""
    return device.type == "cuda" and os.environ.get("MING_CUDA_GRAPHS", "1") != "0"


def cache_bucket(slots: int) -> int:
    """The power-of-two cache size, at least MIN_BUCKET, that holds `slots`: the GPU kernels read caches in
    power-of-two chunks, and a few sizes let captured graphs be reused across requests."""
    return max(MIN_BUCKET, 1 << (slots - 1).bit_length())


def cuda_graphs_enabled(model: "MingOmni") -> bool:
    """Graphs need a decode step without host syncs: the bf16 GPU path (Triton kernels / grouped GEMM)."""
    return fast_gpu_path(model) and graphs_allowed(model.device)


def fast_gpu_path(model: "MingOmni") -> bool:
    return use_triton(torch.empty(0, device=model.device, dtype=model.dtype))


class DecodeStep:
    """Feeds one token per row at cache slot `index` and returns the next-token logits [B, V] (float32).

    Owns the static cache and the input buffers, so the same step can be replayed from a CUDA graph."""

    def __init__(self, llm: BailingMoeForCausalLM, batch: int, cache_len: int, dtype, device, use_graph: bool):
        self.llm = llm
        self.caches = llm.new_caches(batch, cache_len, dtype, device)
        self.key_valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if use_graph:
            self._capture()

    def _step(self) -> torch.Tensor:
        self.key_valid.index_fill_(1, self.index, True)
        embeds = self.llm.model.word_embeddings(self.token[:, None])
        hidden = self.llm.model(
            embeds, self.position[:, None], decode_mask(self.key_valid), None, self.caches, self.index,
            final_norm=False,
        )
        return self.llm.logits(hidden[:, -1], norm=self.llm.model.norm)

    def _capture(self) -> None:
        self.llm.normalize_head_()  # mutates the weight: never inside a capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lets kernels pick their algorithms and allocate workspaces
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # Capture on the warm-up stream: buffers the kernels keep per stream (ming.kernels._tickets) already exist.
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = self._step()

    def reset(self) -> None:
        self.key_valid.zero_()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, index: int) -> torch.Tensor:
        self.token.copy_(tokens)
        self.position.copy_(positions)
        self.index.fill_(index)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def decode_step_for(model: "MingOmni", batch: int, needed: int) -> DecodeStep:
    """A DecodeStep whose cache holds `needed` slots. On CUDA, steps are kept per (batch, power-of-two bucket) and
    reused across requests; elsewhere each generation gets a cache of exactly the size it needs."""
    llm, device = model.model, model.device
    limit = model.config.llm_config.max_position_embeddings
    if needed > limit:
        raise ValueError(f"prompt + max_new_tokens = {needed} exceeds the model's context of {limit} tokens")
    if not fast_gpu_path(model):
        return DecodeStep(llm, batch, needed, model.dtype, device, use_graph=False)
    bucket = min(cache_bucket(needed), limit)
    if not cuda_graphs_enabled(model):
        return DecodeStep(llm, batch, bucket, model.dtype, device, use_graph=False)
    steps: dict = model.__dict__.setdefault("_decode_steps", {})
    key = (batch, bucket)
    if key not in steps:
        steps[key] = DecodeStep(llm, batch, bucket, model.dtype, device, use_graph=True)
    step = steps[key]
    step.reset()
    return step


class Decoder:
    """One generation over a batch: prefill, then `step()` per token. Rows keep their prompt's cache slots (left
    padding stays masked) and all rows decode at the same slot."""

    def __init__(self, model: "MingOmni", input_ids, attention_mask, media: dict, cfg: SamplingConfig):
        self.model, self.cfg = model, cfg
        llm, device = model.model, model.device
        self.eos = model.config.llm_config.eos_token_id
        B, L = input_ids.shape
        self.step_fn = decode_step_for(model, B, L + cfg.max_new_tokens)
        valid = key_valid_of(attention_mask, input_ids, device)
        self.step_fn.key_valid[:, :L] = valid
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None

        embeds, router_ids = model.embed(input_ids, **media)
        hidden = llm.model(
            embeds, positions, prefill_mask(valid), router_ids, self.step_fn.caches, torch.arange(L, device=device)
        )
        # What the talker is conditioned on: the merged input embeddings plus the prompt's last hidden states.
        self.prompt_states = embeds + hidden
        self.logits = llm.logits(hidden[:, -1])
        self.next_position = positions[:, -1] + 1
        self.cache_index = L
        self.guards = None
        if cfg.no_repeat_ngram_size > 0:
            self.guards = [NgramGuard(cfg.no_repeat_ngram_size, row.tolist()) for row in input_ids]
        self.finished = [False] * B
        self.generated = 0

    @property
    def done(self) -> bool:
        return all(self.finished) or self.generated >= self.cfg.max_new_tokens

    def step(self) -> list[int | None]:
        """Choose the next token of every unfinished row (None for finished rows) and feed it to the model."""
        tokens = select_next_token(self.logits, self.cfg, self.guards, self.generator)
        out: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if self.finished[row] or token == self.eos:
                self.finished[row] = True
                tokens[row] = self.eos
                out.append(None)
                continue
            if self.guards is not None:
                self.guards[row].append(token)
            out.append(token)
        self.generated += 1
        if not self.done:
            self.logits = self.step_fn(tokens, self.next_position, self.cache_index)
            self.next_position = self.next_position + 1
            self.cache_index += 1
        return out


def key_valid_of(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=device)
    return attention_mask.to(device).bool()


class TokenStream:
    """Iterator over the new token ids of one prompt. Prefill runs in the constructor, so `talker_condition` is
    ready before the first token is read. Stops at <|endoftext|>, max_new_tokens or `stop_event`."""

    def __init__(self, model: "MingOmni", input_ids, attention_mask, media, cfg: SamplingConfig, stop_event):
        self.decoder = Decoder(model, input_ids, attention_mask, media, cfg)
        self.stop_event: threading.Event | None = stop_event
        self.talker_condition: torch.Tensor = self.decoder.prompt_states
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
