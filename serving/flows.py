"""The tabs' flows: each takes a visitor's request, checks it, builds the prompt and streams the reply (text, and
speech when asked) as it grows. They raise `UserError` only; app.py shows it."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import soundfile
import torch

from ming.audio import SAMPLE_RATE
from ming.media import MediaError
from ming.processor import asr_messages, thinking_messages
from ming.sampling import SamplingConfig

from .checks import ASR_SEGMENT_SECONDS, MAX_ASR_SECONDS, check_audio, sampling_config
from .conversation import Turn, new_turn, prepare_inputs
from . import long_video_flow
from .engine import Job, get_engine, stream_job
from .errors import UserError
from .long_video_flow import VideoStatus
from .voice_clone import MY_VOICE, clone_voice

log = logging.getLogger("serving.flows")


def user_errors(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Wrap a tab's generator so that nothing but a readable UserError ever leaves it."""

    def wrapped(*args, **kwargs):
        try:
            yield from handler(*args, **kwargs)
        except UserError:
            raise
        except (MediaError, ValueError) as error:
            raise UserError(str(error)) from None
        except Exception as error:
            log.error("request failed:\n%s", traceback.format_exc())
            raise UserError(f"Something went wrong on our side ({type(error).__name__}). Please try again.",
                            title="Something went wrong") from None

    return functools.wraps(handler)(wrapped)


def conversation_inputs(turns: list[Turn], system_prompt: str, sampling: SamplingConfig,
                        build: Callable[[list[dict]], list[dict]] = lambda m: m) -> dict[str, torch.Tensor]:
    engine = get_engine()
    return prepare_inputs(engine.processor, engine.max_context, turns, system_prompt, sampling, build)


@dataclass
class Progress:
    """A reply as it streams: the turn (mutated in place) and the newest audio chunk to play, if any."""

    turn: Turn
    audio: tuple[int, np.ndarray] | None = None
    done: bool = False
    notice: str = ""  # something worth a short message beside the reply (e.g. it stopped at max new tokens)


def reply_stream(job: Job, turn: Turn, events: Iterator | None = None) -> Iterator[Progress]:
    """Stream a job into `turn.reply`; keep the spoken reply's chunks and save them as one replayable wav.
    `events`: what to stream instead of running `job` (a long video's statuses and chunks; `job` then only says
    the sampling settings)."""
    started = time.perf_counter()
    speech = get_engine().speech
    rate = speech.sample_rate if speech is not None else 0
    pieces: list[np.ndarray] = []
    yield Progress(turn)  # the question shows at once, while the prompt is prefilled
    for chunk in stream_job(job) if events is None else events:
        if isinstance(chunk, VideoStatus):  # a long video on its way into memory: the pending reply says so
            turn.status = chunk.line
            yield Progress(turn, notice=chunk.notice)
            continue
        turn.status = ""
        turn.reply += chunk.text
        turn.seconds = time.perf_counter() - started
        if chunk.audio is not None and len(chunk.audio):
            pieces.append(chunk.audio)
            yield Progress(turn, audio=(rate, chunk.audio))
        elif chunk.text:
            yield Progress(turn)
        elif chunk.queue_position is not None:  # the server is full: say where this request stands
            ahead = chunk.queue_position
            yield Progress(turn, notice=f"The server is busy: {ahead} request{'s' if ahead != 1 else ''} ahead of "
                                        "you. Your reply starts as soon as there is room.")
        elif chunk.finish_reason == "length":
            yield Progress(turn, notice=f"The reply stopped at max new tokens ({job.sampling.max_new_tokens}); "
                                        "raise it in the settings for longer answers.")
        elif chunk.finish_reason == "stopped":
            turn.interrupted = True
    turn.status = ""
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


def check_voice(speak: bool, voice: str | None, cloned: torch.Tensor | None = None,
                voice_sample: str | None = None) -> str | torch.Tensor | None:
    """The voice to speak with: a bundled voice's name, or an embedding ("My voice": the session's cloned voice;
    `voice_sample`: a recording cloned for this call only, overriding the rest). None when not speaking."""
    if not speak:
        return None
    engine = get_engine()
    if engine.speech is None:
        raise UserError("This checkpoint has no speech model (no talker/ folder), so replies can only be text.",
                        title="No speech")
    if voice_sample:
        return clone_voice(voice_sample, consent=True)  # an API caller sending a sample vouches for it
    if voice == MY_VOICE:
        if cloned is None:
            raise UserError("Clone a voice first (under 'Clone a voice'), or pick another voice.", title="No voice")
        return cloned
    if voice not in engine.voices:
        raise UserError(f"Unknown voice {voice!r}; choose one of: {', '.join(engine.voices)}.", title="Unknown voice")
    return voice


