"""The Space's serving engine: one cached Ming model, request checks, and streamed text and speech.

`app.py` lays out the page and wires events; each of its handlers is a short call into this module. Here live:
  * the model choice (MING_MODEL / --model; the tiny random checkpoint, built on first use, when there is no GPU or
    the weights cannot be reached) and the one model + processor + speech generator, loaded once at import of the
    app, as ZeroGPU requires (weights are loaded before any request, then moved to the GPU per request by Spaces);
  * the checks that turn bad input into a plain message before any GPU time is spent (file types, corrupt files,
    huge images, long videos and recordings, silence, empty or over-long messages);
  * `run_job`, the only GPU work: a generator under `@spaces.GPU` whose duration is computed from the request,
    yielding CPU data only (text deltas and int16 audio chunks);
  * the five tabs' conversations (per-session `Turn` lists that app.py keeps in `gr.State`), streamed as they grow.
"""

from __future__ import annotations

import spaces  # before torch: on ZeroGPU it must patch CUDA before anything touches it

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import gradio as gr
import numpy as np
import soundfile
import torch
from PIL import Image

from . import MingOmni, MingProcessor
from .loading import DEFAULT_HUB_ID, DEFAULT_REVISION, CheckpointError, resolve_checkpoint
from .media import MediaError, audio_duration, load_audio, video_duration
from .processor import asr_messages, thinking_messages

log = logging.getLogger("ming.engine")

TINY_BANNER = "tiny random weights: answers are noise; set MING_MODEL for the real model"
CONCURRENCY_ID = "gpu"  # every event that runs the model shares this queue slot: one request on the GPU at a time
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------ limits (shown in UI)
MAX_IMAGE_SIDE = 8192  # pixels; the model sees at most ~1024 tokens per image anyway
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGES_PER_REQUEST = 4
MAX_VIDEO_SECONDS = 10 * 60
VIDEO_MAX_FRAMES = 64  # frames sampled evenly over the clip (2 per second for clips up to 32 s)
MAX_AUDIO_SECONDS = 60  # a spoken message in Chat or Speech-to-speech
MAX_ASR_SECONDS = 10 * 60  # ASR cuts longer recordings into segments of at most ASR_SEGMENT_SECONDS
ASR_SEGMENT_SECONDS = 30.0
SILENCE_DBFS = -50.0  # the loudest 50 ms of a recording below this level counts as silence
MAX_NEW_TOKENS = 2048
MAX_GPU_SECONDS = 120  # the longest ZeroGPU task a visitor without a PRO account may request
CHARS_PER_TOKEN_CEILING = 8  # no tokenizer packs more characters per token: longer text cannot fit, skip tokenizing

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg"}
AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma"}
AMBIGUOUS_EXTENSIONS = {".webm"}  # webcam clips and microphone recordings both arrive as .webm

LIMITS_MARKDOWN = (
    f"Images up to {MAX_IMAGE_SIDE}px a side ({MAX_IMAGE_PIXELS // 1_000_000} MP), at most {MAX_IMAGES_PER_REQUEST} "
    f"per message. Videos up to {MAX_VIDEO_SECONDS // 60} minutes: {VIDEO_MAX_FRAMES} frames at most are sampled "
    f"evenly (2 per second for clips up to 32 s) and scaled so a video takes at most ~9,200 visual tokens. "
    f"Spoken messages up to "
    f"{MAX_AUDIO_SECONDS} s; ASR takes up to {MAX_ASR_SECONDS // 60} minutes, transcribed in "
    f"{ASR_SEGMENT_SECONDS:.0f}-second segments. The Preview model takes one audio clip per request and cannot mix "
    "images and a video in one message; in a conversation the model sees the newest images or video and the newest "
    "audio clip (older ones drop out of its view, their text stays)."
)


