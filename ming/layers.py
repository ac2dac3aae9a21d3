"""Layers that the thinker, the talker and the flow decoder share; each layer picks its own kernel.

On a CUDA GPU with bf16 weights (Ampere or newer), a few tokens at a time (decoding) run through the Triton kernels
of `ming/kernels.py`; everything else (the CPU, float32, prompts) runs the plain PyTorch here, which is also the
reference every kernel is tested against (tests/test_cuda.py). Model files call these layers and never branch on
the device.

Also here: the static KV cache, RoPE, and `CapturedStep`, the one place a step is captured as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

try:  # Triton comes with CUDA builds of torch; the CPU path never needs it.
    from . import kernels
    from .kernels import DEFAULT_TUNING, KernelTuning
except ImportError:
    kernels = None
    DEFAULT_TUNING = KernelTuning = None

# At most this many rows take the fused GEMV kernels, which read each weight row once per token; more rows take
# cuBLAS, which reads it once for all. Measured on an H200 (thinker decode, tok/s at batch 1/2/4/8): GEMVs up to 8
# rows 459/665/887/1,201, up to 2 rows 449/670/936/1,377 (a talker speaking for 8 replies gains the same way).
FEW_TOKENS = 2
DECODE_BATCH = 64  # up to this many rows, the MoE reads its experts through the decode kernels (not grouped GEMMs)


# ------------------------------------------------------------------------------------------------ kernel choice
def use_triton(x: torch.Tensor) -> bool:
    """The fused GPU kernels of ming/kernels.py: CUDA, bf16, Ampere or newer (bf16 tensor cores)."""
    return (
        kernels is not None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def few_tokens(x: torch.Tensor) -> bool:
    """Whether activations x [..., H] take the fused GEMV kernels (projections with the norm inside, add + norm +
    route). The one predicate for all of them: up to FEW_TOKENS rows, reading each weight row per token wins; above
    it, cuBLAS GEMMs read each weight once for all rows."""
    return use_triton(x) and x.numel() // x.shape[-1] <= FEW_TOKENS


def decode_batch(x: torch.Tensor) -> bool:
    """Whether activations x [..., H] are a decode batch for the MoE's decode kernels (one row by expert id, up to
    DECODE_BATCH rows sorted by expert; more rows take the prompt path's grouped GEMMs)."""
    return use_triton(x) and x.numel() // x.shape[-1] <= DECODE_BATCH


def use_grouped_mm(x: torch.Tensor) -> bool:
    """Grouped GEMM needs CUDA, bf16 and Hopper-class (sm90+) tensor cores; everything else takes the loop."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class TunedKernels:
    """Mixin for layers that launch tuned kernels: they read `kernel_tuning`, which a model sets on all of its
    layers at once (`set_kernel_tuning`), never a module global."""

    kernel_tuning: "KernelTuning | None" = DEFAULT_TUNING


def set_kernel_tuning(model: nn.Module, tuning: "KernelTuning") -> None:
    """Give every kernel-launching layer of `model` the block shapes `tuning` (bench/profile_decode.py tries
    variants this way). Captured steps must be captured again afterwards (`model.captured_steps.clear()`)."""
    for module in model.modules():
        if isinstance(module, TunedKernels):
            module.kernel_tuning = tuning


# ------------------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32, scale in the input dtype (the release's order of operations).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): the residual add and the next norm, one kernel on the GPU."""
        if use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps, delta=delta)
        x = x + delta
        return x, self(x)


