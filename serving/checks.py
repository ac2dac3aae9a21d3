"""Input checks: everything a visitor sends is checked here, before any GPU time is spent, and bad input becomes a
`UserError` that says what happened to *their* file and what to do. The limits are shown in the UI."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from ming.audio import SAMPLE_RATE
from ming.long_video import LongVideoSettings
from ming.media import (
    DEMO_MAX_FRAMES,
    LONG_VIDEO_MAX_FRAMES,
    LONG_VIDEO_RATES,
    MediaError,
    audio_duration,
    load_audio,
    video_duration,
)
from ming.sampling import SamplingConfig

from .errors import UserError

MAX_IMAGE_SIDE = 8192  # pixels; the model sees at most ~1024 tokens per image anyway
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGES_PER_REQUEST = 4
MAX_VIDEO_SECONDS = 2 * 3600  # longer than a short clip: sampled, thinned and compressed (serving/long_video_flow.py)
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

_LONG = LongVideoSettings()
(_TEN_MINUTES, _FAST), (_HOUR, _MEDIUM), (_, _SLOW) = LONG_VIDEO_RATES


def format_limit(seconds: float) -> str:
    """3600 -> "1 hour", 7200 -> "2 hours", 600 -> "10 minutes"."""
    if seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour{'s' if hours > 1 else ''}"
    return f"{int(seconds // 60)} minutes"


LIMITS_MARKDOWN = (
    f"Images up to {MAX_IMAGE_SIDE}px a side ({MAX_IMAGE_PIXELS // 1_000_000} MP), at most {MAX_IMAGES_PER_REQUEST} "
    f"per message. Videos up to {format_limit(MAX_VIDEO_SECONDS)}. Clips up to {_LONG.short_clip_seconds:.0f} s are "
    f"sampled as the release does ({DEMO_MAX_FRAMES} frames at most, 2 a second, at most ~9,200 visual tokens). "
    f"Longer videos are sampled at {_FAST:g} frames a second up to {format_limit(_TEN_MINUTES)}, {_MEDIUM:g} up to "
    f"{format_limit(_HOUR)} and {_SLOW:g} after that ({LONG_VIDEO_MAX_FRAMES:,} frames at most) at a small frame "
    "size; the parts of a frame that barely change from one sample to the next are dropped, and the rest is "
    f"compressed into the model's memory, which keeps {_LONG.visual_budget:,} visual tokens whatever the length "
    "(the least novel ones give way). The first question about a long video waits for this (a progress bar shows "
    "it); later questions about the same video in this session reuse it and start answering at once. "
    f"Spoken messages up to "
    f"{MAX_AUDIO_SECONDS} s; ASR takes up to {MAX_ASR_SECONDS // 60} minutes, transcribed in "
    f"{ASR_SEGMENT_SECONDS:.0f}-second segments. The Preview model takes one audio clip per request and cannot mix "
    "images and a video in one message; in a conversation the model sees the newest images or video and the newest "
    "audio clip (older ones drop out of its view, their text stays)."
)
# What a visitor needs on each tab, in a line or two (the whole paragraph above sits under "All limits").
CHAT_LIMITS_MARKDOWN = (
    f"Per message: up to {MAX_IMAGES_PER_REQUEST} images or one video (not both), and one audio clip of up to "
    f"{MAX_AUDIO_SECONDS} s."
)
VISION_LIMITS_MARKDOWN = (
    f"One image (up to {MAX_IMAGE_SIDE:,} pixels a side) or one video (up to {format_limit(MAX_VIDEO_SECONDS)}). "
    f"A video longer than {_LONG.short_clip_seconds:.0f} s takes a while the first time (a progress bar shows it); "
    "more questions about it then start at once."
)



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
        except (av.FFmpegError, OSError):
            raise UserError(f"Could not read '{name}': the file is damaged or not a recording.",
                            title="Unreadable file") from None
    raise UserError(
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
        raise UserError(f"'{name}' is too large to open safely.", title="Image too large") from None
    except Exception:
        raise UserError(f"Could not read image '{name}': the file is damaged or not an image. Send a picture such "
                        "as a PNG, JPEG or WebP file.", title="Unreadable image") from None
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise UserError(
            f"'{name}' is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} pixels a side and "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels. Please send a smaller image.",
            title="Image too large",
        )


def check_video(path: str) -> float:
    """Duration in seconds, from the container header."""
    try:
        seconds = video_duration(path)
    except MediaError as error:
        raise UserError(f"{str(error).rstrip('.')}. Try another file, or save it again as MP4.",
                        title="Unreadable video") from None
    if seconds > MAX_VIDEO_SECONDS:
        raise UserError(
            f"'{os.path.basename(path)}' is {format_duration(seconds)} long; videos can be at most "
            f"{format_limit(MAX_VIDEO_SECONDS)}. Please trim it, or send the part you want to ask about.",
            title="Video too long",
        )
    return seconds


def read_audio(path: str, max_seconds: float) -> np.ndarray:
    """The waveform (float32, 16 kHz), after a length check (from the header, before decoding)."""
    try:
        seconds = audio_duration(path)
        if seconds > max_seconds:
            raise UserError(f"'{os.path.basename(path)}' is {format_duration(seconds)} long; the limit here is "
                             f"{format_duration(max_seconds)}.", title="Recording too long")
        return load_audio(path)
    except MediaError as error:
        raise UserError(f"{str(error).rstrip('.')}. Record again, or pick another file (WAV, MP3, OGG…).",
                        title="Unreadable audio") from None


def check_audio(path: str, max_seconds: float) -> np.ndarray:
    """The waveform (float32, 16 kHz), after a length check (from the header, before decoding) and a silence
    check. The caller keeps the waveform: the file is decoded once."""
    waveform = read_audio(path, max_seconds)
    if loudest_window_dbfs(waveform) < SILENCE_DBFS:
        raise UserError(f"'{os.path.basename(path)}' is silent: there is no speech to hear. Check the microphone, or "
                         "pick another file.", title="Silent audio")
    return waveform


def loudest_window_dbfs(waveform: np.ndarray, window: int = SAMPLE_RATE // 20) -> float:
    """Level of the loudest 50 ms in dB relative to full scale."""
    usable = len(waveform) // window * window
    frames = waveform[:usable].reshape(-1, window) if usable else waveform[None, :]
    rms = float(np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)).max())
    return 20 * np.log10(max(rms, 1e-10))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


REPETITION_GUARD = 10  # no_repeat_ngram_size, as the release's demo sets it


def sampling_config(temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 512,
                    seed: int | None = None) -> SamplingConfig:
    """The generation settings of a request, checked (temperature 0 means greedy)."""
    if not 0 <= temperature <= 2:
        raise UserError("Temperature must be between 0 and 2.", title="Bad setting")
    if not 0 < top_p <= 1:
        raise UserError("Top-p must be above 0 and at most 1.", title="Bad setting")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise UserError(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}.", title="Bad setting")
    return SamplingConfig(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                          temperature=temperature or 1.0, top_p=top_p, no_repeat_ngram_size=REPETITION_GUARD,
                          seed=seed)
