"""Voice cloning through the Space: the serving flow (checks, privacy) and the public API's per-call voice sample,
on the tiny checkpoint, whose talker/ folder holds a random CAM++ stand-in (`ming.testing.campplus`)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile
import torch

from tests.test_app import EXAMPLES, chat_args, message_files

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

SAMPLE = os.path.join(EXAMPLES, "audio", "robot_story_request.wav")


def copy_of(path: str, folder) -> str:
    target = os.path.join(str(folder), os.path.basename(path))
    shutil.copy(path, target)
    return target


def test_cloning_is_on_with_the_tiny_checkpoint(app):
    from serving.voice_clone import clone_unavailable_reason

    assert app[0].ENGINE.speaker_encoder is not None and clone_unavailable_reason() == ""


def test_a_clone_is_a_voice_and_its_recording_is_deleted(app, tmp_path):
    from serving.voice_clone import clone_voice

    sample = copy_of(SAMPLE, tmp_path)
    voice = clone_voice(sample, consent=True)
    assert voice.shape == (1, 192) and voice.dtype == torch.float32 and torch.isfinite(voice).all()
    assert not os.path.exists(sample), "the recording must not stay on disk"
    again = clone_voice(copy_of(SAMPLE, tmp_path), consent=True)
    torch.testing.assert_close(again, voice)  # deterministic
    speech = app[0].ENGINE.speech
    cloned = speech.synthesize("Hello there.", voice=voice, seed=0)[1]
    luna = speech.synthesize("Hello there.", voice="luna", seed=0)[1]
    assert len(cloned) and not (len(cloned) == len(luna) and np.array_equal(cloned, luna))


@pytest.mark.parametrize("case, message", [
    ("no consent", "Tick the box"),
    ("silent", "is silent"),
    ("too short", "too little speech"),
    ("corrupt", "damaged|Could not read|cannot be read"),
])
def test_bad_samples_get_a_message(app, tmp_path, case, message):
    from serving.errors import UserError
    from serving.voice_clone import clone_voice

    path = str(tmp_path / "sample.wav")
    if case == "silent":
        soundfile.write(path, np.zeros(5 * 16000, np.float32), 16000)
    elif case == "too short":
        audio, rate = soundfile.read(SAMPLE, dtype="float32")
        soundfile.write(path, audio[: int(1.2 * rate)], rate)
    elif case == "corrupt":
        with open(path, "wb") as f:
            f.write(b"RIFF" + os.urandom(3000))
    else:
        shutil.copy(SAMPLE, path)
    with pytest.raises(UserError, match=message):
        clone_voice(path, consent=case != "no consent")
    assert os.path.exists(path) == (case == "no consent"), "deleted once consent is given, kept before"


def test_my_voice_belongs_to_its_session_only():
    from serving.errors import UserError
    from serving.flows import check_voice
    from serving.voice_clone import MY_VOICE

    mine = torch.randn(1, 192)
    assert check_voice(True, MY_VOICE, cloned=mine) is mine
    with pytest.raises(UserError, match="Clone a voice first"):
        check_voice(True, MY_VOICE, cloned=None)  # another session: no clone in its state


def test_chat_and_speech_to_speech_take_a_voice_sample_per_call(app):
    client = Client(app[1], verbose=False)
    chatbot = client.predict(**chat_args("Say hello!", speak=True, voice_sample=handle_file(SAMPLE)))[0]
    assert any(f.endswith(".wav") for f in message_files(chatbot[-1]))
    s2s = client.predict(audio=handle_file(os.path.join(EXAMPLES, "audio", "capital_question.wav")), voice="luna",
                         max_new_tokens=16, voice_sample=handle_file(SAMPLE), api_name="/speech_to_speech")
    assert any(f.endswith(".wav") for f in message_files(s2s[0][-1]))


def test_a_silent_voice_sample_gets_a_message(app, tmp_path):
    path = str(tmp_path / "quiet.wav")
    soundfile.write(path, np.zeros(5 * 16000, np.float32), 16000)
    client = Client(app[1], verbose=False)
    with pytest.raises(AppError, match="cannot be used as a voice"):
        client.predict(**chat_args("Say hello!", speak=True, voice_sample=handle_file(path)))


def test_the_last_recording_sent_can_become_the_voice(app):
    from serving.conversation import new_turn
    from serving.errors import UserError
    from serving.voice_clone import clone_from_conversation

    with pytest.raises(UserError, match="not sent any audio"):
        clone_from_conversation([new_turn("Hello", [])], consent=True)
    turns = [new_turn("", [SAMPLE]), new_turn("And now?", [])]
    with pytest.raises(UserError, match="Tick the box"):
        clone_from_conversation(turns, consent=False)
    voice = clone_from_conversation(turns, consent=True)
    assert voice.shape == (1, 192)
    assert os.path.exists(SAMPLE), "an example the visitor sent is theirs: only uploads made for cloning are deleted"
