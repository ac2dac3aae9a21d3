"""Hands-free voice call: turn detection on a streaming microphone and the call's state machine.

Independent of the model and of Gradio, so it can be tested on the CPU with any responder.

* `TurnDetector` takes microphone chunks as Gradio's streaming `gr.Audio` delivers them ((rate, int16 or float
  array), any rate, mono or stereo), resamples to 16 kHz, runs Silero VAD on 32 ms frames and emits events:
  `SpeechStarted`, `TurnEnded` (with the utterance's 16 kHz waveform), `SpeechIgnored`, `SilenceTimeout`,
  `ChunkSkipped`. Every time in an event is "audio time": seconds of microphone audio received so far, which a live
  microphone keeps in step with the wall clock and tests can drive exactly.
* `CallSession` owns a detector and a responder and runs the states listening -> thinking -> speaking -> listening,
  with barge-in (interrupted), hang-up (ended) and a silence timeout. The microphone thread calls `feed`; the reply
  thread iterates `run_reply`; both may run at once.
* `detect_turns` runs the detector over a whole recording: the same turns a live call would take.

How a Gradio page drives a call: the microphone's `.stream` handler calls `session.feed(chunk)` and, on a
`TurnQueued` or `BargeIn` event, changes a hidden component; that component's `.change` runs a generator that
iterates `session.run_reply()` and streams the Chatbot (built from `session.transcript()`), while the page's own
player fetches the reply's audio as it is made (`session.reply_audio`). Hang-up calls `session.hang_up()`.

The end-of-speech logic (a start threshold with a lower threshold to stay in speech, then a minimum pause) follows
the one Silero VAD's own `get_speech_timestamps`/`VADIterator` use (snakers4/silero-vad, MIT).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

import numpy as np
import soxr

SAMPLE_RATE = 16000
FRAME = 512  # Silero's frame at 16 kHz (32 ms)
FRAME_S = FRAME / SAMPLE_RATE


# --------------------------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class TurnConfig:
    """When a visitor's turn starts and ends. Times in seconds."""

    end_pause_s: float = 0.5          # this much silence after speech ends the turn (OpenAI's realtime VAD's default)
    threshold: float = 0.5            # VAD speech probability that starts speech
    min_speech_s: float = 0.3         # shorter sounds (coughs, clicks, bursts) never become a turn
    max_utterance_s: float = 60.0     # the spoken-message limit: a longer turn is cut here
    silence_timeout_s: float | None = 30.0   # no speech for this long -> SilenceTimeout (None: never)
    pre_roll_s: float = 0.3           # audio kept before the onset (the VAD fires a little late on soft starts)
    post_roll_s: float = 0.15         # audio kept after the end (trailing consonants fall under the threshold)

    def __post_init__(self) -> None:
        checks = [
            (0.3 <= self.end_pause_s <= 1.5, "end_pause_s must be within 0.3-1.5 s"),
            (0.05 <= self.threshold <= 0.95, "threshold must be within 0.05-0.95"),
            (0.0 <= self.min_speech_s <= 2.0, "min_speech_s must be within 0-2 s"),
            (self.max_utterance_s >= 1.0, "max_utterance_s must be at least 1 s"),
            (self.silence_timeout_s is None or self.silence_timeout_s >= 1.0,
             "silence_timeout_s must be at least 1 s, or None"),
            (0.0 <= self.pre_roll_s <= 1.0, "pre_roll_s must be within 0-1 s"),
            (0.0 <= self.post_roll_s <= self.end_pause_s, "post_roll_s must be within 0 and end_pause_s"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def low_threshold(self) -> float:
        # Hysteresis as in Silero's own segmentation: once speaking, only a clearly lower probability is silence,
        # so soft syllables inside a sentence don't start the pause clock.
        return max(self.threshold - 0.15, 0.01)


# ---------------------------------------------------------------------------------------------------------- events

@dataclass(frozen=True)
class SpeechStarted:
    """Speech has lasted `min_speech_s`, so it will become a turn. `onset_s` is where it began."""
    onset_s: float
    confirmed_at_s: float


@dataclass(frozen=True, eq=False)
class Utterance:
    """What the detector made of a sound it took for speech (audio seconds); the events about one extend it."""
    start_s: float          # speech onset
    end_s: float            # where speech stopped (for "max_length", where it was cut)
    reason: str             # why it ended: "pause" | "max_length" | "end_of_stream", or "too_short" (ignored)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, eq=False)
class TurnEnded(Utterance):
    """A finished utterance. `audio` is 16 kHz mono float32 from `audio_start_s` (onset minus pre-roll)."""
    audio: np.ndarray
    detected_at_s: float    # when the detector decided (end_s + the pause, for "pause")
    audio_start_s: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no audio), e.g. for an API endpoint."""
        return {"start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "duration_s": round(self.duration_s, 3), "reason": self.reason,
                "detected_at_s": round(self.detected_at_s, 3)}


@dataclass(frozen=True)
class SpeechIgnored(Utterance):
    """A sound the VAD took for speech but that was too short to be a turn (a cough, a click)."""
    reason: str = "too_short"


@dataclass(frozen=True)
class SilenceTimeout:
    """No speech for `idle_s` seconds."""
    at_s: float
    idle_s: float


@dataclass(frozen=True)
class ChunkSkipped:
    """A microphone chunk that could not be used; the stream goes on without it."""
    reason: str


@dataclass(frozen=True)
class BargeIn:
    """The visitor spoke while turn `turn_index`'s reply was being made or played: it was stopped."""
    turn_index: int
    onset_s: float


@dataclass(frozen=True)
class TurnQueued(Utterance):
    """The utterance is turn `turn_index`, waiting for its reply (run `CallSession.run_reply`)."""
    turn_index: int


@dataclass(frozen=True)
class CallEnded:
    reason: str             # "hang_up" | "silence_timeout"


Event = Union[SpeechStarted, TurnEnded, SpeechIgnored, SilenceTimeout, ChunkSkipped, BargeIn, TurnQueued, CallEnded]


# ------------------------------------------------------------------------------------------------------ audio input

def as_mono_float(chunk: Any) -> tuple[int, np.ndarray]:
    """(rate, samples) from a Gradio audio value; raises ValueError saying what is wrong with it.

    Accepts int8/16/32 or float arrays, mono or (samples, channels)/(channels, samples) up to 8 channels.
    """
    if not isinstance(chunk, (tuple, list)) or len(chunk) != 2:
        raise ValueError("not a (sample_rate, array) pair")
    rate, data = chunk
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 4000 <= int(rate) <= 384000:
        raise ValueError(f"bad sample rate {rate!r}")
    try:
        data = np.asarray(data)
    except Exception:  # ragged lists and the like
        raise ValueError("samples are not an array") from None
    if data.dtype.kind == "i":
        samples = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    elif data.dtype.kind == "f":
        samples = data.astype(np.float32)
    else:
        raise ValueError(f"unsupported sample type {data.dtype}")
    if samples.ndim == 2:
        channel_axis = 1 if samples.shape[1] <= samples.shape[0] else 0
        if samples.shape[channel_axis] > 8:
            raise ValueError(f"bad shape {samples.shape}")
        samples = samples.mean(axis=channel_axis)
    elif samples.ndim != 1:
        raise ValueError(f"bad shape {samples.shape}")
    if samples.size == 0:
        raise ValueError("empty chunk")
    if not np.isfinite(samples).all():
        raise ValueError("NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > 2.0:  # float samples on the int16 scale, or garbage: either way not audio we can trust
        raise ValueError(f"float samples out of range (peak {peak:.3g})")
    return int(rate), np.clip(samples, -1.0, 1.0)


# -------------------------------------------------------------------------------------------------------------- VAD

_silero_lock = threading.Lock()
_silero_model: Any = None


def _shared_silero() -> Any:
    """The packaged Silero VAD ONNX model (shipped in the wheel, no download), loaded once per process."""
    global _silero_model
    with _silero_lock:
        if _silero_model is None:
            import torch
            threads = torch.get_num_threads()
            import silero_vad
            # Importing silero_vad calls torch.set_num_threads(1) for the whole process; the model would then
            # run on one core, so restore what was there.
            torch.set_num_threads(threads)
            _silero_model = silero_vad.load_silero_vad(onnx=True)
        return _silero_model


class SileroVad:
    """Speech probability of one 512-sample 16 kHz frame, with the model's recurrent state kept per instance.

    Instances share one onnxruntime session (its `run` is thread-safe) and keep their own state and context.
    """

    frame_size = FRAME

    def __init__(self) -> None:
        self._model = copy.copy(_shared_silero())
        self._model.reset_states()

    def __call__(self, frame: np.ndarray) -> float:
        import torch
        return float(self._model(torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)), SAMPLE_RATE))

    def reset(self) -> None:
        self._model.reset_states()


