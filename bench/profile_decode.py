"""Where a batch-1 decode step of the full-size model spends its GPU time (eager, one kernel per op).

    python -m bench.profile_decode
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench import RELEASE_CONFIG, fill_random_, text_prompt
from ming.modeling import MingOmni


def tune_expert_kernels() -> None:
    """Time the decode experts kernels on full-size shapes for a few block shapes (prints GB/s of weights read)."""
    from triton.testing import do_bench

    from ming import kernels

    E, I, H, k = 64, 1408, 2048, 6
    w = [torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    w_down = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16)
    shared = (torch.randn(2 * I, H, device="cuda", dtype=torch.bfloat16),) * 2 + (
        torch.randn(H, 2 * I, device="cuda", dtype=torch.bfloat16),
    )
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(E, device="cuda")[:k][None]
    weight = torch.full((1, k), 1 / k, device="cuda")
    gigabytes = (3 * k * I * H + 3 * 2 * I * H) * 2 / 1e9
    for blocks in [(32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8), (16, 256, 2)]:
        kernels.GATE_UP_BLOCKS = kernels.DOWN_BLOCKS = blocks
        ms = do_bench(lambda: kernels.moe_gemv(x, idx, weight, w[0], w[1], w_down, shared), warmup=20, rep=200)
        print(f"experts GEMV blocks {blocks}: {1000 * ms:.1f} us, {gigabytes / ms * 1000:.0f} GB/s")


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
