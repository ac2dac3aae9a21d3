"""Where a batch-1 decode step of the full-size model spends its GPU time, and which kernel blocks are fastest.

    python -m bench.profile_decode
    python -m bench.profile_decode --chains   # only the chains of 3. below

1. Tunes the decode kernels on full-size shapes, each replayed from a CUDA graph (so launch cost is out): the
   Triton GEMV against cuBLAS for the attention and head projections, the attention's chunk (the MoE kernels:
   `python -m bench.moe --tune`).
2. Decode tokens/s of the CUDA-graph step, then a per-kernel profile of eager steps.
3. Pieces of the step chained over 28 full-size layers (random weights, each layer its own, so L2 never holds
   them), each chain replayed from a CUDA graph: with overlapped launches a kernel's time alone says little, the
   time of a chain what it costs in the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench import RELEASE_CONFIG, decode_rate, fill_random_, text_prompt
from ming import kernels
from ming.layers import rope_cos_sin
from ming.modeling import MingOmni

# (BLOCK_N, BLOCK_K, warps). A BLOCK_K of the whole input row (2,048) requests a program's whole slice at once.
BLOCK_CANDIDATES = [(1, 2048, 4), (2, 2048, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 2048, 8), (8, 128, 2),
                    (8, 256, 2), (8, 256, 4), (8, 1024, 8), (16, 128, 2), (16, 256, 4), (32, 128, 4), (32, 256, 8)]


def bench_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return 1000 * do_bench_cudagraph(fn, rep=100)


def tune_gemv() -> None:
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    norm_weight = torch.ones(2048, **bf16)
    x = torch.randn(1, 2048, **bf16)
    for name, n, with_norm, out_dtype in (("qkv", 3072, True, None), ("dense", 2048, False, None), ("head", 126464, True, torch.float32)):
        w = torch.randn(n, 2048, **bf16) / 45
        gigabytes = w.numel() * 2 / 1e9

        norm = (norm_weight, 1e-6) if with_norm else None

        def torch_ops(w=w, norm=norm, out_dtype=out_dtype):
            h = kernels.rms_norm(x, *norm) if norm else x
            y = torch.nn.functional.linear(h, w)
            return y.float() if out_dtype else y

        us = bench_us(torch_ops)
        print(f"{name} cuBLAS{' + norm' if with_norm else ''}: {us:.1f} us, {gigabytes / us * 1e6:.0f} GB/s")
        for blocks in BLOCK_CANDIDATES:
            if n // blocks[0] > 65535:  # the grid's second dimension
                continue
            tuning = dataclasses.replace(kernels.DEFAULT_TUNING, gemv_blocks=blocks)
            us = bench_us(functools.partial(kernels.gemv, x, w, norm, out_dtype, tuning=tuning))
            print(f"{name} triton gemv {blocks}: {us:.1f} us, {gigabytes / us * 1e6:.0f} GB/s")


def tune_attention() -> None:
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    qkv = torch.randn(1, 1, 24, 128, **bf16)
    k_cache, v_cache = torch.randn(2, 1, 4, 2048, 128, **bf16)
    valid = torch.zeros(1, 2048, dtype=torch.bool, device="cuda")
    valid[:, :1300] = True
    newest = torch.tensor([1299], device="cuda")
    cos, sin = rope_cos_sin(newest[:, None], 128, 600000.0)
    for chunk in (32, 64, 128):
        tuning = dataclasses.replace(kernels.DEFAULT_TUNING, decode_attention_chunk=chunk)
        us = bench_us(lambda: kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, valid, newest, 16, tuning))
        print(f"decode attention, 1,300 of 2,048 keys, chunk {chunk}: {us:.1f} us")


def decode_rate_with(model: MingOmni, **settings) -> float:
    """Median decode tok/s (3 runs after a warm-up) with some `KernelTuning` fields changed."""
    model.set_kernel_tuning(dataclasses.replace(kernels.DEFAULT_TUNING, **settings))
    decode_rate(model)
    rates = [decode_rate(model) for _ in range(3)]
    model.set_kernel_tuning(kernels.DEFAULT_TUNING)
    rate = statistics.median(rates)
    print(f"decode (CUDA graph) {settings or 'defaults'}: {rate:.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    return rate


def profile_eager_steps(model: MingOmni, steps: int = 10) -> None:
    os.environ["MING_CUDA_GRAPHS"] = "0"
    stream = model.generate_stream(input_ids=text_prompt(1024), max_new_tokens=64)
    for _ in range(8):
        next(stream)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            next(stream)
        torch.cuda.synchronize()
    os.environ.pop("MING_CUDA_GRAPHS")
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"per step: {total / steps / 1000:.2f} ms of GPU time in {count / steps:.0f} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / steps / 1000:8.3f} ms {e.count // steps:5d}x  {e.key[:110]}")


def time_layer_chains(context: int = 1100) -> None:
    """Batch-1 step pieces over 28 layers, in us per step and per layer (see the module docstring, 3.)."""
    layers_n, hidden, experts, width, top_k = 28, 2048, 64, 1408, 6

    def weight(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5

    def layer() -> dict:
        return dict(qkv=weight(3072, hidden), dense=weight(hidden, hidden),
                    norm=torch.ones(hidden, device="cuda", dtype=torch.bfloat16), router=weight(experts, hidden),
                    gate=weight(experts, width, hidden), up=weight(experts, width, hidden),
                    down=weight(experts, hidden, width),
                    shared=(weight(2 * width, hidden), weight(2 * width, hidden), weight(hidden, 2 * width)),
                    cache=(weight(1, 4, 4096, 128), weight(1, 4, 4096, 128)))

    layers = [layer() for _ in range(layers_n)]
    head = weight(126464, hidden)
    x0 = weight(1, hidden)
    newest = torch.tensor([context], device="cuda")
    valid = (torch.arange(4096, device="cuda") <= context)[None]
    cos, sin = rope_cos_sin(newest[:, None], 128, 600000.0)
    chosen = torch.tensor([[3, 17, 22, 40, 51, 63]], device="cuda")
    chosen_weight = torch.full((1, top_k), 1 / top_k, device="cuda")

    def attention_half(p, x, attend=True):
        qkv = kernels.gemv(x, p["qkv"], (p["norm"], 1e-6))
        if not attend:  # the projections alone: the attention's output replaced by the query
            return kernels.gemv(qkv[:, :hidden], p["dense"])
        out = kernels.decode_attention(qkv.view(1, 1, 24, 128), cos, sin, *p["cache"], valid, newest, 16)
        return kernels.gemv(out.view(1, hidden), p["dense"])

    def route(p, x, delta, shared=False):
        return kernels.add_norm_route(x, delta, p["norm"], 1e-6, p["router"], top_k, True,
                                      p["shared"][:2] if shared else None, width)

    def chain(piece):
        def step():
            x = x0
            for p in layers:
                if piece == "MoE alone":
                    x = kernels.moe_one_row(x, chosen, chosen_weight, p["gate"], p["up"], p["down"], p["shared"], x)
                    continue
                delta = attention_half(p, x, attend=piece != "QKV, output projection, routing")
                if piece == "QKV, attention, output projection":
                    x = delta
                    continue
                x, h, idx, w, swiglu = route(p, x, delta, shared=piece == "whole step")
                if piece == "whole step":
                    x = kernels.moe_one_row(h, idx, w, p["gate"], p["up"], p["down"], p["shared"], x, swiglu=swiglu)
            if piece == "whole step":
                kernels.gemv(x, head, (layers[0]["norm"], 1e-6), out_dtype=torch.float32)
        return step

    print(f"batch-1 step pieces, 28 full-size layers, {context:,}-token context ({torch.cuda.get_device_name()}):")
    for piece in ("whole step", "QKV, attention, output projection", "QKV, attention, output projection, routing",
                  "QKV, output projection, routing", "MoE alone"):
        us = bench_us(chain(piece))
        print(f"{us:8.1f} us a step {us / layers_n:6.1f} us a layer  {piece}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--try", dest="variants", action="append", default=[], metavar="JSON",
                        help='kernel settings to time end to end besides the defaults, e.g. {"sorted_moe_blocks": [16, 64, 64, 4, 4]}')
    parser.add_argument("--chains", action="store_true", help="only time the chains of step pieces")
    args = parser.parse_args()
    if args.chains:
        time_layer_chains()
        return
    tune_gemv()
    tune_attention()
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    decode_rate_with(model)
    for variant in args.variants:
        decode_rate_with(model, **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(variant).items()})
    profile_eager_steps(model)


if __name__ == "__main__":
    main()
