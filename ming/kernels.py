"""Triton kernels for decoding on a GPU (1 to 64 rows a step).

A decode step is memory-bound (read ~5 GB of weights at one row, up to all ~33 GB at tens of rows) and, in plain
PyTorch, also launch-bound: about 1,800 small kernels per token. These kernels read each weight once per step:
- QKV projection with the input RMSNorm inside it (a GEMV: faster than cuBLAS at one token), flash-decoding
  attention (partial + combine) that applies RoPE, writes the new key and value to the cache and reads each row
  only up to its own length, the output projection (prompts: `rope_` rotates in place and writes the cache);
- the residual add + post-attention norm + router gate + softmax/top-k in one kernel (at one row the shared
  expert's SwiGLU too, so that its weights stream while the routing is worked out);
- the MoE with its (row, expert) pairs sorted by expert in blocks: each chosen expert's weights are read once for
  all the rows that chose it, on tensor cores, the shared expert alongside as more blocks, the weighted sum and the
  residual add in a last small kernel; no host sync, so the step stays in a CUDA graph. One row takes two GEMV
  launches instead (no sort; the down projection sums the experts itself).
The GEMV kernels serve up to `ming.layers.FEW_TOKENS` rows (cuBLAS above that); the MoE and attention kernels serve
every decode batch. On Hopper and newer they launch with programmatic dependent launch: each starts while the one
before it finishes, requests the weights it streams first, then waits for that kernel's outputs (`_wait_for_inputs`).
Where one kernel needs all its programs' results (the routing), the last program to finish does the reduction, found
with an atomic ticket, instead of a separate launch.
Prefill (many tokens) uses grouped GEMMs and plain PyTorch ops instead (ming/llm.py). The CPU path never uses this
file; tests/test_cuda.py pins every kernel to the plain PyTorch ops it replaces.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # Triton 3.3+; with an older one the kernels simply launch one after another (`pdl` is False)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# ------------------------------------------------------------------------------ programmatic dependent launch
# A batch-1 step is ~250 kernels of a few microseconds each; between two of them the GPU would otherwise idle while
# the next one launches and its first loads cross the memory system. With programmatic dependent launch (Hopper and
# newer) the next kernel starts while the current one finishes: it requests the weights it streams (never written
# during a step) and then waits in `_wait_for_inputs` for the earlier kernel's outputs.
def pdl(device: torch.device) -> bool:
    """Whether this file's kernels launch with programmatic dependent launch on `device`: sm90+, unless MING_PDL=0."""
    return device.type == "cuda" and HAS_PDL and os.environ.get("MING_PDL", "1") != "0" and _capability(device) >= 9


def _pdl_args(device: torch.device) -> dict:
    """A launch's PDL switch: the kernel's constexpr and Triton's launch option."""
    on = pdl(device)
    return {"PDL": on, "launch_pdl": on}


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """Wait until the kernel launched before this one has finished and its writes are visible, then let the next
    kernel launch. Every kernel here calls it in every program before it reads what an earlier kernel wrote and
    before it writes anything, so the launch order is still the order of effects. (A program with nothing to do may
    leave before it, reading only what was written before the step and writing nothing.) And because the next
    kernel launches only once all of this kernel's programs have waited or left, and at least one has waited, the
    kernel two launches back has finished by the time the next one starts: that one may read its outputs before
    its own wait (the one-row MoE reads the routing)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _softmax_top_k(logits, cols, idx_row, weight_row, K: tl.constexpr, K_P2: tl.constexpr, RENORM: tl.constexpr):
    """Float32 softmax over one token's gate logits (a tensor over `cols`), then its top-k stored in descending
    order: expert ids (int64) and weights, renormalised to sum to one when RENORM. One reduction per pick (value and
    index together, ties to the lower index): the routing is a serial chain at the end of a layer's attention."""
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    picks = tl.arange(0, K_P2)
    chosen = tl.zeros([K_P2], dtype=tl.int64)
    weights = tl.zeros([K_P2], dtype=tl.float32)
    total = 0.0
    remaining = probs
    for j in tl.static_range(K):
        best_prob, best = tl.max(remaining, axis=0, return_indices=True, return_indices_tie_break_left=True)
        total += best_prob
        chosen = tl.where(picks == j, best.to(tl.int64), chosen)
        weights = tl.where(picks == j, best_prob, weights)
        remaining = tl.where(cols == best, -1.0, remaining)
    scale = 1.0 / total if RENORM else 1.0
    tl.store(idx_row + picks, chosen, mask=picks < K)
    tl.store(weight_row + picks, weights * scale, mask=picks < K)


@triton.jit
def _weight_tiles(gate_ptr, up_ptr, rows, k0, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of `rows` of an [N, K] gate and up weight pair (zero outside)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    offsets = rows[:, None] * K + cols[None, :]
    m = (rows < N)[:, None] & (cols < K)[None, :]
    return tl.load(gate_ptr + offsets, mask=m, other=0.0), tl.load(up_ptr + offsets, mask=m, other=0.0)


@triton.jit
def _swiglu_rows(x_row, delta_row, norm_weight_ptr, rstd, gate_ptr, up_ptr, first_gate, first_up, rows,
                 K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DELTA: tl.constexpr, NORM: tl.constexpr,
                 dtype: tl.constexpr):
    """silu(gate @ x) * (up @ x) for `rows` of [N, K] gate/up weights, each projection rounded to `dtype` first (as
    separate linear layers would). The first tiles (`_weight_tiles` at column 0) come loaded, so that a kernel can
    request them before it waits for x; x is read as `_gemv_input` reads it."""
    x = _gemv_input(x_row, delta_row, norm_weight_ptr, rstd, tl.arange(0, BLOCK_K), K, HAS_DELTA, NORM, dtype)
    # Accumulate elementwise and reduce once at the end: a reduction per tile would stall the loads.
    acc_gate = first_gate.to(tl.float32) * x[None, :]
    acc_up = first_up.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        gate, up = _weight_tiles(gate_ptr, up_ptr, rows, k0, K, N, BLOCK_K)
        x = _gemv_input(x_row, delta_row, norm_weight_ptr, rstd, k0 + tl.arange(0, BLOCK_K), K, HAS_DELTA, NORM,
                        dtype)
        acc_gate += gate.to(tl.float32) * x[None, :]
        acc_up += up.to(tl.float32) * x[None, :]
    return _swiglu(tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1), dtype)


