"""Voice call, serving side: a `CallSession` (serving/voice_call.py) wired to the engine. No Gradio here.

* `VoiceCall` is one visitor's call. The page's microphone handler calls `feed(chunk)` (and reads `signal(events)`
  and `status()`), its reply event iterates `reply()` (the transcript), the page's player fetches the reply's audio
  with `next_reply_audio` as soon as it is made, and Hang up calls `hang_up()`. The responder builds the prompt
  from the call's transcript like Speech-to-speech does (earlier turns: the visitor's audio, which drops out of the
  model's view, and the reply's text; the newest turn: its audio) and streams the reply through the engine's
  `Job` / `stream_job`, so each reply is its own GPU job (on ZeroGPU, its own GPU task). Barge-in and hang-up stop
  the running generation through the engine's per-session stop event (`stop_session`), under a key of the call's
  own, so a call and the visitor's other tabs never stop each other.
* `detected_turns` and `whole_call` use the same turn logic on an audio file, without a browser (the API).

Clips (the visitor's turns and the replies' audio) are saved like the other tabs' reply clips, so the transcript
stays replayable after the call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ming.audio import SAMPLE_RATE

from .checks import MAX_AUDIO_SECONDS, MAX_ASR_SECONDS, format_duration, read_audio, sampling_config
from .conversation import Turn as ChatTurn
from .conversation import prepare_inputs
from .engine import Job, get_engine, stop_session, stream_job
from .errors import UserError
from .flows import check_voice, save_wav, user_errors
from .voice_call import (BargeIn, CallEnded, CallSession, CallState, Event, ReplyAudio, ReplyPiece, TurnConfig,
                         TurnQueued, detect_turns)
from .voice_call import Turn as CallTurn

PAUSE_RANGE_S = (0.3, 1.5)          # the end-of-turn pause a visitor may choose
DEFAULT_PAUSE_S = TurnConfig.end_pause_s
SILENCE_TIMEOUT_S = 30.0           # nobody spoke for this long: the call ends
MIC_QUIET_S = 10.0                 # the microphone sent nothing for this long (mid-call): the call ends
MIC_FIRST_CHUNK_S = 30.0           # ... or since Start (a permission prompt may be open meanwhile)
MAX_CALL_FILE_SECONDS = 5 * 60     # a whole call from a file (the API)
CHUNK_S = 0.2                      # what the page's microphone sends at a time, and what the API feeds

# The reply's audio is played in the page with Web Audio (app.py's CALL_PLAYER_JS): the player asks for the newest
# pieces (`next_reply_audio`, a long poll answered as soon as a piece is made) and schedules each one right after the
# one before, so the first piece sounds 40-80 ms after it is made. (Gradio's streaming gr.Audio output went through
# an HLS player that started to sound 0.6-1.4 s after the first piece on the test machine.)
# How far behind its generation a reply plays, in the microphone's audio time, for the server's barge-in rule (speech
# before the reply has played out interrupts it): the microphone's transport to the server (~0.1 s, more on a busy
# machine) plus the reply's transport to the page and its scheduling (~0.1 s). Too short an estimate only lets speech
# over a reply's last instant count as a new turn (the page cuts the reply anyway); too long marks replies that had
# finished as interrupted.
PLAYBACK_LATENCY_S = 0.3
REPLY_AUDIO_WAIT_S = 1.0           # the player's long poll: answered at once when there is news, else after this
REPLY_AUDIO_POLL_S = 0.01          # how often the long poll looks for news

# Tentative barge-in, in the page (app.py's CALL_METER_JS). The server's barge-in reaches the page 0.9-1.3 s after
# the visitor starts talking (the microphone's upload 0.3-0.8 s, the VAD's minimum speech length 0.3 s, the signal
# back 0.1-0.25 s), far over the 300 ms a conversation needs. So the page also listens to the microphone itself
# (echo cancellation on, so the reply coming out of the speakers is not taken for the visitor) and pauses the reply
# as soon as the level jumps over the recent noise floor while the reply plays. The server stays the judge of
# turns: its "stop" (or a new turn, or the end of the call, or speech it hears) keeps the reply stopped; once it has
# heard the whole sound without calling it speech (`VoiceCall.heard`), the sound was a cough or a bang and the reply
# goes on from where it paused.
TENTATIVE_BARGE_IN = dict(
    # How often the page reads the level (ms): each reading covers the last ~21 ms (1024 samples at 48 kHz).
    tick_ms=20,
    # A sound is this much louder than the noise floor (dB). 12 dB (4x the amplitude) is well under speech at a
    # microphone (20-40 dB over the room) and well over the floor's own flutter and what echo cancellation leaves
    # of the reply.
    margin_db=12.0,
    # ... and at least this loud (RMS, full scale 1.0; 0.01 is -40 dBFS): a very quiet room's floor plus 12 dB
    # would still be inaudible, e.g. breathing or a distant door.
    min_level=0.01,
    # The floor follows a quieter room at once and a louder one at this rate (dB per second): a fan or music that
    # starts is floor within seconds, while the first 100 ms of a voice raise it by under 1 dB.
    floor_rise_db_per_s=6.0,
    # Loud this long (ms) before the reply pauses: a click, a tap or a keyboard is over before that; speech and
    # coughs are not (coughs are what the server's verdict is for). Gaps up to gap_ms inside it count as loud.
    hold_ms=100,
    gap_ms=50,
    # The sound is over once it has been quiet this long (ms).
    quiet_ms=250,
    # The server's verdict is in once it has heard the audio up to the end of the sound, and at least its minimum
    # speech length after the sound's start (shorter sounds never become speech), plus this slack (s): the page's
    # meter and the server's recorder start a little apart (~0.1 s), and a verdict that comes in the same update
    # must have been applied first.
    min_speech_s=TurnConfig.min_speech_s,
    verdict_slack_s=0.3,
    # A sound that goes on (music, a vacuum cleaner): once the server has heard this much more of it (s) without
    # hearing speech, resume; the page then waits for quiet before pausing again.
    lasting_s=1.0,
    # No verdict this long after the pause (ms; the server far behind, or not answering): resume anyway. A loaded
    # 2-core test machine was seen 5 s behind.
    max_hold_ms=6000,
)


def tentative_barge_in_json() -> str:
    """The page's tentative barge-in settings, as the JSON the page's script reads."""
    return json.dumps(TENTATIVE_BARGE_IN)

END_MESSAGES = {
    "hang_up": "Call ended. The conversation stays below: replay any turn or reply.",
    "silence_timeout": f"Nobody spoke for {SILENCE_TIMEOUT_S:.0f} seconds, so the call ended. Press **Start call** "
                       "to talk again.",
    "no_audio": "The microphone stopped sending sound, so the call ended. Check that the microphone is connected "
                "and allowed for this page, then press **Start call** again.",
    "closed": "The page was closed, so the call ended.",
}


def turn_config(pause_s: float, silence_timeout_s: float | None = SILENCE_TIMEOUT_S) -> TurnConfig:
    """The call's turn-taking: the visitor's pause ends a turn; a turn longer than the spoken-message limit is cut."""
    try:
        pause = float(pause_s)
    except (TypeError, ValueError):
        raise UserError("The pause must be a number of seconds.", title="Bad pause") from None
    low, high = PAUSE_RANGE_S
    if not low <= pause <= high:
        raise UserError(f"The pause must be between {low} and {high} seconds (got {pause:g}).", title="Bad pause")
    return TurnConfig(end_pause_s=pause, max_utterance_s=float(MAX_AUDIO_SECONDS),
                      silence_timeout_s=silence_timeout_s)


def call_voice(voice: str | None, cloned: torch.Tensor | None = None) -> str | torch.Tensor | None:
    """The voice replies are spoken with: a bundled voice's name, or the session's cloned voice ("My voice"). None
    when the checkpoint cannot speak: replies are then text only."""
    if get_engine().speech is None:
        return None
    return check_voice(True, voice, cloned)


class VoiceCall:
    """One visitor's hands-free call, wired to the engine. Thread-safe as CallSession is: `feed` runs on the
    microphone's event, `reply` on the reply event, `hang_up` on a click."""

    def __init__(self, session: str, voice: str | None, pause_s: float = DEFAULT_PAUSE_S,
                 max_new_tokens: int = 256, *, cloned: torch.Tensor | None = None,
                 silence_timeout_s: float | None = SILENCE_TIMEOUT_S, vad: Any = None) -> None:
        self.id = uuid.uuid4().hex  # also what lets the page's player fetch this call's audio: unguessable
        self.key = f"voice-call:{session}:{self.id}"  # the engine's stop event for this call's replies
        self.set_reply_options(voice, max_new_tokens, cloned)
        self.call = CallSession(self._respond, turn_config(pause_s, silence_timeout_s),
                                playback_latency_s=PLAYBACK_LATENCY_S, vad=vad)
        CALLS[self.id] = self
        self.started_at = time.monotonic()
        self.last_chunk_at: float | None = None
        self.notice = ""  # a message worth showing with the status (a cut turn, why the call ended)
        self._seq = 0
        self._last_status: str | None = None
        self._clips: dict[tuple[str, int], str] = {}
        self._clip_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ settings
    def set_reply_options(self, voice: str | None, max_new_tokens: int, cloned: torch.Tensor | None = None) -> None:
        """The voice and length of the next replies (the page's selectors can change during a call)."""
        self.voice = call_voice(voice, cloned)
        self.sampling = sampling_config(max_new_tokens=max_new_tokens)

    @property
    def ended(self) -> bool:
        return self.call.state is CallState.ENDED

    # ----------------------------------------------------------------------------------------- microphone side
    def feed(self, chunk: Any) -> list[Event]:
        """One microphone chunk. Barge-in and the end of the call stop the reply being generated at once."""
        self.last_chunk_at = time.monotonic()
        events = self.call.feed(chunk)
        self._after(events)
        return events

    def hang_up(self, reason: str = "hang_up") -> list[Event]:
        events = self.call.hang_up(reason)
        self._after(events)
        return events

    def check_microphone(self, now: float | None = None) -> list[Event]:
        """End the call when the microphone has stopped sending chunks (a page timer calls this)."""
        if self.ended:
            return []
        now = time.monotonic() if now is None else now
        quiet = now - (self.last_chunk_at if self.last_chunk_at is not None else self.started_at)
        if quiet >= (MIC_QUIET_S if self.last_chunk_at is not None else MIC_FIRST_CHUNK_S):
            return self.hang_up("no_audio")
        return []

    def _after(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, (BargeIn, CallEnded)):
                stop_session(self.key)
            if isinstance(event, TurnQueued):
                self.notice = (f"You talked for over {format_duration(MAX_AUDIO_SECONDS)} without a pause, so the "
                               "answer is to what was said until then." if event.reason == "max_length" else "")
            if isinstance(event, CallEnded):
                self.notice = END_MESSAGES.get(event.reason, "Call ended.")

    def signal(self, events: list[Event]) -> str | None:
        """What the page's hidden signal box is set to after these events (None: leave it): it holds `stop=<i>` on
        barge-in (the page pauses the reply's playback at once), `turn=<i>` when a turn waits for its reply (the
        page starts the reply event) and `end=<reason>` when the call ended (the page stops the recorder). Every
        value is new, so each one fires the box's change event."""
        words = []
        for event in events:
            if isinstance(event, BargeIn):
                words.append(f"stop={event.turn_index}")
            elif isinstance(event, TurnQueued):
                words.append(f"turn={event.turn_index}")
            elif isinstance(event, CallEnded):
                words.append(f"end={event.reason}")
        if not words:
            return None
        self._seq += 1
        return " ".join([*words, f"call={self.id}", f"seq={self._seq}"])

    def heard(self) -> str:
        """For the page's tentative barge-in: the seconds of microphone audio the call has heard, and " speech" while
        the visitor is heard talking (the page then keeps the reply paused; otherwise it resumes the reply once the
        call has heard past the sound that paused it)."""
        return f"{self.call.now_s:.2f}" + (" speech" if self.call.user_speaking else "")

    def status(self) -> str:
        """One line for the page: what the call is doing, and any notice."""
        state = self.call.state
        if state is CallState.ENDED:
            return self.notice or "Call ended."
        if state is CallState.THINKING:
            line = "**Thinking…**"
        elif state is CallState.SPEAKING:
            line = "**Speaking** (talk to interrupt)"
        elif state is CallState.INTERRUPTED or self.call.user_speaking:
            line = "**Hearing you…**"
        else:
            line = "**Listening**: talk whenever you like; pause to let the model answer."
        return f"{line}  \n{self.notice}" if self.notice else line

    def status_update(self) -> str | None:
        """The status, when it changed since this was last asked (None: unchanged)."""
        status = self.status()
        if status == self._last_status:
            return None
        self._last_status = status
        return status

    # ---------------------------------------------------------------------------------------------- reply side
    def reply(self, wait_s: float = 0.3, every_s: float = 0.3) -> Iterator[list[dict]]:
        """Answer the waiting turn, if any: the Chatbot messages as the reply grows, at most every `every_s` while
        it streams (each update redraws the page's players, which would slow the microphone's stream down). The
        audio goes to the page's player on its own (`next_reply_audio`), as soon as each piece is made. Ends early
        on barge-in or hang-up; always ends with the messages of the whole call (clips included)."""
        yield self.messages()  # the visitor's turn shows at once, while the prompt is prefilled
        sent_at, stale = time.monotonic(), False
        try:
            for piece in self.call.run_reply(wait_s):
                stale = stale or bool(piece.text)
                if stale and time.monotonic() - sent_at >= every_s:
                    yield self.messages()
                    sent_at, stale = time.monotonic(), False
        except UserError:
            yield self.messages()
            raise
        yield self.messages()

    def reply_audio(self, since: dict) -> dict | None:
        """For the page's player, which has played `since` ({"call", "turn", "next", "stopped", "done"} as this
        returned them last): the newest turn's audio from the next piece on, as JSON (16-bit PCM in base64), or None
        when there is nothing new."""
        audio: ReplyAudio = self.call.reply_audio(*self._position(since))
        if (since.get("call") == self.id and since.get("turn") == audio.turn_index and not audio.pieces
                and bool(since.get("stopped")) == audio.stopped and bool(since.get("done")) == audio.done):
            return None
        pcm = b"".join(pcm16(piece).tobytes() for piece in audio.pieces)
        return {"call": self.id, "turn": audio.turn_index, "next": audio.start + len(audio.pieces),
                "rate": audio.sample_rate, "pcm": base64.b64encode(pcm).decode("ascii"), "stopped": audio.stopped,
                "done": audio.done}

    def _position(self, since: dict) -> tuple[int, int]:
        if since.get("call") != self.id:
            return -1, 0
        try:
            return int(since.get("turn", -1)), max(int(since.get("next", 0)), 0)
        except (TypeError, ValueError):
            return -1, 0

    @user_errors
    def _respond(self, user_audio: np.ndarray, index: int, stop: threading.Event) -> Iterator[ReplyPiece]:
        engine = get_engine()
        sampling, voice = self.sampling, self.voice
        turns = self._prompt_turns(index, user_audio)
        inputs = prepare_inputs(engine.processor, engine.max_context, turns, "", sampling)
        if stop.is_set():
            return
        rate = engine.speech.sample_rate if engine.speech is not None else 0
        for chunk in stream_job(Job(self.key, [inputs], sampling, voice)):
            if stop.is_set():  # a barge-in that came while the job was starting
                stop_session(self.key)
                return
            audio = chunk.audio if chunk.audio is not None and len(chunk.audio) else None
            if chunk.text or audio is not None:
                yield ReplyPiece(chunk.text, audio, rate)

    def _prompt_turns(self, index: int, user_audio: np.ndarray) -> list[ChatTurn]:
        """The call so far as a conversation: earlier answered turns (their reply text, even when cut short; turns
        left unanswered because the visitor kept talking are skipped), then the turn to answer."""
        transcript = self.call.transcript()
        turns = [ChatTurn(text="", media=[("audio", self.user_clip(t))], audio=t.user_audio, reply=t.reply_text)
                 for t in transcript[:index] if t.reply_text.strip()]
        current = transcript[index]
        turns.append(ChatTurn(text="", media=[("audio", self.user_clip(current))], audio=user_audio))
        return turns

    # ------------------------------------------------------------------------------------------------ transcript
    def user_clip(self, turn: CallTurn) -> str:
        return self._clip("user", turn.index, lambda: (SAMPLE_RATE, turn.user_audio))

    def reply_clip(self, turn: CallTurn) -> str | None:
        if not turn.done or not turn.reply_audio:
            return None
        return self._clip("reply", turn.index, lambda: (turn.reply_sample_rate, turn.reply_waveform()))

    def _clip(self, kind: str, index: int, audio) -> str:
        with self._clip_lock:
            path = self._clips.get((kind, index))
            if path is None:
                path = self._clips[(kind, index)] = save_wav(*audio())
            return path

    def messages(self) -> list[dict]:
        """Chatbot messages for the call: each turn's recording, and each reply's text and clip (replayable once
        the reply is done). Interrupted replies say so."""
        out: list[dict] = []
        for turn in self.call.transcript():
            out.append({"role": "user", "content": [{"path": self.user_clip(turn), "mime_type": "audio/wav"}]})
            text = turn.reply_text.strip()
            if turn.error:
                text = f"{text}\n\n*(no reply: {turn.error.split(': ', 1)[-1]})*".strip()
            elif turn.interrupted:
                text = f"{text} *(interrupted)*" if text or turn.reply_audio else \
                    "*(not answered: you went on talking)*"
            elif not turn.done and not text:
                text = "…"
            content: list = [text] if text else []
            if clip := self.reply_clip(turn):
                content.append({"path": clip, "mime_type": "audio/wav"})
            if content:
                out.append({"role": "assistant", "content": content})
        return out

    def summary(self) -> list[dict]:
        """The call's turns as JSON-ready dicts (the API's answer)."""
        rows = []
        for turn in self.call.transcript():
            rows.append({"turn": turn.index, "start_s": round(turn.start_s, 3), "end_s": round(turn.end_s, 3),
                         "end_reason": turn.end_reason, "reply": turn.reply_text,
                         "reply_audio_s": round(turn.reply_audio_s, 3), "interrupted": turn.interrupted,
                         "error": turn.error})
        return rows


