"""Speed and memory of the full-size Ming-Lite-Omni-Preview on one GPU, with random bf16 weights.

Random weights cost exactly what the real ones cost (same shapes, same kernels; routing is spread over all experts
as in a trained model), so the figures hold for the real checkpoint. Run on a GPU machine:

    python -m bench.bench --out bench/results [--reference-results ref.json]

It prints one table (our figure, the reference implementation's where given, the ratio, and decode as a share of
the memory-bandwidth roofline) and writes it, with the raw numbers, under --out, named after the card and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from ming.audio import AudioFrontend
from ming.configs import RELEASE_CONFIG, MingConfig
from ming.llm import expert_active_parameters
from ming.loading import release_targets
from ming.modeling import MingOmni
from ming.testing.weights import seeded_generator

PATCH, HUMAN, ASSISTANT = 126346, 126340, 126341  # <imagePatch>; <role>/</role> stand in for the chat markup
AUDIO_PATCH = 126357


def fill_random_(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights per release key (the same key gets the same tensor in any implementation)."""
    with torch.no_grad():
        for key, (param, index) in release_targets(model).items():
            dest = param if index is None else param[index]
            g = seeded_generator(key, seed, dest.device)
            if key.endswith("norm.weight") or "layernorm" in key or key.endswith(("norm1.weight", "norm2.weight")):
                dest.fill_(1.0)
            elif key.endswith("bias"):
                dest.zero_()
            else:
                fan_in = dest[0].numel() if dest.dim() > 1 else dest.numel()
                dest.normal_(0.0, fan_in**-0.5, generator=g)


