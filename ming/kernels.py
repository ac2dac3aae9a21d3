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


GATE_UP_BLOCKS = (32, 256, 4)  # BLOCK_N, BLOCK_K, num_warps: picked with bench/profile_decode.py on an H100
DOWN_BLOCKS = (32, 256, 4)


def _experts_gemv(x, experts, weights, w_gate, w_up, w_down, out, top_k: int, out_offset: int) -> None:
    """Run the pairs (token, expert) through gate/up -> SiLU-gate -> down, writing router-weighted rows of `out`."""
    pairs, hidden = experts.numel(), x.shape[1]
    inter = w_gate.shape[1]
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    bn, bk, warps = GATE_UP_BLOCKS
    _gate_up_kernel[(pairs, triton.cdiv(inter, bn))](
        x, w_gate, w_up, experts, h, K=hidden, N=inter, TOP_K=top_k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps
    )
    bn, bk, warps = DOWN_BLOCKS
    _down_kernel[(pairs, triton.cdiv(hidden, bn))](
        h, w_down, experts, weights, out, K=inter, N=hidden, TOP_K=top_k, OUT_GROUP=out.shape[1],
        OUT_OFFSET=out_offset, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )


def moe_gemv(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [T, H]; topk [T, k]; stacked weights gate/up [E, I, H], down [E, H, I]; optional shared expert weights
    (gate, up [I_s, H], down [H, I_s]) -> [T, H] in x's dtype.

    The expert outputs of a token (and the shared expert's) are summed in float32 with the router weights."""
    T, H = x.shape
    top_k = topk_idx.shape[1]
    x = x.contiguous()
    out = torch.empty(T, top_k + (shared is not None), H, dtype=torch.float32, device=x.device)
    experts = topk_idx.reshape(-1).contiguous()
    _experts_gemv(x, experts, topk_weight.reshape(-1).float().contiguous(), w_gate, w_up, w_down, out, top_k, 0)
    if shared is not None:
        gate, up, down = (w[None] for w in shared)
        zeros = torch.zeros(T, dtype=torch.long, device=x.device)
        ones = torch.ones(T, dtype=torch.float32, device=x.device)
        _experts_gemv(x, zeros, ones, gate, up, down, out, 1, top_k)
    return out.sum(dim=1).to(x.dtype)


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
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, HEADS: tl.constexpr, ROTATED: tl.constexpr, D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)  # one of the first ROTATED heads (queries, then keys)
    half = tl.arange(0, D // 2)
    base = qkv_ptr + (token * HEADS + head) * D
    x1 = tl.load(base + half).to(tl.float32)
    x2 = tl.load(base + D // 2 + half).to(tl.float32)
    cos = tl.load(cos_ptr + token * D + half)
    sin = tl.load(sin_ptr + token * D + half)
    tl.store(base + half, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty))
    tl.store(base + D // 2 + half, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty))


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int) -> None:
    """In place on the fused projection output qkv [B, L, heads, D] (contiguous): rotate the first
    `rotated_heads` heads (queries and keys; values stay). cos/sin: [B, L, D] float32, NeoX layout."""
    B, L, heads, D = qkv.shape
    _rope_kernel[(B * L, rotated_heads)](
        qkv, cos.contiguous(), sin.contiguous(), HEADS=heads, ROTATED=rotated_heads, D=D, num_warps=1
    )


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
