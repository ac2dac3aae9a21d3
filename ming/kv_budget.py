"""Prefill a long input into a KV cache of fixed size: chunks in, evictions per layer and KV head, kept keys moved
to contiguous positions. What comes out is a `ming.generation.CachePrefix` that later turns (follow-up questions)
start from, so they prefill only their own tokens.

Why this shape (see the long-video notes in the project's reference folder):
  * The Preview's LLM uses plain 1-D RoPE trained to 32,768 positions, so an hour of video (230k visual tokens)
    cannot keep its own positions. Kept keys are re-rotated to contiguous positions after every eviction, the
    cache slot of a token is always its position, and no position ever passes the cache's capacity.
    (AdaReTaKe's `pos_embed_reforge` and StreamingVLM's contiguous RoPE do the same.)
  * Selection is query-agnostic, so one compressed cache serves every question about the video. The score is
    InfiniPot-V's pair of ideas (arXiv 2506.15745): temporal redundancy of keys (a key much like the key of the
    same image cell in the frame pair before it adds little) and value norms (large values move the output more).
  * Each KV head keeps the same number of tokens (its own choice of them), so the cache stays one dense
    [B, kv_heads, S, head_dim] tensor per layer and the ordinary attention kernels read it.

Built on the LLM's prefill of a chunk at a cache offset: with a cache, `slots = arange(start, start + L)` and a
boolean mask [B, 1, L, S] over all S slots (`ming.layers.cache_mask`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .generation import CachePrefix
from .layers import KVCache, apply_rope, cache_mask, rope_cos_sin
from .llm import BailingMoeForCausalLM

MAX_POSITIONS = 32768  # the Preview's trained context (max_position_embeddings)


# ------------------------------------------------------------------------------------------------- RoPE moves

def rerotate_keys(keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, theta: float) -> torch.Tensor:
    """Keys rotated at positions `old` -> the same keys rotated at positions `new`.

    keys [..., N, D] (any dtype; computed in float32, returned in the keys' dtype); old, new [..., N] broadcastable
    against keys' leading dims. The rotation by new - old is built from the same float32 cos/sin tables the forward
    pass used (undo table(old), apply table(new)), so the result equals a key rotated at `new` from the start to
    float32 rounding (about 1e-7), even at positions where an angle of (new - old) alone would be rounded
    differently from the angles the forward pass computed."""
    head_dim = keys.shape[-1]
    cos_old, sin_old = rope_cos_sin(old, head_dim, theta)
    cos_new, sin_new = rope_cos_sin(new, head_dim, theta)
    # R(new) R(old)^T from the angle-difference identities, per frequency.
    cos = cos_new * cos_old + sin_new * sin_old
    sin = sin_new * cos_old - cos_new * sin_old
    lead = keys.shape[:-2]
    flat = keys.float().reshape(-1, 1, *keys.shape[-2:])  # apply_rope wants [B, heads, N, D] and cos [B, N, D]
    cos = cos.expand(*lead, *cos.shape[-2:]).reshape(-1, *cos.shape[-2:])
    sin = sin.expand(*lead, *sin.shape[-2:]).reshape(-1, *sin.shape[-2:])
    return apply_rope(flat, cos, sin).reshape(keys.shape).to(keys.dtype)


# ------------------------------------------------------------------------------------------------- eviction

@dataclass
class TokenSources:
    """Where each cached token came from, per layer and KV head (heads keep different tokens): its frame pair and
    its cell in the frame (the 28x28 block the LLM token covers), -1 for text. [layers, kv_heads, S] int64."""

    pair: torch.Tensor
    cell: torch.Tensor


def redundancy_value_scores(
    keys: torch.Tensor, values: torch.Tensor, pair: torch.Tensor, cell: torch.Tensor, positions: torch.Tensor,
    theta: float,
) -> torch.Tensor:
    """Query-agnostic importance of cached visual tokens, one layer: [kv_heads, N] float32, higher = keep.

    keys/values [kv_heads, N, D] (keys rotated at `positions` [N]); pair/cell [kv_heads, N] (see TokenSources),
    slots in time order per head. score = novelty x |v|, where novelty = (1 - cos(k, k_prev)) / 2 against the
    un-rotated key of the latest earlier token of the same cell still in this head, and 1 where there is none
    (InfiniPot-V's temporal redundancy and value norm, combined as a product so that a token the frame before
    already showed scores near zero whatever its norm)."""
    heads, n, head_dim = keys.shape
    zero = torch.zeros_like(positions)
    plain = rerotate_keys(keys, positions, zero, theta).float()  # every key at position 0: comparable directly
    # Sort each head's slots by cell; a stable sort keeps time order within a cell, so a token's predecessor in
    # the same cell is the element before it.
    order = torch.sort(cell, dim=-1, stable=True).indices
    sorted_cell = cell.gather(-1, order)
    sorted_keys = plain.gather(1, order[..., None].expand(-1, -1, head_dim))
    same = torch.zeros_like(sorted_cell, dtype=torch.bool)
    same[:, 1:] = sorted_cell[:, 1:] == sorted_cell[:, :-1]
    previous = torch.roll(sorted_keys, 1, dims=1)
    similarity = F.cosine_similarity(sorted_keys, previous, dim=-1)
    novelty_sorted = torch.where(same, (1 - similarity) / 2, torch.ones_like(similarity))
    novelty = torch.empty_like(novelty_sorted).scatter_(-1, order, novelty_sorted)
    return novelty * values.float().norm(dim=-1)


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [..., keep] of the `keep` highest scores along the last axis, ascending (time order kept). Ties go
    to the earlier slot (a stable sort), so the choice is deterministic."""
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    return ranked.sort(dim=-1).values


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., kv_heads, N, D], index [kv_heads, K] -> [..., kv_heads, K, D]: each KV head keeps its own slots (the
    same ones for every batch row)."""
    index = index[..., None].expand(*x.shape[:-3], *index.shape, x.shape[-1])
    return x.gather(-2, index)


# ------------------------------------------------------------------------------------------------- prefill

class BudgetedPrefill:
    """Prefill chunk by chunk into a static cache of `capacity` slots, keeping at most `budget` evictable (visual)
    tokens: before a visual chunk is written, older visual tokens are evicted per layer and KV head until it fits,
    and the kept keys are re-rotated to close the gaps. Text chunks and the chunk being written are never evicted.

    Evictable chunks must be contiguous (text may come before and after them, not between). `budget=None` never
    evicts: then the result equals one-shot prefill of the same tokens (chunking does not change the math).
    Memory is fixed at `capacity` slots; `capacity` must fit everything kept plus the tokens appended after the
    visual span, and stays <= MAX_POSITIONS so no position leaves the trained range."""

    def __init__(
        self,
        llm: BailingMoeForCausalLM,
        capacity: int,
        budget: int | None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batch: int = 1,
        max_positions: int = MAX_POSITIONS,
    ):
        if capacity > max_positions:
            raise ValueError(f"a cache of {capacity} slots would use positions past the trained {max_positions}")
        config = llm.config
        weight = llm.lm_head.weight
        self.llm, self.capacity, self.budget, self.theta = llm, capacity, budget, config.rope_theta
        self.dtype, self.device = dtype or weight.dtype, torch.device(device or weight.device)
        self.cache: KVCache = llm.new_cache(batch, capacity, self.dtype, self.device)
        sources_shape = (config.num_hidden_layers, config.num_key_value_heads, capacity)
        self.sources = TokenSources(torch.full(sources_shape, -1, dtype=torch.long, device=self.device),
                                    torch.full(sources_shape, -1, dtype=torch.long, device=self.device))
        self.filled = 0
        self.visual_start: int | None = None  # first slot of the evictable span
        self.visual_closed = False  # text came after the evictable span: it can no longer grow or shrink
        self.evicted = 0
        self.evict_seconds = 0.0  # wall time spent evicting (synchronised on CUDA)
        self.peak = 0  # most slots ever filled

    @property
    def visual_count(self) -> int:
        return 0 if self.visual_start is None else self.filled - self.visual_start

    @torch.no_grad()
    def append(
        self,
        embeds: torch.Tensor,
        router_ids: torch.Tensor | None = None,
        sources: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Prefill `embeds` [B, L, H] at the next slots; returns their final-norm hidden states [B, L, H].

        `sources` (pair ids [L], cell ids [L]) marks the chunk as visual, hence evictable later; without it the
        chunk is text and stays. `router_ids` [B, L] defaults to the text router."""
        batch, length, _ = embeds.shape
        if sources is not None:
            if self.visual_closed:
                raise ValueError("visual chunks must be contiguous: text was already appended after them")
            if self.visual_start is None:
                self.visual_start = self.filled
            if self.budget is not None:
                if length > self.budget:
                    raise ValueError(f"a chunk of {length} visual tokens does not fit the budget of {self.budget}")
                if self.visual_count + length > self.budget:
                    self.evict_(self.budget - length)
        elif self.visual_start is not None:
            self.visual_closed = True
        start = self.filled
        if start + length > self.capacity:
            raise ValueError(f"{start + length} tokens do not fit the cache of {self.capacity} slots")
        slots = torch.arange(start, start + length, device=self.device)
        if sources is not None:
            self.sources.pair[..., start : start + length] = sources[0].to(self.device)
            self.sources.cell[..., start : start + length] = sources[1].to(self.device)
        self.cache.valid[:, start : start + length] = True
        hidden = self.llm.model(
            embeds.to(self.device, self.dtype), slots[None].expand(batch, -1), cache_mask(self.cache.valid, slots),
            None if router_ids is None else router_ids.to(self.device), self.cache, slots,
        )
        self.filled += length
        self.peak = max(self.peak, self.filled)
        return hidden

    @torch.no_grad()
    def evict_(self, keep: int) -> None:
        """Keep `keep` of the visual tokens in every layer and KV head, chosen by `redundancy_value_scores`, and
        move them (re-rotated) to the slots right after the visual span's start."""
        start, end = self.visual_start, self.filled
        count = end - start
        if keep >= count:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        positions = torch.arange(start, end, device=self.device)
        new = torch.arange(start, start + keep, device=self.device)
        region = slice(start, end)
        # Layer by layer: the float32 work of scoring and re-rotating stays at one layer's size.
        for i, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
            pair, cell = self.sources.pair[i, :, region], self.sources.cell[i, :, region]
            scores = redundancy_value_scores(k[0, :, region], v[0, :, region], pair, cell, positions, self.theta)
            kept = select_kept(scores, keep)  # [kv_heads, keep]
            keys = rerotate_keys(gather_slots(k[:, :, region], kept), start + kept, new, self.theta)
            v[:, :, start : start + keep] = gather_slots(v[:, :, region], kept)
            k[:, :, start : start + keep] = keys
            self.sources.pair[i, :, start : start + keep] = pair.gather(-1, kept)
            self.sources.cell[i, :, start : start + keep] = cell.gather(-1, kept)
        # Slots past the new end keep stale data, marked invalid, so no mask lets a query see them.
        self.cache.valid[:, start + keep :] = False
        self.filled = start + keep
        self.evicted += count - keep
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.evict_seconds += time.perf_counter() - began

    def prefix(self) -> CachePrefix:
        """The filled slots as a `CachePrefix` for generation (views of this cache: do not append afterwards)."""
        n = self.filled
        return CachePrefix([k[:, :, :n] for k in self.cache.keys], [v[:, :, :n] for v in self.cache.values], n)

    @property
    def visual_kept(self) -> int:
        """Visual tokens in the cache now (every layer and head holds the same number)."""
        return int((self.sources.pair[0, 0, : self.filled] >= 0).sum())