def cuda_time(fn: Callable[[], object], warmup: int = 2, runs: int = 5) -> tuple[float, float]:
    """Median wall time in seconds (synchronised) and the peak memory in GiB over the timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds, _ = cuda_time(lambda: dst.copy_(src), warmup=3, runs=10)
    return 2 * n / seconds


def decode_bytes(config: MingConfig, context: int) -> int:
    """Bytes one batch-1 decode step must read: active weights, the output head, and the KV cache."""
    llm = config.llm_config
    weights = expert_active_parameters(llm) + llm.vocab_size * llm.hidden_size
    kv = llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.attention_head_dim * context
    return 2 * (weights + kv)


def text_prompt(n: int) -> torch.Tensor:
    body = torch.randint(1000, 100000, (n - 3,), generator=torch.Generator().manual_seed(n))
    return torch.cat([torch.tensor([HUMAN]), body, torch.tensor([ASSISTANT, HUMAN])])[None]


def media_prompt(token: int, count: int, text: int = 24) -> torch.Tensor:
    ids = text_prompt(text)[0]
    return torch.cat([ids[:4], torch.full((count,), token), ids[4:]])[None]


def first_token(model: MingOmni, inputs: dict) -> Callable[[], int]:
    def run() -> int:
        return next(model.generate_stream(**inputs, max_new_tokens=1))

    return run


def decode_rate(model: MingOmni, tokens: int = 256) -> float:
    """Decode tokens per second at batch 1: `tokens` new tokens after a 1,024-token text prompt (prefill not
    counted)."""
    stream = model.generate_stream(input_ids=text_prompt(1024), max_new_tokens=tokens + 1)
    next(stream)  # the first token comes from the prefill
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = sum(1 for _ in stream)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reference-results", help="JSON of the reference implementation's figures, same keys")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--talker", default="0.5b", choices=["0.5b", "1.5b", "none"], help="assumed talker size")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True

    config = MingConfig.from_file(RELEASE_CONFIG)
    card = torch.cuda.get_device_name()
    model = MingOmni.from_config(config, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    model.model.normalize_head_()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    results: dict[str, float] = {"weights_gib": weights_gib}

    bandwidth = copy_bandwidth()
    results["copy_bandwidth_tbps"] = bandwidth / 1e12
    step_bytes = decode_bytes(config, context=1024 + args.decode_tokens)
    results["decode_bytes_gb"] = step_bytes / 1e9
    results["roofline_tok_s"] = bandwidth / step_bytes

    # Time to first token: prefill (with the encoders) plus one sampled token.
    cases = {}
    cases["ttft_text_1000"] = {"input_ids": text_prompt(1000)}
    cases["ttft_image_1024"] = {
        "input_ids": media_prompt(PATCH, 1024),
        "pixel_values": torch.randn(4096, 1176),
        "image_grid_thw": torch.tensor([[1, 64, 64]]),
    }
    grid = (32, 34, 34)  # 64 frames at the per-frame pixel cap for 64 frames: 9,248 visual tokens
    cases["ttft_video_64f"] = {
        "input_ids": media_prompt(PATCH, grid[0] * grid[1] * grid[2] // 4),
        "pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], 1176),
        "video_grid_thw": torch.tensor([grid]),
    }
    for name, inputs in cases.items():
        seconds, peak = cuda_time(first_token(model, inputs))
        results[name + "_ms"], results[name + "_peak_gib"] = 1000 * seconds, peak

    # 30 s of audio, from the waveform: fbank + LFR + CMVN frontend, SANM encoder, projector, prefill.
    frontend = AudioFrontend(shift=torch.zeros(560), scale=torch.ones(560))
    waveform = 0.1 * torch.randn(30 * 16000, generator=torch.Generator().manual_seed(0))

    def audio_inputs(waveform: torch.Tensor) -> dict:
        feats = frontend(waveform)
        n = feats.shape[0]
        return {
            "input_ids": media_prompt(AUDIO_PATCH, n),
            "audio_feats": feats[None],
            "audio_feats_lengths": torch.tensor([[n]]),
            "audio_placeholder_loc_lens": torch.tensor([[[4, n]]]),
        }

    ms, peak = cuda_time(lambda: first_token(model, audio_inputs(waveform))())
    results["ttft_audio_30s_ms"], results["ttft_audio_30s_peak_gib"] = 1000 * ms, peak

    # Decode at batch 1: tokens per second over N new tokens after a 1,024-token prompt.
    decode_rate(model, args.decode_tokens)  # warm-up (captures the CUDA graph)
    torch.cuda.reset_peak_memory_stats()
    rates = [decode_rate(model, args.decode_tokens) for _ in range(3)]
    results["decode_tok_s"] = statistics.median(rates)
    results["decode_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["decode_pct_roofline"] = 100 * results["decode_tok_s"] / results["roofline_tok_s"]

    if args.talker != "none":
        from bench.speech import measure_speech

        results.update(measure_speech(model, audio_inputs, cases["ttft_image_1024"], args.talker))

    reference = {}
    if args.reference_results and os.path.exists(args.reference_results):
        with open(args.reference_results, encoding="utf-8") as f:
            reference = json.load(f)
    write_report(results, reference, card, args.out)


def write_report(results: dict, reference: dict, card: str, out_dir: str, date: str | None = None) -> None:
    # (title, key, kind): "rate" is better higher; "time" and "memory" are better lower.
    rows = [
        ("Decode, batch 1, 256 new tokens (tok/s)", "decode_tok_s", "rate"),
        ("Time to first token, 1,000-token text (ms)", "ttft_text_1000_ms", "time"),
        ("Time to first token, 1,024-visual-token image (ms)", "ttft_image_1024_ms", "time"),
        ("Time to first token, 30 s audio (ms)", "ttft_audio_30s_ms", "time"),
        ("Time to first token, 64-frame video (ms)", "ttft_video_64f_ms", "time"),
        ("Speech-to-speech: first audio chunk from the request (ms)", "speech_first_chunk_ms", "time"),
        ("- of which: thinker until the first sentence piece (ms)", "speech_first_chunk_thinker_ms", "time"),
        ("- of which: talker, first piece (ms)", "speech_first_chunk_talker_ms", "time"),
        ("- of which: flow decoder + vocoder, first piece (ms)", "speech_first_chunk_detokenizer_ms", "time"),
        ("Speech: real-time factor, talker + decoder + vocoder", "speech_rtf", "time"),
        ("Speech-to-speech: real-time factor of the whole turn", "speech_turn_rtf", "time"),
        ("Peak GPU memory, decode (GiB)", "decode_peak_gib", "memory"),
        ("Peak GPU memory, image question (GiB)", "ttft_image_1024_peak_gib", "memory"),
        ("Peak GPU memory, video question (GiB)", "ttft_video_64f_peak_gib", "memory"),
        ("Peak GPU memory, 30 s audio (GiB)", "ttft_audio_30s_peak_gib", "memory"),
        ("Peak GPU memory, speech-to-speech turn (GiB)", "speech_peak_gib", "memory"),
        ("Peak GPU memory, image chat with a spoken reply (GiB)", "image_speech_peak_gib", "memory"),
    ]
    date = date or datetime.date.today().isoformat()
    lines = [
        f"# Ming-Lite-Omni-Preview, full size, random bf16 weights: {card}, {date}",
        "",
        f"Copy bandwidth {results['copy_bandwidth_tbps']:.2f} TB/s; one decode step reads "
        f"{results['decode_bytes_gb']:.2f} GB; roofline {results['roofline_tok_s']:.0f} tok/s; "
        f"weights {results['weights_gib']:.1f} GiB."
        + (f" Talker timed at {results['speech_talker_size_b']}B parameters (its real size is not public)."
           if "speech_talker_size_b" in results else ""),
        "",
        "| case | ours | reference | vs. reference | % of roofline |",
        "|---|---|---|---|---|",
    ]
    for title, key, kind in rows:
        if key not in results:
            continue
        ours = results[key]
        ref = reference.get(key)
        ratio = ""
        if ref:
            ratio = {
                "rate": f"{ours / ref:.1f}x faster",
                "time": f"{ref / ours:.1f}x faster",
                "memory": f"{ours / ref:.2f}x the memory",
            }[kind]
        pct = f"{results['decode_pct_roofline']:.0f}%" if key == "decode_tok_s" else ""
        lines.append(f"| {title} | {ours:.2f} | {'' if ref is None else f'{ref:.2f}'} | {ratio} | {pct} |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{date}_{card.replace(' ', '_')}"
    with open(os.path.join(out_dir, stem + ".md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
        json.dump({"card": card, "date": date, "ours": results, "reference": reference}, f, indent=2)


if __name__ == "__main__":
    main()
