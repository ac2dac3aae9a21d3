"""Triton kernels for batch-1 decoding on a GPU.

A decode step is memory-bound (read ~5 GB of weights) and, in plain PyTorch, also launch-bound: about 1,800 small
kernels per token. These kernels cut both:
- the MoE experts as two gathered GEMVs: indexing the stacked expert weights by the router's choice reads exactly
  the chosen experts' rows, once, with no sort, gather copy or host sync (so the step stays in a CUDA graph); the
  shared expert runs through the same kernels as one more "expert";
- RMSNorm (optionally fused with the residual add), RoPE applied in place on the fused QKV output, and the router's
  softmax + top-k + renormalisation, each one kernel instead of five to ten.
Prefill (many tokens) uses grouped GEMMs and plain PyTorch ops instead (ming/llm.py). The CPU path never uses this
file; tests/test_cuda.py pins every kernel to the plain PyTorch ops it replaces.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, expert_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)  # (token, slot) pair: token = pair // TOP_K
    block = tl.program_id(1)
    expert = tl.load(expert_ptr + pair).to(tl.int64)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Accumulate elementwise and reduce once at the end: a reduction per tile would stall the loads.
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    x_row = x_ptr + (pair // TOP_K) * K
    w_offset = expert * N * K + rows[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        m = row_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_gate_ptr + w_offset + cols[None, :], mask=m, other=0.0)
        wu = tl.load(w_up_ptr + w_offset + cols[None, :], mask=m, other=0.0)
        acc_gate += wg.to(tl.float32) * x[None, :]
        acc_up += wu.to(tl.float32) * x[None, :]
    # Round each projection to the weight dtype before the activation, as separate linear layers would.
    gate = tl.sum(acc_gate, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    up = tl.sum(acc_up, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + pair * N + rows, h.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_kernel(
    h_ptr, w_down_ptr, expert_ptr, weight_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr, TOP_K: tl.constexpr, OUT_GROUP: tl.constexpr, OUT_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    block = tl.program_id(1)
    expert = tl.load(expert_ptr + pair).to(tl.int64)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_offset = expert * N * K + rows[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        h = tl.load(h_ptr + pair * K + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_down_ptr + w_offset + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * h[None, :]
    y = tl.sum(acc, axis=1).to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(weight_ptr + pair)
    out_row = (pair // TOP_K) * OUT_GROUP + OUT_OFFSET + pair % TOP_K
    tl.store(out_ptr + out_row * N + rows, y, mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps), picked with bench/profile_decode.py on an H100: wide blocks when there are several
# (token, expert) pairs, narrow ones for a single pair (the shared expert) so that it still fills every SM.
GATE_UP_BLOCKS = (32, 256, 8)
DOWN_BLOCKS = (32, 256, 8)
SINGLE_PAIR_BLOCKS = (8, 256, 2)


def _experts_gemv(x, experts, weights, w_gate, w_up, w_down, out, top_k: int, out_offset: int) -> None:
    """Run the pairs (token, expert) through gate/up -> SiLU-gate -> down, writing router-weighted rows of `out`."""
    pairs, hidden = experts.numel(), x.shape[1]
    inter = w_gate.shape[1]
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    bn, bk, warps = GATE_UP_BLOCKS if pairs > 1 else SINGLE_PAIR_BLOCKS
    _gate_up_kernel[(pairs, triton.cdiv(inter, bn))](
        x, w_gate, w_up, experts, h, K=hidden, N=inter, TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps
    )
    bn, bk, warps = DOWN_BLOCKS if pairs > 1 else SINGLE_PAIR_BLOCKS
    _down_kernel[(pairs, triton.cdiv(hidden, bn))](
        h, w_down, experts, weights, out, K=inter, N=hidden, TOP_K=top_k, OUT_GROUP=out.shape[1],
        OUT_OFFSET=out_offset, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )


@functools.cache
def _shared_expert_routing(tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared expert as "expert 0 of a one-expert stack, weight 1" for every token (made once, not per step)."""
    return (
        torch.zeros(tokens, dtype=torch.long, device=device),
        torch.ones(tokens, dtype=torch.float32, device=device),
    )


