"""Where a batch-1 decode step of the full-size model spends its GPU time (eager, one kernel per op).

    python -m bench.profile_decode
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from bench.bench import RELEASE_CONFIG, fill_random_, text_prompt
from ming.modeling import MingOmni


def tune_expert_kernels() -> None:
    """Time the decode experts kernels (replayed from a CUDA graph, so launch cost is out) on full-size shapes for
    a few block shapes, gate/up and down separately; prints the GB/s of weights read."""
    from triton.testing import do_bench_cudagraph

    from ming import kernels

    E, I, H, k = 64, 1408, 2048, 6
    w_gate, w_up = (torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w_down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    experts = torch.randperm(E, device="cuda")[:k]
    weights = torch.full((k,), 1 / k, device="cuda")
    h = torch.randn(k, I, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, k, H, device="cuda")
    candidates = [(8, 256, 2), (16, 256, 4), (32, 256, 8), (32, 128, 4), (64, 128, 8), (16, 512, 8), (64, 64, 4), (128, 64, 8)]
    for part, gigabytes in (("gate_up", 2 * k * I * H * 2 / 1e9), ("down", k * I * H * 2 / 1e9)):
        for bn, bk, warps in candidates:
            if part == "gate_up":
                fn = functools.partial(
                    kernels._gate_up_kernel[(k, triton.cdiv(I, bn))], x, w_gate, w_up, experts, h,
                    K=H, N=I, TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                )
            else:
                fn = functools.partial(
                    kernels._down_kernel[(k, triton.cdiv(H, bn))], h, w_down, experts, weights, out,
                    K=I, N=H, TOP_K=k, OUT_GROUP=k, OUT_OFFSET=0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                )
            ms = do_bench_cudagraph(fn, rep=100)
            print(f"{part} blocks {(bn, bk, warps)}: {1000 * ms:.1f} us, {gigabytes / ms * 1000:.0f} GB/s")


def main() -> None:
    tune_expert_kernels()
    os.environ["MING_CUDA_GRAPHS"] = "0"
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    stream = model.generate_stream(input_ids=text_prompt(1024), max_new_tokens=64)
    for _ in range(8):
        next(stream)
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            next(stream)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    kernels = sum(e.count for e in events)
    print(f"per step: {total / steps / 1000:.2f} ms of GPU time in {kernels / steps:.0f} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / steps / 1000:8.3f} ms {e.count // steps:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