CALLS: weakref.WeakValueDictionary[str, VoiceCall] = weakref.WeakValueDictionary()  # by id, while a page holds them


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Audio samples as little-endian 16-bit integers (float samples are on the -1..1 scale)."""
    audio = np.asarray(audio)
    if audio.dtype.kind == "f":
        audio = np.round(np.clip(audio, -1.0, 1.0) * 32767)
    return audio.astype("<i2", copy=False)


async def next_reply_audio(since: dict | None, wait_s: float = REPLY_AUDIO_WAIT_S) -> dict | None:
    """The page player's long poll: the newest reply audio of call `since["call"]` after what the player has
    (`VoiceCall.reply_audio`), as soon as there is some, or None after `wait_s` without news (or when the call is
    gone). Runs on the server's event loop, holding no thread while it waits."""
    since = since if isinstance(since, dict) else {}
    deadline = time.monotonic() + wait_s
    while True:
        call = CALLS.get(str(since.get("call")))
        news = call.reply_audio(since) if call is not None else None
        if news is not None or time.monotonic() >= deadline:
            return news
        await asyncio.sleep(REPLY_AUDIO_POLL_S)


# ------------------------------------------------------------------------------------------------------ the API
def load_recording(path: str | None, max_seconds: float) -> np.ndarray:
    """A recording as 16 kHz float32, with the length checked from the header first (no silence check: a call
    finds no turn in silence, and says so)."""
    if not path:
        raise UserError("Upload or record an audio file first.", title="No audio")
    return read_audio(path, max_seconds)