# ---------------------------------------------------------------------------------------------------- turn detector

class TurnDetector:
    """Streaming end-of-turn detection. Not thread-safe on its own (`CallSession` guards it)."""

    def __init__(self, config: TurnConfig | None = None, vad: Callable[[np.ndarray], float] | None = None) -> None:
        self.config = config or TurnConfig()
        self._vad = vad if vad is not None else SileroVad()
        self.skipped_chunks = 0
        self.ignored_sounds = 0
        self._rate: int | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, np.float32)   # resampled samples not yet a whole frame
        self._frames: list[np.ndarray] = []        # retained frames, the first one is frame number _first
        self._first = 0
        self._count = 0                            # frames processed
        self._onset: int | None = None             # frame where the current sound began
        self._last_voiced = 0
        self._quiet_from: int | None = None        # first frame of the current run under the low threshold
        self._confirmed = False
        self._cut = False                          # cut at max length: ignore the rest until the visitor pauses
        self._idle_from = 0                        # frame since which nobody spoke
        self._timeout_sent = False

    # frames <-> seconds
    @staticmethod
    def _s(frames: int) -> float:
        return frames * FRAME_S

    def _frames_in(self, seconds: float) -> int:
        return max(int(round(seconds / FRAME_S)), 1)

    @property
    def now_s(self) -> float:
        """Seconds of audio processed."""
        return self._s(self._count)

    @property
    def in_speech(self) -> bool:
        return self._confirmed and not self._cut

    def feed(self, chunk: Any) -> list[Event]:
        """Take one microphone chunk; return what happened in it, in order. A bad chunk is skipped, not raised."""
        try:
            rate, samples = as_mono_float(chunk)
        except ValueError as error:
            self.skipped_chunks += 1
            return [ChunkSkipped(str(error))]
        return self._process(self._resample(rate, samples))

    def flush(self) -> list[Event]:
        """End of stream: a turn still in progress ends here (reason "end_of_stream")."""
        tail = np.zeros(0, np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler, self._rate = None, None
        events = self._process(tail)
        if self._onset is not None:
            end = self._quiet_from if self._quiet_from is not None else self._count
            event = self._close(end, "end_of_stream")
            if event is not None:
                events.append(event)
        return events

    def hold_idle_until(self, at_s: float) -> None:
        """Count silence for the timeout only from `at_s` (e.g. when a reply's playback ends)."""
        self._idle_from = max(self._idle_from, int(at_s / FRAME_S))
        self._timeout_sent = False

    def drop_current(self) -> None:
        """Forget the sound in progress (hang-up): it will not become a turn."""
        self._onset, self._quiet_from, self._confirmed, self._cut = None, None, False, False

    def _resample(self, rate: int, samples: np.ndarray) -> np.ndarray:
        if rate == SAMPLE_RATE and self._resampler is None:
            return samples
        head = np.zeros(0, np.float32)
        if rate != self._rate:
            # A new rate mid-stream (another device): finish the old stream so its buffered tail isn't lost.
            if self._resampler is not None:
                head = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32")
            self._rate = rate
        body = samples if self._resampler is None else self._resampler.resample_chunk(samples)
        return np.concatenate([head, body]) if head.size else body

    def _process(self, samples: np.ndarray) -> list[Event]:
        events: list[Event] = []
        if samples.size:
            self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = self._pending.size // FRAME * FRAME
        frames, self._pending = self._pending[:whole].reshape(-1, FRAME), self._pending[whole:]
        for frame in frames:
            self._frames.append(frame)
            self._count += 1
            event = self._step(float(self._vad(frame)))
            if event is not None:
                events.append(event)
        self._trim()
        return events

    def _step(self, p: float) -> Event | None:
        """Advance by the frame just appended (number `_count - 1`), whose speech probability is `p`."""
        c, i = self.config, self._count - 1
        if self._onset is None:
            if p >= c.threshold:
                self._onset, self._last_voiced, self._quiet_from = i, i, None
                self._confirmed = self._cut = False
                return self._maybe_confirm(i)
            idle = self._s(i + 1 - self._idle_from)
            if c.silence_timeout_s is not None and not self._timeout_sent and idle >= c.silence_timeout_s:
                self._timeout_sent = True
                return SilenceTimeout(at_s=self._s(i + 1), idle_s=idle)
            return None
        if p >= c.threshold:
            self._last_voiced, self._quiet_from = i, None
        elif p < c.low_threshold and self._quiet_from is None:
            self._quiet_from = i
        pause = self._frames_in(c.end_pause_s)
        if self._quiet_from is not None and i + 1 - self._quiet_from >= pause:
            return self._close(self._quiet_from, "pause")
        # Noise can hold the probability between the two thresholds for ever; a long enough stretch without
        # a clearly voiced frame ends the sound too.
        if i - self._last_voiced >= 2 * pause:
            return self._close(self._last_voiced + 1, "pause")
        if self._confirmed and not self._cut and i + 1 - self._onset >= self._frames_in(c.max_utterance_s):
            self._cut = True
            self._idle_from = i + 1
            return self._turn(self._onset, i + 1, "max_length")
        return self._maybe_confirm(i)

    def _maybe_confirm(self, i: int) -> Event | None:
        if self._confirmed or self._cut:
            return None
        if self._s(self._last_voiced + 1 - self._onset) >= self.config.min_speech_s:
            self._confirmed = True
            self._timeout_sent = False
            return SpeechStarted(onset_s=self._s(self._onset), confirmed_at_s=self._s(i + 1))
        return None

    def _close(self, end: int, reason: str) -> Event | None:
        """The sound in progress is over at frame `end`."""
        onset, confirmed, cut = self._onset, self._confirmed, self._cut
        self.drop_current()
        if confirmed:  # only speech restarts the silence timeout: coughs and bursts of noise don't
            self._idle_from = max(self._idle_from, end)
            # A turn always follows its SpeechStarted (never without one), unless it was already cut.
            return None if cut else self._turn(onset, end, reason)
        self.ignored_sounds += 1
        return SpeechIgnored(start_s=self._s(onset), end_s=self._s(end))

    def _turn(self, onset: int, end: int, reason: str) -> TurnEnded:
        c = self.config
        start = max(onset - int(round(c.pre_roll_s / FRAME_S)), self._first)
        stop = min(end + int(round(c.post_roll_s / FRAME_S)), self._first + len(self._frames))
        audio = np.concatenate(self._frames[start - self._first:stop - self._first]) if stop > start \
            else np.zeros(0, np.float32)
        return TurnEnded(audio=audio, start_s=self._s(onset), end_s=self._s(end), reason=reason,
                         detected_at_s=self.now_s, audio_start_s=self._s(start))

    def _trim(self) -> None:
        # Keep the pre-roll while idle; keep the whole sound (up to the length limit) while one is going on.
        keep_from = self._count - int(round(self.config.pre_roll_s / FRAME_S)) - 1
        if self._onset is not None and not self._cut:
            keep_from = min(keep_from, self._onset - int(round(self.config.pre_roll_s / FRAME_S)))
        drop = keep_from - self._first
        if drop > 256:  # trim in batches, not per frame
            del self._frames[:drop]
            self._first += drop


# ----------------------------------------------------------------------------------------- a whole recording (API)

def _chunks_of(source: Any, chunk_s: float) -> Iterable[Any]:
    if isinstance(source, (str, os.PathLike)):
        import soundfile
        data, rate = soundfile.read(os.fspath(source), dtype="float32", always_2d=False)
        source = (rate, data)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], (int, np.integer)):
        rate, data = source
        data = np.asarray(data)
        step = max(int(rate * chunk_s), 1)
        return [(rate, data[i:i + step]) for i in range(0, len(data), step)]
    return source


