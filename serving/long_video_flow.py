"""Long videos in the Space: a video longer than a short clip is sampled, thinned and compressed into a cache prefix
once (`ming.long_video.encode_video`), kept per session, and every question about it prefills only its own tokens.

    for event in answer(session, turns, system_prompt, sampling):   # VideoStatus while the video is prepared,
        ...                                                          # then engine.Chunk text (and speech) deltas

  * `run_video_job` is the GPU work of one request: encoding (when the video is not cached yet) and the answer in
    one `@spaces.GPU` task, whose duration comes from the video's length. The prefix leaves the task compact, on
    the host (pinned) unless this is a dedicated GPU with room for it in `CACHE`'s GPU share; on ZeroGPU and on
    the CPU it always lives in host memory between tasks.
  * `CACHE` keeps at most `PER_SESSION` videos per session and `HOST_CACHE_BYTES` in host memory over all sessions
    (least recently used first out); a session's entries go when it ends (`free_session`) or after an hour unused.
  * The Stop button's event (`engine.stop_session`) stops the encoding at its next chunk and the answer at its
    next token; a stopped encoding is not cached.

No Gradio here: app.py shows `VideoStatus` as a progress bar or a status line and `UserError` as a message.
"""

from __future__ import annotations

import spaces  # before torch: on ZeroGPU it must patch CUDA before anything touches it

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ming.generation import CachePrefix
from ming.layers import CAPTURE_LOCK
from ming.long_video import LongVideoSettings, LongVideoStats, encode_video
from ming.media import MediaError, long_video_fps, long_video_timestamps, plan_long_video, video_duration
from ming.processor import VideoPrompt
from ming.sampling import SamplingConfig

from .checks import MAX_GPU_SECONDS, format_duration
from .conversation import Turn, kept_media, prompt_messages
from .engine import (COLD_START_SECONDS, Chunk, get_engine, gpu_failures_as_messages, out_of_memory_error,
                     segment_chunks)
from .errors import UserError

log = logging.getLogger("serving.long_video")

SETTINGS = LongVideoSettings()  # the Space's settings (tests swap in smaller ones)
PER_SESSION = 2  # videos kept per session
IDLE_SECONDS = 3600.0  # a cached video unused this long is dropped
GIB = 1 << 30
HOST_CACHE_BYTES = int(float(os.environ.get("MING_VIDEO_CACHE_GIB", "8")) * GIB)  # all sessions together
GPU_CACHE_BYTES = int(float(os.environ.get("MING_VIDEO_GPU_CACHE_GIB", "4")) * GIB)  # dedicated GPU only
ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
# ZeroGPU time asked per sampled frame when a video is encoded: reading, ViT, prefill and eviction. bench/long_video.py
# measured 43.7 s for 1 h of 720p (3,600 frames; frame decoding on the CPU bounds it) on a whole H200; this asks for
# about twice that (90 s), for half an H200 and a Space's fewer CPU cores. Not measured on ZeroGPU itself.
ENCODE_SECONDS_PER_FRAME = 0.025
ENCODE_SLOT = threading.Semaphore(1)  # one video encoded at a time in this process (memory stays bounded)
STAGES = {"sampling": "Sampling frames", "encoding": "Encoding frames",
          "prefill": "Compressing the video into the model's memory"}


# ============================================================================================================ events
@dataclass
class VideoStatus:
    """How far the preparation of a long video has come: shown as a progress bar or a status line."""

    stage: str  # "preparing", "sampling", "encoding", "prefill" (compression), "ready"
    fraction: float  # of the whole preparation, 0..1
    message: str  # a line for the visitor
    notice: str = ""  # worth a short pop-up (once per video)

    @property
    def line(self) -> str:
        """The message with the percentage, for a status line."""
        if self.stage in STAGES:
            return f"{self.message}… {self.fraction:.0%}"
        return self.message


@dataclass
class Encoded:
    """The video is in memory: its prefix (compact, on its home device) and what happened on the way."""

    prefix: CachePrefix
    stats: LongVideoStats


class EncodingStopped(Exception):
    """The visitor pressed Stop (or left) while the video was being encoded."""


# ============================================================================================================= cache
@dataclass
class CachedVideo:
    session: str
    key: tuple
    name: str  # the file's name, for messages
    prefix: CachePrefix = field(repr=False)
    stats: LongVideoStats = field(repr=False)
    nbytes: int = 0
    last_used: float = 0.0

    @property
    def on_gpu(self) -> bool:
        return self.prefix.keys[0].device.type == "cuda"