def linear(
    x: torch.Tensor,
    layer: nn.Linear,
    norm: RMSNorm | None = None,
    tuning: "KernelTuning | None" = DEFAULT_TUNING,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """layer(norm(x)) over x [..., K] (`norm` optional), as `out_dtype` (default x's, after rounding to the weight's
    dtype). For a few tokens on the GPU, one GEMV kernel with the norm inside: faster than cuBLAS at batch 1."""
    if few_tokens(x):
        flat = x.reshape(-1, x.shape[-1])
        y = kernels.gemv(flat, layer.weight, None if norm is None else (norm.weight, norm.eps), out_dtype=out_dtype,
                         bias=layer.bias, tuning=tuning)
        return y.view(*x.shape[:-1], -1)
    y = layer(x if norm is None else norm(x))
    return y if out_dtype is None else y.to(out_dtype)


class MLP(nn.Module, TunedKernels):
    """SwiGLU feed-forward: the thinker's shared expert and the talker's (Qwen2) MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of x [..., H], plus `residual` when given (added inside the last kernel on the GPU)."""
        if few_tokens(x):
            H = x.shape[-1]
            y = kernels.mlp_gemv(x.reshape(-1, H), self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                                 residual=None if residual is None else residual.reshape(-1, H),
                                 tuning=self.kernel_tuning)
            return y.view(x.shape)
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if residual is None else residual + y


# -------------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] for NeoX-style rotation over the full head dim, in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, D]; cos/sin: [B, L, D]. Rotating a key at position p by the angles of p' - p gives the key
    at p' (used to move cached keys to new positions)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Static keys and values of every layer, [B, kv_heads, capacity, head_dim] each (keys stored rotated), and
    which slots hold a token. Fixed shapes let a decode step be replayed from a CUDA graph; forgetting tokens is
    just marking their slots invalid."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [B, capacity] bool

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str) -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            torch.zeros(batch, capacity, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def rows(self, rows: slice) -> "KVCache":
        """A view of some rows (no copy, still contiguous): the scheduler's decode steps of several batch sizes and
        its per-request prefills share one slotted cache this way."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.valid[rows])

    def first_slots(self, n: int) -> "KVCache":
        """A view of every row's first n slots (no copy; writes land in this cache): a chunk prefilled after earlier
        ones attends over the slots in use, not over the whole capacity."""
        return KVCache([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values], self.valid[:, :n])


def prompt_mask(key_valid: torch.Tensor) -> torch.Tensor | None:
    """Mask for a prompt of L tokens over its own keys: None (plain causal) without padding, else a boolean
    [B, 1, L, L] mask in which query i sees the valid keys at positions <= i. key_valid: [B, L], False at padding."""
    if bool(key_valid.all()):
        return None
    L = key_valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=key_valid.device).tril()
    # A fully padded query row would give NaN in softmax; let it see itself (its output is never used).
    mask = (causal[None] & key_valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=key_valid.device)
    return mask[:, None]


def cache_mask(valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Mask [B, 1, L, S] for queries at cache `slots` [L] over all S cache slots: each sees the valid slots up to
    its own. `valid` [B, S] must already include the queries' slots."""
    visible = torch.arange(valid.shape[1], device=valid.device)[None, :] <= slots[:, None]  # [L, S]
    return (valid[:, None, :] & visible[None])[:, None]


def decode_mask(valid: torch.Tensor) -> torch.Tensor:
    """`cache_mask` for one new token per row whose slot is the newest valid one: [B, 1, 1, S]."""
    return valid[:, None, None, :]


def attend(
    qkv: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    mask: torch.Tensor | None,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
    tuning: "KernelTuning | None" = DEFAULT_TUNING,
) -> torch.Tensor:
    """Rotary attention over the projected qkv [B, L, num_heads + 2 num_kv_heads, D] (contiguous); returns
    [B, L, num_heads * D].

    With a cache (keys, values) [B, kv_heads, S, D], the new keys and values are first written at `slots`: [L]
    (every row at the same slots) or [B, L] (each row at its own, for rows at different points of their sequences).
    `mask` (boolean, True where a query may attend) says what the queries see: None is plain causal attention over
    the new tokens (lets SDPA pick its flash kernel); [B, 1, L, L] is over the new tokens; [B, 1, L, S] is over the
    whole cache (decode steps, and chunks prefilled after earlier ones). Attention in the cache is causal in slot
    order: a token never sees a valid slot after its own (the GPU decode kernel reads only up to its slot)."""
    B, L, _, D = qkv.shape
    split = [num_heads, num_kv_heads, num_kv_heads]
    over_cache = cache is not None and mask is not None and mask.shape[-1] == cache[0].shape[2] != L
    if use_triton(qkv):
        if over_cache and L == 1 and flash_decoding_fits(cache[0]):
            # One token: RoPE, the cache write and attention in two kernels.
            newest = slots.reshape(-1).expand(B) if slots.numel() == 1 else slots.reshape(B)
            out = kernels.decode_attention(qkv, *rope, *cache, mask.reshape(B, -1), newest, num_heads, tuning)
            return out.view(B, 1, -1)
        # One kernel rotates q/k in place and writes k/v into the cache.
        kernels.rope_(qkv, *rope, num_heads, num_kv_heads, cache, slots)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(split, dim=2))
    else:
        q, k, v = (t.transpose(1, 2) for t in qkv.split(split, dim=2))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            write_cache_(cache, slots, k, v)
    if over_cache:
        k, v = cache
        if L == 1:
            return grouped_decode_attention(q, k, v, mask).view(B, 1, -1)
    out = sdpa(q, k, v, mask, is_causal=mask is None, enable_gqa=num_kv_heads != num_heads)
    return out.transpose(1, 2).reshape(B, L, -1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, never through cuDNN's fused attention on the GPU: cuDNN builds an execution
    plan for every new sequence length (50-100 ms each on an H200: a spoken sentence's flow decoder took 370 ms with
    it and 220 ms without, and 160 ms either way for a length seen before), and prompts, sentences, audio clips and
    images all come in new lengths. Flash and memory-efficient attention have no such cost. The switch is
    process-wide (torch's backend switches are global), so it is simply turned off on the first GPU call."""
    if q.is_cuda and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa)


def write_cache_(cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Write k, v [B, kv_heads, L, D] into the cache at `slots` [L] (all rows) or [B, L] (per row)."""
    if slots.dim() == 1:
        cache[0].index_copy_(2, slots, k)
        cache[1].index_copy_(2, slots, v)
        return
    index = slots[:, None, :, None].expand_as(k)
    cache[0].scatter_(2, index, k)
    cache[1].scatter_(2, index, v)


def flash_decoding_fits(keys: torch.Tensor) -> bool:
    """The flash-decoding kernel's shapes: a whole (contiguous) power-of-two cache and a power-of-two head dim of at
    least 16."""
    S, D = keys.shape[2], keys.shape[3]
    return keys.is_contiguous() and S & (S - 1) == 0 and D >= 16 and D & (D - 1) == 0


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """One query per row [B, heads, 1, D] over the whole cache. The query heads of a KV group attend together, so
    each cached key and value is read once (no repeated KV heads), which is what a memory-bound step wants."""
    B, heads, _, D = q.shape
    kv_heads = keys.shape[1]
    q = q.view(B, kv_heads, heads // kv_heads, D)
    scores = (q @ keys.transpose(-1, -2)).float() / D**0.5  # [B, kv, groups, S]
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    out = scores.softmax(dim=-1).to(q.dtype) @ values  # [B, kv, groups, D]
    return out.view(B, heads, D)


# ------------------------------------------------------------------------------------------------- CUDA graphs
MIN_BUCKET = 1024
T = TypeVar("T")


class OrderedLock:
    """A reentrant lock that waiting threads get in order: earliest `deadline` first (`hold(deadline)`), and first
    come, first served for `with lock:`. Python's own locks promise no order, and a loop that releases one and takes
    it again at once can starve a thread that waits for it."""

    def __init__(self):
        self._changed = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._waiting: list[tuple[float, int]] = []  # a heap of (deadline, ticket)
        self._tickets = itertools.count()

    def acquire(self, deadline: float | None = None) -> None:
        me = threading.get_ident()
        with self._changed:
            if self._owner != me:
                entry = (time.monotonic() if deadline is None else deadline, next(self._tickets))
                heapq.heappush(self._waiting, entry)
                while self._owner is not None or self._waiting[0] != entry:
                    self._changed.wait()
                heapq.heappop(self._waiting)
                self._owner = me
            self._depth += 1

    def release(self) -> None:
        with self._changed:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._changed.notify_all()

    @contextlib.contextmanager
    def hold(self, deadline: float | None = None):
        self.acquire(deadline)
        try:
            yield
        finally:
            self.release()

    def __enter__(self) -> "OrderedLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# Held while a graph is captured. A capture fails if another thread launches work meanwhile, so threads that share
# the GPU with captures made at run time (the decode loops of the thinker and the talker beside the flow decoder of
# several replies) hold it around their GPU work too. First come, first served: the loops take it again at once.
CAPTURE_LOCK = OrderedLock()


def graphs_allowed(device: torch.device | str) -> bool:
    """CUDA graphs on this device, unless MING_CUDA_GRAPHS=0."""
    return torch.device(device).type == "cuda" and os.environ.get("MING_CUDA_GRAPHS", "1") != "0"


def cache_bucket(slots: int) -> int:
    """The power-of-two cache size, at least MIN_BUCKET, that holds `slots`: the GPU kernels read caches in
    power-of-two chunks, and a few sizes let captured steps be reused across requests."""
    return max(MIN_BUCKET, 1 << (slots - 1).bit_length())


class CapturedStep(Generic[T]):
    """`step()`, a function of fixed buffers, replayed from a CUDA graph where graphs are allowed: one launch
    instead of hundreds of kernel launches from Python, which is what bounds small-batch decoding otherwise.
    (ZeroGPU forbids torch.compile at run time; CUDA graphs are fine.) Elsewhere it simply calls `step`.

    Warm-up and capture run on one side stream, so that buffers the kernels keep per stream exist before the
    capture. `warmups=0` when the caller has just run the step eagerly itself."""

    def __init__(self, step: Callable[[], T], device: torch.device | str, warmups: int = 2):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: T | None = None
        if not graphs_allowed(device):
            return
        with CAPTURE_LOCK:
            try:
                self._capture(step, device, warmups)
            except RuntimeError as error:  # e.g. cudaErrorStreamCaptureInvalidated by another thread's GPU work
                # A failed capture leaves the device usable: run this step eagerly rather than fail the request.
                warnings.warn(f"CUDA graph capture failed, running the step eagerly: {error}".splitlines()[0],
                              RuntimeWarning, stacklevel=2)
                self.graph, self.output = None, None
                torch.cuda.synchronize(device)

    def _capture(self, step: Callable[[], T], device: torch.device | str, warmups: int) -> None:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):  # lets kernels pick their algorithms and allocate workspaces
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's work (a visitor's speech while the decode loop captures a new batch size,
        # say) must not invalidate this capture; the capture itself only ever records this thread's launches.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.output = step()

    def __call__(self) -> T:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.output
