"""The serving engine: the one Ming model of this process and the only GPU work.

  * the model choice (MING_MODEL / --model; the tiny random checkpoint, built on first use, when there is no GPU or
    the weights cannot be reached) and the one model + processor + speech generator, loaded once when the app
    starts, as ZeroGPU requires (weights are loaded before any request, then moved to the GPU per request);
  * `run_job`, the only GPU work on ZeroGPU: a generator under `@spaces.GPU` whose duration is computed from the
    request, yielding CPU data only (text deltas and int16 audio chunks), and the per-session stop events;
  * on a dedicated GPU (or the CPU), `run_scheduled` instead: the text of every request goes through one
    `Scheduler` (serving/scheduler.py) that decodes all visitors' rows together, and spoken replies share the speech
    generator sentence by sentence (`SharedSpeech`). `MING_SCHEDULER=0/1` forces either path.
"""

from __future__ import annotations

import spaces  # before torch: on ZeroGPU it must patch CUDA before anything touches it

import contextlib
import dataclasses
import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

import ming
from ming import MingOmni, MingProcessor
from ming.loading import DEFAULT_HUB_ID, DEFAULT_REVISION, CheckpointError, resolve_checkpoint
from ming.sampling import SamplingConfig
from ming.speech import SpeechGenerator
from ming.speech.speaker import SpeakerEncoder, SpeakerModelUnavailable, load_speaker_encoder
from ming.testing.tiny import build_tiny_checkpoint, is_tiny_checkpoint

from .errors import UserError
from .scheduler import MAX_ACTIVE, Scheduler, SharedSpeech

log = logging.getLogger("serving.engine")

TINY_BANNER = "tiny random weights: answers are noise; set MING_MODEL for the real model"
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_GPU_SECONDS = 120  # the longest ZeroGPU task a visitor without a PRO account may request


@dataclass
class Engine:
    """The one model instance every tab shares."""

    model: MingOmni = field(repr=False)
    processor: MingProcessor = field(repr=False)
    speech: SpeechGenerator | None = field(repr=False)  # None when the checkpoint has no talker/
    checkpoint: str
    is_tiny: bool
    notice: str  # why this checkpoint was chosen, when that is worth telling the user ("" otherwise)
    device: torch.device
    active_jobs: int = 0  # GPU jobs running right now, and the most ever seen at once (the queue keeps this at 1)
    peak_active_jobs: int = 0
    gpu_jobs_done: int = 0
    stop_events: dict[str, threading.Event] = field(default_factory=dict)  # per session: its Stop button
    speaker_encoder: SpeakerEncoder | None = field(default=None, repr=False)  # CAM++ for voice cloning (CPU)
    speaker_model_problem: str = ""  # why voice cloning is off, when it is
    _scheduler: Scheduler | None = field(default=None, repr=False)  # made on first use (see `scheduler`)
    _shared_speech: SharedSpeech | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching scheduler (dedicated GPU or CPU): made once, with its KV memory budget worked out
        from the memory free after the model loaded, and its decode steps captured before any visitor."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.model, max_active=int(os.environ.get("MING_MAX_ACTIVE", MAX_ACTIVE)))
            return self._scheduler

    @property
    def shared_speech(self) -> SharedSpeech | None:
        """The speech generator for replies spoken at the same time (interleaved a sentence at a time)."""
        with self._lock:
            if self._shared_speech is None and self.speech is not None:
                self._shared_speech = SharedSpeech(self.speech)
            return self._shared_speech

    @property
    def concurrency_limit(self) -> int:
        """How many GPU events Gradio may run at once: as many as the scheduler decodes together; one on ZeroGPU."""
        return self.scheduler.rows if use_scheduler() else 1

    def count_job(self, delta: int) -> None:
        with self._lock:
            self.active_jobs += delta
            self.peak_active_jobs = max(self.peak_active_jobs, self.active_jobs)

    @property
    def voices(self) -> list[str]:
        return list(self.speech.voices) if self.speech is not None else []

    @property
    def max_context(self) -> int:
        """Prompt + new tokens one request may take: the model's context, or a scheduler row's."""
        context = self.model.config.llm_config.max_position_embeddings
        return min(context, self.scheduler.capacity - 1) if use_scheduler() else context

    @property
    def banner(self) -> str:
        lines = []
        if self.is_tiny:
            lines.append(f"**{TINY_BANNER}**")
        if self.notice:
            lines.append(self.notice)
        return "  \n".join(lines)


