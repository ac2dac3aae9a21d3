"""The MoE block alone, full-size shapes, at each decode batch size: which kernel path is fastest, and how close each
comes to reading its weights at the card's copy bandwidth.

    python -m bench.moe [--tune] [--batches 1 2 ...]

Paths: "sorted" (`kernels.moe_sorted`, rows sorted by expert: the decode path from 2 rows), "one_row"
(`kernels.moe_one_row`, no sort, two launches: the decode path at 1 row) and "grouped" (the prompt path: grouped
GEMMs for the routed experts, cuBLAS for the shared one). (A per-row GEMV path, `moe_gemv`, measured here
on 2026-11-29 at 45/78/139/246/459 us for 1/2/4/8/16 rows against the sorted path's 43/64/117/166/223, was removed.) Each is replayed from a
CUDA graph, so launch cost from Python is out. Bytes: the distinct experts the routing chose, the shared expert.
--tune also tries block shapes of the sorted kernels and, at 1 row, of the one-row kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from bench.bench import copy_bandwidth
from bench.profile_decode import bench_us
from ming import kernels
from ming.configs import LLMConfig
from ming.llm import SparseMoeBlock

BATCHES = (1, 2, 4, 8, 16, 32, 64)
SORTED_BLOCKS = [(16, 64, 128, 4, 3), (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 128, 128, 4, 3), (16, 32, 128, 2, 4),
                 (16, 64, 256, 4, 3), (16, 128, 128, 8, 3), (32, 64, 128, 4, 3)]
# moe_one_row's (gate/up, down) blocks, each (BLOCK_N, BLOCK_K, warps): the default's neighbours, one kernel at a time
_GATE_UP, _DOWN = kernels.DEFAULT_TUNING.one_row_moe_blocks
ONE_ROW_BLOCKS = [(gate_up, _DOWN) for gate_up in ((8, 128, 2), (8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4),
                                                   (4, 512, 4))]
ONE_ROW_BLOCKS += [(_GATE_UP, down) for down in ((2, 128, 4), (2, 256, 4), (4, 64, 2), (4, 256, 4), (8, 128, 4),
                                                 (8, 64, 4), (4, 128, 8))]


def random_block(device: torch.device) -> SparseMoeBlock:
    block = SparseMoeBlock(LLMConfig())
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return block.to(device, torch.bfloat16)


def paths(block: SparseMoeBlock, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
          tuning: kernels.KernelTuning) -> dict:
    e, s = block.experts, block.shared_experts
    shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
    args = (x, idx, weight, e.gate_proj, e.up_proj, e.down_proj, shared, residual)
    out = {
        "sorted": lambda: kernels.moe_sorted(*args, tuning=tuning),
        "grouped": lambda: e(x, idx, weight) + s(x[None])[0] + residual,  # Experts: grouped GEMMs on sm90+
    }
    if x.shape[0] == 1:
        out["one_row"] = lambda: kernels.moe_one_row(*args, tuning=tuning)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="rows per step to time")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    block = random_block(device)
    config = LLMConfig()
    H, I = config.hidden_size, config.moe_intermediate_size
    expert_bytes, shared_bytes = 3 * H * I * 2, 3 * H * I * config.num_shared_experts * 2
    bandwidth = copy_bandwidth()
    card = torch.cuda.get_device_name()
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, H, device=device, dtype=torch.bfloat16)
        residual = torch.randn_like(x)
        weight, idx = torch.randn(batch, config.num_experts, device=device).softmax(-1).topk(config.num_experts_per_tok)
        weight = weight / weight.sum(-1, keepdim=True)
        gigabytes = (idx.unique().numel() * expert_bytes + shared_bytes) / 1e9
        row = {"batch": batch, "distinct_experts": idx.unique().numel(), "gigabytes": gigabytes}
        for name, fn in paths(block, x, idx, weight, residual, kernels.DEFAULT_TUNING).items():
            row[f"{name}_us"] = bench_us(fn)
        if args.tune:
            for blocks in SORTED_BLOCKS:
                tuning = dataclasses.replace(kernels.DEFAULT_TUNING, sorted_moe_blocks=blocks)
                row[f"sorted{blocks}_us"] = bench_us(paths(block, x, idx, weight, residual, tuning)["sorted"])
            for blocks in ONE_ROW_BLOCKS if batch == 1 else ():
                tuning = dataclasses.replace(kernels.DEFAULT_TUNING, one_row_moe_blocks=blocks)
                row[f"one_row{blocks}_us"] = bench_us(paths(block, x, idx, weight, residual, tuning)["one_row"])
        best = min((k for k in row if k.endswith("_us")), key=row.get)
        row["best"], row["best_of_copy_bandwidth"] = best, gigabytes / row[best] * 1e6 / (bandwidth / 1e9)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    stamp = time.strftime("%Y-%m-%d")
    name = os.path.join(args.out, f"{stamp}_{card.replace(' ', '_')}_moe")
    with open(name + ".json", "w") as f:
        json.dump({"card": card, "copy_bandwidth_tbps": bandwidth / 1e12, "rows": rows}, f, indent=1)
    lines = [f"# The MoE block alone by batch size: {card}, {stamp}", "",
             f"Full-size shapes (E=64, top-6, I=1408, shared 2816, H=2048), bf16, CUDA-graph replays; copy bandwidth "
             f"{bandwidth / 1e12:.2f} TB/s. `python -m bench.moe`.", "",
             "| rows | distinct experts | GB read | sorted us | one-row us | grouped us | best | best of copy bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda k: f"{r[k]:.0f}" if k in r else "-"
        lines.append(f"| {r['batch']} | {r['distinct_experts']} | {r['gigabytes']:.3f} | "
                     f"{cell('sorted_us')} | {cell('one_row_us')} | {cell('grouped_us')} | {r['best'][:-3]} | {100 * r['best_of_copy_bandwidth']:.0f}% |")
    with open(name + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