def scan(source: Any, config: TurnConfig | None = None, *, chunk_s: float = 0.5,
         vad: Callable[[np.ndarray], float] | None = None) -> list[Event]:
    """Run a fresh detector over a recording, the way a live call would hear it, and return every event.

    `source` is a wav path, a whole (rate, array) recording (cut into `chunk_s` chunks, as the browser sends
    it), or an iterable of (rate, array) chunks. The stream is flushed at the end.
    """
    detector = TurnDetector(config, vad)
    events: list[Event] = []
    for chunk in _chunks_of(source, chunk_s):
        events += detector.feed(chunk)
    return events + detector.flush()


def detect_turns(source: Any, config: TurnConfig | None = None, *, chunk_s: float = 0.5,
                 vad: Callable[[np.ndarray], float] | None = None) -> list[TurnEnded]:
    """The turns a live call would take from this recording (see `scan`)."""
    return [e for e in scan(source, config, chunk_s=chunk_s, vad=vad) if isinstance(e, TurnEnded)]


# ------------------------------------------------------------------------------------------------------ the session

class CallState(Enum):
    LISTENING = "listening"       # waiting for the visitor (or hearing them)
    THINKING = "thinking"         # a turn is queued or its reply started, nothing produced yet
    SPEAKING = "speaking"         # the reply is being produced or is still playing
    INTERRUPTED = "interrupted"   # the visitor cut the reply off and is still talking
    ENDED = "ended"