def detected_turns(path: str | None, pause_s: float = DEFAULT_PAUSE_S) -> list[dict]:
    """The turns a live call would take from this recording (no model involved): start, end, why it ended, and when
    the detector decided, in seconds of the recording."""
    config = turn_config(pause_s, silence_timeout_s=None)
    waveform = load_recording(path, MAX_ASR_SECONDS)
    return [turn.summary() for turn in detect_turns((SAMPLE_RATE, waveform), config, chunk_s=CHUNK_S)]


@user_errors
def whole_call(path: str | None, pause_s: float, voice: str | None, max_new_tokens: int, session: str,
               cloned: torch.Tensor | None = None) -> Iterator[tuple[list[dict], list[dict]]]:
    """A whole call from a recording: its chunks go to a call as a microphone's would, and each turn is answered as
    soon as it is detected (each reply its own GPU job). The recording does not wait for a reply; a reply's audio
    then "plays" for its length in the recording's time, and speech during it interrupts it, as in a live call.
    Yields (Chatbot messages, turn summaries) as the call goes on."""
    call = VoiceCall(session, voice, pause_s, max_new_tokens, cloned=cloned, silence_timeout_s=None)
    waveform = load_recording(path, MAX_CALL_FILE_SECONDS)
    # Trailing silence, so that a last turn spoken up to the end of the file is still heard to end.
    waveform = np.concatenate([waveform, np.zeros(int(SAMPLE_RATE * (call.call.config.end_pause_s + 0.5)),
                                                  np.float32)])
    step = int(SAMPLE_RATE * CHUNK_S)
    for start in range(0, len(waveform), step):
        events = call.feed((SAMPLE_RATE, waveform[start:start + step]))
        if any(isinstance(e, TurnQueued) for e in events):
            for messages in call.reply(every_s=0.0):
                yield messages, call.summary()
    if not call.call.transcript():
        raise UserError(f"No speech was heard in '{os.path.basename(path)}'.", title="No speech")
    yield call.messages(), call.summary()