def moe_gemv(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H]; topk [T, k]; stacked weights gate/up [E, I, H], down [E, H, I]; optional shared expert weights
    (gate, up [I_s, H], down [H, I_s]) -> [T, H] in x's dtype, plus `residual` [T, H] if given.

    The expert outputs of a token (and the shared expert's) are summed in float32 with the router weights, then
    rounded and added to the residual in the same kernel."""
    T, H = x.shape
    top_k = topk_idx.shape[1]
    x = x.contiguous()
    out = torch.empty(T, top_k + (shared is not None), H, dtype=torch.float32, device=x.device)
    experts = topk_idx.reshape(-1).contiguous()
    _experts_gemv(x, experts, topk_weight.reshape(-1).float().contiguous(), w_gate, w_up, w_down, out, top_k, 0)
    if shared is not None:
        gate, up, down = (w[None] for w in shared)
        expert_zero, weight_one = _shared_expert_routing(T, x.device)
        _experts_gemv(x, expert_zero, weight_one, gate, up, down, out, 1, top_k)
    result = torch.empty_like(x)
    _combine_kernel[(T,)](
        out, residual.reshape(T, H).contiguous() if residual is not None else x, result, SLOTS=out.shape[1], N=H,
        BLOCK=triton.next_power_of_2(H), HAS_RESIDUAL=residual is not None, num_warps=4,
    )
    return result


@triton.jit
def _combine_kernel(parts_ptr, residual_ptr, out_ptr, SLOTS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SLOTS):
        total += tl.load(parts_ptr + (row * SLOTS + s) * N + cols, mask=ok, other=0.0)
    y = total.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + row * N + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * N + cols, y, mask=ok)


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_DELTA: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(delta_ptr + row * N + cols, mask=ok, other=0.0)  # rounded to the activation dtype
        tl.store(sum_ptr + row * N + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """RMSNorm over the last dim (in float32, scaled in x's dtype). With `delta`, first x = x + delta and return
    (x, norm(x)) from one kernel; else return norm(x)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty_like(x2)
    total = torch.empty_like(x2) if delta is not None else out
    d2 = delta.reshape(-1, n).contiguous() if delta is not None else x2
    _rms_norm_kernel[(x2.shape[0],)](
        x2, d2, weight, total, out, eps, N=n, BLOCK=triton.next_power_of_2(n), HAS_DELTA=delta is not None,
        num_warps=8,
    )
    if delta is not None:
        return total.view(shape), out.view(shape)
    return out.view(shape)


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, cache_pos_ptr,
    L: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    token = tl.program_id(0)  # b * L + l
    head = tl.program_id(1)  # queries, then keys, then values of the fused projection
    half = tl.arange(0, D // 2)
    base = qkv_ptr + (token * (Q_HEADS + 2 * KV_HEADS) + head) * D
    x1 = tl.load(base + half)
    x2 = tl.load(base + D // 2 + half)
    if head < Q_HEADS + KV_HEADS:
        cos = tl.load(cos_ptr + token * D + half)
        sin = tl.load(sin_ptr + token * D + half)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        x1 = (x1f * cos - x2f * sin).to(qkv_ptr.dtype.element_ty)
        x2 = (x2f * cos + x1f * sin).to(qkv_ptr.dtype.element_ty)
        tl.store(base + half, x1)
        tl.store(base + D // 2 + half, x2)
    if WRITE_CACHE and head >= Q_HEADS:
        kv_head = (head - Q_HEADS) % KV_HEADS
        pos = tl.load(cache_pos_ptr + token % L)
        row = ((token // L) * KV_HEADS + kv_head) * S + pos
        if head < Q_HEADS + KV_HEADS:
            tl.store(k_cache_ptr + row * D + half, x1)
            tl.store(k_cache_ptr + row * D + D // 2 + half, x2)
        else:
            tl.store(v_cache_ptr + row * D + half, x1)
            tl.store(v_cache_ptr + row * D + D // 2 + half, x2)


def rope_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache_position: torch.Tensor | None = None,
) -> None:
    """In place on the fused projection output qkv [B, L, heads, D] (contiguous): rotate the query and key heads
    (NeoX layout; cos/sin [B, L, D] float32) and, with a cache, also write the keys and values at
    `cache_position` [L] of cache (k, v) [B, kv_heads, S, D]. One kernel for what is otherwise about twenty."""
    B, L, heads, D = qkv.shape
    k_cache, v_cache = cache if cache is not None else (qkv, qkv)
    _rope_kernel[(B * L, heads)](
        qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
        cache_position if cache_position is not None else cos,
        L=L, Q_HEADS=num_heads, KV_HEADS=num_kv_heads, D=D, S=k_cache.shape[2] if cache is not None else 1,
        WRITE_CACHE=cache is not None, num_warps=1,
    )


@triton.jit
def _decode_attention_partial(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, stats_ptr, scale,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    bh = tl.program_id(0)  # b * KV_HEADS + kv head
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    b, kv_head = bh // KV_HEADS, bh % KV_HEADS
    group = Q_HEADS // KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    s = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = tl.load(valid_ptr + b * S + s).to(tl.int1)
    part = (bh * num_chunks + chunk) * GROUP_PAD + g
    if tl.sum(valid.to(tl.int32), axis=0) == 0:  # past the end of the sequence: nothing to read
        tl.store(stats_ptr + part * 2, tl.full([GROUP_PAD], float("-inf"), tl.float32))
        tl.store(stats_ptr + part * 2 + 1, tl.zeros([GROUP_PAD], tl.float32))
        tl.store(acc_ptr + part[:, None] * D + d[None, :], tl.zeros([GROUP_PAD, D], tl.float32))
    else:
        q_rows = b * (Q_HEADS + 2 * KV_HEADS) + kv_head * group + g
        q = tl.load(qkv_ptr + q_rows[:, None] * D + d[None, :], mask=(g < group)[:, None], other=0.0)
        kv_rows = bh * S + s
        k = tl.load(k_ptr + kv_rows[:, None] * D + d[None, :])
        scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, CHUNK], float32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)
        p = tl.exp(scores - m[:, None])
        v = tl.load(v_ptr + kv_rows[:, None] * D + d[None, :])
        acc = tl.dot(p.to(v.dtype), v)
        tl.store(stats_ptr + part * 2, m)
        tl.store(stats_ptr + part * 2 + 1, tl.sum(p, axis=1))
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc)


@triton.jit
def _decode_attention_combine(
    acc_ptr, stats_ptr, out_ptr,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    bh = tl.program_id(0)
    group = Q_HEADS // KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    m_all = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for c in range(NUM_CHUNKS):
        m_all = tl.maximum(m_all, tl.load(stats_ptr + ((bh * NUM_CHUNKS + c) * GROUP_PAD + g) * 2))
    total = tl.zeros([GROUP_PAD], tl.float32)
    out = tl.zeros([GROUP_PAD, D], tl.float32)
    for c in range(NUM_CHUNKS):
        part = (bh * NUM_CHUNKS + c) * GROUP_PAD + g
        m = tl.load(stats_ptr + part * 2)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        total += w * tl.load(stats_ptr + part * 2 + 1)
        out += w[:, None] * tl.load(acc_ptr + part[:, None] * D + d[None, :])
    out = out / total[:, None]
    b, kv_head = bh // KV_HEADS, bh % KV_HEADS
    rows = b * Q_HEADS + kv_head * group + g
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=(g < group)[:, None])


def decode_attention(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_valid: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """One new token per row over the whole cache (split over chunks of keys, then combined: flash decoding).

    qkv [B, 1, heads, D] holds the rotated queries; caches [B, kv_heads, S, D]; key_valid [B, S] bool.
    Returns [B, num_heads, D]. Chunks past the sequence's end are skipped, so a large cache bucket costs nothing."""
    B, _, heads, D = qkv.shape
    kv_heads, S = k_cache.shape[1], k_cache.shape[2]
    chunk = min(256, S)
    if S % chunk or chunk & (chunk - 1):
        raise ValueError(f"decode_attention needs a power-of-two cache length (or a multiple of 256), got {S}")
    num_chunks = S // chunk
    group_pad = max(16, triton.next_power_of_2(num_heads // kv_heads))
    acc = torch.empty(B * kv_heads * num_chunks * group_pad, D, dtype=torch.float32, device=qkv.device)
    stats = torch.empty(B * kv_heads * num_chunks * group_pad, 2, dtype=torch.float32, device=qkv.device)
    _decode_attention_partial[(B * kv_heads, num_chunks)](
        qkv, k_cache, v_cache, key_valid, acc, stats, D**-0.5,
        Q_HEADS=num_heads, KV_HEADS=kv_heads, GROUP_PAD=group_pad, D=D, S=S, CHUNK=chunk, num_warps=4,
    )
    out = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    _decode_attention_combine[(B * kv_heads,)](
        acc, stats, out, Q_HEADS=num_heads, KV_HEADS=kv_heads, GROUP_PAD=group_pad, D=D, NUM_CHUNKS=num_chunks,
        num_warps=4,
    )
    return out


@triton.jit
def _route_kernel(logits_ptr, idx_ptr, weight_ptr, E: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, E)
    logits = tl.load(logits_ptr + row * E + cols).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    remaining = probs
    total = 0.0
    for j in tl.static_range(K):
        best = tl.argmax(remaining, axis=0)
        p = tl.max(remaining, axis=0)
        tl.store(idx_ptr + row * K + j, best.to(tl.int64))
        tl.store(weight_ptr + row * K + j, p)
        total += p
        remaining = tl.where(cols == best, -1.0, remaining)
    if RENORM:
        for j in tl.static_range(K):
            w = tl.load(weight_ptr + row * K + j)
            tl.store(weight_ptr + row * K + j, w / total)


def route_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] float32): float32 softmax, top-k,
    optionally renormalised to sum to one."""
    T, E = logits.shape
    idx = torch.empty(T, k, dtype=torch.long, device=logits.device)
    weight = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    _route_kernel[(T,)](logits.contiguous(), idx, weight, E=E, K=k, RENORM=renormalize, num_warps=1)
    return idx, weight
