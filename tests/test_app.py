"""The Space through its public API: app.py launched on localhost with the tiny checkpoint, driven by gradio_client.

Each of the tabs' endpoints must stream (several partial updates before the final one) and return the right kinds
of output; four clients at once get their own complete answers (decoded together by the scheduler; one at a time
on ZeroGPU); every kind of bad input gets a readable message, and the next normal request still works.

The server runs in this process (a real HTTP server on 127.0.0.1), so the GPU-failure tests can make the model
raise the errors a GPU would.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import threading
from fractions import Fraction

import numpy as np
import pytest

os.environ.setdefault("MING_MODEL", "tiny")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
IMAGE = os.path.join(EXAMPLES, "images", "street.png")
TRIANGLE = os.path.join(EXAMPLES, "images", "triangle.png")
VIDEO = os.path.join(EXAMPLES, "video", "bouncing_ball.mp4")
SPEECH = os.path.join(EXAMPLES, "audio", "capital_question.wav")
FOX = os.path.join(EXAMPLES, "audio", "fox_sentence.wav")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve():
    """The app module, serving on localhost. One server per test process, shared with test_browser.py: Gradio
    removes its cached example files when a demo closes, so the demo is never closed and relaunched."""
    import app as space

    if not space.demo.is_running:
        space.launch(argparse.Namespace(host="127.0.0.1", port=free_port(), share=False), block=False)
    return space


def chat_args(text: str = "Hello", files=(), speak: bool = False, max_new_tokens: int = 12, **kwargs) -> dict:
    return dict(message={"text": text, "files": [handle_file(f) for f in files]}, speak=speak,
                max_new_tokens=max_new_tokens, api_name="/chat", **kwargs)


def stream(client: Client, **kwargs) -> tuple[list, object]:
    """All streamed outputs of one call, and its final output."""
    job = client.submit(**kwargs)
    updates = list(job)
    return updates, job.result()


def message_texts(message: dict) -> list[str]:
    return [part["text"] for part in message["content"] if part.get("type") == "text"]


def message_files(message: dict) -> list[str]:
    return [part["file"] for part in message["content"] if part.get("type") == "file"]


def assert_still_works(client: Client) -> None:
    chatbot = client.predict(**chat_args("Are you still there?", max_new_tokens=4))[0]
    assert message_texts(chatbot[-2]) == ["Are you still there?"]
    assert chatbot[-1]["role"] == "assistant" and message_texts(chatbot[-1])[0]


# ------------------------------------------------------------------------------------------------- the endpoints
def test_the_tabs_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/vision_qa", "/asr", "/speech_to_speech", "/voice_call", "/voice_call_turns",
            "/thinking"} <= set(endpoints)


def test_api_view_names_everything_and_marks_optional_inputs(client):
    import re

    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, endpoint in endpoints.items():
        for part in endpoint["parameters"] + endpoint["returns"]:
            assert not re.fullmatch(r"(value|parameter|param)_\d+", part["label"]), (name, part["label"])
        for part in endpoint["parameters"]:
            assert not re.fullmatch(r"param_\d+", part["parameter_name"]), (name, part["parameter_name"])
    optional = {(name, p["parameter_name"]) for name, e in endpoints.items() for p in e["parameters"]
                if p["parameter_has_default"]}
    assert {("/vision_qa", "image"), ("/vision_qa", "video"), ("/thinking", "image"), ("/chat", "voice_sample"),
            ("/speech_to_speech", "voice_sample")} <= optional
    printed = client.view_api(print_info=False, return_format="str")
    assert not re.search(r"\bvalue_\d+", printed)


def test_chat_streams_text_about_an_image(client):
    updates, (chatbot, *_) = stream(client, **chat_args("What is in this picture?", [IMAGE], max_new_tokens=16))
    replies = {message_texts(u[0][-1])[0] for u in updates if u[0] and u[0][-1]["role"] == "assistant"}
    assert len(replies) >= 3, "the reply should arrive in several partial updates"
    user, reply = chatbot
    assert user["role"] == "user" and message_texts(user) == ["What is in this picture?"]
    assert message_files(user)[0].endswith("street.png")
    assert reply["role"] == "assistant" and len(message_texts(reply)[0]) > 5
    assert not message_files(reply), "no speech was asked for"


def test_chat_remembers_the_conversation(client):
    client.predict(**chat_args("First question", max_new_tokens=4))
    chatbot = client.predict(**chat_args("Second question", max_new_tokens=4))[0]
    assert [message_texts(m)[0] for m in chatbot if m["role"] == "user"] == ["First question", "Second question"]


def test_chat_reply_with_voice_streams_audio_beside_the_text(client):
    import soundfile

    updates, (chatbot, *_) = stream(client, **chat_args("Say something.", speak=True, voice="luna",
                                                        max_new_tokens=10))
    kinds = ["audio" if isinstance(u[1], str) else "text" for u in updates]
    assert "audio" in kinds, "audio chunks should stream to the player"
    assert kinds.index("text") < kinds.index("audio"), "text starts before the first sound"
    clip = message_files(chatbot[-1])
    assert message_texts(chatbot[-1])[0] and len(clip) == 1, "the reply keeps its text and the full clip"
    samples, rate = soundfile.read(clip[0])
    assert rate == 22050 and len(samples) > 0


def test_vision_qa_streams_answers_about_an_image_and_a_video(client):
    for image, video in ((handle_file(IMAGE), None), (None, handle_file(VIDEO))):
        updates, answer = stream(client, image=image, video=video, question="What do you see?", max_new_tokens=12,
                                 api_name="/vision_qa")
        assert len(set(updates)) >= 3 and isinstance(answer, str) and answer == updates[-1] and answer


def test_asr_streams_a_transcript(client):
    updates, transcript = stream(client, audio=handle_file(FOX), api_name="/asr")
    assert len(set(updates)) >= 3 and isinstance(transcript, str) and transcript.strip()


def test_asr_transcribes_long_recordings_in_segments(client, tmp_path):
    import soundfile

    speech, rate = soundfile.read(FOX, dtype="float32")
    long = np.concatenate([speech] * int(np.ceil(65 * rate / len(speech))))[: 65 * rate]
    path = tmp_path / "long.wav"
    soundfile.write(path, long, rate)
    transcript = client.predict(audio=handle_file(str(path)), api_name="/asr")
    assert len(transcript.splitlines()) == 3, "65 s of speech is transcribed as three segments of at most 30 s"


def test_speech_to_speech_streams_a_spoken_answer_over_several_turns(client):
    import soundfile

    for turn in (1, 2):
        updates, (chatbot, _, _) = stream(client, audio=handle_file(SPEECH), voice="luna", max_new_tokens=10,
                                       api_name="/speech_to_speech")
        assert sum(isinstance(u[1], str) for u in updates) >= 1, "audio chunks stream while the reply is made"
        assert len(updates) >= 3
        assert [m["role"] for m in chatbot] == ["user", "assistant"] * turn
        assert message_files(chatbot[-2])[0].endswith(".wav")  # the spoken question, replayable
        text, clip = message_texts(chatbot[-1]), message_files(chatbot[-1])
        assert text and text[0] and len(clip) == 1
        assert len(soundfile.read(clip[0])[0]) > 0


def test_thinking_shows_reasoning_in_a_collapsible_block(client):
    updates, (chatbot, question_box, image_box) = stream(
        client, text="Find x.", image=handle_file(TRIANGLE), max_new_tokens=16, api_name="/thinking")
    thoughts = [u[0][1]["content"][0]["text"] for u in updates if len(u[0]) > 1]
    assert len(set(thoughts)) >= 3, "the reasoning streams"
    assert updates[1][0][1]["metadata"]["status"] == "pending"
    user, thought, *answer = chatbot
    assert message_files(user)[0].endswith("triangle.png")
    assert thought["metadata"]["title"] == "Thinking" and thought["metadata"]["status"] == "done"
    assert answer and answer[0]["role"] == "assistant" and message_texts(answer[0])  # the answer below it


def test_four_clients_at_once_get_their_own_complete_answers(app):
    space, url = app
    space.ENGINE.peak_active_jobs = 0
    clients = [Client(url, verbose=False) for _ in range(4)]
    jobs = [c.submit(**chat_args(f"Question number {i}", max_new_tokens=24)) for i, c in enumerate(clients)]
    for i, job in enumerate(jobs):
        chatbot = job.result(timeout=300)[0]
        assert [m["role"] for m in chatbot] == ["user", "assistant"], "nobody sees another session's turns"
        assert message_texts(chatbot[0]) == [f"Question number {i}"]
        assert len(message_texts(chatbot[1])[0]) > 10
    from serving.engine import use_scheduler

    if use_scheduler():  # a dedicated machine: the scheduler decodes the sessions together
        assert space.ENGINE.peak_active_jobs > 1, "the requests share the model at once"
    else:  # ZeroGPU: one request per GPU task, one at a time
        assert space.ENGINE.peak_active_jobs == 1, "the queue runs one request on the model at a time"


def test_stop_ends_a_generation_early(app, client):
    space, _ = app
    job = client.submit(**chat_args("Tell me everything.", max_new_tokens=2000))
    seen = threading.Event()
    for update in job:
        if update[0] and message_texts(update[0][-1]) and len(message_texts(update[0][-1])[0]) > 20:
            seen.set()
            space.stop_session(client.session_hash)
            break
    chatbot = job.result(timeout=120)[0]
    assert seen.is_set()
    # ~2000 tokens of noise would be thousands of characters; a stopped reply is a few dozen.
    assert len(message_texts(chatbot[-1])[0]) < 1000
    assert_still_works(client)


# ---------------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import av
    import soundfile
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad")
    files = {}
    files["unsupported"] = folder / "notes.txt"
    files["unsupported"].write_text("not media")
    files["corrupt"] = folder / "photo.png"
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    files["huge_image"] = folder / "huge.png"
    Image.new("1", (12000, 12000)).save(files["huge_image"])
    files["silence"] = folder / "silence.wav"
    soundfile.write(files["silence"], np.zeros(3 * 16000, dtype=np.float32), 16000)
    files["long_recording"] = folder / "twenty_minutes.ogg"
    tone = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 8000)).astype(np.float32)
    with soundfile.SoundFile(files["long_recording"], "w", 8000, 1, format="OGG", subtype="VORBIS") as f:
        for _ in range(20 * 60):  # one second at a time: libsndfile's Vorbis encoder dislikes huge single writes
            f.write(tone)
    files["long_video"] = folder / "two_hours.mp4"
    with av.open(str(files["long_video"]), "w") as container:  # 2 h 0 min 10 s at one frame per 10 s: over the limit
        stream = container.add_stream("libx264", rate=Fraction(1, 10))
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(721):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 255, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(10, 1)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return {name: str(path) for name, path in files.items()}


def long_text(tokens: int = 40_000) -> str:
    """Random words: well over the tiny model's 32k-token context, yet short enough that it must be tokenized."""
    rng = random.Random(0)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                    for _ in range(tokens // 2 + tokens // 8))


BAD_REQUESTS = {
    # Gradio's own file-type check answers first in Chat; the engine's check covers the other inputs.
    "unsupported file": (lambda f: chat_args("Read this", [f["unsupported"]]),
                         "Invalid file type|not a supported file type"),
    "corrupt file": (lambda f: chat_args("What is this?", [f["corrupt"]]), "Could not read image"),
    "12000x12000 image": (lambda f: dict(image=handle_file(f["huge_image"]), video=None, question="What is this?",
                                         api_name="/vision_qa"), "12000x12000 pixels"),
    "video over 2 hours": (lambda f: dict(image=None, video=handle_file(f["long_video"]), question="What happens?",
                                          api_name="/vision_qa"), r"2:00:10 long; videos can be at most 2 hours"),
    "silence": (lambda f: dict(audio=handle_file(f["silence"]), api_name="/asr"), "is silent"),
    "20-minute recording": (lambda f: dict(audio=handle_file(f["long_recording"]), api_name="/asr"),
                            r"20:00 long; the limit here is 10:00"),
    "empty message": (lambda f: chat_args(""), "The message is empty"),
    "message over the context": (lambda f: chat_args(long_text()), "too long for the model"),
    "silent spoken message": (lambda f: dict(audio=handle_file(f["silence"]), voice="luna",
                                             api_name="/speech_to_speech"), "is silent"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 12000x12000 image, on purpose
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_message_and_the_app_keeps_working(client, bad_files, case):
    request, message = BAD_REQUESTS[case]
    with pytest.raises(AppError, match=message):
        client.predict(**request(bad_files))
    assert_still_works(client)


def test_gpu_out_of_memory_gets_a_message(app, client, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(app[0].ENGINE.model, "embed", out_of_memory)  # both paths embed the prompt first
    with pytest.raises(AppError, match="ran out of memory"):
        client.predict(**chat_args("Describe", [IMAGE]))
    monkeypatch.undo()
    assert_still_works(client)


def test_zerogpu_quota_error_gets_a_message(app, client, monkeypatch):
    import gradio as gr

    import serving.engine

    def over_quota(job):
        raise gr.Error("You have exceeded your free ZeroGPU quota (60s requested vs. 12s left). Try again in 0:41:00.",
                       title="ZeroGPU quota exceeded")
        yield  # a generator, like the real run_job

    monkeypatch.setattr(serving.engine, "run_job", over_quota)
    with pytest.raises(AppError, match=r"exceeded your free ZeroGPU quota.*try again later"):
        client.predict(**chat_args("Hello"))
    monkeypatch.undo()
    assert_still_works(client)


# ------------------------------------------------------------------------------------------------- engine helpers
def test_thinking_output_splits_into_reasoning_and_answer():
    from serving.render import boxed_results, split_thinking

    reply = "<think>3 squared plus 4 squared is 25.</think><answer>x = \\boxed{5}</answer>"
    assert split_thinking(reply) == ("3 squared plus 4 squared is 25.", "x = \\boxed{5}", True)
    assert split_thinking("<thinking>Let me see</thi") == ("Let me see", "", False)  # streaming: no tag debris
    assert split_thinking("no tags at all") == ("no tags at all", "", False)
    assert boxed_results(r"so \boxed{\frac{1}{2}} and \boxed{7}") == [r"\frac{1}{2}", "7"]
    assert boxed_results(r"\boxed{unclosed") == []


def test_older_media_drop_out_of_the_prompt_newest_first():
    from serving.conversation import Turn, kept_media

    turns = [Turn("a", [("audio", "a.wav"), ("image", "1.png")]), Turn("b", [("video", "v.mp4")]),
             Turn("c", [("image", "2.png"), ("image", "3.png")]), Turn("d", [("audio", "b.wav")])]
    # The newest audio, and the visual media of the newest turn that has any.
    assert kept_media(turns) == {(3, 0), (2, 0), (2, 1)}
    assert kept_media(turns[:2]) == {(0, 0), (1, 0)}


def test_long_recordings_are_cut_between_words():
    from serving.checks import ASR_SEGMENT_SECONDS
    from serving.flows import split_for_asr

    rate = 16000
    rng = np.random.default_rng(0)
    speech = 0.3 * rng.standard_normal(75 * rate).astype(np.float32)
    speech[int(25.0 * rate):int(25.4 * rate)] = 0  # a pause inside the first segment's last third
    segments = split_for_asr(speech)
    assert sum(len(s) for s in segments) == len(speech)
    assert all(len(s) <= ASR_SEGMENT_SECONDS * rate for s in segments)
    assert 25.0 * rate <= len(segments[0]) <= 25.4 * rate, "the first cut falls in the pause"


def test_gpu_duration_grows_with_the_request():
    import torch

    from serving.checks import sampling_config
    from serving.engine import Job

    prompt = {"input_ids": torch.zeros(1, 500, dtype=torch.long)}
    short = Job("s", [prompt], sampling_config(max_new_tokens=64)).gpu_seconds
    long = Job("s", [prompt], sampling_config(max_new_tokens=512)).gpu_seconds
    spoken = Job("s", [prompt], sampling_config(max_new_tokens=512), voice="luna").gpu_seconds
    assert 15 <= short < long < spoken <= 120


def test_the_first_gpu_job_asks_for_time_to_compile_kernels(monkeypatch):
    import types

    import torch

    from serving import engine
    from serving.checks import sampling_config

    job = engine.Job("s", [{"input_ids": torch.zeros(1, 500, dtype=torch.long)}], sampling_config(max_new_tokens=64))
    monkeypatch.setattr(engine, "_ENGINE", types.SimpleNamespace(gpu_jobs_done=0))
    assert engine._job_seconds(job) == job.gpu_seconds + engine.COLD_START_SECONDS
    monkeypatch.setattr(engine, "_ENGINE", types.SimpleNamespace(gpu_jobs_done=1))
    assert engine._job_seconds(job) == job.gpu_seconds


def test_an_unreachable_model_falls_back_to_the_tiny_checkpoint(monkeypatch):
    from serving import engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, is_tiny, notice = engine.choose_checkpoint("inclusionAI/no-such-model")
    assert is_tiny and os.path.exists(os.path.join(folder, "config.json"))
    assert "Could not load `inclusionAI/no-such-model`" in notice


def test_a_checkpoint_without_talker_weights_loads_text_only(monkeypatch, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from serving import engine

    folder = tmp_path / "no-talker"
    shutil.copytree(engine.tiny_checkpoint_dir(), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("talker.")}, folder / "model.safetensors")
    monkeypatch.setattr(engine, "_ENGINE", None)  # a fresh engine; monkeypatch restores the app's afterwards
    text_only = engine.load_engine(str(folder))
    assert text_only.speech is None and text_only.voices == []
    assert "Spoken replies are off" in text_only.notice


def test_text_deltas_drop_control_characters_but_keep_newlines():
    from serving.engine import text_deltas

    class Decoder:
        def push(self, token):
            return {1: "a\x00b", 2: "\x07", 3: "c\nd\t"}[token]

        def flush(self):
            return "\x1b"

    assert list(text_deltas(iter([1, 2, 3]), Decoder())) == ["ab", "c\nd\t"]