# ======================================================================================================= model loading
@dataclass
class Engine:
    """The one model instance every tab shares."""

    model: MingOmni = field(repr=False)
    processor: MingProcessor = field(repr=False)
    speech: object | None = field(repr=False)  # ming.speech.SpeechGenerator, or None when there is no talker/
    checkpoint: str
    is_tiny: bool
    notice: str  # why this checkpoint was chosen, when that is worth telling the user ("" otherwise)
    device: torch.device
    active_jobs: int = 0  # GPU jobs running right now, and the most ever seen at once (the queue keeps this at 1)
    peak_active_jobs: int = 0
    gpu_jobs_done: int = 0
    stop_events: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def voices(self) -> list[str]:
        return list(self.speech.voices) if self.speech is not None else []

    @property
    def max_context(self) -> int:
        return self.model.config.llm_config.max_position_embeddings

    @property
    def banner(self) -> str:
        lines = []
        if self.is_tiny:
            lines.append(f"**{TINY_BANNER}**")
        if self.notice:
            lines.append(self.notice)
        return "  \n".join(lines)


ENGINE: Engine | None = None


def tiny_checkpoint_dir() -> str:
    """The tiny random checkpoint, built on first use into a cache folder keyed by the code that writes it (so a
    change to the tiny layout builds a fresh one instead of loading a stale one)."""
    from . import tiny

    package = os.path.dirname(os.path.abspath(__file__))
    sources = ["tiny.py", "tokenizer.py", "configs.py", os.path.join("speech", "tiny.py")]
    digest = hashlib.sha1()
    for name in sources:
        path = os.path.join(package, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    cache = os.environ.get("MING_CACHE_DIR", os.path.join(REPO_DIR, ".cache"))
    folder = os.path.join(cache, f"tiny-{digest.hexdigest()[:12]}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="tiny-building-", dir=cache)
        tiny.build_tiny_checkpoint(staging)
        try:
            os.rename(staging, folder)  # atomic: a half-written folder is never seen as a checkpoint
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def choose_checkpoint(requested: str | None) -> tuple[str, bool, str]:
    """(folder, is_tiny, notice) for --model / MING_MODEL. Never raises and never waits on an unreachable hub for
    long: anything that cannot be loaded falls back to the tiny checkpoint, with the reason as the notice."""
    from .tiny import is_tiny_checkpoint

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


def load(requested: str | None = None) -> Engine:
    """Load the model once and keep it as the module's ENGINE (a second call returns the same engine)."""
    global ENGINE
    if ENGINE is not None:
        return ENGINE
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
        from .speech import SpeechGenerator

        try:
            speech = SpeechGenerator.from_pretrained(folder, device=load_device, dtype=dtype).to(device)
        except (CheckpointError, OSError, ValueError) as error:  # e.g. a checkpoint without talker weights
            log.warning("speech is off: %s", error)
            reason = str(error).strip().splitlines()[0][:200]
            notice = f"{notice} Spoken replies are off: the speech model could not be loaded ({reason}).".strip()
    log.info("loaded %s on %s in %.1f s", folder, device, time.perf_counter() - started)
    ENGINE = Engine(model, processor, speech, folder, is_tiny, notice, device)
    return ENGINE


def engine() -> Engine:
    if ENGINE is None:
        raise RuntimeError("ming.engine.load() must run first (app.py does it at import)")
    return ENGINE


# ===================================================================================================== input checking
def user_error(message: str, title: str = "Cannot do that") -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)


def media_kind(path: str) -> str:
    """The kind of an uploaded file ("image", "video" or "audio"), from its extension (and its streams, for .webm,
    which webcams and microphones both produce)."""
    name = os.path.basename(path)
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    if ext in AMBIGUOUS_EXTENSIONS:
        import av

        try:
            with av.open(path) as container:
                return "video" if container.streams.video else "audio"
        except (av.FFmpegError, OSError) as error:
            raise user_error(f"Could not read '{name}': the file is damaged ({error}).") from None
    raise user_error(
        f"'{name}' is not a supported file type. Send an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
        f"a video ({', '.join(sorted(VIDEO_EXTENSIONS | AMBIGUOUS_EXTENSIONS))}) or an audio clip "
        f"({', '.join(sorted(AUDIO_EXTENSIONS))}).",
        title="Unsupported file",
    )


def check_image(path: str) -> None:
    """Reads only the header: a 12000x12000 image is refused before it is decoded."""
    name = os.path.basename(path)
    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
            width, height = image.size
            image.verify()
    except Image.DecompressionBombError:
        raise user_error(f"'{name}' is too large to open safely.", title="Image too large") from None
    except Exception:
        raise user_error(f"Could not read image '{name}': the file is damaged or not an image.",
                         title="Unreadable image") from None
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise user_error(
            f"'{name}' is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} pixels a side and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels. Please send a smaller image.",
            title="Image too large",
        )


def check_video(path: str) -> float:
    """Duration in seconds, from the container header."""
    try:
        seconds = video_duration(path)
    except MediaError as error:
        raise user_error(str(error), title="Unreadable video") from None
    if seconds > MAX_VIDEO_SECONDS:
        raise user_error(
            f"'{os.path.basename(path)}' is {format_duration(seconds)} long; videos can be at most "
            f"{MAX_VIDEO_SECONDS // 60} minutes. Please trim it.",
            title="Video too long",
        )
    return seconds


def check_audio(path: str, max_seconds: float) -> np.ndarray:
    """The waveform (float32, 16 kHz), after a length check (from the header, before decoding) and a silence
    check."""
    name = os.path.basename(path)
    try:
        seconds = audio_duration(path)
        if seconds > max_seconds:
            raise user_error(f"'{name}' is {format_duration(seconds)} long; the limit here is "
                             f"{format_duration(max_seconds)}.", title="Recording too long")
        waveform = load_audio(path)
    except MediaError as error:
        raise user_error(str(error), title="Unreadable audio") from None
    if loudest_window_dbfs(waveform) < SILENCE_DBFS:
        raise user_error(f"'{name}' is silent: there is no speech to hear. Check the microphone, or pick another "
                         "file.", title="Silent audio")
    return waveform


def loudest_window_dbfs(waveform: np.ndarray, window: int = 800) -> float:
    """Level of the loudest 50 ms (at 16 kHz) in dB relative to full scale."""
    usable = len(waveform) // window * window
    frames = waveform[:usable].reshape(-1, window) if usable else waveform[None, :]
    rms = float(np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)).max())
    return 20 * np.log10(max(rms, 1e-10))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 512

    def checked(self) -> "Sampling":
        if not 0 <= self.temperature <= 2:
            raise user_error("Temperature must be between 0 and 2.")
        if not 0 < self.top_p <= 1:
            raise user_error("Top-p must be above 0 and at most 1.")
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS:
            raise user_error(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}.")
        return replace(self, max_new_tokens=int(self.max_new_tokens))