def prefix_bytes(prefix: CachePrefix) -> int:
    return sum(t.numel() * t.element_size() for t in (*prefix.keys, *prefix.values))


class VideoCache:
    """Compressed videos by (session, key), least recently used first. Bounded three ways: `per_session` videos per
    session, `host_bytes` of prefixes in host memory over all sessions, `gpu_bytes` of prefixes kept on the GPU
    (the least recently used move to the host first). Entries unused for `idle_seconds` are dropped."""

    def __init__(self, per_session: int = PER_SESSION, host_bytes: int = HOST_CACHE_BYTES,
                 gpu_bytes: int = GPU_CACHE_BYTES, idle_seconds: float = IDLE_SECONDS):
        self.per_session, self.host_limit, self.gpu_limit, self.idle_seconds = (per_session, host_bytes, gpu_bytes,
                                                                                idle_seconds)
        self.entries: OrderedDict[tuple[str, tuple], CachedVideo] = OrderedDict()
        self.lock = threading.Lock()

    # ---- reading
    def get(self, session: str, key: tuple) -> CachedVideo | None:
        with self.lock:
            self._expire()
            entry = self.entries.get((session, key))
            if entry is not None:
                entry.last_used = time.monotonic()
                self.entries.move_to_end((session, key))
            return entry

    def session_entries(self, session: str) -> list[CachedVideo]:
        """This session's videos, most recently used last."""
        with self.lock:
            return [e for (s, _), e in self.entries.items() if s == session]

    @property
    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if not e.on_gpu)

    @property
    def gpu_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values() if e.on_gpu)

    def gpu_room(self, nbytes: int) -> bool:
        """Whether a prefix of `nbytes` may stay on the GPU (older GPU entries would move to the host to make
        room): only on a dedicated GPU, and only within the GPU share."""
        return not ZERO_GPU and nbytes <= self.gpu_limit

    # ---- writing
    def put(self, session: str, key: tuple, name: str, prefix: CachePrefix, stats: LongVideoStats) -> CachedVideo | None:
        """Keep a prefix (already compact, on its home device), evicting as the bounds say. None when it alone is
        larger than the host share (it is then not kept)."""
        entry = CachedVideo(session, key, name, prefix, stats, prefix_bytes(prefix), time.monotonic())
        if entry.nbytes > self.host_limit and not (entry.on_gpu and entry.nbytes <= self.gpu_limit):
            log.warning("video cache: %s (%d MiB) is larger than the cache's share; not kept", name,
                        entry.nbytes >> 20)
            return None
        with self.lock:
            self._expire()
            self.entries.pop((session, key), None)
            self.entries[(session, key)] = entry
            mine = [k for k in self.entries if k[0] == session]
            for k in mine[: max(0, len(mine) - self.per_session)]:
                del self.entries[k]
            gpu = [k for k, e in self.entries.items() if e.on_gpu]
            while gpu and sum(self.entries[k].nbytes for k in gpu) > self.gpu_limit:
                oldest = self.entries[gpu.pop(0)]
                oldest.prefix = oldest.prefix.to("cpu")
            while self.entries and self.host_bytes > self.host_limit:
                oldest = next(k for k, e in self.entries.items() if not e.on_gpu)
                log.info("video cache: host share full, dropping %s of session %s", self.entries[oldest].name,
                         oldest[0][:8])
                del self.entries[oldest]
            return self.entries.get((session, key))

    def free_session(self, session: str) -> int:
        """Drop a session's videos (it ended); returns how many went."""
        with self.lock:
            gone = [k for k in self.entries if k[0] == session]
            for k in gone:
                del self.entries[k]
            return len(gone)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, e in self.entries.items() if now - e.last_used > self.idle_seconds]:
            del self.entries[k]


CACHE = VideoCache()


def free_session(session: str) -> None:
    """The session ended (page closed, or its state expired): its videos leave memory."""
    if session and CACHE.free_session(session):
        log.info("video cache: freed session %s", session[:8])


@dataclass
class VideoSession:
    """A handle app.py keeps in a session's state, so the session's videos are freed when Gradio deletes it."""

    session: str

    def close(self) -> None:
        free_session(self.session)


# ========================================================================================================= the job
_DIGESTS: OrderedDict[tuple, str] = OrderedDict()
_DIGEST_LOCK = threading.Lock()


