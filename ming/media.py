"""Loading user media (images, videos, audio) into the arrays the processor expects.

Every loader turns a bad input into a `MediaError` (a ValueError) whose message names the file and says what is
wrong, so the UI can show it as is. The sampling and resizing rules follow the Ming-Lite-Omni-Preview reference:
  * images: RGB PIL images (the processor resizes them),
  * video: about 2 frames per second ("duration x 2" frames, uniform bin midpoints), clamped to [4, 128], even,
    each frame resized bicubic + antialias within per-frame pixel bounds,
  * long video (ours, not the reference's): a rate that falls with length (`long_video_timestamps`), frames read
    by timestamp with seeking so an hours-long file is never decoded whole (`read_frames_at`),
  * audio: float32 mono at 16 kHz, keeping the FIRST channel of multi-channel audio (the reference does not downmix).
"""

import contextlib
import io
import math
import os
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Union

import av
import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

AUDIO_SAMPLE_RATE = 16000
MIN_AUDIO_SAMPLES = 400  # one 25 ms analysis window at 16 kHz: shorter clips give no feature frames

# Image/video geometry: sides are multiples of 28 (14-pixel patches merged 2x2), aspect ratio at most 200.
IMAGE_FACTOR = 28
MAX_ASPECT_RATIO = 200

# Video: ~2 frames per second, between 4 and 128 frames, an even count (frames are paired into temporal patches).
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
PROCESSOR_MAX_FRAMES = 128  # the reference processor's cap when a request names no max_frames
DEMO_MAX_FRAMES = 64  # the cap the release's own demo passes as max_frames; our UI's short-clip path uses it too
VIDEO_FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 9216 * 28 * 28  # budget over all frames: caps a video near 9216 LLM tokens
VIDEO_RESIZE_CHUNK = 8  # frames resized at a time, to bound the float32 memory of long high-resolution clips

MediaSource = Union[str, os.PathLike, bytes]


class MediaError(ValueError):
    """A media input that cannot be used; the message is meant for the end user."""


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source)) or os.fspath(source)
    return "the uploaded data"