# =============================================================================================================== tabs
@user_errors
def chat(turns: list[Turn], text: str, files: list[str], system_prompt: str, sampling: SamplingConfig, speak: bool,
         voice: str | None, session: str, cloned: torch.Tensor | None = None,
         voice_sample: str | None = None) -> Iterator[tuple[list[Turn], Progress]]:
    """Chat: a multimodal message, answered in text (and speech, when asked) with the whole history in context."""
    voice = check_voice(speak, voice, cloned, voice_sample)
    turn = new_turn(text, files)
    turns = [*turns, turn]
    if long_video_flow.long_video_in_view(turns):  # sampled, thinned and compressed once, kept for follow-ups
        events = long_video_flow.answer(session, turns, system_prompt, sampling, voice)
        for progress in reply_stream(Job(session, [], sampling, voice), turn, events):
            yield turns, progress
        return
    inputs = conversation_inputs(turns, system_prompt, sampling)
    for progress in reply_stream(Job(session, [inputs], sampling, voice), turn):
        yield turns, progress


@user_errors
def vision_qa(image: str | None, video: str | None, question: str, sampling: SamplingConfig, session: str,
              on_status: Callable[[VideoStatus], None] | None = None) -> Iterator[str]:
    """Image & video QA: one image or one video and a question; yields the answer as it grows. A long video is
    sampled, thinned and compressed into memory first (`on_status` hears how far that is), once per session:
    another question about it is answered from memory."""
    if image and video:
        raise UserError("Ask about either the image or the video: clear one of them.", title="Two inputs")
    if not image and not video:
        raise UserError("Add an image or a video first.", title="Nothing to look at")
    question = (question or "").strip() or "Describe this in detail."
    turn = new_turn(question, [image or video])
    if video and long_video_flow.is_long(video):
        # Nothing is shown until the answer starts: meanwhile the answer box carries the progress bar.
        for event in long_video_flow.answer(session, [turn], "", sampling):
            if isinstance(event, VideoStatus):
                if on_status is not None:
                    on_status(event)
            elif event.text:
                turn.reply += event.text
                yield turn.reply
        if not turn.reply:  # stopped before the answer began: the answer is empty, not missing
            yield ""
        return
    inputs = conversation_inputs([turn], "", sampling)
    for _ in reply_stream(Job(session, [inputs], sampling), turn):
        yield turn.reply


def split_for_asr(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> list[np.ndarray]:
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
        raise UserError("Record or upload some speech first.", title="No audio")
    waveform = check_audio(audio, MAX_ASR_SECONDS)
    segments = [(SAMPLE_RATE, segment) for segment in split_for_asr(waveform)]
    # A transcript is never longer than the speech: ~3 words a second at most, plus the language tag.
    longest = max(len(samples) for _, samples in segments) / SAMPLE_RATE
    sampling = sampling_config(temperature=0.0, top_p=1.0, max_new_tokens=32 + int(6 * longest))
    inputs = []
    for segment in segments:
        try:
            inputs.append(get_engine().processor(asr_messages(segment), add_generation_prompt=True))
        except MediaError as error:
            raise UserError(str(error), title="Unreadable audio") from None
    done: list[str] = []
    current = ""
    for chunk in stream_job(Job(session, inputs, sampling)):
        current += chunk.text
        if chunk.segment_done:
            done.append(current.strip())
            current = ""
        yield "\n".join([*done, current.strip()] if current else done)


@user_errors
def speech_to_speech(turns: list[Turn], audio: str | None, voice: str | None, sampling: SamplingConfig,
                     session: str, cloned: torch.Tensor | None = None,
                     voice_sample: str | None = None) -> Iterator[tuple[list[Turn], Progress]]:
    """Speech-to-speech: a spoken message in, a spoken reply streamed out with its text; multi-turn."""
    voice = check_voice(True, voice, cloned, voice_sample)
    if not audio:
        raise UserError("Record or upload a spoken message first.", title="No audio")
    turn = new_turn("", [audio])
    turns = [*turns, turn]
    inputs = conversation_inputs(turns, "", sampling)
    for progress in reply_stream(Job(session, [inputs], sampling, voice), turn):
        yield turns, progress


@user_errors
def thinking(turns: list[Turn], text: str, image: str | None, sampling: SamplingConfig,
             session: str) -> Iterator[tuple[list[Turn], Progress]]:
    """Thinking mode: the release's chain-of-thought prompt on the newest question (optionally with an image)."""
    turn = new_turn(text, [image] if image else [])
    turns = [*turns, turn]
    inputs = conversation_inputs(turns, "", sampling, build=thinking_messages)
    for progress in reply_stream(Job(session, [inputs], sampling), turn):
        yield turns, progress