def file_digest(path: str) -> str:
    """BLAKE2 of the file's bytes (read in 4 MiB pieces; remembered per path, size and mtime)."""
    status = os.stat(path)
    memo = (os.path.realpath(path), status.st_size, status.st_mtime_ns)
    with _DIGEST_LOCK:
        if memo in _DIGESTS:
            _DIGESTS.move_to_end(memo)
            return _DIGESTS[memo]
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while piece := f.read(4 << 20):
            digest.update(piece)
    with _DIGEST_LOCK:
        _DIGESTS[memo] = digest.hexdigest()
        while len(_DIGESTS) > 512:
            _DIGESTS.popitem(last=False)
    return _DIGESTS[memo]


def cache_key(video: str, head_ids: torch.Tensor, settings: LongVideoSettings) -> tuple:
    """A cached prefix serves any prompt with the same video file, the same text before it and the same settings."""
    return file_digest(video), tuple(head_ids.reshape(-1).tolist()), dataclasses.astuple(settings)


@dataclass
class VideoJob:
    """One request's GPU work, all picklable (ZeroGPU sends it to a worker process)."""

    session: str
    prompt: VideoPrompt
    settings: LongVideoSettings
    sampling: SamplingConfig
    duration: float  # seconds of video
    frames: int  # frames the encoding samples
    prefix: CachePrefix | None = None  # the video already in memory: then only the answer runs
    voice: str | torch.Tensor | None = None  # speak the answer with this voice (a name or an embedding)
    keep_on_gpu: bool = False  # the new prefix stays on the GPU (a dedicated GPU with room for it)

    @property
    def gpu_seconds(self) -> int:
        """What to ask ZeroGPU for: the answer as `engine.Job` counts it, plus, when the video is new, a share per
        sampled frame (ENCODE_SECONDS_PER_FRAME), capped at what a free visitor may ask for."""
        per_token = 0.02 + (0.08 if self.voice is not None else 0.0)
        seconds = 10 + self.prompt.continuation_ids.shape[1] / 1000 + self.sampling.max_new_tokens * per_token
        if self.prefix is None:
            seconds += 5 + self.frames * ENCODE_SECONDS_PER_FRAME
        return int(min(max(seconds, 15), MAX_GPU_SECONDS))


def _video_job_seconds(job: VideoJob) -> int:
    engine = get_engine()
    cold = engine.gpu_jobs_done == 0
    return min(job.gpu_seconds + (COLD_START_SECONDS if cold else 0), MAX_GPU_SECONDS)


def compact(prefix: CachePrefix, device: torch.device | str) -> CachePrefix:
    """The prefix as its own tensors of exactly its length on `device` (the encoder's are views of its whole
    fixed-size cache), pinned in host memory when a GPU will read it back."""
    device = torch.device(device)
    if device.type == "cpu" and prefix.keys[0].device.type != "cpu":
        return prefix.to("cpu")  # copies, pinned where CUDA is
    own = lambda t: t.to(device, copy=True, memory_format=torch.contiguous_format)  # noqa: E731
    return CachePrefix([own(k) for k in prefix.keys], [own(v) for v in prefix.values], prefix.next_position)