@triton.jit
def _swiglu(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in float32 of two float32 projections, each rounded to `dtype` first (as the separate linear
    layers of the release would round them)."""
    gate = gate.to(dtype).to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up.to(dtype).to(tl.float32)


@triton.jit
def _swiglu_gate_up_kernel(x_ptr, w_gate_ptr, w_up_ptr, h_ptr, H: tl.constexpr, I: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first_gate, first_up = _weight_tiles(w_gate_ptr, w_up_ptr, rows, 0, H, I, BLOCK_K)
    _wait_for_inputs(PDL)  # the first weight tiles are on their way meanwhile
    dtype = h_ptr.dtype.element_ty
    h = _swiglu_rows(x_ptr + token * H, x_ptr, x_ptr, 1.0, w_gate_ptr, w_up_ptr, first_gate, first_up, rows, H, I,
                     BLOCK_K, False, False, dtype)
    tl.store(h_ptr + token * I + rows, h.to(dtype), mask=rows < I)


@functools.cache
def _ticket_buffer(device: torch.device, stream: int) -> torch.Tensor:
    return torch.zeros(4096, dtype=torch.int32, device=device)


def _tickets(x: torch.Tensor) -> torch.Tensor:
    """Zeroed counters for the last-program reductions (add_norm_route's routing, argmax_rows); each launch leaves
    them zero again. One set per CUDA stream, so that launches on different streams never share one."""
    return _ticket_buffer(x.device, torch.cuda.current_stream(x.device).stream_id if x.is_cuda else 0)


@dataclass(frozen=True)
class KernelTuning:
    """Block shapes of the decode kernels: (BLOCK_N, BLOCK_K, num_warps) per GEMV family and keys per program of
    the attention. Picked with bench/profile_decode.py and bench/moe.py (on an H100, the GEMVs again on an H200 with
    programmatic dependent launch); a layer holds one and passes it to each call."""

    # qkv, dense and the head; H200 batch-1 decode (PDL on): 531 tok/s against 517 with (4, 512, 4)
    gemv_blocks: tuple[int, int, int] = (4, 1024, 4)
    gate_up_blocks: tuple[int, int, int] = (16, 128, 2)  # a dense MLP's gate/up (the talker's)
    decode_attention_chunk: int = 64
    sorted_moe_blocks: tuple[int, int, int, int, int] = (16, 64, 128, 4, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    # (BLOCK_N, BLOCK_K, warps) of moe_one_row's gate/up and down kernels. Down from `bench/moe.py --batches 1
    # --tune` on an H200: 42.0 us for one row's ~138 MB of experts (the first guess, (4, 128, 4), took 56 us);
    # 2,048 / 8 = 256 programs, each over all 8 slots at once. Gate/up (6 chosen experts x 1,408 / 4 = 2,112
    # programs; the shared expert's rows go to add_norm_route) from same-process batch-1 decode on an H200, with
    # the shared expert in add_norm_route: 572-574 tok/s against 557 with (16, 128, 2) and the shared expert here.
    one_row_moe_blocks: tuple[tuple[int, int, int], tuple[int, int, int]] = ((4, 512, 2), (8, 128, 4))
    # (BLOCK_N, BLOCK_K, warps) of the shared expert's SwiGLU inside add_norm_route at one row: 2,816 / 2 = 1,408
    # programs. Many small programs keep enough loads in flight: (16, 128, 2), 176 programs, lost 40 tok/s.
    route_shared_blocks: tuple[int, int, int] = (2, 1024, 4)


DEFAULT_TUNING = KernelTuning()


# ------------------------------------------------------------------------------------- MoE for a decode batch
# In a decode batch most experts are chosen by a few rows each: per-row GEMVs would read an expert once per row, a
# grouped GEMM of the prompt path is built for hundreds of rows. Here the (row, expert) pairs are sorted by expert
# into blocks of BLOCK_M (the idea of vLLM's fused MoE kernel); each block multiplies its rows by its expert's
# weights on tensor cores, so every chosen expert is read once per step. The shared expert joins as more blocks,
# cut into pieces of the experts' width. Four launches, no host sync: the step stays in a CUDA graph.
# One row (the batch-1 step) needs no sort: `moe_one_row` reads the expert ids straight from the routing, in two
# GEMV launches whose second one also sums the experts.
UNUSED_BLOCK = tl.constexpr(1 << 30)


@triton.jit
def _sort_pairs_by_expert_kernel(
    idx_ptr, sorted_ptr, block_expert_ptr,
    PAIRS: tl.constexpr, PAIRS_P2: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCKS_P2: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    pair = tl.arange(0, PAIRS_P2)
    expert = tl.load(idx_ptr + pair, mask=pair < PAIRS, other=E_P2).to(tl.int32)  # padding matches no expert
    one_hot = (expert[:, None] == tl.arange(0, E_P2)[None, :]).to(tl.int32)  # [pairs, experts]
    blocks = (tl.sum(one_hot, axis=0) + BLOCK_M - 1) // BLOCK_M  # per expert
    block_end = tl.cumsum(blocks, axis=0)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # among the pairs of its expert, in pair order
    dest = tl.sum(one_hot * (block_end - blocks)[None, :], axis=1) * BLOCK_M + rank
    slot = tl.arange(0, BLOCKS_P2 * BLOCK_M)
    tl.store(sorted_ptr + slot, PAIRS, mask=slot < BLOCKS * BLOCK_M)  # PAIRS marks a block's unused rows
    tl.debug_barrier()
    tl.store(sorted_ptr + dest, pair, mask=pair < PAIRS)
    block = tl.arange(0, BLOCKS_P2)
    owner = tl.sum((block_end[None, :] <= block[:, None]).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + block, tl.where(owner < E, owner, UNUSED_BLOCK), mask=block < BLOCKS)


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, block, T: tl.constexpr, TOP_K: tl.constexpr, E: tl.constexpr,
                BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """A block's pairs (rows of the h / partial buffers), their tokens, which are real, and its expert (E + piece
    for the shared expert's pieces; UNUSED_BLOCK for a block no expert needed)."""
    m = tl.arange(0, BLOCK_M)
    if block < BLOCKS:
        pair = tl.load(sorted_ptr + block * BLOCK_M + m)
        expert = tl.load(block_expert_ptr + block)
        real = pair < T * TOP_K
        token = pair // TOP_K
    else:  # the shared expert: every token, a piece at a time
        TOKEN_BLOCKS: tl.constexpr = (T + BLOCK_M - 1) // BLOCK_M
        piece = (block - BLOCKS) // TOKEN_BLOCKS
        token = ((block - BLOCKS) % TOKEN_BLOCKS) * BLOCK_M + m
        real = token < T
        pair = T * TOP_K + piece * T + token
        expert = E + piece
    return pair, token, real, expert


@triton.jit
def _sorted_gate_up_kernel(
    x_ptr, sorted_ptr, block_expert_ptr, w_gate_ptr, w_up_ptr, s_gate_ptr, s_up_ptr, h_ptr,
    T: tl.constexpr, TOP_K: tl.constexpr, E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    PIECES: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    pair, token, real, expert = _block_rows(sorted_ptr, block_expert_ptr, tl.program_id(0), T, TOP_K, E, BLOCKS,
                                            BLOCK_M)
    if expert < E + PIECES:
        if expert < E:
            gate_ptr, up_ptr = w_gate_ptr + expert.to(tl.int64) * I * H, w_up_ptr + expert.to(tl.int64) * I * H
        else:
            gate_ptr, up_ptr = s_gate_ptr + (expert - E) * I * H, s_up_ptr + (expert - E) * I * H
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < I
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < H
            x = tl.load(x_ptr + token[:, None] * H + k[None, :], mask=real[:, None] & k_ok[None, :], other=0.0)
            w_at = n[None, :] * H + k[:, None]  # [BLOCK_K, BLOCK_N]: the weights transposed
            w_ok = n_ok[None, :] & k_ok[:, None]
            acc_gate = tl.dot(x, tl.load(gate_ptr + w_at, mask=w_ok, other=0.0), acc_gate)
            acc_up = tl.dot(x, tl.load(up_ptr + w_at, mask=w_ok, other=0.0), acc_up)
        dtype = h_ptr.dtype.element_ty
        h = _swiglu(acc_gate, acc_up, dtype)
        tl.store(h_ptr + pair[:, None] * I + n[None, :], h.to(dtype), mask=real[:, None] & n_ok[None, :])


@triton.jit
def _sorted_down_kernel(
    h_ptr, sorted_ptr, block_expert_ptr, weight_ptr, w_down_ptr, s_down_ptr, partial_ptr,
    T: tl.constexpr, TOP_K: tl.constexpr, E: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    PIECES: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    pair, token, real, expert = _block_rows(sorted_ptr, block_expert_ptr, tl.program_id(0), T, TOP_K, E, BLOCKS,
                                            BLOCK_M)
    if expert < E + PIECES:
        if expert < E:
            w_ptr = w_down_ptr + expert.to(tl.int64) * H * I
        else:
            w_ptr = s_down_ptr + (expert - E) * I
        stride = tl.where(expert < E, I, PIECES * I)  # the shared down projection is PIECES pieces wide
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < H
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < I
            h = tl.load(h_ptr + pair[:, None] * I + k[None, :], mask=real[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + n[None, :] * stride + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(h, w, acc)
        if expert < E:
            # Each expert's output rounded (as its own linear layer would be), then weighted by its router weight.
            weight = tl.load(weight_ptr + pair, mask=real, other=0.0)
            acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
        tl.store(partial_ptr + pair[:, None] * H + n[None, :], acc, mask=real[:, None] & n_ok[None, :])


@triton.jit
def _moe_output(routed, shared, residual_row, n, ok, PIECES: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                dtype: tl.constexpr):
    """A token's MoE output at columns n: its weighted routed outputs, summed in slot order in float32
    (deterministic), rounded once; plus the shared expert's pieces, summed in float32 and rounded once as one
    linear layer; plus the residual row."""
    out = routed.to(dtype)
    if PIECES > 0:
        out = out + shared.to(dtype)
    if HAS_RESIDUAL:
        out = out + tl.load(residual_row + n, mask=ok, other=0.0)
    return out


@triton.jit
def _sum_experts_kernel(partial_ptr, residual_ptr, out_ptr, T: tl.constexpr, TOP_K: tl.constexpr, H: tl.constexpr,
                        PIECES: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    token = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < H
    routed = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        routed += tl.load(partial_ptr + (token * TOP_K + s) * H + n, mask=ok, other=0.0)
    shared = tl.zeros([BLOCK], dtype=tl.float32)
    for piece in tl.static_range(PIECES):
        shared += tl.load(partial_ptr + (T * TOP_K + piece * T + token) * H + n, mask=ok, other=0.0)
    out = _moe_output(routed, shared, residual_ptr + token * H, n, ok, PIECES, HAS_RESIDUAL,
                      out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * H + n, out, mask=ok)


def moe_sorted(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """The MoE block for a decode batch (up to 64 rows; the decode step takes `moe_one_row` at one), reading each
    chosen expert once for all its rows.

    x [T, H]; topk_idx / topk_weight [T, k]; stacked weights gate/up [E, I, H], down [E, H, I]; optional shared
    expert (gate, up [I_s, H], down [H, I_s]). Returns [T, H] in x's dtype, plus `residual` [T, H] if given. Each
    projection is rounded to x's dtype as its own linear layer would be; the routed outputs are summed in float32
    with their weights and rounded once, as the release does."""
    T, H = x.shape
    E, I = w_gate.shape[0], w_gate.shape[1]
    top_k = topk_idx.shape[1]
    pieces, (s_gate, s_up, s_down) = _shared_pieces(shared, w_gate, w_up, w_down)
    block_m, bn, bk, warps, stages = tuning.sorted_moe_blocks
    pairs = T * top_k
    if pairs > 512:  # the sort runs in one program, which holds a pairs x experts table
        raise ValueError(f"moe_sorted is for a decode batch (at most {512 // top_k} rows), got {T}")
    # Every expert's pairs fill whole blocks: at most pairs / BLOCK_M full ones plus one partial per expert.
    blocks = triton.cdiv(pairs, block_m) + min(E, pairs)
    grid_m = blocks + pieces * triton.cdiv(T, block_m)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=x.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=x.device)
    _sort_pairs_by_expert_kernel[(1,)](
        topk_idx.contiguous(), sorted_pairs, block_expert, PAIRS=pairs, PAIRS_P2=triton.next_power_of_2(pairs), E=E,
        E_P2=triton.next_power_of_2(E), BLOCK_M=block_m, BLOCKS=blocks, BLOCKS_P2=triton.next_power_of_2(blocks),
        **_pdl_args(x.device), num_warps=8,
    )
    sizes = dict(T=T, TOP_K=top_k, E=E, H=H, I=I, PIECES=pieces, BLOCKS=blocks, BLOCK_M=block_m)
    h = torch.empty(pairs + pieces * T, I, dtype=x.dtype, device=x.device)
    _sorted_gate_up_kernel[(grid_m, triton.cdiv(I, bn))](
        x.contiguous(), sorted_pairs, block_expert, w_gate, w_up, s_gate, s_up, h, **sizes,
        BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(H)), **_pdl_args(x.device), num_warps=warps,
        num_stages=stages,
    )
    partial = torch.empty(pairs + pieces * T, H, dtype=torch.float32, device=x.device)
    _sorted_down_kernel[(grid_m, triton.cdiv(H, bn))](
        h, sorted_pairs, block_expert, topk_weight.float().contiguous(), w_down, s_down, partial, **sizes,
        BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(I)), **_pdl_args(x.device), num_warps=warps,
        num_stages=stages,
    )
    out = torch.empty_like(x)
    block = min(1024, triton.next_power_of_2(H))
    _sum_experts_kernel[(T, triton.cdiv(H, block))](
        partial, residual.reshape(T, H).contiguous() if residual is not None else x, out, T=T, TOP_K=top_k, H=H,
        PIECES=pieces, HAS_RESIDUAL=residual is not None, BLOCK=block, **_pdl_args(x.device), num_warps=4,
    )
    return out


def _shared_pieces(shared, w_gate, w_up, w_down) -> tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """How many pieces of the experts' width I the shared expert (gate, up [I_s, H], down [H, I_s]) is cut into,
    and its weights (the routed ones stand in, never read, when there is none)."""
    if shared is None:
        return 0, (w_gate, w_up, w_down)
    I, i_shared = w_gate.shape[1], shared[0].shape[0]
    if i_shared % I:
        raise ValueError(f"the shared expert's width {i_shared} is not a multiple of the experts' {I}")
    return i_shared // I, shared


# One row: the `moe_sorted` math for a batch-1 step in two launches. Slot j < TOP_K is the token's j-th chosen
# expert, slot TOP_K + p the shared expert's piece p.
@triton.jit
def _one_row_gate_up_kernel(x_ptr, idx_ptr, w_gate_ptr, w_up_ptr, s_gate_ptr, s_up_ptr, h_ptr,
                            TOP_K: tl.constexpr, H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    slot = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if slot < TOP_K:
        _wait_for_inputs(PDL)  # the expert ids come from the kernel just before
        expert = tl.load(idx_ptr + slot)  # int64 (topk_idx's dtype): offsets into a large stack cannot overflow
        gate_ptr, up_ptr = w_gate_ptr + expert * I * H, w_up_ptr + expert * I * H
        first_gate, first_up = _weight_tiles(gate_ptr, up_ptr, rows, 0, H, I, BLOCK_K)
    else:
        gate_ptr, up_ptr = s_gate_ptr + (slot - TOP_K) * I * H, s_up_ptr + (slot - TOP_K) * I * H
        first_gate, first_up = _weight_tiles(gate_ptr, up_ptr, rows, 0, H, I, BLOCK_K)
        _wait_for_inputs(PDL)
    dtype = h_ptr.dtype.element_ty
    h = _swiglu_rows(x_ptr, x_ptr, x_ptr, 1.0, gate_ptr, up_ptr, first_gate, first_up, rows, H, I, BLOCK_K, False,
                     False, dtype)
    tl.store(h_ptr + slot * I + rows, h.to(dtype), mask=rows < I)


@triton.jit
def _slot_inputs(h_ptr, slots, used, k, I: tl.constexpr):
    """Columns k of the down projection's inputs (the SwiGLU outputs) of `slots`, in float32, zero where not used."""
    h = tl.load(h_ptr + slots[:, None] * I + k[None, :], mask=used[:, None] & (k < I)[None, :], other=0.0)
    return h.to(tl.float32)


@triton.jit
def _one_row_down_kernel(h_ptr, idx_ptr, weight_ptr, w_down_ptr, s_down_ptr, residual_ptr, out_ptr,
                         TOP_K: tl.constexpr, H: tl.constexpr, I: tl.constexpr, PIECES: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, TOP_K_P2: tl.constexpr, PIECES_P2: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    slot = tl.arange(0, TOP_K_P2)
    routed = slot < TOP_K
    piece = tl.arange(0, PIECES_P2)
    pieced = piece < PIECES
    # Rows n of each chosen expert's [H, I] down weights, and of each piece (a column block) of the shared expert's
    # [H, PIECES * I]: two tiles, so that every loop step has all their weights in flight. (One tile through a
    # tl.where of the two pointers would hide their alignment from the compiler: 2-byte loads.)
    # The routing was written two launches back (before the gate/up kernel), so it may be read before the wait
    # (see _wait_for_inputs); ".cg" reads it from L2, where that kernel's writes are.
    expert = tl.load(idx_ptr + slot, mask=routed, other=0, cache_modifier=".cg")
    routed_rows = w_down_ptr + expert[:, None] * H * I + n[None, :] * I  # [TOP_K_P2, BLOCK_N]
    shared_rows = s_down_ptr + piece[:, None] * I + n[None, :] * (PIECES * I)  # [PIECES_P2, BLOCK_N]
    routed_ok = routed[:, None] & n_ok[None, :]
    shared_ok = pieced[:, None] & n_ok[None, :]
    k = tl.arange(0, BLOCK_K)
    w_routed = tl.load(routed_rows[:, :, None] + k[None, None, :], mask=routed_ok[:, :, None] & (k < I)[None, None, :],
                       other=0.0)
    w_shared = tl.load(shared_rows[:, :, None] + k[None, None, :], mask=shared_ok[:, :, None] & (k < I)[None, None, :],
                       other=0.0)
    _wait_for_inputs(PDL)  # the first weight tiles are on their way meanwhile
    acc_routed = w_routed.to(tl.float32) * _slot_inputs(h_ptr, slot, routed, k, I)[:, None, :]
    acc_shared = w_shared.to(tl.float32) * _slot_inputs(h_ptr, TOP_K + piece, pieced, k, I)[:, None, :]
    for k0 in range(BLOCK_K, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < I
        w = tl.load(routed_rows[:, :, None] + k[None, None, :], mask=routed_ok[:, :, None] & k_ok[None, None, :],
                    other=0.0)
        acc_routed += w.to(tl.float32) * _slot_inputs(h_ptr, slot, routed, k, I)[:, None, :]
        w = tl.load(shared_rows[:, :, None] + k[None, None, :], mask=shared_ok[:, :, None] & k_ok[None, None, :],
                    other=0.0)
        acc_shared += w.to(tl.float32) * _slot_inputs(h_ptr, TOP_K + piece, pieced, k, I)[:, None, :]
    dtype = out_ptr.dtype.element_ty
    # Each expert's output rounded (as its own linear layer would be), then weighted by its router weight.
    weight = tl.load(weight_ptr + slot, mask=routed, other=0.0)
    routed_y = tl.sum(acc_routed, axis=2).to(dtype).to(tl.float32) * weight[:, None]  # [TOP_K_P2, BLOCK_N]
    shared_y = tl.sum(acc_shared, axis=2)  # [PIECES_P2, BLOCK_N]
    # Summed one slot (one piece) at a time, in order, as moe_sorted does (taking a row sums exact zeros with it).
    routed_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        routed_sum += tl.sum(tl.where(slot[:, None] == j, routed_y, 0.0), axis=0)
    shared_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p in tl.static_range(PIECES):
        shared_sum += tl.sum(tl.where(piece[:, None] == p, shared_y, 0.0), axis=0)
    out = _moe_output(routed_sum, shared_sum, residual_ptr, n, n_ok, PIECES, HAS_RESIDUAL, dtype)
    tl.store(out_ptr + n, out, mask=n_ok)


def moe_one_row(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
    swiglu: torch.Tensor | None = None,
) -> torch.Tensor:
    """`moe_sorted` for one row x [1, H] (the batch-1 decode step), same arguments and the same roundings, in two
    launches: SwiGLU of the chosen experts and the shared expert's pieces side by side, then one down projection
    over all of them that also weights, sums and adds the residual. `swiglu`, from `add_norm_route`, already holds
    the shared expert's SwiGLU: then only the chosen experts' is computed here."""
    T, H = x.shape
    if T != 1:
        raise ValueError(f"moe_one_row takes one row, got {T}")
    I = w_gate.shape[1]
    top_k = topk_idx.shape[1]
    pieces, (s_gate, s_up, s_down) = _shared_pieces(shared, w_gate, w_up, w_down)
    slots = top_k + pieces
    idx = topk_idx.contiguous()
    (bn, bk, warps), (down_bn, down_bk, down_warps) = tuning.one_row_moe_blocks
    h = torch.empty(slots, I, dtype=x.dtype, device=x.device) if swiglu is None else swiglu
    if h.shape != (slots, I):
        raise ValueError(f"moe_one_row's swiglu must be [{slots}, {I}], got {tuple(h.shape)}")
    _one_row_gate_up_kernel[(slots if swiglu is None else top_k, triton.cdiv(I, bn))](
        x.contiguous(), idx, w_gate, w_up, s_gate, s_up, h, TOP_K=top_k, H=H, I=I, BLOCK_N=bn,
        BLOCK_K=min(bk, triton.next_power_of_2(H)), **_pdl_args(x.device), num_warps=warps,
    )
    out = torch.empty_like(x)
    _one_row_down_kernel[(triton.cdiv(H, down_bn),)](
        h, idx, topk_weight.float().contiguous(), w_down, s_down,
        residual.reshape(1, H).contiguous() if residual is not None else x, out, TOP_K=top_k, H=H, I=I,
        PIECES=pieces, HAS_RESIDUAL=residual is not None, TOP_K_P2=triton.next_power_of_2(top_k),
        PIECES_P2=triton.next_power_of_2(max(pieces, 1)), BLOCK_N=down_bn,
        BLOCK_K=min(down_bk, triton.next_power_of_2(I)), **_pdl_args(x.device), num_warps=down_warps,
    )
    return out


def mlp_gemv(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    residual: torch.Tensor | None = None, tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """A SwiGLU MLP (gate/up [I, H], down [H, I]) for a few tokens x [T, H], plus `residual`: gate, up and SiLU in
    one GEMV kernel, then the down projection as a GEMV."""
    T, H = x.shape
    I = w_gate.shape[0]
    h = torch.empty(T, I, dtype=x.dtype, device=x.device)
    bn, bk, warps = tuning.gate_up_blocks
    bn, bk = min(bn, triton.next_power_of_2(I)), min(bk, triton.next_power_of_2(H))
    _swiglu_gate_up_kernel[(T, triton.cdiv(I, bn))](x.contiguous(), w_gate, w_up, h, H=H, I=I, BLOCK_N=bn, BLOCK_K=bk,
                                                    **_pdl_args(x.device), num_warps=warps)
    return gemv(h, w_down, residual=residual, tuning=tuning)


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_DELTA: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
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
        **_pdl_args(x2.device), num_warps=8,
    )
    if delta is not None:
        return total.view(shape), out.view(shape)
    return out.view(shape)


@triton.jit
def _add_norm_route_kernel(
    x_ptr, delta_ptr, norm_weight_ptr, router_ptr, sum_ptr, normed_ptr, logits_ptr, ticket_ptr, idx_ptr, weight_ptr,
    s_gate_ptr, s_up_ptr, h_ptr, eps, H: tl.constexpr, E: tl.constexpr, TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr,
    RENORM: tl.constexpr, ROWS: tl.constexpr, ROUTER_PARTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
    I: tl.constexpr, SHARED_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    token = tl.program_id(0)
    part = tl.program_id(1)  # below ROUTER_PARTS: which ROWS of the router's E rows this program scores
    dtype = normed_ptr.dtype.element_ty
    # (The two branches use names of their own: Triton merges the ones both assign.)
    if part < ROUTER_PARTS:
        cols = tl.arange(0, BLOCK_H)
        ok = cols < H
        rows = part * ROWS + tl.arange(0, ROWS)
        gate = tl.load(router_ptr + rows[:, None] * H + cols[None, :], mask=(rows < E)[:, None] & ok[None, :],
                       other=0.0)
        w = tl.load(norm_weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        # Every program recomputes the (cheap, 2*H-element) add and norm so that none waits for another.
        x = tl.load(x_ptr + token * H + cols, mask=ok, other=0.0) + tl.load(delta_ptr + token * H + cols, mask=ok,
                                                                            other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
        normed = (w * (xf * rstd).to(dtype).to(tl.float32)).to(dtype)
        if part == 0:
            tl.store(sum_ptr + token * H + cols, x, mask=ok)
            tl.store(normed_ptr + token * H + cols, normed, mask=ok)
        logits = tl.sum(gate.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1).to(dtype)  # a linear's rounding
        tl.store(logits_ptr + token * E + rows, logits.to(tl.float32), mask=rows < E)
        # The last router program to finish (whichever it is) routes the token: softmax and top-k over all E
        # logits, done once here rather than by every program of the expert kernels. It resets the ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + token, 1, sem="acq_rel")
        if ticket == ROUTER_PARTS - 1:
            experts = tl.arange(0, BLOCK_E)
            all_logits = tl.load(logits_ptr + token * E + experts, mask=experts < E, other=float("-inf"),
                                 cache_modifier=".cg")
            _softmax_top_k(all_logits, experts, idx_ptr + token * TOP_K, weight_ptr + token * TOP_K, TOP_K, TOP_K_P2,
                           RENORM)
            tl.atomic_xchg(ticket_ptr + token, 0)
    else:
        # The shared expert's SwiGLU (one row), BLOCK_N of its SHARED_I rows per program, into slots TOP_K.. of
        # moe_one_row's inputs: its weights stream while the routing above is worked out.
        shared_rows = (part - ROUTER_PARTS) * BLOCK_N + tl.arange(0, BLOCK_N)
        first_gate, first_up = _weight_tiles(s_gate_ptr, s_up_ptr, shared_rows, 0, H, SHARED_I, BLOCK_K)
        _wait_for_inputs(PDL)
        shared_rstd = _row_rstd(x_ptr, delta_ptr, eps, H, BLOCK_H, True)
        h = _swiglu_rows(x_ptr, delta_ptr, norm_weight_ptr, shared_rstd, s_gate_ptr, s_up_ptr, first_gate, first_up,
                         shared_rows, H, SHARED_I, BLOCK_K, True, True, dtype)
        tl.store(h_ptr + TOP_K * I + shared_rows, h.to(dtype), mask=shared_rows < SHARED_I)


def add_norm_route(
    x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
    top_k: int, renormalize: bool, shared_gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
    expert_width: int = 0, tuning: KernelTuning = DEFAULT_TUNING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, delta [T, H] -> (x + delta, RMSNorm(x + delta), topk_idx [T, k], topk_weight [T, k], swiglu) in one
    kernel: the residual add after attention, the MoE's input norm, its gate (logits rounded to x's dtype, as a
    linear layer's would be) and the routing (float32 softmax, top-k, optionally renormalised).

    With `shared_gate_up` (the shared expert's gate and up weights [P * expert_width, H]) and one row, the same
    launch also computes the shared expert's SwiGLU: `swiglu` is then `moe_one_row`'s [k + P, expert_width] input
    buffer with rows k.. filled (it is None otherwise). That keeps memory busy while the routing is worked out."""
    T, H = x.shape
    E = router_weight.shape[0]
    total, normed = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    idx = torch.empty(T, top_k, dtype=torch.long, device=x.device)
    weight = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    tickets = _tickets(x)
    rows = ROUTER_ROWS
    router_parts = triton.cdiv(E, rows)
    bn, bk, warps = tuning.route_shared_blocks
    swiglu, shared_parts = None, 0
    s_gate, s_up = shared_gate_up if shared_gate_up is not None else (router_weight, router_weight)
    if shared_gate_up is not None:
        if T != 1:
            raise ValueError(f"add_norm_route computes the shared expert for one row, got {T}")
        shared_width = s_gate.shape[0]
        swiglu = torch.empty(top_k * expert_width + shared_width, dtype=x.dtype, device=x.device)
        swiglu = swiglu.view(-1, expert_width)
        shared_parts = triton.cdiv(shared_width, bn)
    else:
        shared_width, warps = 0, 1  # one warp: the routing's reductions stay in registers
    _add_norm_route_kernel[(T, router_parts + shared_parts)](
        x.contiguous(), delta.contiguous(), norm_weight, router_weight, total, normed, logits, tickets, idx, weight,
        s_gate, s_up, swiglu if swiglu is not None else total, eps, H=H, E=E, TOP_K=top_k,
        TOP_K_P2=triton.next_power_of_2(top_k), RENORM=renormalize, ROWS=rows, ROUTER_PARTS=router_parts,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_E=triton.next_power_of_2(E), I=max(expert_width, 1),
        SHARED_I=max(shared_width, 1), BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(H)), **_pdl_args(x.device),
        num_warps=warps,
    )
    return total, normed, idx, weight, swiglu


ROUTER_ROWS = 2  # gate rows per program of add_norm_route


@triton.jit
def _gemv_input(x_row, delta_row, norm_weight_ptr, rstd, cols, K: tl.constexpr, HAS_DELTA: tl.constexpr,
                NORM: tl.constexpr, dtype: tl.constexpr):
    """Columns `cols` of the GEMV's input row in float32: x (plus delta when HAS_DELTA, rounded as the residual add
    is), normalised (RMSNorm with rstd, rounded as the release rounds it) when NORM."""
    ok = cols < K
    x = tl.load(x_row + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(delta_row + cols, mask=ok, other=0.0)
    x = x.to(tl.float32)
    if NORM:
        scale = tl.load(norm_weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        x = (scale * (x * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return x


@triton.jit
def _row_rstd(x_row, delta_row, eps, K: tl.constexpr, BLOCK_ROW: tl.constexpr, HAS_DELTA: tl.constexpr):
    """RMSNorm's 1 / rms of the row x (plus delta when HAS_DELTA), in float32."""
    x = _gemv_input(x_row, delta_row, x_row, 1.0, tl.arange(0, BLOCK_ROW), K, HAS_DELTA, False, tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)


@triton.jit
def _gemv_kernel(
    x_ptr, norm_weight_ptr, w_ptr, bias_ptr, residual_ptr, out_ptr, eps,
    K: tl.constexpr, N: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    OUT_STRIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr, PDL: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_row = x_ptr + token * K
    dtype = w_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    _wait_for_inputs(PDL)  # the first weight tile is on its way meanwhile
    rstd = 1.0
    if NORM:  # each program normalises the (short) input row itself rather than waiting on a norm kernel
        rstd = _row_rstd(x_row, x_row, eps, K, BLOCK_ROW, False)
    acc = w.to(tl.float32) * _gemv_input(x_row, x_row, norm_weight_ptr, rstd, cols, K, False, NORM, dtype)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * _gemv_input(x_row, x_row, norm_weight_ptr, rstd, cols, K, False, NORM, dtype)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(dtype)  # rounded like a linear layer's output, even when stored as float32
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + token * N + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + token * OUT_STRIDE + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm: tuple[torch.Tensor, float] | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """x [T, K] @ weight[N, K].T (+ bias) for a few rows T; with `norm` (weight, eps), RMSNorm(x) @ weight.T in the
    same kernel. The output is rounded to the weight's dtype, `residual` [T, N] added, and stored as `out_dtype`
    (default x's), or into `out` [T, N] (rows may be strided, e.g. a slice of a wider buffer)."""
    T, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(T, N, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != (T, N) or out.stride(-1) != 1:
        raise ValueError(f"gemv out must be [{T}, {N}] with contiguous rows, got {tuple(out.shape)}")
    bn, bk, warps = tuning.gemv_blocks
    norm_weight, eps = norm if norm is not None else (weight, 0.0)
    _gemv_kernel[(T, triton.cdiv(N, bn))](
        x.contiguous(), norm_weight, weight, bias if bias is not None else weight,
        residual.contiguous() if residual is not None else weight, out, eps, K=K, N=N, NORM=norm is not None,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, OUT_STRIDE=out.stride(0), BLOCK_N=bn,
        BLOCK_K=min(bk, triton.next_power_of_2(K)), BLOCK_ROW=triton.next_power_of_2(K), **_pdl_args(x.device),
        num_warps=warps,
    )
    return out


@triton.jit
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, cache_pos_ptr,
    L, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
    WRITE_CACHE: tl.constexpr, PER_ROW: tl.constexpr, PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
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
        # cache_position is [L] (every row at the same slots) or, PER_ROW, [B, L] (token = b * L + l indexes it).
        if PER_ROW:
            pos = tl.load(cache_pos_ptr + token)
        else:
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
    `cache_position` [L] (all rows) or [B, L] (each row at its own slots) of cache (k, v) [B, kv_heads, S, D].
    One kernel for what is otherwise about twenty."""
    B, L, heads, D = qkv.shape
    k_cache, v_cache = cache if cache is not None else (qkv, qkv)
    per_row = cache_position is not None and cache_position.dim() == 2
    _rope_kernel[(B * L, heads)](
        qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache,
        cache_position.contiguous() if cache_position is not None else cos,
        # S: slots per (row, head) in memory, so that a view of a cache's first slots is written in place.
        L=L, Q_HEADS=num_heads, KV_HEADS=num_kv_heads, D=D, S=k_cache.stride(1) // D if cache is not None else 1,
        WRITE_CACHE=cache is not None, PER_ROW=per_row, **_pdl_args(qkv.device), num_warps=1,
    )


@triton.jit
def _rotated(rows, d, cos, signed_sin, D: tl.constexpr, mask):
    """RoPE (NeoX halves) of the heads at `rows` (pointers to [.., D] rows; cos and sin [D] over d in float32, sin
    negated on the first half), rounded to the heads' dtype: the rotate-half partner of column d is d +- D/2."""
    x = tl.load(rows + d, mask=mask, other=0.0)
    partner = tl.load(rows + (d + D // 2) % D, mask=mask, other=0.0)
    return (x.to(tl.float32) * cos + partner.to(tl.float32) * signed_sin).to(x.dtype)


@triton.jit
def _row_chunks(slot_ptr, b, splits, CHUNK: tl.constexpr):
    """Row b's newest slot, its number of key chunks and the chunks per split. The row's keys end at its new token's
    slot: only those chunks are read, shared out evenly over the splits, so the work follows the row's length, not
    the cache's capacity. (The slot is written before the step's first layer, two or more launches back, so both
    attention kernels read it before their wait; ".cg": from L2, where its writer's result is.)"""
    newest = tl.load(slot_ptr + b, cache_modifier=".cg").to(tl.int32)
    chunks = (newest + CHUNK) // CHUNK
    return newest, chunks, (chunks + splits - 1) // splits


@triton.jit
def _decode_attention_partial(
    qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, acc_ptr, max_ptr, sum_ptr, scale,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    S: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    bh = tl.program_id(0)  # b * KV_HEADS + kv head
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b, kv_head = bh // KV_HEADS, bh % KV_HEADS
    g = tl.arange(0, GROUP_PAD)  # the KV head's query heads, padded to a tensor-core tile
    d = tl.arange(0, D)
    real = g < GROUP
    newest, chunks, per_split = _row_chunks(slot_ptr, b, splits, CHUNK)
    first = split * per_split
    if first >= chunks:
        # No keys for this split: leave before the wait, writing nothing (the combine reads only the splits that
        # read keys). The grid is fixed by the cache's capacity: a scheduler row of 16,384 slots has 128 splits
        # per KV head, most of them empty for a chat; staying cost 50 us a step at one row on an H200.
        return
    last = tl.minimum(first + per_split, chunks)
    # RoPE here rather than in a kernel of its own (one fewer link in the chain of small kernels between a layer's
    # weight reads): every program rotates its query heads; the one that reads the newest slot rotates the new key
    # and writes it and the new value to the cache first.
    cos = tl.load(cos_ptr + b * D + d, cache_modifier=".cg")
    signed_sin = tl.where(d < D // 2, -1.0, 1.0) * tl.load(sin_ptr + b * D + d, cache_modifier=".cg")
    # RoPE's tables, like the slot, come from before the step's first layer: read before the wait too.
    _wait_for_inputs(PDL)
    token_heads = qkv_ptr + b * (Q_HEADS + 2 * KV_HEADS) * D
    q = _rotated(token_heads + (kv_head * GROUP + g)[:, None] * D, d[None, :], cos[None, :], signed_sin[None, :], D,
                 real[:, None])
    if (first < chunks) & (chunks <= last):
        new_row = (bh * S + newest) * D + d
        tl.store(k_ptr + new_row, _rotated(token_heads + (Q_HEADS + kv_head) * D, d, cos, signed_sin, D, d < D))
        tl.store(v_ptr + new_row, tl.load(token_heads + (Q_HEADS + KV_HEADS + kv_head) * D + d))
        tl.debug_barrier()  # the writes are seen by all of this program's threads when they read the chunk
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for chunk in range(first, last):  # online softmax over this split's chunks
        s = chunk * CHUNK + tl.arange(0, CHUNK)
        valid = tl.load(valid_ptr + b * S + s).to(tl.int1)
        kv_rows = bh * S + s
        k = tl.load(k_ptr + kv_rows[:, None] * D + d[None, :])
        v = tl.load(v_ptr + kv_rows[:, None] * D + d[None, :])
        scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, CHUNK], float32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep everything at zero
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(m - shift)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    part = (bh * splits + split) * GROUP + g  # where this split's statistics go, one row per query head
    tl.store(max_ptr + part, m, mask=real)  # -inf: the split read no valid key, and the combine skips it
    tl.store(sum_ptr + part, total, mask=real)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=real[:, None])


@triton.jit
def _decode_attention_combine(
    acc_ptr, max_ptr, sum_ptr, slot_ptr, out_ptr,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr,
    D_BLOCK: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    b, kv_head = bh // KV_HEADS, bh % KV_HEADS
    _, chunks, per_split = _row_chunks(slot_ptr, b, SPLITS, CHUNK)
    used = (chunks + per_split - 1) // per_split  # the splits that read keys
    _wait_for_inputs(PDL)
    # All the statistics in one load each, none waiting on another's value: a single round trip to L2 (two passes
    # over blocks of splits, each load masked by the last, took ~2.5 us more a layer at batch 1).
    d = tl.program_id(1) * D_BLOCK + tl.arange(0, D_BLOCK)
    g = tl.arange(0, GROUP_P2)
    real = g < GROUP
    split = tl.arange(0, SPLITS_P2)
    stats = bh * SPLITS * GROUP + split[:, None] * GROUP + g[None, :]
    ok = (split < used)[:, None] & real[None, :]
    m = tl.load(max_ptr + stats, mask=ok, other=float("-inf"))
    sums = tl.load(sum_ptr + stats, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + stats[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0)
    m_all = tl.max(m, axis=0)  # each query head's largest score over all splits
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all[None, :]))  # [SPLITS_P2, GROUP_P2]
    total = tl.sum(w * sums, axis=0)
    out = tl.sum(w[:, :, None] * tl.where((w > 0)[:, :, None], acc, 0.0), axis=0)  # a split with no valid key adds 0
    out = out / tl.where(real, total, 1.0)[:, None]
    rows = b * Q_HEADS + kv_head * GROUP + g
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def decode_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    key_valid: torch.Tensor, slots: torch.Tensor, num_heads: int, tuning: KernelTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """One new token per row over its cache (split over groups of key chunks, then combined: flash decoding), with
    its RoPE and its cache write: what `rope_` then attention would do, in two launches.

    qkv [B, 1, heads, D], the fused projection (queries, keys, values; not rotated, and left as it is); cos/sin
    [B, 1, D] float32; caches [B, kv_heads, S, D], where the new key (rotated) and value are written at `slots`;
    key_valid [B, S] bool, the new slots included; slots [B] each row's new token's slot: the row's valid keys all
    lie at or before it (causal in slot order), so only its first slots + 1 keys are read and a large cache costs
    nothing. slots and cos/sin must not come from the kernel launched just before (both kernels read them before
    they wait for that kernel's outputs). Returns [B, num_heads, D]."""
    B, D = qkv.shape[0], qkv.shape[-1]
    kv_heads, S = k_cache.shape[1], k_cache.shape[2]
    chunk = min(tuning.decode_attention_chunk, S)
    if S % chunk or chunk & (chunk - 1):
        raise ValueError(f"decode_attention needs a power-of-two cache length (or a multiple of {chunk}), got {S}")
    group = num_heads // kv_heads
    splits = _attention_splits(B * kv_heads, S // chunk, qkv.device)
    parts = B * kv_heads * splits * group
    acc = torch.empty(parts, D, dtype=torch.float32, device=qkv.device)
    maxima = torch.empty(parts, dtype=torch.float32, device=qkv.device)
    sums = torch.empty(parts, dtype=torch.float32, device=qkv.device)
    _decode_attention_partial[(B * kv_heads, splits)](
        qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache, key_valid, slots, acc, maxima, sums, D**-0.5,
        Q_HEADS=num_heads, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, group), D=D, S=S, CHUNK=chunk,
        **_pdl_args(qkv.device), num_warps=4,
    )
    out = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    splits_p2, group_p2 = triton.next_power_of_2(splits), triton.next_power_of_2(group)
    d_block = max(1, min(D, 32, 8192 // (splits_p2 * group_p2)))  # at most 8K statistics in flight per program
    _decode_attention_combine[(B * kv_heads, D // d_block)](
        acc, maxima, sums, slots, out, Q_HEADS=num_heads, KV_HEADS=kv_heads, GROUP=group, GROUP_P2=group_p2, D=D,
        D_BLOCK=d_block, CHUNK=chunk, SPLITS=splits, SPLITS_P2=splits_p2, **_pdl_args(qkv.device), num_warps=4,
    )
    return out


def _attention_splits(heads: int, chunks: int, device: torch.device) -> int:
    """How many programs share each (row, KV head)'s keys: enough for about four programs per multiprocessor in
    all, a power of two, at most one per chunk. Fixed per batch size, so a captured step keeps its grid while its
    rows grow."""
    programs = 4 * _multiprocessors(device)
    return max(1, min(chunks, 1 << max(0, (programs // heads).bit_length() - 1)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@triton.jit
def _route_kernel(logits_ptr, idx_ptr, weight_ptr, E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr,
                  K_P2: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + row * E + cols, mask=cols < E, other=float("-inf")).to(tl.float32)
    _softmax_top_k(logits, cols, idx_ptr + row * K, weight_ptr + row * K, K, K_P2, RENORM)


def route_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] float32): float32 softmax, top-k,
    optionally renormalised to sum to one."""
    T, E = logits.shape
    idx = torch.empty(T, k, dtype=torch.long, device=logits.device)
    weight = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    _route_kernel[(T,)](
        logits.contiguous(), idx, weight, E=E, BLOCK_E=triton.next_power_of_2(E), K=k, K_P2=triton.next_power_of_2(k),
        RENORM=renormalize, **_pdl_args(logits.device), num_warps=1,
    )
    return idx, weight


@triton.jit
def _argmax_kernel(logits_ptr, top_ptr, top_at_ptr, ticket_ptr, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr,
                   PARTS: tl.constexpr, PARTS_P2: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)  # which BLOCK of the row's V logits this program reads
    _wait_for_inputs(PDL)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * V + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    top = tl.max(x, axis=0)
    tl.store(top_ptr + row * PARTS + part, top)
    tl.store(top_at_ptr + row * PARTS + part, tl.min(tl.where(x == top, cols, V), axis=0))  # the part's first
    # The last program of the row to finish (found with a ticket, as in add_norm_route) picks among the parts.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
    if ticket == PARTS - 1:
        parts = tl.arange(0, PARTS_P2)
        ok = parts < PARTS
        tops = tl.load(top_ptr + row * PARTS + parts, mask=ok, other=float("-inf"), cache_modifier=".cg")
        top_at = tl.load(top_at_ptr + row * PARTS + parts, mask=ok, other=V, cache_modifier=".cg")
        # The lowest column holding the largest value, as torch.argmax; an all -inf row gives column 0.
        tl.store(out_ptr + row, tl.min(tl.where(tops == tl.max(tops, axis=0), top_at, V), axis=0).to(tl.int64))
        tl.atomic_xchg(ticket_ptr + row, 0)


ARGMAX_BLOCK = 4096  # logits per program of argmax_rows


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for logits [B, V] (no NaN), in one launch of many programs a row. torch's own
    reduction takes ~37 us for one 126,464-logit row on an H200, one program scanning the row 30 us: 2% of a batch-1
    decode step; 31 programs of 4,096 logits each read theirs in one round trip."""
    B, V = logits.shape
    parts = triton.cdiv(V, ARGMAX_BLOCK)
    tickets = _tickets(logits)
    if B > tickets.numel():
        raise ValueError(f"argmax_rows takes at most {tickets.numel()} rows, got {B}")
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    tops = torch.empty(B, parts, dtype=torch.float32, device=logits.device)
    top_at = torch.empty(B, parts, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(B, parts)](logits.contiguous(), tops, top_at, tickets, out, V=V, BLOCK=ARGMAX_BLOCK,
                               PARTS=parts, PARTS_P2=triton.next_power_of_2(parts), **_pdl_args(logits.device),
                               num_warps=4)
    return out
