"""Where a batch-1 decode step of the full-size model spends its GPU time (eager, one kernel per op).

    python -m bench.profile_decode
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench import RELEASE_CONFIG, fill_random_, text_prompt
from ming.modeling import MingOmni


def main() -> None:
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