def _encode(engine, job: VideoJob, stop: threading.Event) -> Iterator[VideoStatus | Encoded]:
    """Encode on a worker thread (encode_video reports progress through a callback; this generator turns it into
    events). Stop, or closing this generator, ends the encoding at its next chunk."""
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    finished = object()

    def progress(fraction: float, stage: str) -> None:
        if stop.is_set() or cancelled.is_set():
            raise EncodingStopped
        now = stage_now(stage, fraction)
        events.put(VideoStatus(now, float(fraction), STAGES[now]))

    def work() -> None:
        try:
            video = encode_video(engine.model, engine.processor, job.prompt, job.settings, progress,
                                 gpu_lock=gpu_lock(engine))
            home = engine.device if job.keep_on_gpu else torch.device("cpu")
            events.put(Encoded(compact(video.prefix, home), video.stats))
        except EncodingStopped:
            pass
        except BaseException as error:  # handed to the consumer, which raises it
            events.put(error)
        finally:
            events.put(finished)

    thread = threading.Thread(target=work, name="video-encode", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        thread.join()


def stage_now(finished: str, fraction: float) -> str:
    """encode_video reports each stage of a chunk when it is done ("sampling": the chunk's frames are read,
    "encoding": its ViT features are made, "prefill": it is in the cache); the visitor sees what runs next."""
    if finished == "sampling" and fraction == 0:
        return "sampling"  # the start: the first frames are being read
    if fraction >= 1:
        return "prefill"  # the last chunk is in; the text after the video follows
    return {"sampling": "encoding", "encoding": "prefill", "prefill": "sampling"}.get(finished, "sampling")


def gpu_lock(engine):
    """On a GPU, the model's work is done in pieces under `CAPTURE_LOCK`, as the scheduler's decode loop does, so a
    CUDA-graph capture in another thread never sees our kernels and the loop interleaves with a long encoding."""
    return CAPTURE_LOCK if engine.device.type == "cuda" else contextlib.nullcontext()


def locked_tokens(stream: Iterator[int], lock) -> Iterator[int]:
    """Each decode step of `stream` under `lock`."""
    while True:
        with lock:
            token = next(stream, None)
        if token is None:
            return
        yield token


def count_job(engine, delta: int) -> None:
    if hasattr(engine, "count_job"):  # the scheduler's engine counts under its lock
        engine.count_job(delta)
    else:
        engine.active_jobs += delta
        engine.peak_active_jobs = max(engine.peak_active_jobs, engine.active_jobs)


def encode_and_answer(job: VideoJob) -> Iterator[VideoStatus | Encoded | Chunk]:
    """The GPU work of one request: encode the video unless the job brings its prefix, then answer from it."""
    engine = get_engine()
    stop = engine.stop_events.setdefault(job.session, threading.Event())
    count_job(engine, +1)
    try:
        prefix = job.prefix
        if prefix is None:
            if not ENCODE_SLOT.acquire(blocking=False):
                yield VideoStatus("waiting", 0.0, "Waiting for another visitor's video to finish encoding")
                while not ENCODE_SLOT.acquire(timeout=0.2):
                    if stop.is_set():
                        yield Chunk(segment_done=True, finish_reason="stopped")
                        return
            try:
                for event in _encode(engine, job, stop):
                    if isinstance(event, Encoded):
                        prefix = event.prefix
                    yield event
            finally:
                ENCODE_SLOT.release()
        if prefix is None or stop.is_set():
            yield Chunk(segment_done=True, finish_reason="stopped")
            return
        lock = gpu_lock(engine)
        with lock:
            stream = engine.model.generate_stream(job.prompt.continuation_ids.to(engine.device), prefix=prefix,
                                                  **dataclasses.asdict(job.sampling), stop_event=stop)
        # Spoken answers share the speech generator with the scheduler's replies where there is one. The talker
        # hears the continuation's states only (the video is in the prefix): enough to speak the answer, which is
        # what it is conditioned on.
        speech = getattr(engine, "shared_speech", None) or engine.speech
        yield from segment_chunks(engine, stream, locked_tokens(stream, lock), speech, job.voice, stop)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise out_of_memory_error() from None
    finally:
        count_job(engine, -1)


run_video_job = spaces.GPU(duration=_video_job_seconds)(encode_and_answer)


# ========================================================================================================== the flow
def is_long(path: str) -> bool:
    """Longer than a short clip: such a video takes the long path (short clips keep the release's sampling)."""
    try:
        return video_duration(path) > SETTINGS.short_clip_seconds
    except MediaError:
        return False  # the ordinary path reports it


def long_video_in_view(turns: list[Turn]) -> str | None:
    """The long video the model would see in this conversation (the newest visual media), if there is one."""
    for t, i in kept_media(turns):
        kind, path = turns[t].media[i]
        if kind == "video" and is_long(path):
            return path
    return None


def video_messages(turns: list[Turn], system_prompt: str = "") -> list[dict]:
    """The conversation's messages for the long path: the video without the short path's frame cap, and no audio
    (the long path takes one video and text; an older spoken message's clip drops out of view, its text stays)."""
    messages = prompt_messages(turns, system_prompt)
    last = len(messages) - 1
    for index, message in enumerate(messages):
        if not isinstance(message["content"], list):
            continue
        content = []
        for item in message["content"]:
            if item["type"] == "audio":
                if index == last:
                    raise UserError("Ask about a long video in writing: a spoken message and a long video cannot "
                                    "go together in one request. Type your question instead.",
                                    title="Long video and audio")
                continue
            if item["type"] == "video":
                item = {k: v for k, v in item.items() if k != "max_frames"}
            content.append(item)
        message["content"] = content or [{"type": "text", "text": "(a message with media that is no longer shown)"}]
    return messages


def describe_plan(seconds: float, frames: int) -> str:
    return (f"This video is {format_duration(seconds)} long: it is sampled at {long_video_fps(seconds):g} frames "
            f"a second ({frames:,} frames), blocks that do not change are dropped, and the rest is compressed into "
            "the model's memory. That happens once; later questions about it start answering at once.")


def describe_stats(stats: LongVideoStats) -> str:
    rate = stats.frames / stats.duration if stats.duration else 0.0
    return (f"**Video in memory** ({format_duration(stats.duration)}): {stats.frames:,} frames sampled "
            f"({rate:.2g} a second), {stats.visual_tokens:,} visual tokens, {stats.after_drop:,} left after dropping "
            f"blocks that did not change, {stats.kept:,} kept after compression. Ask more questions about it: they "
            "reuse it and start answering at once.")


def describe(session: str, video: str | None) -> str:
    """A status line about this session's cached copy of `video` ("" when it has none)."""
    if not video or not os.path.exists(video):
        return ""
    digest = file_digest(video)
    for entry in reversed(CACHE.session_entries(session)):
        if entry.key[0] == digest:
            return describe_stats(entry.stats)
    return ""


def bytes_per_token(engine) -> int:
    c = engine.model.config.llm_config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.attention_head_dim * engine.model.dtype.itemsize


def answer(session: str, turns: list[Turn], system_prompt: str, sampling: SamplingConfig,
           voice: str | torch.Tensor | None = None) -> Iterator[VideoStatus | Chunk]:
    """Answer the conversation's last turn about its long video: VideoStatus events while the video is prepared
    (none when it is already in this session's memory), then the answer's Chunks."""
    engine = get_engine()
    try:
        prompt = engine.processor.video_prompt(video_messages(turns, system_prompt))
    except MediaError as error:
        raise UserError(str(error), title="Unreadable video") from None
    except ValueError as error:
        raise UserError(str(error)) from None
    name = os.path.basename(str(prompt.video))
    settings = SETTINGS
    key = cache_key(prompt.video, prompt.head_ids, settings)
    entry = CACHE.get(session, key)
    head, tail, rest = (prompt.head_ids.shape[1], prompt.tail_ids.shape[1], prompt.continuation_ids.shape[1])
    if entry is not None:
        prefix_length, seconds, frames = entry.prefix.length, entry.stats.duration, entry.stats.frames
    else:
        try:
            plan = plan_long_video(prompt.video, settings.max_frames)
        except MediaError as error:
            raise UserError(str(error), title="Unreadable video") from None
        seconds, frames = plan.seconds, len(plan.timestamps)
        cells = (plan.height // 28) * (plan.width // 28)  # an upper bound: the processor's size is near this one
        visual = plan.num_pairs * cells
        prefix_length = head + (visual if settings.visual_budget is None else min(settings.visual_budget, visual)) \
            + tail
    context = engine.model.config.llm_config.max_position_embeddings  # decoded on its own, not in a scheduler row
    if prefix_length + rest + sampling.max_new_tokens > context:
        raise UserError(f"The conversation about this video no longer fits the model's context ({context:,} "
                        f"tokens, of which the video takes up to {prefix_length:,}). Press Clear and ask again, or "
                        "lower max new tokens.", title="Conversation too long")
    keep_on_gpu = engine.device.type == "cuda" and CACHE.gpu_room(prefix_length * bytes_per_token(engine))
    job = VideoJob(session, prompt, settings, sampling, seconds, frames, entry.prefix if entry else None, voice,
                   keep_on_gpu)
    engine.stop_events[session] = threading.Event()
    try:
        with gpu_failures_as_messages():
            if entry is None:
                yield VideoStatus("preparing", 0.0, "Preparing the video", notice=describe_plan(seconds, frames))
            for event in run_video_job(job):
                if isinstance(event, Encoded):
                    CACHE.put(session, key, name, event.prefix, event.stats)
                    log.info("long video %s: %s", name, {k: v for k, v in dataclasses.asdict(event.stats).items()
                                                         if k != "seconds"} | {"seconds": {k: round(v, 2) for k, v in
                                                                                          event.stats.seconds.items()}})
                    yield VideoStatus("ready", 1.0, "The video is in memory; answering")
                else:
                    yield event
        engine.gpu_jobs_done += 1
    finally:
        engine.stop_events.pop(session, None)


def frames_for(seconds: float, settings: LongVideoSettings | None = None) -> int:
    """Frames the long path samples from a video of this length."""
    return len(long_video_timestamps(seconds, (settings or SETTINGS).max_frames))