def _open_source(source: MediaSource):
    """A path string or a file-like object, for the decoders that accept either."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    path = os.fspath(source)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not os.path.isfile(path):
        raise MediaError(f"File not found: '{path}'.")
    return path


# ----------------------------------------------------------------------------------------------------------- geometry

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.

    Sides are rounded to the nearest multiple (Python's round, ties to even, as the reference does); if the area is
    out of bounds both sides are scaled by the same factor and floored (too big) or ceiled (too small).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"A {width}x{height} image or video frame is too elongated: the aspect ratio must be at "
                         f"most {MAX_ASPECT_RATIO}:1.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames_bicubic(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [T, H, W, 3] with antialiased bicubic, exactly like torchvision's uint8 tensor resize.

    torchvision interpolates in float32, clamps to [0, 255], rounds half to even and casts back to uint8.
    """
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for start in range(0, frames.shape[0], VIDEO_RESIZE_CHUNK):
        chunk = torch.from_numpy(frames[start:start + VIDEO_RESIZE_CHUNK]).permute(0, 3, 1, 2).float()
        chunk = F.interpolate(chunk, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        chunk = chunk.clamp_(0, 255).round_().to(torch.uint8)
        out[start:start + VIDEO_RESIZE_CHUNK] = chunk.permute(0, 2, 3, 1).numpy()
    return out


# ------------------------------------------------------------------------------------------------------------- images

def load_image(source: Union[MediaSource, Image.Image, np.ndarray]) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image, or an array [H, W], [H, W, 3|4] (uint8, or float 0..1).

    Files get their EXIF orientation applied. Alpha is dropped (not composited), as the reference's convert("RGB").
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    name = _name(source)
    try:
        image = Image.open(_open_source(source))
        image.load()
        image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"Could not read image '{name}': not a supported image file.") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise MediaError(f"Could not read image '{name}': the file is damaged or unsupported ({error}).") from None
    return image.convert("RGB")


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or array.size == 0:
        raise MediaError(f"An image array must be [H, W] or [H, W, 3] (or 1/4 channels); got shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.max(initial=0) <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


# -------------------------------------------------------------------------------------------------------------- video

def num_video_frames(total_frames: int, fps: float, max_frames: int | None = None) -> int:
    """Frames to sample: duration x 2, capped at `max_frames` (default PROCESSOR_MAX_FRAMES), at least 4, even."""
    at_two_fps = int(total_frames / fps * VIDEO_FPS)
    cap = max_frames if max_frames is not None else min(PROCESSOR_MAX_FRAMES, at_two_fps)
    cap = cap // VIDEO_FRAME_FACTOR * VIDEO_FRAME_FACTOR
    count = max(min(at_two_fps, cap), VIDEO_MIN_FRAMES)
    return count // VIDEO_FRAME_FACTOR * VIDEO_FRAME_FACTOR


def sample_frame_indices(num_frames: int, total_frames: int) -> list[int]:
    """Midpoints of `num_frames` equal bins over the clip (bin edges truncated to ints, as numpy's int linspace).

    With more bins than frames some bins are empty; they take their left edge (the reference would produce -1)."""
    edges = np.linspace(0, total_frames, num_frames + 1).astype(int)
    return [min(max(int(lo), int((lo + hi - 1) // 2)), total_frames - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def video_frame_size(height: int, width: int, num_frames: int) -> tuple[int, int]:
    """Per-frame size: area within [128, min(768, 9216 x 2 / frames)] x 28 x 28 pixels (never below 1.05 x min)."""
    max_pixels = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / num_frames * VIDEO_FRAME_FACTOR),
                     int(VIDEO_MIN_PIXELS * 1.05))
    return smart_resize(height, width, IMAGE_FACTOR, VIDEO_MIN_PIXELS, max_pixels)


def load_video(source: MediaSource, max_frames: int | None = None) -> np.ndarray:
    """Sampled and resized frames, uint8 [T, H, W, 3] (RGB), T even.

    Decoded with decord (the reference's reader, so frames match it to the pixel), falling back to PyAV for files
    decord cannot read. A clip shorter than 2 s still gives 4 frames; the reference instead falls back to reading
    every frame with torchvision, which is not copied here.
    """
    name = _name(source)
    src = _open_source(source)
    try:
        return _sample_and_resize(*_open_with_decord(src), max_frames)
    except MediaError:
        raise
    except Exception:
        if isinstance(src, io.BytesIO):
            src.seek(0)
        return _sample_and_resize(*_open_with_pyav(src, name), max_frames)


FrameReader = Callable[[list[int]], Iterator[np.ndarray]]


def _sample_and_resize(total_frames: int, fps: float, read: FrameReader, max_frames: int | None) -> np.ndarray:
    """Pick the frames, then decode and resize them a few at a time (a long 4K clip never sits in memory whole)."""
    indices = sample_frame_indices(num_video_frames(total_frames, fps, max_frames), total_frames)
    frames, resized = read(indices), []
    while batch := list(islice(frames, VIDEO_RESIZE_CHUNK)):
        height, width = video_frame_size(batch[0].shape[0], batch[0].shape[1], len(indices))
        resized.append(resize_frames_bicubic(np.stack(batch), height, width))
    return np.concatenate(resized)


def _open_with_decord(src) -> tuple[int, float, FrameReader]:
    import decord

    reader = decord.VideoReader(src)
    total, fps = len(reader), reader.get_avg_fps()
    if total == 0 or not fps > 0:
        raise RuntimeError("decord found no frames")

    def read(indices: list[int]) -> Iterator[np.ndarray]:
        for start in range(0, len(indices), VIDEO_RESIZE_CHUNK):
            yield from reader.get_batch(indices[start:start + VIDEO_RESIZE_CHUNK]).asnumpy()

    return total, fps, read


def _open_with_pyav(src, name: str) -> tuple[int, float, FrameReader]:
    def damaged(error: Exception) -> MediaError:
        return MediaError(f"Could not read video '{name}': the file is damaged or not a supported video ({error}).")

    try:
        with av.open(src) as container:
            if not container.streams.video:
                raise MediaError(f"Could not read video '{name}': the file has no video stream.")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)  # demux only: cheap
    except (av.FFmpegError, OSError, ValueError) as error:
        raise damaged(error) from None
    if total == 0 or fps <= 0:
        raise MediaError(f"Could not read video '{name}': no decodable frames.")

    def read(indices: list[int]) -> Iterator[np.ndarray]:
        wanted, emitted, frame = Counter(indices), 0, None
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            with av.open(src) as container:
                for position, decoded in enumerate(container.decode(video=0)):
                    if position in wanted:
                        frame = decoded.to_ndarray(format="rgb24")
                        for _ in range(wanted[position]):
                            yield frame
                        emitted += wanted[position]
                    if emitted == len(indices):
                        return
        except (av.FFmpegError, OSError, ValueError) as error:
            raise damaged(error) from None
        if frame is None:
            raise MediaError(f"Could not read video '{name}': no decodable frames.")
        for _ in range(len(indices) - emitted):  # fewer frames decoded than packets counted: repeat the last one
            yield frame

    return total, fps, read


def _header_duration(container, stream) -> float | None:
    """Seconds from the stream's or the container's header, None where neither says."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def video_duration(source: MediaSource) -> float:
    """Duration in seconds from the container header (or packet timestamps; never decodes), for cheap pre-checks."""
    name = _name(source)
    try:
        with av.open(_open_source(source)) as container:
            if not container.streams.video:
                raise MediaError(f"Could not read video '{name}': the file has no video stream.")
            stream = container.streams.video[0]
            seconds = _header_duration(container, stream)
            if seconds is not None:
                return seconds
            # No duration in the header (e.g. browser-recorded webm): read packet timestamps, without decoding.
            end = max((p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None), default=None)
            if end is not None and stream.time_base:
                return float(end * stream.time_base)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"Could not read video '{name}': the file is damaged or not a supported video ({error}).") \
            from None
    raise MediaError(f"Could not read video '{name}': its duration is unknown.")


# --------------------------------------------------------------------------------------------------------- long video

ProgressFn = Callable[[float, str], None]  # (fraction done in [0, 1], stage name) -> None

# Long videos are sampled more sparsely the longer they are: (up to this many seconds, frames per second). Two
# frames per second for ten minutes is 600 frame pairs; an hour at one per second is 1,800 pairs; past an hour the
# rate halves again, and LONG_VIDEO_MAX_FRAMES caps the total whatever the length (the ViT's cost is per frame).
LONG_VIDEO_RATES = ((10 * 60.0, 2.0), (60 * 60.0, 1.0), (math.inf, 0.5))
LONG_VIDEO_MAX_FRAMES = 7200
# Decode forward rather than seek while the next wanted frame is this close (seconds): a seek restarts at the
# keyframe before the target, which costs more than decoding a short gap. The reader raises it per file when seeks
# land before where it already was (long keyframe intervals).
SEEK_MIN_GAP = 2.0


def long_video_fps(seconds: float) -> float:
    """Frames per second sampled from a long video of this duration (LONG_VIDEO_RATES)."""
    return next(rate for limit, rate in LONG_VIDEO_RATES if seconds <= limit)


def long_video_timestamps(seconds: float, max_frames: int = LONG_VIDEO_MAX_FRAMES) -> list[float]:
    """Sample times (seconds from the start) for a long video: bin midpoints, as the short path's frame indices, at
    `long_video_fps`, an even count in [VIDEO_MIN_FRAMES, max_frames]."""
    if not seconds > 0:
        raise MediaError("The video's duration is unknown or zero.")
    count = min(round(seconds * long_video_fps(seconds)), max_frames)
    count = max(count // VIDEO_FRAME_FACTOR * VIDEO_FRAME_FACTOR, VIDEO_MIN_FRAMES)
    return [(i + 0.5) * seconds / count for i in range(count)]


@dataclass
class DecodeStats:
    """What reading a long video cost: frames decoded (wanted or not) and seeks made."""

    decoded: int = 0
    seeks: int = 0


def video_stream_size(source: MediaSource) -> tuple[int, int]:
    """(height, width) of the first video stream, from the header (no decoding)."""
    name = _name(source)
    try:
        with av.open(_open_source(source)) as container:
            if not container.streams.video:
                raise MediaError(f"Could not read video '{name}': the file has no video stream.")
            context = container.streams.video[0].codec_context
            return int(context.height), int(context.width)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"Could not read video '{name}': the file is damaged or not a supported video ({error}).") \
            from None


@dataclass(frozen=True)
class LongVideoPlan:
    """Which frames of a long video to read, and the size they are scaled to (as `video_frame_size` gives)."""

    seconds: float
    timestamps: list[float]
    height: int
    width: int

    @property
    def num_pairs(self) -> int:
        return len(self.timestamps) // VIDEO_FRAME_FACTOR


def plan_long_video(source: MediaSource, max_frames: int = LONG_VIDEO_MAX_FRAMES) -> LongVideoPlan:
    """Sample times and frame size for a long video, from its header alone."""
    seconds = video_duration(source)
    timestamps = long_video_timestamps(seconds, max_frames)
    height, width = video_stream_size(source)
    return LongVideoPlan(seconds, timestamps, *video_frame_size(height, width, len(timestamps)))


def read_frames_at(
    source: MediaSource,
    timestamps: list[float],
    size: tuple[int, int] | None = None,
    progress: ProgressFn | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[np.ndarray]:
    """The frame shown at each of `timestamps` (ascending seconds), RGB uint8 [H, W, 3], decoded with PyAV.

    A far-away target is reached by seeking to the keyframe before it and decoding forward from there, so the cost
    grows with the number of samples, not with the file's length. Nearby targets are decoded forward without a
    seek. Past the last decodable frame, the last frame is repeated. `size` (height, width) has FFmpeg scale the
    frame while converting it (bicubic; its filter widens when shrinking, so it is antialiased): several times
    cheaper than converting a 720p frame whole and resizing it in torch, which matters at thousands of frames.
    `progress` gets (fraction, "sampling")."""
    name = _name(source)
    stats = stats if stats is not None else DecodeStats()
    try:
        with av.open(_open_source(source)) as container:
            if not container.streams.video:
                raise MediaError(f"Could not read video '{name}': the file has no video stream.")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame- and slice-threaded decoding (the decode releases the GIL)
            interval = 1.0 / float(stream.average_rate) if stream.average_rate else 0.04
            base = stream.time_base
            origin = float(stream.start_time * base) if stream.start_time is not None and base else 0.0
            frames, seek_gap = container.decode(stream), SEEK_MIN_GAP
            ahead = ahead_time = last = None  # the decoded frame not yet passed, its time; the one before it
            position = -math.inf  # time of the newest decoded frame
            for done, target in enumerate(timestamps):
                sought_from = None
                if base and target - position > seek_gap:
                    try:
                        container.seek(int((origin + target) / base), stream=stream, backward=True)
                    except (av.FFmpegError, OSError, ValueError):
                        seek_gap = math.inf  # not seekable: decode forward from here on
                    else:
                        frames, ahead, sought_from, stats.seeks = container.decode(stream), None, position, \
                            stats.seeks + 1
                # Decode forward to the first frame still on screen at `target`. It is kept as `ahead`, not
                # consumed: the next target may fall within the same frame.
                while ahead is None or ahead_time <= target - interval * 0.999:
                    if ahead is not None:
                        last, ahead = ahead, None
                    ahead = next(frames, None)
                    if ahead is None:
                        break  # end of stream: the last frame stays on screen
                    stats.decoded += 1
                    ahead_time = (float(ahead.pts * base) - origin if ahead.pts is not None and base
                                  else position + interval)
                    if sought_from is not None:
                        # The first frame after a seek is the keyframe it landed on. Landing at or before where we
                        # already were means keyframes are further apart than this gap: seek less eagerly.
                        if ahead_time <= sought_from:
                            seek_gap = max(seek_gap, target - ahead_time)
                        sought_from = None
                    position = ahead_time
                frame = ahead if ahead is not None else last
                if frame is None:
                    raise MediaError(f"Could not read video '{name}': no decodable frames.")
                if progress is not None:
                    progress((done + 1) / len(timestamps), "sampling")
                if size is None:
                    yield frame.to_ndarray(format="rgb24")
                else:
                    yield frame.to_ndarray(format="rgb24", height=size[0], width=size[1], interpolation="BICUBIC")
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"Could not read video '{name}': the file is damaged or not a supported video ({error}).") \
            from None


# -------------------------------------------------------------------------------------------------------------- audio

AudioSource = Union[MediaSource, tuple]
LOSSLESS_SOUNDFILE_FORMATS = {"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64"}


def load_audio(source: AudioSource) -> np.ndarray:
    """Float32 mono waveform at 16 kHz from a file path, encoded bytes, or a (sample_rate, samples) tuple.

    Any format FFmpeg reads works (wav, flac, ogg, mp3, m4a/aac, webm, ...). Multi-channel audio keeps its FIRST
    channel, as the reference does (no downmix). Integer samples are scaled to [-1, 1). Resampling uses soxr.
    """
    if isinstance(source, tuple):
        sample_rate, samples = source
        name = "the recorded audio"
        waveform = _first_channel_from_array(np.asarray(samples), name)
    else:
        name = _name(source)
        waveform, sample_rate = _decode_audio(_open_source(source), name)
    if waveform.size < 1:
        raise MediaError(f"Audio '{name}' contains no samples.")
    if sample_rate != AUDIO_SAMPLE_RATE:
        waveform = soxr.resample(waveform, sample_rate, AUDIO_SAMPLE_RATE)
    if waveform.size < MIN_AUDIO_SAMPLES:
        raise MediaError(f"Audio '{name}' is too short ({1000 * waveform.size / AUDIO_SAMPLE_RATE:.0f} ms); "
                         f"at least {1000 * MIN_AUDIO_SAMPLES // AUDIO_SAMPLE_RATE} ms is needed.")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _first_channel_from_array(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim == 2:
        # [samples, channels] (Gradio) or [channels, samples] (torchaudio): channels is the short axis.
        samples = samples[:, 0] if samples.shape[0] >= samples.shape[1] else samples[0]
    elif samples.ndim != 1:
        raise MediaError(f"Audio '{name}' must be 1-D or 2-D samples; got shape {samples.shape}.")
    if np.issubdtype(samples.dtype, np.integer):
        return samples.astype(np.float32) / float(2 ** (8 * samples.dtype.itemsize - 1))
    return samples.astype(np.float32)


@contextlib.contextmanager
def _audio_stream(src, name: str):
    """(container, first audio stream) opened with FFmpeg; every failure becomes a MediaError naming the file."""
    try:
        with av.open(src) as container:
            if not container.streams.audio:
                raise MediaError(f"Could not read audio '{name}': the file has no audio stream.")
            yield container, container.streams.audio[0]
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"Could not read audio '{name}': the file is damaged or not a supported audio format "
                         f"({error}).") from None


def _decode_audio(src, name: str) -> tuple[np.ndarray, int]:
    # Lossless containers are read with libsndfile (exact and fast); everything else (mp3, ogg, m4a, aac, webm, ...)
    # goes through FFmpeg, the decoder the reference's torchaudio uses too.
    try:
        if soundfile.info(src).format in LOSSLESS_SOUNDFILE_FORMATS:
            if isinstance(src, io.BytesIO):
                src.seek(0)
            samples, sample_rate = soundfile.read(src, dtype="float32", always_2d=True)
            return samples[:, 0], sample_rate
    except Exception:
        pass
    if isinstance(src, io.BytesIO):
        src.seek(0)
    with _audio_stream(src, name) as (container, stream):
        to_float = av.AudioResampler(format="fltp")  # planar float, original layout and rate
        chunks, sample_rate = [], stream.rate
        for frame in container.decode(stream):
            for converted in to_float.resample(frame):
                chunks.append(converted.to_ndarray()[0])
                sample_rate = converted.sample_rate
        for converted in to_float.resample(None):
            chunks.append(converted.to_ndarray()[0])
    if not chunks:
        raise MediaError(f"Could not read audio '{name}': no decodable audio.")
    return np.concatenate(chunks).astype(np.float32), int(sample_rate)


def audio_duration(source: MediaSource) -> float:
    """Duration in seconds from the file header where possible (decodes only when the header lacks it)."""
    name = _name(source)
    src = _open_source(source)
    try:
        info = soundfile.info(src)
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:
        if isinstance(src, io.BytesIO):
            src.seek(0)
    with _audio_stream(src, name) as (container, stream):
        seconds = _header_duration(container, stream)
        if seconds is not None:
            return seconds
    if isinstance(src, io.BytesIO):
        src.seek(0)
    waveform, sample_rate = _decode_audio(src, name)
    return waveform.size / sample_rate
