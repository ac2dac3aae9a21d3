"""Triton kernels for batch-1 decoding on a GPU: the MoE experts as two gathered GEMVs.

At decode time each token uses 6 of 64 experts. A GEMV that indexes the stacked expert weights by the router's
choice reads exactly those 6 experts' rows, once, and never leaves the GPU: no sorting, no gather copy, no host
sync, so the step stays capturable in a CUDA graph. Prefill (many tokens) uses grouped GEMMs instead (ming/llm.py).
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
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + (pair // TOP_K) * K
    w_offset = expert * N * K + rows[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        m = row_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_gate_ptr + w_offset + cols[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(w_up_ptr + w_offset + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc_gate += tl.sum(wg * x[None, :], axis=1)
        acc_up += tl.sum(wu * x[None, :], axis=1)
    # Round each projection to the weight dtype before the activation, as separate linear layers would.
    gate = acc_gate.to(out_ptr.dtype.element_ty).to(tl.float32)
    up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + pair * N + rows, h.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_kernel(
    h_ptr, w_down_ptr, expert_ptr, weight_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    block = tl.program_id(1)
    expert = tl.load(expert_ptr + pair).to(tl.int64)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_offset = expert * N * K + rows[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        h = tl.load(h_ptr + pair * K + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_down_ptr + w_offset + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(weight_ptr + pair)
    tl.store(out_ptr + pair * N + rows, y, mask=row_ok)


def moe_gemv(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x [T, H]; topk [T, k]; stacked weights gate/up [E, I, H], down [E, H, I] -> [T, H] in x's dtype.

    The k expert outputs of a token are summed in float32 with the router weights (as the release does)."""
    T, H = x.shape
    top_k = topk_idx.shape[1]
    I = w_gate.shape[1]
    experts = topk_idx.reshape(-1).contiguous()
    h = torch.empty(T * top_k, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(T * top_k, triton.cdiv(I, 32))](
        x.contiguous(), w_gate, w_up, experts, h, K=H, N=I, TOP_K=top_k, BLOCK_N=32, BLOCK_K=256, num_warps=4
    )
    out = torch.empty(T * top_k, H, dtype=torch.float32, device=x.device)
    _down_kernel[(T * top_k, triton.cdiv(H, 32))](
        h, w_down, experts, topk_weight.reshape(-1).float().contiguous(), out,
        K=I, N=H, BLOCK_N=32, BLOCK_K=256, num_warps=4,
    )
    return out.view(T, top_k, H).sum(dim=1).to(x.dtype)