@dataclass(frozen=True)
class ReplyPiece:
    """One piece of a reply: text written and/or audio (mono, int16 or float) at `sample_rate`."""
    text: str = ""
    audio: np.ndarray | None = None
    sample_rate: int = 0


Responder = Callable[[np.ndarray, int, threading.Event], Iterable[ReplyPiece]]


@dataclass(frozen=True)
class ReplyAudio:
    """The newest turn's reply audio from one of its pieces on: what a page's player fetches while it plays."""
    turn_index: int                   # -1: no turn yet
    start: int                        # the index of the first piece in `pieces`
    pieces: list[np.ndarray]
    sample_rate: int
    stopped: bool                     # cut off (barge-in, hang-up): nothing more of it is to be played
    done: bool                        # no more pieces will come


@dataclass
class Turn:
    """One exchange of the call: what the visitor said and what came back."""
    index: int
    user_audio: np.ndarray            # 16 kHz float32
    start_s: float
    end_s: float
    end_reason: str                   # "pause" | "max_length" | "end_of_stream"
    reply_text: str = ""
    reply_audio: list[np.ndarray] = field(default_factory=list)
    reply_sample_rate: int = 0
    interrupted: bool = False
    done: bool = False                # the reply finished, was stopped, or never ran
    error: str | None = None
    timing: dict[str, float] = field(default_factory=dict)   # wall-clock stamps: see CallSession
    stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def reply_audio_s(self) -> float:
        if not self.reply_sample_rate:
            return 0.0
        return sum(len(a) for a in self.reply_audio) / self.reply_sample_rate

    def reply_waveform(self) -> np.ndarray:
        return np.concatenate(self.reply_audio) if self.reply_audio else np.zeros(0, np.float32)