# ======================================================================================================= conversations
@dataclass
class Turn:
    """One exchange of a conversation: the user's text and media, the reply, and the spoken reply's full clip."""

    text: str
    media: list[tuple[str, str]] = field(default_factory=list)  # (kind, path) in the order they were attached
    reply: str = ""
    reply_audio: str | None = None  # wav of the whole spoken reply, replayable from the history
    seconds: float = 0.0  # how long the reply took (shown on thinking blocks)


def new_turn(text: str | None, files: list[str] | None, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> Turn:
    """A checked user turn; raises a user-facing error for anything the model cannot take."""
    text = (text or "").strip()
    media = [(media_kind(path), path) for path in files or [] if path]
    if not text and not media:
        raise user_error("The message is empty: type something or attach a file.", title="Empty message")
    counts = {kind: sum(k == kind for k, _ in media) for kind in ("image", "video", "audio")}
    if counts["audio"] > 1:
        raise user_error("Ming-Lite-Omni-Preview takes one audio clip per message.", title="Too many audio clips")
    if counts["video"] > 1 or (counts["video"] and counts["image"]):
        raise user_error("Send either one video or up to four images per message (the Preview model cannot mix "
                         "them).", title="Too many visual inputs")
    if counts["image"] > MAX_IMAGES_PER_REQUEST:
        raise user_error(f"At most {MAX_IMAGES_PER_REQUEST} images per message.", title="Too many images")
    for kind, path in media:
        if kind == "image":
            check_image(path)
        elif kind == "video":
            check_video(path)
        else:
            check_audio(path, max_audio_seconds)
    return Turn(text=text, media=media)


def kept_media(turns: list[Turn]) -> set[tuple[int, int]]:
    """Which (turn, item) media stay in the prompt: the newest audio clip, and the images or video of the newest
    turn that has any. The Preview takes one audio per request and routes every token between the first and the
    last image patch through its vision router, so visual media spread over several turns would mis-route the
    text between them; older media drop out (their turns' text stays)."""
    kept: set[tuple[int, int]] = set()
    audio_kept = visual_kept = False
    for t in range(len(turns) - 1, -1, -1):
        visual = [i for i, (kind, _) in enumerate(turns[t].media) if kind in ("image", "video")]
        if visual and not visual_kept:
            kept.update((t, i) for i in visual)
            visual_kept = True
        audio = [i for i, (kind, _) in enumerate(turns[t].media) if kind == "audio"]
        if audio and not audio_kept:
            kept.add((t, audio[0]))
            audio_kept = True
    return kept


def prompt_messages(turns: list[Turn], system_prompt: str = "") -> list[dict]:
    """The processor's chat messages for a conversation whose last turn awaits its reply."""
    keep = kept_media(turns)
    messages: list[dict] = []
    if system_prompt.strip():
        messages.append({"role": "SYSTEM", "content": system_prompt.strip()})
    for t, turn in enumerate(turns):
        content: list[dict] = []
        for i, (kind, path) in enumerate(turn.media):
            if (t, i) in keep:
                item = {"type": kind, kind: path}
                if kind == "video":
                    item["max_frames"] = VIDEO_MAX_FRAMES
                content.append(item)
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        if not content:  # its media dropped out of the context
            content.append({"type": "text", "text": "(a message with media that is no longer shown)"})
        messages.append({"role": "HUMAN", "content": content})
        if t < len(turns) - 1:
            messages.append({"role": "ASSISTANT", "content": turn.reply})
    return messages


def prepare_inputs(turns: list[Turn], system_prompt: str, sampling: Sampling,
                   build: Callable[[list[dict]], list[dict]] = lambda m: m) -> dict[str, torch.Tensor]:
    """Processor inputs for the conversation, dropping the oldest turns until prompt + reply fit the context."""
    eng = engine()
    budget = eng.max_context - sampling.max_new_tokens
    if len(turns[-1].text) > budget * CHARS_PER_TOKEN_CEILING:
        raise context_error(len(turns[-1].text), budget, unit="characters")
    for first in range(len(turns)):
        try:
            inputs = eng.processor(build(prompt_messages(turns[first:], system_prompt)), add_generation_prompt=True)
        except MediaError as error:
            raise user_error(str(error), title="Unreadable file") from None
        except ValueError as error:  # the processor's own limits (one audio, no image + video mix)
            raise user_error(str(error)) from None
        length = inputs["input_ids"].shape[1]
        if length <= budget:
            return inputs
    raise context_error(length, budget, unit="tokens")


def context_error(size: int, budget: int, unit: str) -> gr.Error:
    return user_error(
        f"The message is too long for the model: {size:,} {unit}, while the context holds {engine().max_context:,} "
        f"tokens of which the reply may use {engine().max_context - budget:,} (max new tokens). "
        "Shorten the message or lower max new tokens.",
        title="Message too long",
    )


# ============================================================================================================ GPU work
@dataclass
class Job:
    """Everything the GPU function needs, all picklable (ZeroGPU sends it to a worker process)."""

    session: str
    segments: list[dict[str, torch.Tensor]]  # processor inputs; ASR sends one per audio segment
    sampling: Sampling
    voice: str | None = None  # speak the reply with this voice; None = text only

    @property
    def gpu_seconds(self) -> int:
        """What to ask ZeroGPU for: start-up and prefill, plus per new token 0.02 s for text and 0.08 s more when
        the talker, flow decoder and vocoder speak it. That is 2.5-7x what bench/ measured on an H100 (~370
        tokens/s decoding; speech at a real-time factor of ~0.1, ~0.3 s of speech per text token), as ZeroGPU gives
        half a larger card. Quota is charged by actual use and a shorter request queues sooner; 120 s is the most a
        free visitor may ask for."""
        prompt_tokens = sum(s["input_ids"].shape[1] for s in self.segments)
        per_token = 0.02 + (0.08 if self.voice else 0.0)
        seconds = 10 + prompt_tokens / 1000 + len(self.segments) * self.sampling.max_new_tokens * per_token
        return int(min(max(seconds, 15), MAX_GPU_SECONDS))


@dataclass
class Chunk:
    """One streamed piece of a reply, CPU data only."""

    text: str = ""
    audio: np.ndarray | None = None  # int16 samples at the speech generator's rate
    segment_done: bool = False  # ASR: a segment's transcript is complete
    finish_reason: str = ""  # with segment_done: "eos", "length" or "stopped"


COLD_START_SECONDS = 15  # the first GPU job compiles the Triton kernels and captures graphs: ~10 s on an H100


def _job_seconds(job: Job) -> int:
    """The job's duration, plus the one-time cost of a cold start for the first job of this process (later ZeroGPU
    workers find the compiled kernels in Triton's disk cache: ~1.5 s, see bench/coldstart.py)."""
    cold = ENGINE is not None and ENGINE.gpu_jobs_done == 0
    return min(job.gpu_seconds + (COLD_START_SECONDS if cold else 0), MAX_GPU_SECONDS)


@spaces.GPU(duration=_job_seconds)
def run_job(job: Job) -> Iterator[Chunk]:
    """The only GPU work: generate each segment's reply, streaming text deltas (and speech chunks)."""
    eng = engine()
    stop = eng.stop_events.setdefault(job.session, threading.Event())
    eng.active_jobs += 1
    eng.peak_active_jobs = max(eng.peak_active_jobs, eng.active_jobs)
    s = job.sampling
    try:
        for inputs in job.segments:
            if stop.is_set():
                break
            stream = eng.model.generate_stream(
                **{name: value.to(eng.device) for name, value in inputs.items()},
                max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0, temperature=s.temperature or 1.0,
                top_p=s.top_p, no_repeat_ngram_size=10, stop_event=stop,
            )
            deltas = text_deltas(stream, eng.processor.stream_decoder())
            if job.voice and eng.speech is not None:
                for event in eng.speech.stream(deltas, thinker_states=stream.thinker_states, voice=job.voice,
                                               stop_event=stop):
                    yield Chunk(text=event.text_delta, audio=event.audio)
            else:
                for delta in deltas:
                    yield Chunk(text=delta)
            yield Chunk(segment_done=True, finish_reason=stream.finish_reason or "stopped")
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise out_of_memory_error() from None
    finally:
        eng.active_jobs -= 1


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all C0 controls but tab and newline


def text_deltas(tokens: Iterator[int], decoder) -> Iterator[str]:
    """Token ids -> non-empty text deltas, never splitting a UTF-8 character. Control characters (which the tiny
    random model emits as raw byte tokens) are dropped: a browser shows them as boxes."""
    for token in tokens:
        if delta := CONTROL_CHARACTERS.sub("", decoder.push(token)):
            yield delta
    if tail := CONTROL_CHARACTERS.sub("", decoder.flush()):
        yield tail


def out_of_memory_error() -> gr.Error:
    return user_error("The GPU ran out of memory on this request. Try a shorter video, fewer or smaller images, "
                      "a shorter conversation (Clear), or fewer max new tokens.", title="GPU out of memory")


def stream_job(job: Job) -> Iterator[Chunk]:
    """run_job with its failures turned into messages a user can act on."""
    eng = engine()
    eng.stop_events[job.session] = threading.Event()
    try:
        yield from run_job(job)
        eng.gpu_jobs_done += 1
    except gr.Error as error:
        if str(getattr(error, "title", "")).startswith("ZeroGPU"):  # raised by `spaces` when no GPU is granted
            raise user_error(f"{error.message} The Space's free GPU time is shared by everyone using it: try again "
                             "later, sign in to Hugging Face for a larger quota, or run the demo on your own machine "
                             "(see the README).", title="No GPU available") from None
        raise
    except torch.OutOfMemoryError:
        raise out_of_memory_error() from None
    finally:
        eng.stop_events.pop(job.session, None)


def stop(session: str) -> None:
    """Stop the session's generation at the next token (the Stop buttons; they also cancel the Gradio event)."""
    event = engine().stop_events.get(session)
    if event is not None:
        event.set()


def user_errors(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Wrap a tab's generator so that nothing but a readable gr.Error ever reaches the page."""

    def wrapped(*args, **kwargs):
        try:
            yield from handler(*args, **kwargs)
        except gr.Error:
            raise
        except (MediaError, ValueError) as error:
            raise user_error(str(error)) from None
        except Exception as error:
            log.error("request failed:\n%s", traceback.format_exc())
            raise user_error(f"Something went wrong ({type(error).__name__}: {error}). Please try again.",
                             title="Error") from None

    return functools.wraps(handler)(wrapped)


# ================================================================================================= replies and audio
@dataclass
class Progress:
    """A reply as it streams: the turn (mutated in place) and the newest audio chunk to play, if any."""

    turn: Turn
    audio: tuple[int, np.ndarray] | None = None
    done: bool = False


def reply_stream(job: Job, turn: Turn) -> Iterator[Progress]:
    """Stream a job into `turn.reply`; keep the spoken reply's chunks and save them as one replayable wav."""
    started = time.perf_counter()
    rate = engine().speech.sample_rate if engine().speech is not None else 0
    pieces: list[np.ndarray] = []
    yield Progress(turn)  # the question shows at once, while the prompt is prefilled
    for chunk in stream_job(job):
        turn.reply += chunk.text
        turn.seconds = time.perf_counter() - started
        if chunk.audio is not None and len(chunk.audio):
            pieces.append(chunk.audio)
            yield Progress(turn, audio=(rate, chunk.audio))
        elif chunk.text:
            yield Progress(turn)
        elif chunk.finish_reason == "length":
            gr.Info(f"The reply stopped at max new tokens ({job.sampling.max_new_tokens}); raise it in the settings "
                    "for longer answers.", duration=6)
    if pieces:
        turn.reply_audio = save_wav(rate, np.concatenate(pieces))
    yield Progress(turn, done=True)


OUTPUT_DIR = os.path.join(tempfile.gettempdir(), "ming-space-replies")
OUTPUT_MAX_AGE = 24 * 3600


def save_wav(rate: int, samples: np.ndarray) -> str:
    """Write a reply clip under the temp folder (Gradio serves files from there); clips older than a day go."""
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    now = time.time()
    for name in os.listdir(OUTPUT_DIR):
        path = os.path.join(OUTPUT_DIR, name)
        try:
            if now - os.path.getmtime(path) > OUTPUT_MAX_AGE:
                os.remove(path)
        except OSError:
            pass
    path = os.path.join(OUTPUT_DIR, f"reply-{uuid.uuid4().hex}.wav")
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path


def check_voice(speak: bool, voice: str | None) -> str | None:
    if not speak:
        return None
    eng = engine()
    if eng.speech is None:
        raise user_error("This checkpoint has no speech model (no talker/ folder), so replies can only be text.",
                         title="No speech")
    if voice not in eng.voices:
        raise user_error(f"Unknown voice {voice!r}; choose one of: {', '.join(eng.voices)}.", title="Unknown voice")
    return voice


# =============================================================================================================== tabs
@user_errors
def chat(turns: list[Turn], text: str, files: list[str], system_prompt: str, sampling: Sampling, speak: bool,
         voice: str | None, session: str) -> Iterator[tuple[list[Turn], Progress]]:
    """Chat: a multimodal message, answered in text (and speech, when asked) with the whole history in context."""
    sampling = sampling.checked()
    voice = check_voice(speak, voice)
    turn = new_turn(text, files)
    turns = [*turns, turn]
    inputs = prepare_inputs(turns, system_prompt, sampling)
    for progress in reply_stream(Job(session, [inputs], sampling, voice), turn):
        yield turns, progress


@user_errors
def vision_qa(image: str | None, video: str | None, question: str, sampling: Sampling,
              session: str) -> Iterator[str]:
    """Image & video QA: one image or one video and a question; yields the answer as it grows."""
    sampling = sampling.checked()
    if image and video:
        raise user_error("Ask about either the image or the video: clear one of them.", title="Two inputs")
    if not image and not video:
        raise user_error("Add an image or a video first.", title="Nothing to look at")
    question = (question or "").strip() or "Describe this in detail."
    turn = new_turn(question, [image or video])
    inputs = prepare_inputs([turn], "", sampling)
    for _ in reply_stream(Job(session, [inputs], sampling), turn):
        yield turn.reply


def split_for_asr(waveform: np.ndarray, rate: int = 16000) -> list[np.ndarray]:
    """Segments of at most ASR_SEGMENT_SECONDS, each cut at the quietest 100 ms of its last third, so that cuts
    fall between words where possible."""
    limit = int(ASR_SEGMENT_SECONDS * rate)
    window = rate // 10
    segments, start = [], 0
    while len(waveform) - start > limit:
        search_from = start + limit * 2 // 3
        region = waveform[search_from:start + limit]
        usable = len(region) // window * window
        energy = np.square(region[:usable].reshape(-1, window)).mean(axis=1)
        cut = search_from + int(energy.argmin()) * window + window // 2
        segments.append(waveform[start:cut])
        start = cut
    segments.append(waveform[start:])
    return [s for s in segments if len(s) >= rate // 10]


@user_errors
def asr(audio: str | None, session: str) -> Iterator[str]:
    """ASR: the release's prompt (language identification + transcription) over each segment; yields the
    transcript so far."""
    if not audio:
        raise user_error("Record or upload some speech first.", title="No audio")
    waveform = check_audio(audio, MAX_ASR_SECONDS)
    segments = [(16000, segment) for segment in split_for_asr(waveform)]
    # A transcript is never longer than the speech: ~3 words a second at most, plus the language tag.
    longest = max(len(samples) for _, samples in segments) / 16000
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=32 + int(6 * longest))
    inputs = []
    for segment in segments:
        try:
            inputs.append(engine().processor(asr_messages(segment), add_generation_prompt=True))
        except MediaError as error:
            raise user_error(str(error), title="Unreadable audio") from None
    done: list[str] = []
    current = ""
    for chunk in stream_job(Job(session, inputs, sampling)):
        current += chunk.text
        if chunk.segment_done:
            done.append(current.strip())
            current = ""
        yield "\n".join([*done, current.strip()] if current else done)


@user_errors
def speech_to_speech(turns: list[Turn], audio: str | None, voice: str | None, sampling: Sampling,
                     session: str) -> Iterator[tuple[list[Turn], Progress]]:
    """Speech-to-speech: a spoken message in, a spoken reply streamed out with its text; multi-turn."""
    sampling = sampling.checked()
    voice = check_voice(True, voice)
    if not audio:
        raise user_error("Record or upload a spoken message first.", title="No audio")
    turn = new_turn("", [audio])
    turns = [*turns, turn]
    inputs = prepare_inputs(turns, "", sampling)
    for progress in reply_stream(Job(session, [inputs], sampling, voice), turn):
        yield turns, progress


@user_errors
def thinking(turns: list[Turn], text: str, image: str | None, sampling: Sampling,
             session: str) -> Iterator[tuple[list[Turn], Progress]]:
    """Thinking mode: the release's chain-of-thought prompt on the newest question (optionally with an image)."""
    sampling = sampling.checked()
    turn = new_turn(text, [image] if image else [])
    turns = [*turns, turn]
    inputs = prepare_inputs(turns, "", sampling, build=thinking_messages)
    for progress in reply_stream(Job(session, [inputs], sampling), turn):
        yield turns, progress


# ========================================================================================================= rendering
THINK_OPEN = re.compile(r"<think(?:ing)?>")
THINK_CLOSE = re.compile(r"</think(?:ing)?>|<answer>")
TAGS = re.compile(r"</?(?:think|thinking|answer)>")
PARTIAL_TAG = re.compile(r"<[/a-z]{0,9}$")


def split_thinking(reply: str) -> tuple[str, str, bool]:
    """(reasoning, answer, reasoning finished). Text before the first closing tag (</think>, </thinking> or
    <answer>) is reasoning: the chain-of-thought prompt makes the model start with it."""
    close = THINK_CLOSE.search(reply)
    reasoning, answer = (reply[:close.start()], reply[close.end():]) if close else (reply, "")
    clean = lambda s: PARTIAL_TAG.sub("", TAGS.sub("", s)).strip()  # noqa: E731
    return clean(reasoning), clean(answer), close is not None


def boxed_results(text: str) -> list[str]:
    r"""The contents of every \boxed{...} (nested braces allowed)."""
    results, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            break
        results.append(text[i + len("\\boxed{"):j - 1])
        start = j
    return results


def user_message(turn: Turn) -> dict:
    content: list = [{"path": path} for _, path in turn.media]
    if turn.text:
        content.append(turn.text)
    return {"role": "user", "content": content}


def chat_messages(turns: list[Turn], pending: bool = False) -> list[dict]:
    """Chatbot messages: each turn's text and media, the reply, and its spoken clip (replayable, downloadable)."""
    messages = []
    for t, turn in enumerate(turns):
        messages.append(user_message(turn))
        streaming = pending and t == len(turns) - 1
        reply = turn.reply or ("…" if streaming else "")
        content: list = [reply] if reply else []
        if turn.reply_audio:
            content.append({"path": turn.reply_audio, "mime_type": "audio/wav"})
        if content:
            messages.append({"role": "assistant", "content": content})
    return messages


def thinking_chat_messages(turns: list[Turn], pending: bool = False) -> list[dict]:
    """Reasoning in a collapsible "Thinking" block (open with a spinner while it streams), the answer below it
    with any \\boxed{} result repeated as the final result."""
    messages = []
    for t, turn in enumerate(turns):
        messages.append(user_message(turn))
        reasoning, answer, finished = split_thinking(turn.reply)
        streaming = pending and t == len(turns) - 1
        thinking_done = finished or not streaming
        metadata = {"title": "Thinking", "status": "done" if thinking_done else "pending"}
        if thinking_done:
            metadata["duration"] = round(turn.seconds, 1)
        messages.append({"role": "assistant", "content": reasoning or "…", "metadata": metadata})
        if answer:
            results = boxed_results(answer)
            if results:
                answer += "\n\n**Final result:** " + ", ".join(f"$\\boxed{{{r}}}$" for r in results)
            messages.append({"role": "assistant", "content": answer})
        elif not streaming:
            messages.append({"role": "assistant",
                             "content": "*(no final answer: the model did not finish its reasoning)*"})
    return messages