_ENGINE: Engine | None = None  # the one engine of this process, made by load_engine()


def use_scheduler() -> bool:
    """Continuous batching, unless on ZeroGPU (each request its own GPU task there); MING_SCHEDULER=0/1 decides
    explicitly. Read at each request, so tests can run both paths in one process."""
    forced = os.environ.get("MING_SCHEDULER", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not os.environ.get("SPACES_ZERO_GPU")


def tiny_checkpoint_dir() -> str:
    """The tiny random checkpoint, built on first use into a cache folder keyed by the code that writes it (so a
    change to the tiny layout builds a fresh one instead of loading a stale one)."""
    package = os.path.dirname(os.path.abspath(ming.__file__))
    sources = sorted(glob.glob(os.path.join(package, "testing", "*.py"))) + [os.path.join(package, "configs.py")]
    digest = hashlib.sha1()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(f.read())
    cache = os.environ.get("MING_CACHE_DIR", os.path.join(REPO_DIR, ".cache"))
    folder = os.path.join(cache, f"tiny-{digest.hexdigest()[:12]}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="tiny-building-", dir=cache)
        build_tiny_checkpoint(staging)
        try:
            os.rename(staging, folder)  # atomic: a half-written folder is never seen as a checkpoint
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def choose_checkpoint(requested: str | None) -> tuple[str, bool, str]:
    """(folder, is_tiny, notice) for --model / MING_MODEL. Never raises and never waits on an unreachable hub for
    long: anything that cannot be loaded falls back to the tiny checkpoint, with the reason as the notice."""
    requested = (requested or os.environ.get("MING_MODEL") or "").strip()
    if requested == "tiny":
        return tiny_checkpoint_dir(), True, ""
    if not requested:
        if not torch.cuda.is_available():
            return tiny_checkpoint_dir(), True, "No GPU here, so the demo runs the tiny test checkpoint."
        requested = DEFAULT_HUB_ID
    revision = DEFAULT_REVISION if requested == DEFAULT_HUB_ID else None
    try:
        folder = resolve_checkpoint(requested, revision)
    except Exception as error:  # offline hub, unknown id, missing folder: the demo still starts
        log.warning("cannot use %s (%s); falling back to the tiny checkpoint", requested, error)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return tiny_checkpoint_dir(), True, f"Could not load `{requested}` ({reason}); running the tiny test " \
                                            "checkpoint instead."
    return folder, is_tiny_checkpoint(folder), ""


def load_engine(requested: str | None = None) -> Engine:
    """Load the model once for this process (a second call returns the same engine)."""
    global _ENGINE
    if _ENGINE is not None:
        return _ENGINE
    folder, is_tiny, notice = choose_checkpoint(requested)
    # The tiny checkpoint runs on the CPU (its answers are noise anyway) unless MING_DEVICE says otherwise, e.g.
    # MING_DEVICE=cuda to try the Space's GPU path without the real weights.
    default = "cuda" if torch.cuda.is_available() and not is_tiny else "cpu"
    device = torch.device(os.environ.get("MING_DEVICE") or default)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # On ZeroGPU, load on the CPU and then move with .to("cuda"): the pattern its CUDA emulation packs at start-up.
    load_device = torch.device("cpu") if os.environ.get("SPACES_ZERO_GPU") else device
    started = time.perf_counter()
    model = MingOmni.from_pretrained(folder, dtype=dtype, device=load_device).to(device)
    processor = MingProcessor.from_pretrained(folder)
    speech = None
    if os.path.isdir(os.path.join(folder, "talker")):
        try:
            speech = SpeechGenerator.from_pretrained(folder, device=load_device, dtype=dtype).to(device)
        except (CheckpointError, OSError, ValueError) as error:  # e.g. a checkpoint without talker weights
            log.warning("speech is off: %s", error)
            reason = str(error).strip().splitlines()[0][:200]
            notice = f"{notice} Spoken replies are off: the speech model could not be loaded ({reason}).".strip()
    speaker_encoder, speaker_problem = None, ""
    if speech is not None:
        try:  # the checkpoint's campplus.onnx, else a hub copy fetched once (never for the tiny checkpoint)
            speaker_encoder = load_speaker_encoder(folder, download=not is_tiny)
        except SpeakerModelUnavailable as error:
            log.warning("voice cloning is off: %s", error)
            speaker_problem = f"Voice cloning is off: {error}"
    log.info("loaded %s on %s in %.1f s", folder, device, time.perf_counter() - started)
    _ENGINE = Engine(model, processor, speech, folder, is_tiny, notice, device, speaker_encoder=speaker_encoder,
                     speaker_model_problem=speaker_problem)
    if use_scheduler():
        _ENGINE.scheduler  # now: budget from the memory left after loading, steps captured before any visitor
        if speech is not None:
            speech.detokenizer.capture_graphs()  # likewise the flow decoder and vocoder per padded length
    return _ENGINE


def get_engine() -> Engine:
    if _ENGINE is None:
        raise RuntimeError("serving.engine.load_engine() must run first (app.py does it at import)")
    return _ENGINE


@dataclass
class Job:
    """Everything the GPU function needs, all picklable (ZeroGPU sends it to a worker process)."""

    session: str
    segments: list[dict[str, torch.Tensor]]  # processor inputs; ASR sends one per audio segment
    sampling: SamplingConfig
    voice: str | torch.Tensor | None = None  # speak the reply with this voice (a name or an embedding); None = text

    @property
    def gpu_seconds(self) -> int:
        """What to ask ZeroGPU for: start-up and prefill, plus per new token 0.02 s for text and 0.08 s more when
        the talker, flow decoder and vocoder speak it. That is 2.5-7x what bench/ measured on an H100 (~370
        tokens/s decoding; speech at a real-time factor of ~0.1, ~0.3 s of speech per text token), as ZeroGPU gives
        half a larger card. Quota is charged by actual use and a shorter request queues sooner; 120 s is the most a
        free visitor may ask for."""
        prompt_tokens = sum(s["input_ids"].shape[1] for s in self.segments)
        per_token = 0.02 + (0.08 if self.voice is not None else 0.0)
        seconds = 10 + prompt_tokens / 1000 + len(self.segments) * self.sampling.max_new_tokens * per_token
        return int(min(max(seconds, 15), MAX_GPU_SECONDS))


@dataclass
class Chunk:
    """One streamed piece of a reply, CPU data only."""

    text: str = ""
    audio: np.ndarray | None = None  # int16 samples at the speech generator's rate
    segment_done: bool = False  # ASR: a segment's transcript is complete
    finish_reason: str = ""  # with segment_done: "eos", "length" or "stopped"
    queue_position: int | None = None  # while the request waits for room: how many requests are ahead of it


COLD_START_SECONDS = 15  # the first GPU job compiles the Triton kernels and captures graphs: ~10 s on an H100


def _job_seconds(job: Job) -> int:
    """The job's duration, plus the one-time cost of a cold start for the first job of this process (later ZeroGPU
    workers find the compiled kernels in Triton's disk cache: ~1.5 s, see bench/coldstart.py)."""
    cold = _ENGINE is not None and _ENGINE.gpu_jobs_done == 0
    return min(job.gpu_seconds + (COLD_START_SECONDS if cold else 0), MAX_GPU_SECONDS)


@spaces.GPU(duration=_job_seconds)
def run_job(job: Job) -> Iterator[Chunk]:
    """The only GPU work: generate each segment's reply, streaming text deltas (and speech chunks). Through the
    shared scheduler on a dedicated machine; alone, in this GPU task, on ZeroGPU."""
    yield from (run_scheduled(job) if use_scheduler() else run_alone(job))


def run_alone(job: Job) -> Iterator[Chunk]:
    """One request on the model by itself (ZeroGPU: each request is its own GPU task)."""
    engine = get_engine()
    stop = engine.stop_events.setdefault(job.session, threading.Event())
    engine.count_job(+1)
    try:
        for inputs in job.segments:
            if stop.is_set():
                break
            stream = engine.model.generate_stream(
                **{name: value.to(engine.device) for name, value in inputs.items()},
                **dataclasses.asdict(job.sampling), stop_event=stop,
            )
            yield from segment_chunks(engine, stream, stream, engine.speech, job.voice, stop)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise out_of_memory_error() from None
    finally:
        engine.count_job(-1)


def run_scheduled(job: Job) -> Iterator[Chunk]:
    """One request on a dedicated GPU: each segment's text comes from the shared scheduler (queued while it is full,
    with the place in the queue as chunks), speech from the shared speech generator. A stream left unread (the
    visitor left, or Stop) frees its row at once."""
    engine = get_engine()
    stop = engine.stop_events.setdefault(job.session, threading.Event())
    speech = engine.shared_speech if job.voice is not None else None
    engine.count_job(+1)
    try:
        for inputs in job.segments:
            if stop.is_set():
                break
            stream = engine.scheduler.submit(inputs, job.sampling, stop, thinker_states=speech is not None)
            try:
                for ahead in stream.waiting():
                    yield Chunk(queue_position=ahead)
                yield from segment_chunks(engine, stream, stream, speech, job.voice, stop)
            finally:
                stream.cancel()
    except torch.OutOfMemoryError:
        raise out_of_memory_error() from None
    finally:
        engine.count_job(-1)


def segment_chunks(engine: Engine, stream, tokens: Iterator[int], speech, voice, stop: threading.Event
                   ) -> Iterator[Chunk]:
    """One segment's reply as chunks: the text deltas of `tokens` (the token stream `stream`'s, or a wrapper of it),
    spoken by `speech` when a voice was asked for, then the segment's end with the stream's finish reason."""
    deltas = text_deltas(tokens, engine.processor.stream_decoder())
    if voice is not None and speech is not None:
        for event in speech.stream(deltas, thinker_states=stream.thinker_states, voice=voice, stop_event=stop):
            yield Chunk(text=event.text_delta, audio=event.audio)
    else:
        for delta in deltas:
            yield Chunk(text=delta)
    yield Chunk(segment_done=True, finish_reason=stream.finish_reason or "stopped")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all C0 controls but tab and newline


def text_deltas(tokens: Iterator[int], decoder) -> Iterator[str]:
    """Token ids -> non-empty text deltas, never splitting a UTF-8 character. Control characters (which the tiny
    random model emits as raw byte tokens) are dropped: a browser shows them as boxes."""
    for token in tokens:
        if delta := CONTROL_CHARACTERS.sub("", decoder.push(token)):
            yield delta
    if tail := CONTROL_CHARACTERS.sub("", decoder.flush()):
        yield tail


def out_of_memory_error() -> UserError:
    return UserError("The GPU ran out of memory on this request. Try a shorter video, fewer or smaller images, "
                      "a shorter conversation (Clear), or fewer max new tokens.", title="GPU out of memory")


def stream_job(job: Job) -> Iterator[Chunk]:
    """run_job with its failures turned into messages a user can act on."""
    engine = get_engine()
    engine.stop_events[job.session] = threading.Event()
    try:
        with gpu_failures_as_messages():
            yield from run_job(job)
        engine.gpu_jobs_done += 1
    finally:
        engine.stop_events.pop(job.session, None)


@contextlib.contextmanager
def gpu_failures_as_messages() -> Iterator[None]:
    """Out of GPU memory or of ZeroGPU quota inside a GPU job -> a message the visitor can act on."""
    try:
        yield
    except UserError:
        raise
    except torch.OutOfMemoryError:
        raise out_of_memory_error() from None
    except Exception as error:
        title = str(getattr(error, "title", ""))
        if title.startswith("ZeroGPU"):  # `spaces` raises its own error when no GPU is granted
            message = getattr(error, "message", str(error))
            raise UserError(f"{message} The Space's free GPU time is shared by everyone using it: try again "
                            "later, sign in to Hugging Face for a larger quota, or run the demo on your own machine "
                            "(see the README).", title="No GPU available") from None
        raise


def stop_session(session: str) -> None:
    """Stop the session's generation at the next token (the Stop buttons; they also cancel the Gradio event)."""
    event = get_engine().stop_events.get(session)
    if event is not None:
        event.set()
