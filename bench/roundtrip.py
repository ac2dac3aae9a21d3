"""Full-size checkpoint round trip on a GPU: random bf16 weights -> save in the release's layout -> reload -> the
same greedy tokens. Prints timings and peak GPU memory.

    python -m bench.roundtrip --dir /tmp/ming-full
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from bench.bench import RELEASE_CONFIG, fill_random_, text_prompt
from ming.modeling import MingOmni


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/ming-full")
    args = parser.parse_args()
    prompt = text_prompt(64)
    report = {"card": torch.cuda.get_device_name()}

    t0 = time.perf_counter()
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    report["build_s"] = time.perf_counter() - t0
    before = model.generate(input_ids=prompt, max_new_tokens=16)

    t0 = time.perf_counter()
    model.save_pretrained(args.dir)
    report["save_s"] = time.perf_counter() - t0
    report["checkpoint_gb"] = sum(
        os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors")
    ) / 1e9
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    model = MingOmni.from_pretrained(args.dir, dtype=torch.bfloat16, device="cuda")
    report["load_s"] = time.perf_counter() - t0
    report["load_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    after = model.generate(input_ids=prompt, max_new_tokens=16)
    report["generate_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["same_tokens"] = bool(torch.equal(before, after))
    report["tokens"] = after[0].tolist()
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)
    assert report["same_tokens"], "tokens changed across save/load"


if __name__ == "__main__":
    main()
