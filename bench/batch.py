"""Aggregate decode throughput by batch size, with the batch roofline: `python -m bench.batch --out bench/results`.

Full-size architecture from the released config, random bf16 weights. For each batch B (1, 4, 8, 16, 32, 64):
B different 512-token text prompts, prefilled together, then 128 decode steps through `model.generate`'s decoder
(the captured CUDA-graph step); tokens/s counts B tokens a step, prefill excluded. The roofline is the bytes one step
must read at batch B (attention, shared expert, gates, norms and head once; the expected number of distinct routed
experts for B*top_k draws; the KV cache) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from bench.bench import copy_bandwidth, fill_random_
from ming.configs import RELEASE_CONFIG, MingConfig
from ming.layers import DECODE_BATCH, FEW_TOKENS
from ming.modeling import MingOmni

BATCHES = (1, 4, 8, 16, 32, 64)
PROMPT, NEW_TOKENS = 512, 128


def step_bytes(config: MingConfig, batch: int, context: int) -> float:
    """Bytes one decode step reads at `batch` rows, `context` cached tokens each (bf16)."""
    c = config.llm_config
    H, I, hd = c.hidden_size, c.moe_intermediate_size, c.attention_head_dim
    attention = H * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + c.num_attention_heads * hd * H
    shared = 3 * H * I * (c.num_shared_experts or 0)
    expert = 3 * H * I
    # Each row picks top_k distinct experts of E; rows independently: expected distinct = E * (1 - (1 - k/E)^B).
    distinct = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
    per_layer = attention + shared + c.num_experts * H + 2 * H + distinct * expert
    kv = 2 * c.num_key_value_heads * hd * context * batch
    head = c.vocab_size * H
    return 2.0 * (c.num_hidden_layers * (per_layer + kv) + head)


def prompts(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(1000, 100000, (batch, PROMPT), generator=generator)


def decode_throughput(model: MingOmni, batch: int) -> float:
    decoder = model._decoder(prompts(batch), None, {"max_new_tokens": NEW_TOKENS + 1})
    decoder.step()  # the first token comes from the prefill; this step also replays the graph once
    torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 0
    while not decoder.done:
        decoder.step()
        steps += 1
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    bandwidth = copy_bandwidth()
    rows = []
    for batch in BATCHES:
        decode_throughput(model, batch)  # capture the graph for this batch
        rate = max(decode_throughput(model, batch) for _ in range(2))
        roofline = bandwidth / step_bytes(model.config, batch, PROMPT + NEW_TOKENS // 2) * batch
        path = ("GEMV kernels + one-row MoE" if batch == 1 else
                "GEMV kernels + MoE rows sorted by expert" if batch <= FEW_TOKENS else
                "cuBLAS + MoE rows sorted by expert" if batch <= DECODE_BATCH else "prompt path (cuBLAS + grouped GEMM)")
        rows.append({"batch": batch, "tok_s": rate, "per_row_tok_s": rate / batch, "roofline_tok_s": roofline,
                     "of_roofline": rate / roofline, "path": path})
        print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    name = f"{date}_{card.replace(' ', '_')}_batch"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"card": card, "copy_bandwidth_tbps": bandwidth / 1e12, "prompt": PROMPT,
                   "new_tokens": NEW_TOKENS, "rows": rows}, f, indent=2)
    lines = [f"# Decode throughput by batch size: {card}, {date}", "",
             f"Full-size architecture, random bf16 weights, {PROMPT}-token prompts, {NEW_TOKENS} new tokens; copy "
             f"bandwidth {bandwidth / 1e12:.2f} TB/s. `python -m bench.batch`.", "",
             "| batch | aggregate tok/s | per row tok/s | roofline tok/s | of roofline | path |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['tok_s']:.0f} | {r['per_row_tok_s']:.0f} | {r['roofline_tok_s']:.0f} | "
              f"{100 * r['of_roofline']:.0f}% | {r['path']} |" for r in rows]
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
