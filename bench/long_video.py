"""Long video on one GPU: the release's frame cap, dense 1 fps, and ours (token dropping + a fixed-budget KV cache).

Full-size architecture from the released config.json with random bf16 weights (`bench.bench.fill_random_`): costs
are the real model's, answers are noise, so no accuracy is reported. Synthetic 720p videos (10 min, 1 h, 2 h) are
drawn procedurally at the sampled times and sizes, in memory (scenes of a textured background with a moving
sprite, cut every 30 s); decoding is timed separately on a small encoded 720p file and projected to each length.

    python -m bench.long_video --out bench/results            # on a GPU machine
    python -m bench.long_video --tiny --out /tmp/lv_smoke     # CPU smoke test on the tiny architecture

Arms:
  * release: 64 and 128 frames (the release demo's and processor's caps), one-shot prefill;
  * dense: 1 fps one-shot prefill at the minimum frame size, for growing lengths, until it fails (the position
    limit, or out of memory);
  * ours at two visual budgets, and ours without token dropping (tau = 0), at each length.
Per run: tokens at each stage, peak GPU memory, time split into decode / ViT / prefill (+ eviction), a follow-up
question's time to first token (prefix on the GPU, and coming back from pinned host memory), and decode tok/s on
the compressed cache vs a text-only prompt of the same length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections.abc import Iterator

import av
import numpy as np
import torch

from bench.bench import PATCH, fill_random_, media_prompt, text_prompt
from ming.configs import RELEASE_CONFIG, MingConfig
from ming.long_video import LongVideoSettings, encode_frames
from ming.media import (
    DEMO_MAX_FRAMES,
    PROCESSOR_MAX_FRAMES,
    DecodeStats,
    long_video_timestamps,
    read_frames_at,
    video_frame_size,
)
from ming.modeling import MingOmni
from ming.processor import MingProcessor, video_processor_size
from ming.testing.tiny import tiny_config
from ming.testing.tokenizer import write_tiny_tokenizer

SOURCE = (720, 1280)  # height, width of the synthetic videos
SCENE_SECONDS = 30.0
QUESTION = "What happens in this video?"


# ------------------------------------------------------------------------------------------------- synthetic video

def scene_frame(seconds: float, size: tuple[int, int]) -> np.ndarray:
    """The frame at `seconds`: a per-scene texture with a 1/8-height sprite moving across it."""
    height, width = size
    scene = int(seconds // SCENE_SECONDS)
    rng = np.random.default_rng(scene)
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    frame = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)[:height, :width].copy()
    side = max(8, height // 8)
    x = int((seconds * 40) % max(1, width - side))
    y = int(height / 2 + height / 4 * np.sin(seconds / 3)) - side // 2
    frame[max(0, y):y + side, x:x + side] = (255, 255, 255)
    return frame


def synthetic_frames(seconds: float, max_frames: int, source=SOURCE) -> tuple[int, tuple[int, int], Iterator]:
    times = long_video_timestamps(seconds, max_frames)
    size = video_processor_size(*video_frame_size(*source, len(times)))
    return len(times), size, (scene_frame(t, size) for t in times)


def write_encoded_video(path: str, seconds: float, fps: int, size=SOURCE, gop: int = 50) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(gop), "preset": "ultrafast"})
        stream.height, stream.width, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.thread_type = "AUTO"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(scene_frame(i / fps, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------- helpers

class Meter:
    """Wall time and peak memory of a block (memory only on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Meter":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30 if self.cuda else None


def video_prompt(processor: MingProcessor):
    messages = [{"role": "HUMAN", "content": [{"type": "video", "video": "synthetic"},
                                              {"type": "text", "text": QUESTION}]}]
    return processor.video_prompt(messages)


def decode_rate(model: MingOmni, tokens: int, **inputs) -> float:
    """Tokens per second of greedy decoding after the prompt (or prefix + prompt) is prefilled."""
    stream = model.generate_stream(max_new_tokens=tokens + 1, **inputs)
    next(stream, None)
    sync(model)
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    sync(model)
    return count / (time.perf_counter() - start) if count else float("nan")


def sync(model: MingOmni) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def first_token_seconds(model: MingOmni, **inputs) -> float:
    sync(model)
    start = time.perf_counter()
    next(model.generate_stream(max_new_tokens=1, **inputs), None)
    sync(model)
    return time.perf_counter() - start


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------- arms

def one_shot(model: MingOmni, frames: int, seconds: float) -> dict:
    """The release's path: all frames' patches through the ViT at once and one prefill (random pixels: the cost
    does not depend on them). `frames` is the sampled count; their size follows the release's pixel budget."""
    height, width = video_processor_size(*video_frame_size(*SOURCE, frames))
    grid = (frames // 2, height // 14, width // 14)
    tokens = grid[0] * grid[1] * grid[2] // 4
    row = {"seconds": seconds, "frames": frames, "visual_tokens": tokens}
    inputs = {"input_ids": media_prompt(PATCH, tokens), "video_grid_thw": torch.tensor([grid]),
              "pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], 1176)}
    try:
        with Meter(model.device) as meter:
            next(model.generate_stream(max_new_tokens=1, **inputs), None)
        row.update(first_token_s=meter.seconds, peak_gib=meter.peak_gib, reserved_gib=meter.reserved_gib)
    except ValueError as error:  # the context check: prompt + new tokens past max_position_embeddings
        row["failed"] = f"position limit ({error})"
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        row["failed"] = "out of memory"
    finally:
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ours(model: MingOmni, processor: MingProcessor, seconds: float, settings: LongVideoSettings, decode_tokens: int,
         decode_fps: dict[float, float]) -> dict:
    prompt = video_prompt(processor)
    num_frames, size, frames = synthetic_frames(seconds, settings.max_frames)
    whole = Meter(model.device).__enter__()  # peak over the encoding and the follow-up questions
    with Meter(model.device) as meter:
        video = encode_frames(model, processor, prompt.head_ids, prompt.tail_ids, frames, num_frames, size, settings)
    stats = video.stats
    row = {"seconds": seconds, "budget": settings.visual_budget, "tau": settings.drop_threshold,
           "frames": stats.frames, "visual_tokens": stats.visual_tokens, "after_drop": stats.after_drop,
           "kept": stats.kept, "evicted": stats.evicted, "cache_slots": stats.cache_slots,
           "max_position": stats.cache_slots - 1, "encode_s": meter.seconds, "peak_gib": meter.peak_gib,
           "reserved_gib": meter.reserved_gib, **{f"{k}_s": v for k, v in stats.seconds.items()}}
    # Real decoding runs on a background thread beside the GPU work; its cost at this length, projected from the
    # encoded sample's frames per second at this sampling rate.
    rate = num_frames / seconds
    per_frame = decode_fps.get(min(decode_fps, key=lambda r: abs(r - rate))) if decode_fps else None
    if per_frame:
        row["decode_projected_s"] = num_frames / per_frame
        row["first_answer_projected_s"] = max(row["decode_projected_s"], meter.seconds)
    question = prompt.continuation_ids
    first_token_seconds(model, input_ids=question, prefix=video.prefix)  # warm-up (captures the decode step)
    row["follow_up_ttft_ms"] = 1000 * first_token_seconds(model, input_ids=question, prefix=video.prefix)
    if model.device.type == "cuda":
        host = video.prefix.to("cpu")
        row["prefix_gib"] = sum(t.nbytes for t in host.keys + host.values) / 2**30
        row["follow_up_from_host_ttft_ms"] = 1000 * first_token_seconds(model, input_ids=question, prefix=host)
        del host
    row["decode_tok_s"] = decode_rate(model, decode_tokens, input_ids=question, prefix=video.prefix)
    whole.__exit__(None, None, None)
    row["peak_with_follow_up_gib"] = whole.peak_gib
    length = video.prefix.length + question.shape[1]
    row["text_decode_tok_s"] = decode_rate(model, decode_tokens, input_ids=text_prompt(length))
    del video
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_decoding(seconds: float, fps: int, size: tuple[int, int], rates: list[float]) -> dict[float, float]:
    """Frames per second of `read_frames_at` (seeking, FFmpeg scaling to the model's size) on an encoded clip, at
    each sampling rate (frames per second of video)."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        path = write_encoded_video(os.path.join(folder, "clip.mp4"), seconds, fps, size)
        for rate in rates:
            count = max(2, int(seconds * rate)) // 2 * 2
            times = long_video_timestamps(seconds, count)
            target = video_processor_size(*video_frame_size(*size, 3600))
            stats = DecodeStats()
            start = time.perf_counter()
            for _ in read_frames_at(path, times, target, stats=stats):
                pass
            out[rate] = len(times) / (time.perf_counter() - start)
    return out


# ------------------------------------------------------------------------------------------------- report

def write_report(results: dict, out_dir: str, card: str) -> str:
    date = datetime.date.today().isoformat()
    stem = f"{date}_{card.replace(' ', '_')}_long_video"
    lines = [f"# Long video, full-size architecture, random weights: {card}, {date}", ""]
    weights = f"Weights {results['weights_gib']:.1f} GiB. " if results.get("weights_gib") else ""
    height, width = results["decode_clip_size"]
    lines += [weights + f"Real decoding ({width}x{height} H.264, seeking + scaling to the model's size): "
              + ", ".join(f"{fps:.2f} frames/s at {rate} fps sampled" for rate, fps in results["decode_fps"].items()),
              ""]
    lines += ["## Release behaviour and dense 1 fps (one-shot prefill)", "",
              "| arm | video | frames | visual tokens | first token (s) | peak GiB | result |", "|---|---|---|---|---|---|---|"]
    for row in results["release"] + results["dense"]:
        lines.append(f"| {row['arm']} | {row['seconds'] / 60:.1f} min | {row['frames']} | {row['visual_tokens']:,} | "
                     f"{_f(row.get('first_token_s'))} | {_f(row.get('peak_gib'))} | {row.get('failed', 'ok')} |")
    lines += ["", "## Ours: token dropping + fixed-budget KV cache", "",
              "| video | budget | tau | tokens (sampled / after drop / kept) | peak GiB (encode / with follow-up) | encode s (ViT / prefill+evict / "
              "evict / decode wait) | projected first answer s | follow-up TTFT ms (GPU / host) | decode tok/s "
              "(video / text, same length) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["ours"]:
        if "failed" in row:
            lines.append(f"| {row['seconds'] / 60:.0f} min | {row['budget']} | {row['tau']} | {row['failed']} |"
                         + " |" * 5)
            continue
        lines.append(
            f"| {row['seconds'] / 60:.0f} min | {row['budget']} | {row['tau']} | {row['visual_tokens']:,} / "
            f"{row['after_drop']:,} / {row['kept']:,} | {_f(row.get('peak_gib'))} / "
            f"{_f(row.get('peak_with_follow_up_gib'))} | {row['encode_s']:.1f} "
            f"({row.get('vit_s', 0):.1f} / {row.get('prefill_s', 0):.1f} / {row.get('evict_s', 0):.2f} / "
            f"{row.get('decode_wait_s', 0):.1f}) | {_f(row.get('first_answer_projected_s'))} | "
            f"{row['follow_up_ttft_ms']:.0f} / {_f(row.get('follow_up_from_host_ttft_ms'), 0)} | "
            f"{row['decode_tok_s']:.0f} / {row['text_decode_tok_s']:.0f} |")
    lines += ["", "Synthetic scenes cut every 30 s with a moving sprite: the share of tokens dropped here says little "
              "about real footage. No accuracy: the weights are random.", ""]
    table = "\n".join(lines)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
        json.dump({"card": card, "date": date, **results}, f, indent=2, default=str)
    return stem


def _f(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny architecture, short videos")
    parser.add_argument("--minutes", type=float, nargs="*", help="video lengths for our arms (default 10 60 120)")
    parser.add_argument("--budgets", type=int, nargs="*", help="visual budgets (default 16384 24576)")
    parser.add_argument("--tau", type=float, default=0.02, help="drop threshold of our main arms")
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        config = tiny_config()
        minutes, budgets = args.minutes or [1.0, 3.0], args.budgets or [600, 1200]
        dense_minutes, release_frames, max_frames = [0.5, 1.0], [8, 16], 240
        decode_clip = (20.0, 10, (180, 320))
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = MingConfig.from_file(RELEASE_CONFIG)
        minutes, budgets = args.minutes or [10.0, 60.0, 120.0], args.budgets or [16384, 24576]
        dense_minutes, release_frames, max_frames = [2.0, 5.0, 8.0, 9.0, 10.0, 20.0, 60.0], [DEMO_MAX_FRAMES,
                                                                                             PROCESSOR_MAX_FRAMES], None
        decode_clip = (60.0, 25, SOURCE)
        torch.backends.cuda.matmul.allow_tf32 = True
    model = MingOmni.from_config(config, device=device, dtype=dtype)
    fill_random_(model)
    model.model.normalize_head_()
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer(folder)  # the release's special-token ids; the vocabulary does not change costs
        processor = MingProcessor.from_pretrained(folder)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU tiny"
    results: dict = {"weights_gib": torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None,
                     "release": [], "dense": [], "ours": []}

    results["decode_fps"] = measure_decoding(*decode_clip, rates=[2.0, 1.0, 0.5])
    results["decode_clip_size"] = decode_clip[2]
    print("decoding:", results["decode_fps"], flush=True)
    for frames in release_frames:
        row = one_shot(model, frames, seconds=frames / 2)
        results["release"].append({"arm": f"release, {frames} frames", **row})
        print(results["release"][-1], flush=True)
    for length in dense_minutes:
        row = one_shot(model, int(length * 60) // 2 * 2, seconds=length * 60)
        results["dense"].append({"arm": "dense 1 fps", **row})
        print(results["dense"][-1], flush=True)
        if "failed" in row:
            break
    arms = [(budget, args.tau) for budget in budgets] + [(max(budgets), 0.0)]
    for length in minutes:
        for budget, tau in arms:
            settings = LongVideoSettings(visual_budget=budget, drop_threshold=tau)
            if max_frames:
                settings.max_frames = max_frames
            try:
                row = ours(model, processor, length * 60, settings, args.decode_tokens, results["decode_fps"])
            except RuntimeError as error:
                if not out_of_memory(error):
                    raise
                row = {"seconds": length * 60, "budget": budget, "tau": tau, "failed": "out of memory"}
            results["ours"].append(row)
            print(row, flush=True)
    print("written:", write_report(results, args.out, card))


if __name__ == "__main__":
    main()