class CallSession:
    """One visitor's call. `feed` (microphone thread) and `run_reply` (reply thread) may run at the same time.

    Timing stamps in `Turn.timing` (from `clock`, seconds): "speech_end" (estimated: when the visitor stopped
    talking), "queued" (the turn was detected), "reply_started", "first_text", "first_audio", "reply_done".
    The responder should check its stop event between steps: `run_reply` can only stop it between pieces.
    """

    def __init__(self, respond: Responder, config: TurnConfig | None = None, *, barge_in: bool = True,
                 playback_latency_s: float = 0.8, vad: Callable[[np.ndarray], float] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._respond = respond
        self._detector = TurnDetector(config, vad)
        self._barge_in = barge_in
        # The browser plays a reply this long behind its generation (in audio time: the microphone's transport to
        # the server plus the reply's to the page); speech before playback ends is a barge-in.
        self._latency = playback_latency_s
        self._clock = clock or time.monotonic
        self._lock = threading.Condition(threading.RLock())
        self._state = CallState.LISTENING
        self._turns: list[Turn] = []
        self._pending: Turn | None = None
        self._running: Turn | None = None
        self._playback_end_s = 0.0     # audio time at which the last reply has finished playing
        self._first_audio_s: float | None = None
        self._ignoring = False         # barge-in is off and the visitor talks over the reply
        self.end_reason: str | None = None
        self.chunks_after_end = 0

    # -- what the UI reads

    @property
    def state(self) -> CallState:
        with self._lock:
            self._settle()
            return self._state

    @property
    def now_s(self) -> float:
        with self._lock:
            return self._detector.now_s

    @property
    def user_speaking(self) -> bool:
        """The visitor is in the middle of a turn (for a "hearing you..." status)."""
        with self._lock:
            return self._detector.in_speech

    @property
    def config(self) -> TurnConfig:
        return self._detector.config

    def transcript(self) -> list[Turn]:
        """A snapshot of the turns so far (copies; safe to read while the call goes on)."""
        with self._lock:
            return [dataclasses.replace(t, reply_audio=list(t.reply_audio), timing=dict(t.timing))
                    for t in self._turns]

    def reply_audio(self, turn_index: int, start: int = 0) -> ReplyAudio:
        """The newest turn's reply audio from piece `start` on; from its first piece when the newest turn is not
        `turn_index` (a new turn replaces the reply being played)."""
        with self._lock:
            if not self._turns:
                return ReplyAudio(-1, 0, [], 0, False, False)
            turn = self._turns[-1]
            start = start if turn.index == turn_index else 0
            return ReplyAudio(turn.index, start, turn.reply_audio[start:], turn.reply_sample_rate,
                              turn.stop.is_set(), turn.done)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"turns": len(self._turns), "interrupted": sum(t.interrupted for t in self._turns),
                    "skipped_chunks": self._detector.skipped_chunks,
                    "ignored_sounds": self._detector.ignored_sounds, "chunks_after_end": self.chunks_after_end}

    # -- microphone thread

    def feed(self, chunk: Any) -> list[Event]:
        """Take one microphone chunk. Returns its events in order, each detector event followed by what the
        call made of it (`BargeIn`, `TurnQueued`, `CallEnded`)."""
        with self._lock:
            if self._state is CallState.ENDED:
                self.chunks_after_end += 1
                return []
            out: list[Event] = []
            for event in self._detector.feed(chunk):
                out.append(event)
                out += self._on(event)
                if self._state is CallState.ENDED:
                    break
            self._settle()
            return out

    def hang_up(self, reason: str = "hang_up") -> list[Event]:
        """End the call: the reply in progress stops (and is marked interrupted); later chunks are ignored."""
        with self._lock:
            if self._state is CallState.ENDED:
                return []
            for turn in (self._running, self._pending):
                if turn is not None and not turn.done:
                    turn.interrupted = True
                    turn.stop.set()
            if self._pending is not None:
                self._pending.done = True
                self._pending = None
            self._detector.drop_current()
            self._state = CallState.ENDED
            self.end_reason = reason
            self._lock.notify_all()
            return [CallEnded(reason)]

    def _on(self, event: Event) -> list[Event]:
        if isinstance(event, SpeechStarted):
            # Judge by when the speech was confirmed, not by the end of the chunk that carried it: speech heard
            # while the reply still played is a barge-in even if the chunk ends after the playback.
            self._settle(event.confirmed_at_s)
            if self._state in (CallState.THINKING, CallState.SPEAKING):
                if not self._barge_in:
                    self._ignoring = True
                    return []
                return [self._interrupt(event.onset_s)]
            return []
        if isinstance(event, TurnEnded):
            if self._ignoring:
                self._ignoring = False
                return []
            return [self._queue(event)]
        if isinstance(event, SilenceTimeout):
            self._settle()
            if self._state is CallState.LISTENING:
                return self.hang_up("silence_timeout")
        return []

    def _interrupt(self, onset_s: float) -> BargeIn:
        turn = self._running or self._pending or self._turns[-1]
        turn.interrupted = True
        turn.stop.set()
        if self._pending is turn:  # never started: it stays in the transcript, unanswered
            turn.done = True
            self._pending = None
        self._playback_end_s = 0.0
        self._state = CallState.INTERRUPTED
        return BargeIn(turn.index, onset_s)

    def _queue(self, event: TurnEnded) -> TurnQueued:
        now = self._clock()
        # The chunk that ended the turn arrived with audio after the decision, and that audio after the end of
        # speech; taking both off gives when the visitor stopped talking (less the browser's transport lag).
        timing = {"queued": now, "speech_end": now - (self._detector.now_s - event.end_s)}
        turn = Turn(index=len(self._turns), user_audio=event.audio, start_s=event.start_s, end_s=event.end_s,
                    end_reason=event.reason, timing=timing)
        if self._pending is not None:  # cannot happen with barge-in on; keep the call consistent anyway
            self._pending.done = True
        self._turns.append(turn)
        self._pending = turn
        self._state = CallState.THINKING
        self._lock.notify_all()
        return TurnQueued(event.start_s, event.end_s, event.reason, turn_index=turn.index)

    def _settle(self, at_s: float | None = None) -> None:
        # A finished reply keeps the call "speaking" until its audio has played out in the browser.
        now = self._detector.now_s if at_s is None else at_s
        if (self._state is CallState.SPEAKING and self._running is None and self._pending is None
                and now >= self._playback_end_s):
            self._state = CallState.LISTENING

    # -- reply thread

    def wait_for_turn(self, timeout: float | None = None) -> int | None:
        """Block until a turn is queued (its index) or the call ends / the timeout passes (None)."""
        with self._lock:
            self._lock.wait_for(lambda: self._pending is not None or self._state is CallState.ENDED, timeout)
            return self._pending.index if self._pending is not None else None

    def run_reply(self, wait_s: float = 0.0) -> Iterator[ReplyPiece]:
        """Answer the queued turn (waiting up to `wait_s` for one): the responder's pieces, as they come.

        Stops early, without an error, on barge-in or hang-up; the pieces produced so far stay in the transcript.
        A responder error is recorded in `Turn.error`, the call goes back to listening, and the error is raised.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._pending is not None or self._state is CallState.ENDED, wait_s)
            turn = self._pending
            if turn is None or self._state is CallState.ENDED:
                return
            self._pending, self._running = None, turn
            self._first_audio_s = None
            turn.timing["reply_started"] = self._clock()
        pieces = None
        try:
            pieces = iter(self._respond(turn.user_audio, turn.index, turn.stop))
            for piece in pieces:
                with self._lock:
                    if turn.stop.is_set():
                        break
                    self._record(turn, piece)
                yield piece
                if turn.stop.is_set():
                    break
        except Exception as error:
            with self._lock:
                turn.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a generator responder gets GeneratorExit and can free what it holds
            with self._lock:
                self._finish(turn)

    def _record(self, turn: Turn, piece: ReplyPiece) -> None:
        now = self._clock()
        if piece.text:
            turn.reply_text += piece.text
            turn.timing.setdefault("first_text", now)
        if piece.audio is not None and len(piece.audio):
            if piece.sample_rate <= 0:
                raise ValueError("a ReplyPiece with audio needs its sample_rate")
            if turn.reply_sample_rate and piece.sample_rate != turn.reply_sample_rate:
                raise ValueError("a reply's audio pieces must share one sample rate")
            turn.reply_sample_rate = piece.sample_rate
            turn.reply_audio.append(np.asarray(piece.audio))
            turn.timing.setdefault("first_audio", now)
            if self._first_audio_s is None:
                self._first_audio_s = self._detector.now_s
        if (piece.text or turn.reply_audio) and self._state is CallState.THINKING:
            self._state = CallState.SPEAKING

    def _finish(self, turn: Turn) -> None:
        turn.done = True
        turn.timing["reply_done"] = self._clock()
        if self._running is turn:
            self._running = None
        if turn.stop.is_set() or self._state is CallState.ENDED or self._turns[-1] is not turn:
            return
        now = self._detector.now_s
        start = self._first_audio_s if self._first_audio_s is not None else now
        self._playback_end_s = max(now, start + turn.reply_audio_s + self._latency) if turn.reply_audio else now
        self._detector.hold_idle_until(self._playback_end_s)
        self._state = CallState.SPEAKING if turn.reply_audio else CallState.LISTENING
        self._settle()
