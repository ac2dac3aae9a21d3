"""Hours-long video on the Preview's released weights, training-free: sample, drop redundant visual tokens, encode
and prefill in chunks into a KV cache of fixed size, and keep that cache as a prefix for every question.

    prompt = processor.video_prompt(messages)                       # head / video / tail / continuation
    video = encode_video(model, processor, prompt, LongVideoSettings(), progress=callback)
    ... prefill prompt.continuation_ids from video.prefix, then decode ...

Steps, per chunk of `chunk_pairs` frame pairs (one LLM token = one 28x28 pixel block of a frame pair):
  1. Frames are read at the times `ming.media.long_video_timestamps` picks, seeking through the file, on a
     background thread while the model works on the chunk before. Clips up to `short_clip_seconds` are read
     exactly as the short-video path reads them (same frames, same pixels).
  2. Dropping (the pixel criterion of TimeChat-Online's Differential Token Drop, arXiv 2504.17343): a token whose
     pixel block changed by less than `drop_threshold` (mean |difference| / 255) since the frame pair before is
     left out. The first pair is always kept; tau = 0 keeps every token. It depends on pixels only, never on
     weights.
  3. The ViT encodes only the pairs that keep a token, a chunk at a time. This is exact: its attention never
     crosses a frame pair, so a chunk's features equal the same rows of a one-shot encoding.
  4. The kept features are prefilled after the tokens before them (contiguous 1-D positions) into a
     `ming.kv_budget.BudgetedPrefill`, which evicts per layer and KV head once the visual budget is reached.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .generation import CachePrefix
from .kv_budget import MAX_POSITIONS, BudgetedPrefill
from .llm import IMAGE, TEXT
from .media import (
    DEMO_MAX_FRAMES,
    LONG_VIDEO_MAX_FRAMES,
    VIDEO_FPS,
    VIDEO_FRAME_FACTOR,
    DecodeStats,
    ProgressFn,
    plan_long_video,
    read_frames_at,
    video_duration,
)
from .processor import MingProcessor, VideoPrompt, video_processor_size

CELL = 28  # pixels per side of the block one LLM token covers (14-pixel patches merged 2 x 2)


@dataclass
class LongVideoSettings:
    """How a video becomes a cache prefix. Defaults are for an hours-long video on one GPU."""

    visual_budget: int | None = 24_576  # visual tokens kept in the cache; None = never evict
    drop_threshold: float = 0.02  # tau: mean |pixel difference| / 255 below which a token is dropped; 0 = keep all
    chunk_pairs: int = 16  # frame pairs per ViT call and per prefill chunk
    max_frames: int = LONG_VIDEO_MAX_FRAMES  # frames sampled from a long video at most
    short_clip_seconds: float = DEMO_MAX_FRAMES / VIDEO_FPS  # up to this long: today's short-video sampling
    prefetch_chunks: int = 2  # chunks of frames decoded ahead on a background thread


@dataclass
class LongVideoStats:
    """What happened to a video on its way into the cache (token counts and where the time went)."""

    duration: float = 0.0
    path: str = "long"  # "short" (today's sampling) or "long" (seeking, sparser sampling)
    frames: int = 0
    pairs: int = 0
    tokens_per_pair: int = 0
    visual_tokens: int = 0  # before dropping
    after_drop: int = 0
    kept: int = 0  # visual tokens in the final cache
    evicted: int = 0
    cache_slots: int = 0  # the prefix's length (= next position)
    peak_slots: int = 0
    decoded_frames: int = 0
    seeks: int = 0
    # Wall seconds: decode_wait (waiting for frames; decoding itself overlaps the model), vit, prefill (with the
    # evictions in it), evict, total.
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class EncodedVideo:
    prefix: CachePrefix
    stats: LongVideoStats


# ------------------------------------------------------------------------------------------------ token dropping

def cell_changes(pairs: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference / 255 of each 28x28 block between two runs of frame pairs.

    pairs, before: uint8 [P, 2, H, W, 3] -> float32 [P, H / 28, W / 28]. Both frames of a pair count (the token
    covers both), as do all three channels."""
    p, _, height, width, _ = pairs.shape
    diff = np.abs(pairs.astype(np.int16) - before.astype(np.int16)).astype(np.float32)
    diff = diff.reshape(p, 2, height // CELL, CELL, width // CELL, CELL, 3)
    return diff.mean(axis=(1, 3, 5, 6)) / 255.0


class TokenDropper:
    """Keep masks for the frame pairs of a video, fed chunk by chunk (it remembers the last pair it saw).

    A token is kept when its block changed by at least `threshold` since the previous pair; every token of the
    first pair is kept. The kept set only shrinks as the threshold grows, and it never depends on the model. A
    scene that drifts by less than the threshold per pair is not followed (the comparison is with the previous
    pair, as DTD's): at 1-2 s per pair that is a nearly still scene."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError("the drop threshold must be >= 0")
        self.threshold = threshold
        self.last: np.ndarray | None = None  # the previous pair, [1, 2, H, W, 3]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [2P, H, W, 3] (the next P pairs) -> keep mask bool [P, H / 28, W / 28]."""
        pairs = frames.reshape(-1, VIDEO_FRAME_FACTOR, *frames.shape[1:])
        grid = (pairs.shape[0], frames.shape[1] // CELL, frames.shape[2] // CELL)
        if self.threshold == 0:
            keep = np.ones(grid, dtype=bool)
        elif self.last is None:
            keep = np.ones(grid, dtype=bool)
            keep[1:] = cell_changes(pairs[1:], pairs[:-1]) >= self.threshold
        else:
            keep = cell_changes(pairs, np.concatenate([self.last, pairs[:-1]])) >= self.threshold
        self.last = pairs[-1:]
        return keep


# ------------------------------------------------------------------------------------------------ pipeline

def encode_video(
    model,
    processor: MingProcessor,
    prompt: VideoPrompt,
    settings: LongVideoSettings | None = None,
    progress: ProgressFn | None = None,
    gpu_lock: contextlib.AbstractContextManager | None = None,
) -> EncodedVideo:
    """A video and the text around it (`prompt.head_ids`, `prompt.tail_ids`) -> a reusable cache prefix.

    `model` is a `MingOmni`. `progress(fraction, stage)` is called as the work advances, stage one of "sampling",
    "encoding", "prefill"; an exception it raises ends the encoding there (how a Stop button works). `gpu_lock`, when
    given, is held around each piece of model work (a chunk's ViT call, each prefill piece) and released between
    them, so other threads sharing the GPU (a decode loop, CUDA-graph captures) interleave with a long encoding.
    With `visual_budget=None` and `drop_threshold=0` the prefix holds exactly what one-shot prefill of the
    processor's prompt would (the same tokens at the same positions)."""
    settings = settings or LongVideoSettings()
    stats = LongVideoStats()
    started = time.perf_counter()
    stats.duration = video_duration(prompt.video)
    decode_stats = DecodeStats()
    if stats.duration <= settings.short_clip_seconds:
        stats.path = "short"
        frames = processor.video_frames(prompt.video, max_frames=prompt.max_frames or DEMO_MAX_FRAMES)
        frame_source: Iterable[np.ndarray] = frames
        num_frames, (height, width) = frames.shape[0], frames.shape[1:3]
    else:
        plan = plan_long_video(prompt.video, min(settings.max_frames, prompt.max_frames or settings.max_frames))
        height, width = video_processor_size(plan.height, plan.width)
        frame_source = read_frames_at(prompt.video, plan.timestamps, (height, width), stats=decode_stats)
        num_frames = len(plan.timestamps)
    video = encode_frames(model, processor, prompt.head_ids, prompt.tail_ids, frame_source, num_frames,
                          (height, width), settings, progress, stats, gpu_lock)
    stats.decoded_frames, stats.seeks = decode_stats.decoded, decode_stats.seeks
    stats.seconds["total"] = time.perf_counter() - started
    return video


def encode_frames(
    model,
    processor: MingProcessor,
    head_ids: torch.Tensor,
    tail_ids: torch.Tensor,
    frames: Iterable[np.ndarray],
    num_frames: int,
    size: tuple[int, int],
    settings: LongVideoSettings | None = None,
    progress: ProgressFn | None = None,
    stats: LongVideoStats | None = None,
    gpu_lock: contextlib.AbstractContextManager | None = None,
) -> EncodedVideo:
    """`encode_video` from frames already sampled: uint8 [H, W, 3] each, `size` = (H, W) (multiples of 28),
    `num_frames` of them (even), iterated once (a generator is fine: it runs on a background thread)."""
    settings = settings or LongVideoSettings()
    stats = stats or LongVideoStats()
    guard = gpu_lock if gpu_lock is not None else contextlib.nullcontext()
    llm, device = model.model, model.device
    timer = _timer(stats.seconds, device)
    height, width = size
    pairs_total = num_frames // VIDEO_FRAME_FACTOR
    cells = (height // CELL) * (width // CELL)
    stats.frames, stats.pairs, stats.tokens_per_pair = num_frames, pairs_total, cells
    stats.visual_tokens = pairs_total * cells

    head, tail = head_ids.to(device), tail_ids.to(device)
    visual_room = stats.visual_tokens if settings.visual_budget is None else min(settings.visual_budget,
                                                                                stats.visual_tokens)
    capacity = head.shape[1] + visual_room + tail.shape[1]
    if capacity > MAX_POSITIONS:
        raise ValueError(f"{capacity} cache slots would pass the model's {MAX_POSITIONS} positions; "
                         "set a visual budget")
    with guard:
        state = BudgetedPrefill(llm, capacity, settings.visual_budget)
    embed = llm.model.word_embeddings
    with torch.no_grad():
        with guard:
            state.append(embed(head), torch.full_like(head, TEXT))
        dropper = TokenDropper(settings.drop_threshold)
        chunk_frames = settings.chunk_pairs * VIDEO_FRAME_FACTOR
        piece = max(1, settings.visual_budget // 4) if settings.visual_budget else stats.visual_tokens or 1
        done_pairs = 0
        if progress is not None:
            progress(0.0, "sampling")
        # The pixel comparison runs with the decoding, on the prefetch thread (numpy releases the GIL).
        chunks = ((chunk, dropper(chunk)) for chunk in _batches(frames, chunk_frames))
        for chunk, keep in _prefetch(chunks, settings.prefetch_chunks, timer):
            count = chunk.shape[0] // VIDEO_FRAME_FACTOR
            step = lambda stage, part: progress((done_pairs + part * count) / pairs_total, stage)  # noqa: E731
            if progress is not None:
                step("sampling", 1 / 3)
            keep = keep.reshape(count, cells)
            with guard, timer("vit"):
                embeds, pair_ids, cell_ids = _encode_kept(model, processor, chunk, keep, done_pairs)
            if progress is not None:
                step("encoding", 2 / 3)
            stats.after_drop += embeds.shape[0]
            with timer("prefill"):
                # Evicting for a piece much bigger than a fraction of the budget would throw away most of the
                # older video at once; pieces of a quarter of the budget keep eviction gradual.
                for start in range(0, embeds.shape[0], piece):
                    end = start + piece
                    with guard:
                        state.append(embeds[None, start:end],
                                     torch.full((1, embeds[start:end].shape[0]), IMAGE, device=device),
                                     (pair_ids[start:end], cell_ids[start:end]))
            done_pairs += count
            if progress is not None:
                step("prefill", 0.0)
        with guard, timer("prefill"):
            state.append(embed(tail), torch.full_like(tail, TEXT))
    stats.seconds["evict"] = state.evict_seconds
    prefix = state.prefix()
    stats.kept, stats.evicted, stats.cache_slots, stats.peak_slots = (state.visual_kept, state.evicted,
                                                                      prefix.length, state.peak)
    return EncodedVideo(prefix, stats)


def _encode_kept(model, processor: MingProcessor, frames: np.ndarray, keep: np.ndarray, first_pair: int):
    """ViT features [n_kept, H] of the kept tokens of one chunk, with their pair and cell ids [n_kept] each.
    Pairs that keep no token are not encoded at all (their features would be thrown away)."""
    device = model.device
    used = np.flatnonzero(keep.any(axis=1))
    if used.size == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return torch.empty(0, model.config.llm_config.hidden_size, device=device, dtype=model.dtype), empty, empty
    pairs = frames.reshape(-1, VIDEO_FRAME_FACTOR, *frames.shape[1:])[used]
    patches, grid = processor.frames_to_patches(pairs.reshape(-1, *frames.shape[1:]))
    features = model.encode_images(patches, torch.tensor([grid]))  # [len(used) * cells, H]
    mask = torch.from_numpy(keep[used].reshape(-1)).to(device)
    pair_of = torch.from_numpy(first_pair + used).to(device).repeat_interleave(keep.shape[1])
    cell_of = torch.arange(keep.shape[1], device=device).repeat(used.size)
    return features[mask], pair_of[mask], cell_of[mask]


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch[: len(batch) // VIDEO_FRAME_FACTOR * VIDEO_FRAME_FACTOR])


def _prefetch(items: Iterator, depth: int, timer: Callable) -> Iterator:
    """Run `items` on a background thread, `depth` items ahead (decoding and scaling release the GIL, so reading
    the next chunk overlaps the model's work on this one). Time spent waiting for it goes to "decode_wait"."""
    if depth <= 0:
        while True:
            with timer("decode_wait"):
                item = next(items, None)
            if item is None:
                return
            yield item
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            slots.put(error)

    thread = threading.Thread(target=work, name="video-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with timer("decode_wait"):
                item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _timer(totals: dict[str, float], device: torch.device) -> Callable[[str], contextlib.AbstractContextManager]:
    """`with timer(stage):` adds the block's wall seconds to totals[stage]. On CUDA it synchronises at both ends,
    so the GPU work of a stage is counted in that stage."""
    cuda = device.type == "cuda"

    @contextlib.contextmanager
    def timed(stage: str) -> Iterator[None]:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start

    return timed
