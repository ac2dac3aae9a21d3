"""What the first requests after a start cost: Triton compiling the decode kernels and CUDA-graph capture.

    TRITON_CACHE_DIR=$(mktemp -d) python -m bench.coldstart

Full-size model, random bf16 weights. Times three text requests of different prompt lengths (16 new tokens each) in
a fresh process with an empty kernel cache, then the same in a second process that finds the first one's compiled
kernels on disk (what a new ZeroGPU worker of a running Space sees). A new prompt length must not compile anything.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from bench.bench import RELEASE_CONFIG, fill_random_, text_prompt
from ming.modeling import MingOmni


def timed_requests() -> None:
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    torch.cuda.synchronize()
    for length in (300, 517, 1200):
        t0 = time.perf_counter()
        tokens = list(model.generate_stream(input_ids=text_prompt(length), max_new_tokens=16))
        torch.cuda.synchronize()
        print(f"  {length}-token prompt, {len(tokens)} new tokens: {time.perf_counter() - t0:.2f} s", flush=True)


def main() -> None:
    if "--child" in sys.argv:
        timed_requests()
        return
    for label in ("empty kernel cache", "kernels cached on disk by the run above"):
        print(label, flush=True)
        subprocess.run([sys.executable, "-m", "bench.coldstart", "--child"], check=True)


if __name__ == "__main__":
    main()
