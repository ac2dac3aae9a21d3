"""One-shot voice cloning for a session: a short recording becomes "My voice".

The recording is checked (consent, length from the header before decoding, then the speaker model's assessment:
silence, too little speech, music or noise, several speakers), turned into a CAM++ embedding on the CPU, and
deleted. The embedding lives only in the visitor's session state: never on disk, never shown to other sessions,
gone when the session ends.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ming.media import MediaError, audio_duration, load_audio
from ming.speech.speaker import MAX_INPUT_SECONDS, Reason, assess_voice_sample

from .checks import format_duration
from .conversation import Turn
from .engine import get_engine
from .errors import UserError

MY_VOICE = "My voice"  # how a cloned voice is listed, for its own session only
CONSENT = "This is my voice, or I have the speaker's permission to use it."

REASON_MESSAGES = {
    Reason.INVALID: "The recording could not be read as sound.",
    Reason.TOO_LONG: "The recording is too long.",
    Reason.SILENT: "The recording is silent. Check the microphone, or pick another file.",
    Reason.TOO_SHORT: "There is too little speech in it: record 3 to 30 seconds of one person talking.",
    Reason.NO_SPEECH: "No speech could be heard in it, only noise. Record in a quieter place.",
    Reason.MUSIC: "It sounds like music rather than speech. Record someone talking, without music.",
    Reason.NOISY: "There is too much background noise. Record again in a quieter place, closer to the microphone.",
    Reason.MULTIPLE_SPEAKERS: "It sounds like more than one person. Record one speaker alone.",
}


def clone_unavailable_reason() -> str:
    """Why cloning is off on this deployment ("" when it is on)."""
    engine = get_engine()
    if engine.speech is None:
        return "Voice cloning is off: this checkpoint has no speech model."
    return engine.speaker_model_problem


def clone_voice(path: str | None, consent: bool) -> torch.Tensor:
    """The voice (float32 [1, 192]) of the recording at `path`. Once consent is given, the recording is deleted
    whatever the verdict: nothing of it stays on disk."""
    if reason := clone_unavailable_reason():
        raise UserError(reason, title="Voice cloning is off")
    if not path:
        raise UserError("Record or upload 3 to 30 seconds of clear speech first.", title="No voice sample")
    if not consent:
        raise UserError("Tick the box to confirm that this is your voice, or that you have the speaker's "
                        "permission.", title="Consent needed")
    name = os.path.basename(path)
    try:
        try:
            seconds = audio_duration(path)
            if seconds > MAX_INPUT_SECONDS:
                raise UserError(f"'{name}' is {format_duration(seconds)} long; a voice sample should be 3 to 30 "
                                "seconds.", title="Sample too long")
            waveform = load_audio(path)
        except MediaError as error:
            raise UserError(str(error), title="Unreadable voice sample") from None
        return voice_from_waveform(waveform, f"'{name}'")
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def clone_from_conversation(turns: list[Turn], consent: bool) -> torch.Tensor:
    """The voice of the newest audio the visitor already sent in this conversation (kept decoded in its turn)."""
    if reason := clone_unavailable_reason():
        raise UserError(reason, title="Voice cloning is off")
    recording = next((turn.audio for turn in reversed(turns) if turn.audio is not None), None)
    if recording is None:
        raise UserError("You have not sent any audio in this conversation yet: record or upload a voice sample "
                        "instead.", title="No recording yet")
    if not consent:
        raise UserError("Tick the box to confirm that this is your voice, or that you have the speaker's "
                        "permission.", title="Consent needed")
    return voice_from_waveform(recording, "Your last recording")


def voice_from_waveform(waveform: np.ndarray, what: str) -> torch.Tensor:
    sample = assess_voice_sample(get_engine().speaker_encoder, waveform)
    if not sample.ok:
        raise UserError(f"{what} cannot be used as a voice: {REASON_MESSAGES[sample.reason]} Your previous voice "
                        "stays selected.", title="Voice not cloned")
    return sample.embedding
