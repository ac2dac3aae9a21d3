"""Ming-Lite-Omni-Preview demo: six tabs on one cached model, streaming text and speech.

    python app.py [--model PATH_OR_HUB_ID] [--host 0.0.0.0] [--port 7860] [--share]

Layout and event wiring only: the model, the checks and the tabs' flows are in `serving/`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home at start

import argparse
import functools
import html
import logging
import sys
from collections.abc import Callable, Iterator

import gradio as gr
from gradio.helpers import log_message

from ming.processor import ASR_PROMPT
from serving import checks, flows, long_video_flow, render, voice_call_flow, voice_clone
from serving.checks import sampling_config
from serving.engine import load_engine, stop_session
from serving.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "examples")


def example(*parts: str) -> str:
    return os.path.join(EXAMPLES, *parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ming-Lite-Omni-Preview demo")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: $MING_MODEL, else the official "
                                        "weights on a GPU host, else the tiny random test checkpoint); 'tiny' forces "
                                        "the tiny one")
    parser.add_argument("--host", help="address to bind, e.g. 0.0.0.0 (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also serve a public gradio.live link")
    return parser.parse_args(argv)


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request Gradio makes to itself
if __name__ == "__main__":
    print("Loading the model… (the very first start also builds the tiny test model: about a minute)", flush=True)
ENGINE = load_engine(ARGS.model)  # at import, once: ZeroGPU packs the weights before the first request

# Every event that runs the model shares one queue: on a dedicated GPU as many requests at once as the scheduler
# decodes together (it queues any beyond its memory budget itself); on ZeroGPU one request at a time.
GPU_EVENT = dict(concurrency_id="gpu", concurrency_limit=ENGINE.concurrency_limit)
VOICES = ENGINE.voices
DEFAULT_VOICE = "luna" if "luna" in VOICES else (VOICES[0] if VOICES else None)
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


# ============================================================================================================ handlers
def as_gradio_error(error: UserError) -> gr.Error:
    """The toast for a UserError, headed by its own title ("Empty message", "Silent audio"), and no traceback.

    Gradio 6.31's page heads every toast with its kind ("Error"), whatever title the server sends, so the page gets
    the message as an error-level log that starts with the title in bold; the gr.Error that ends the event carries
    the plain message to API clients and is not shown a second time. The conversation and the inputs get no error
    overlay (CSS below)."""
    toast = f"<strong>{html.escape(error.title)}.</strong> {html.escape(error.message)}"
    log_message(toast, title=error.title, level="error", duration=10)  # type: ignore[arg-type]
    return gr.Error(error.message, title=error.title, print_exception=False, visible=False)


def shows_errors(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Turn the serving layer's UserError into Gradio's error toast (with its title, and no traceback)."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            yield from handler(*args, **kwargs)
        except UserError as error:
            raise as_gradio_error(error) from None

    return wrapped


class ImageInput(gr.Image):
    """gr.Image whose upload reaches our own check undecoded when Gradio cannot open it (a text file renamed .png):
    serving/checks.py then says what is wrong with the visitor's file, instead of Gradio's "Could not preprocess
    input component" with a temp path and a traceback in the log."""

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except Exception:
            return payload.path if payload is not None and payload.path else None

    def get_block_name(self) -> str:
        return "image"  # the page's own Image component


def show_notice(progress: flows.Progress) -> None:
    if progress.notice:
        gr.Info(progress.notice, duration=6)


@shows_errors
def chat(message, turns, system_prompt, temperature, top_p, max_new_tokens, speak, voice, voice_sample=None,
         cloned=None, request: gr.Request = None):
    message = message or {}
    sampling = sampling_config(temperature, top_p, max_new_tokens)
    first = True
    for updated, progress in flows.chat(turns, message.get("text", ""), message.get("files", []), system_prompt,
                                        sampling, speak, voice, request.session_hash, cloned, voice_sample):
        show_notice(progress)
        cleared = None if first else gr.skip()
        first = False
        yield render.chat_messages(updated, pending=not progress.done), progress.audio or gr.skip(), cleared, updated


@shows_errors
def retry_chat(turns, system_prompt, temperature, top_p, max_new_tokens, speak, voice, cloned,
               request: gr.Request):
    if not turns:
        return
    last = turns[-1]
    message = {"text": last.text, "files": [path for _, path in last.media]}
    for chatbot, audio, _, new_turns in chat(message, turns[:-1], system_prompt, temperature, top_p, max_new_tokens,
                                             speak, voice, None, cloned, request):
        yield chatbot, audio, new_turns


def attach(message, path):
    """A webcam photo or clip joins the message being written (and the webcam box empties for the next one)."""
    if not path:
        return gr.skip(), gr.skip()
    message = message or {"text": "", "files": []}
    return {"text": message.get("text", ""), "files": [*message.get("files", []), path]}, None


def undo_chat(turns):
    if not turns:
        return [], gr.skip(), []
    last = turns[-1]
    return (render.chat_messages(turns[:-1]), {"text": last.text, "files": [path for _, path in last.media]},
            turns[:-1])


@shows_errors
def vision_qa(image=None, video=None, question="", max_new_tokens=512, request: gr.Request = None,
              progress=gr.Progress()):
    """A long video shows a progress bar (sampling, encoding, compression) the first time it is asked about; later
    questions about it in this session are answered from memory."""
    def on_status(status):
        progress(status.fraction, desc=status.message)
        if status.notice:
            gr.Info(status.notice, duration=8)

    yield from flows.vision_qa(image, video, question, sampling_config(max_new_tokens=max_new_tokens),
                               request.session_hash, on_status=on_status)


def video_status(video, video_session, request: gr.Request):
    """After each answer: the line about this session's copy of the video in memory (hidden when there is none),
    and the session's handle, whose deletion frees its videos."""
    line = long_video_flow.describe(request.session_hash, video)
    return (gr.update(value=line, visible=bool(line)),
            video_session or long_video_flow.VideoSession(request.session_hash))


def free_session_videos(request: gr.Request):
    """The page closed: this session's long videos leave memory at once."""
    long_video_flow.free_session(request.session_hash)


@shows_errors
def asr(audio, request: gr.Request):
    yield from flows.asr(audio, request.session_hash)


@shows_errors
def speech_to_speech(audio, turns, voice, max_new_tokens, voice_sample=None, cloned=None, request: gr.Request = None):
    sampling = sampling_config(max_new_tokens=max_new_tokens)
    first = True
    for updated, progress in flows.speech_to_speech(turns, audio, voice, sampling, request.session_hash, cloned,
                                                    voice_sample):
        show_notice(progress)
        cleared = None if first else gr.skip()  # the recording moves into the conversation; the mic is ready again
        first = False
        yield render.chat_messages(updated, pending=not progress.done), progress.audio or gr.skip(), cleared, updated


@shows_errors
def thinking(text, image=None, turns=None, max_new_tokens=1024, request: gr.Request = None):
    turns = turns or []
    sampling = sampling_config(max_new_tokens=max_new_tokens)
    first = True
    for updated, progress in flows.thinking(turns, text, image, sampling, request.session_hash):
        show_notice(progress)
        cleared = ("", None) if first else (gr.skip(), gr.skip())
        first = False
        yield render.thinking_chat_messages(updated, pending=not progress.done), *cleared, updated


def stop(request: gr.Request):
    stop_session(request.session_hash)


# ============================================================================================================== layout
@shows_errors
def clone(sample, consent, cloned):
    """The clone panel's button: the new voice joins this session's voice lists, selected; on any problem the
    message says why and the previous voice stays."""
    embedding = voice_clone.clone_voice(sample, consent)
    gr.Info("Your voice is ready: pick “My voice” in the voice list (it is kept only for this visit).", duration=6)
    yield embedding, gr.update(choices=voices_for(embedding), value=voice_clone.MY_VOICE), None


@shows_errors
def clone_last_recording(turns, consent, cloned):
    embedding = voice_clone.clone_from_conversation(turns, consent)
    gr.Info("Your voice is ready: pick “My voice” in the voice list (it is kept only for this visit).", duration=6)
    yield embedding, gr.update(choices=voices_for(embedding), value=voice_clone.MY_VOICE)


def voices_for(cloned) -> list[str]:
    return VOICES + ([voice_clone.MY_VOICE] if cloned is not None else [])


def clone_panel(cloned: gr.State, voice: gr.Dropdown, turns: gr.State, elem_prefix: str) -> None:
    """"Clone a voice": record or upload 3-30 s of one person speaking, confirm consent, and the voice becomes
    "My voice" in this session's voice lists. Hidden, with the reason, where no speaker model can be had."""
    problem = voice_clone.clone_unavailable_reason()
    with gr.Accordion("Clone a voice", open=False, elem_id=f"{elem_prefix}-clone"):
        if problem:
            gr.Markdown(problem)
            return
        gr.Markdown("Record or upload 3 to 30 seconds of one person speaking clearly. The reply will speak in that "
                    "voice. The recording is deleted at once; the voice is kept only for this visit and nobody else "
                    "can use it.")
        sample = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Voice sample",
                          elem_id=f"{elem_prefix}-clone-sample")
        consent = gr.Checkbox(label=voice_clone.CONSENT, value=False, elem_id=f"{elem_prefix}-clone-consent")
        with gr.Row():
            button = gr.Button("Use this voice", elem_id=f"{elem_prefix}-clone-button")
            last = gr.Button("Use the last recording I sent", elem_id=f"{elem_prefix}-clone-last")
    button.click(clone, [sample, consent, cloned], [cloned, voice, sample], api_visibility="private",
                 concurrency_id="clone", concurrency_limit=4)
    last.click(clone_last_recording, [turns, consent, cloned], [cloned, voice], api_visibility="private",
               concurrency_id="clone", concurrency_limit=4)


def voice_dropdown() -> gr.Dropdown:
    return gr.Dropdown(VOICES, value=DEFAULT_VOICE, label="Voice", interactive=bool(VOICES),
                       info=None if VOICES else "this checkpoint has no speech model")


def streaming_reply_audio(elem_id: str, visible: bool = True) -> gr.Audio:
    return gr.Audio(label="Spoken reply (plays while it is made)", streaming=True, autoplay=True, interactive=False,
                    visible=visible, elem_id=elem_id)


def run_examples(examples: gr.Examples, handler, inputs, outputs, **progress) -> gr.events.Dependency:
    """Clicking an example fills the inputs, then runs the tab's handler in the shared GPU queue."""
    return examples.load_input_event.then(handler, inputs, outputs, api_visibility="private", **progress,
                                          **GPU_EVENT)


def progress_on(target) -> dict:
    """Progress settings for an event that streams into `target` and also clears its inputs: the queue position and
    timer show on `target` alone (never on the message box or the media inputs), lightly ("minimal": no opaque cover,
    clicks go through), and an error shows only as its toast (CSS hides the error badge), so nothing stays over the
    conversation or the inputs and the next request needs no extra click."""
    return dict(show_progress="minimal", show_progress_on=[target])


def build_chat_tab(cloned: gr.State) -> gr.Dropdown:
    turns = gr.State([])
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=480, latex_delimiters=LATEX, elem_id="chat-chatbot",
                                 buttons=["copy"])
            reply_audio = streaming_reply_audio("chat-reply-audio", visible=False)
            box = gr.MultimodalTextbox(placeholder="Type a message, attach images, a video or an audio clip, or "
                                                   "record with the microphone…",
                                       sources=["upload", "microphone"], file_types=["image", "video", "audio"],
                                       file_count="multiple", label="Message", show_label=False,
                                       elem_id="chat-input")
            with gr.Row():
                stop_button = gr.Button("Stop", variant="stop", size="sm")
                clear_button = gr.Button("Clear", size="sm")
            with gr.Accordion("Webcam (attach a photo or a clip to the next message)", open=False):
                with gr.Row():
                    photo = gr.Image(sources=["webcam"], type="filepath", image_mode=None, label="Photo",
                                     elem_id="chat-photo")
                    # Unmirrored: the model should see the scene as it is (and Gradio then skips an ffmpeg pass).
                    clip = gr.Video(sources=["webcam"], label="Clip", elem_id="chat-clip",
                                    webcam_options=gr.WebcamOptions(mirror=False))
        with gr.Column(scale=1):
            system_prompt = gr.Textbox("", label="System prompt", lines=3, placeholder="e.g. You are a friendly tutor.")
            speak = gr.Checkbox(label="Reply with voice", value=False, interactive=bool(VOICES), elem_id="chat-speak")
            voice = voice_dropdown()
            clone_panel(cloned, voice, turns, "chat")
            # The API's optional per-call voice: a recording to speak in, instead of the voice picked above.
            voice_sample = gr.Audio(type="filepath", visible=False, label="Voice sample (optional)")
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(1, checks.MAX_NEW_TOKENS, value=512, step=1, label="Max new tokens",
                                       elem_id="chat-max-tokens")
            gr.Markdown(checks.CHAT_LIMITS_MARKDOWN, elem_classes="limits")
            with gr.Accordion("All limits", open=False):
                gr.Markdown(checks.LIMITS_MARKDOWN, elem_classes="limits")

    photo.change(attach, [box, photo], [box, photo], api_visibility="private", queue=False)
    clip.change(attach, [box, clip], [box, clip], api_visibility="private", queue=False)
    inputs = [box, turns, system_prompt, temperature, top_p, max_new_tokens, speak, voice, voice_sample, cloned]
    outputs = [chatbot, reply_audio, box, turns]
    # Enter while a reply streams queues the message: it stays in the box and is sent when the reply ends.
    submit = box.submit(chat, inputs, outputs, api_name="chat", trigger_mode="always_last", **progress_on(chatbot),
                        **GPU_EVENT)
    settings = [system_prompt, temperature, top_p, max_new_tokens, speak, voice]
    retry = chatbot.retry(retry_chat, [turns, *settings, cloned], [chatbot, reply_audio, turns], api_visibility="private",
                          **progress_on(chatbot), **GPU_EVENT)
    chatbot.undo(undo_chat, [turns], [chatbot, box, turns], api_visibility="private", queue=False)
    chatbot.clear(lambda: [], None, turns, api_visibility="private", queue=False)
    speak.change(lambda on: gr.update(visible=on), speak, reply_audio, api_visibility="private", queue=False)
    examples = gr.Examples(
        [
            [{"text": "What is in this picture? Describe it for a child.", "files": [example("images", "street.png")]}],
            [{"text": "Which fruit sold the most, and by how much more than the least?",
              "files": [example("images", "fruit_chart.png")]}],
            [{"text": "What happens in this video?", "files": [example("video", "bouncing_ball.mp4")]}],
            [{"text": "", "files": [example("audio", "capital_question.wav")]}],
            [{"text": "Write a four-line poem about the sea.", "files": []}],
        ],
        inputs=[box], label="Examples (click to run)", api_visibility="private",
        example_labels=["Image: describe a street scene", "Image: read a bar chart", "Video: what happens?",
                        "Audio: a spoken question", "Text: a short poem"],
    )
    from_example = run_examples(examples, chat, inputs, outputs, **progress_on(chatbot))
    stop_button.click(stop, None, None, cancels=[submit, retry, from_example], api_visibility="private", queue=False)
    clear_button.click(lambda: ([], [], None), None, [chatbot, turns, reply_audio],
                       cancels=[submit, retry, from_example], api_visibility="private", queue=False)
    return voice


def build_vision_tab():
    with gr.Row():
        image = ImageInput(sources=["upload", "webcam", "clipboard"], type="filepath", image_mode=None, label="Image",
                           elem_id="vqa-image")
        video = gr.Video(sources=["upload", "webcam"], label="Video", elem_id="vqa-video")
    question = gr.Textbox("", label="Question", placeholder="Ask about the image or the video", elem_id="vqa-question")
    with gr.Row():
        ask = gr.Button("Ask", variant="primary")
        stop_button = gr.Button("Stop", variant="stop", elem_id="vqa-stop")
    with gr.Accordion("Settings", open=False, elem_id="vqa-settings"):
        max_new_tokens = gr.Slider(1, checks.MAX_NEW_TOKENS, value=512, step=1, label="Max new tokens",
                                   elem_id="vqa-max-tokens")
    answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="vqa-answer")
    status = gr.Markdown("", visible=False, elem_id="vqa-video-status")
    # This session's long videos stay in memory for follow-up questions until the page closes (or the state expires).
    video_session = gr.State(None, delete_callback=lambda handle: handle.close() if handle is not None else None)
    gr.context.Context.root_block.unload(free_session_videos)
    gr.Markdown(checks.VISION_LIMITS_MARKDOWN, elem_classes="limits")
    with gr.Accordion("All limits", open=False):
        gr.Markdown(checks.LIMITS_MARKDOWN, elem_classes="limits")
    inputs = [image, video, question, max_new_tokens]
    events = [ask.click(vision_qa, inputs, answer, api_name="vision_qa", show_progress_on=[answer], **GPU_EVENT),
              question.submit(vision_qa, inputs, answer, api_visibility="private", show_progress_on=[answer],
                              trigger_mode="always_last", **GPU_EVENT)]
    examples = gr.Examples(
        [[example("images", "shop_sign.png"), None, "What does the sign say? When is it open?"],
         [example("images", "street.png"), None, "What colour is the car, and where is it?"],
         [None, example("video", "bouncing_ball.mp4"), "Describe the motion of the ball."]],
        inputs=[image, video, question], label="Examples (click to run)", api_visibility="private",
        example_labels=["Read a shop sign", "Find the car", "Follow a bouncing ball"],
    )
    events.append(run_examples(examples, vision_qa, inputs, answer))
    for event in events:
        event.then(video_status, [video, video_session], [status, video_session], api_visibility="private",
                   queue=False)
    video.change(lambda: gr.update(value="", visible=False), None, status, api_visibility="private", queue=False)
    stop_button.click(stop, None, None, cancels=events, api_visibility="private", queue=False)


def build_asr_tab():
    gr.Markdown(f"Transcribes with the release's ASR prompt: *“{ASR_PROMPT}”* The model names the "
                f"language first. Recordings up to {checks.MAX_ASR_SECONDS // 60} minutes are transcribed in "
                f"{checks.ASR_SEGMENT_SECONDS:.0f}-second segments.")
    audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Speech", elem_id="asr-audio")
    with gr.Row():
        transcribe = gr.Button("Transcribe", variant="primary")
        stop_button = gr.Button("Stop", variant="stop")
    transcript = gr.Textbox(label="Transcript", lines=6, interactive=False, elem_id="asr-transcript")
    events = [transcribe.click(asr, audio, transcript, api_name="asr", **GPU_EVENT)]
    examples = gr.Examples([[example("audio", "fox_sentence.wav")], [example("audio", "robot_story_request.wav")]],
                           inputs=[audio], label="Examples (click to run)", api_visibility="private",
                           example_labels=["English: the quick brown fox", "English: a request"])
    events.append(run_examples(examples, asr, [audio], transcript))
    stop_button.click(stop, None, None, cancels=events, api_visibility="private", queue=False)


def build_speech_tab(cloned: gr.State) -> gr.Dropdown:
    turns = gr.State([])
    gr.Markdown("Talk to the model: record a question (or upload one), and the spoken answer starts playing while "
                "the rest is still being made. The conversation continues turn by turn.")
    with gr.Row():
        with gr.Column(scale=1):
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your message",
                             elem_id="s2s-audio")
            voice = voice_dropdown()
            clone_panel(cloned, voice, turns, "s2s")
            voice_sample = gr.Audio(type="filepath", visible=False, label="Voice sample (optional)")
            with gr.Accordion("Settings", open=False, elem_id="s2s-settings"):
                max_new_tokens = gr.Slider(1, checks.MAX_NEW_TOKENS, value=256, step=1, label="Max new tokens",
                                           elem_id="s2s-max-tokens")
            with gr.Row():
                send = gr.Button("Send", variant="primary")
                stop_button = gr.Button("Stop", variant="stop")
                clear_button = gr.Button("Clear")
        with gr.Column(scale=2):
            reply_audio = streaming_reply_audio("s2s-reply-audio")
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="s2s-chatbot")
    inputs = [audio, turns, voice, max_new_tokens, voice_sample, cloned]
    outputs = [chatbot, reply_audio, audio, turns]
    events = [send.click(speech_to_speech, inputs, outputs, api_name="speech_to_speech", **progress_on(chatbot),
                         **GPU_EVENT),
              audio.stop_recording(speech_to_speech, inputs, outputs, api_visibility="private", **progress_on(chatbot),
                                   **GPU_EVENT)]
    examples = gr.Examples([[example("audio", "capital_question.wav")], [example("audio", "robot_story_request.wav")]],
                           inputs=[audio], label="Examples (click to run)", api_visibility="private",
                           example_labels=["“What is the capital of France?”", "“Tell me a story about a robot”"])
    events.append(run_examples(examples, speech_to_speech, inputs, outputs, **progress_on(chatbot)))
    stop_button.click(stop, None, None, cancels=events, api_visibility="private", queue=False)
    clear_button.click(lambda: ([], [], None), None, [chatbot, turns, reply_audio], cancels=events,
                       api_visibility="private", queue=False)
    chatbot.clear(lambda: [], None, turns, api_visibility="private", queue=False)
    return voice


def build_thinking_tab():
    turns = gr.State([])
    gr.Markdown("Chain-of-thought mode: the release's reasoning prompt is added to your question. The reasoning "
                "streams in a collapsible **Thinking** block; the answer, and any boxed result, follow below it.")
    chatbot = gr.Chatbot(label="Reasoning", height=440, latex_delimiters=LATEX, elem_id="think-chatbot")
    with gr.Row():
        image = ImageInput(sources=["upload", "webcam", "clipboard"], type="filepath", image_mode=None,
                           label="Image (optional, for visual math)", height=220, elem_id="think-image")
        with gr.Column(elem_id="think-ask"):
            # One line that grows: Enter asks, Shift+Enter starts a new line (as in Chat).
            question = gr.Textbox("", label="Question", lines=1, max_lines=8,
                                  placeholder="e.g. A train leaves at 9:40 and arrives at 11:15. How long is the trip?",
                                  info="Enter asks; Shift+Enter starts a new line.", elem_id="think-question")
            with gr.Row():
                think = gr.Button("Think", variant="primary")
                stop_button = gr.Button("Stop", variant="stop")
                clear_button = gr.Button("Clear")
            max_new_tokens = gr.Slider(1, checks.MAX_NEW_TOKENS, value=1024, step=1, label="Max new tokens",
                                       elem_id="think-max-tokens")
    inputs = [question, image, turns, max_new_tokens]
    outputs = [chatbot, question, image, turns]
    events = [think.click(thinking, inputs, outputs, api_name="thinking", **progress_on(chatbot), **GPU_EVENT),
              question.submit(thinking, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                              **progress_on(chatbot), **GPU_EVENT)]
    examples = gr.Examples(
        [["Find x. Give the answer in a box.", example("images", "triangle.png")],
         ["How many pieces of fruit were sold in total?", example("images", "fruit_chart.png")],
         ["If 3 pencils cost 45 cents, how much do 7 pencils cost?", None]],
        inputs=[question, image], label="Examples (click to run)", api_visibility="private",
        example_labels=["Visual math: a right triangle", "Add up a bar chart", "Word problem"],
    )
    events.append(run_examples(examples, thinking, inputs, outputs, **progress_on(chatbot)))
    stop_button.click(stop, None, None, cancels=events, api_visibility="private", queue=False)
    clear_button.click(lambda: ([], []), None, [chatbot, turns], cancels=events, api_visibility="private",
                       queue=False)
    chatbot.clear(lambda: [], None, turns, api_visibility="private", queue=False)


# ========================================================================================================= voice call
# The microphone streams short chunks to `call_chunk` (Gradio 6.31's recorder uploads one every 0.1 s, whatever
# stream_every says; its own unlimited concurrency, never the GPU queue), which only feeds the call. Its events set
# the hidden signal box; the box's change cuts the reply's playback in the page on barge-in (js) and starts
# `call_reply` in the GPU queue, the only event that writes the transcript. The reply's audio does not go through
# that event: the page's own player (CALL_PLAYER_JS, Web Audio) fetches each piece as soon as it is made and plays
# it 40-80 ms later (Gradio's streaming gr.Audio output plays through an HLS player that started 0.6-1.4 s late).
# The server's barge-in reaches the page about a second after the visitor starts talking, so the page also meters
# the microphone itself and pauses the reply at once when the visitor makes a sound ("tentative barge-in",
# CALL_METER_JS): the server's signal keeps it stopped, or, if none comes, the reply resumes.
# See serving/voice_call_flow.py (TENTATIVE_BARGE_IN: the settings and why) and serving/voice_call.py.
CALL_RECORD_JS = """() => {
    if (window.mingCallPlayer) window.mingCallPlayer.start();  // in the click: the browser then lets it play
    const b = document.querySelector('#call-mic .record-button');
    if (b) b.click();
}"""
# js_on_load of the reply player (a gr.HTML; `server.call_reply_audio` is its server function): defines
# window.mingCallPlayer once. listen(call id) long-polls the call's reply audio (serving/voice_call_flow.py
# next_reply_audio) and schedules each piece right after the one before on an AudioContext, so a reply sounds as soon
# as its first piece is made and plays without gaps. A newer turn's reply replaces the one playing; cut() drops what
# is left of the current reply (barge-in, the end); pause() / resume() suspend and resume the audio clock (the
# tentative barge-in: it goes on exactly where it stopped); playing() says whether reply audio is sounding. Its log
# ({t: performance.now() ms, kind}): "play" (t: when a reply starts to sound, or sounds again after running dry),
# "pause", "resume", "cut ..." (while it sounded) and "end" (t: when a finished reply's last sample played).
CALL_PLAYER_JS = """
if (!window.mingCallPlayer) window.mingCallPlayer = (() => {
  const LEAD_S = 0.03;  // the first piece starts this far ahead of the audio clock: room to schedule it
  const log = [];
  const note = (kind, t = performance.now()) => { log.push({t, kind}); if (log.length > 300) log.shift(); };
  const label = element.querySelector('.call-player-state');
  const show = (text) => { if (label) label.textContent = text; };
  let context = null, out = null, callId = null, polling = false;
  let turn = -1, next = 0, stopped = false, done = false, dropped = -1, endAt = 0, paused = false, ended = false;
  const pageTime = (t) => performance.now() + (t - context.currentTime) * 1000;
  function ensureContext() {
    if (!context || context.state === 'closed') context = new AudioContext();
    if (context.state === 'suspended' && !paused) context.resume().catch(() => {});
  }
  const sounding = () => !!context && !!out && endAt > context.currentTime;
  function finishIfOver() {
    if (done && !ended && out && !stopped && turn !== dropped && context.currentTime >= endAt - 0.002) {
      ended = true;
      note('end', pageTime(endAt));
      show('finished');
    }
  }
  function cut(why) {
    const was = sounding();
    dropped = turn;
    if (out) { out.disconnect(); out = null; }
    endAt = 0;
    if (paused) { paused = false; context.resume().catch(() => {}); }
    if (was) { note('cut ' + (why || '')); show('stopped'); }
  }
  function schedule(pcm, rate) {
    const bytes = atob(pcm), n = bytes.length >> 1;
    if (!n || !rate) return;
    ensureContext();
    const buffer = context.createBuffer(1, n, rate), data = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) {
      const v = bytes.charCodeAt(2 * i) | (bytes.charCodeAt(2 * i + 1) << 8);
      data[i] = (v >= 32768 ? v - 65536 : v) / 32768;
    }
    if (!out) { out = context.createGain(); out.connect(context.destination); }
    const source = context.createBufferSource(), gain = out, now = context.currentTime;
    source.buffer = buffer;
    source.connect(gain);
    const at = Math.max(endAt, now + LEAD_S);
    source.start(at);
    if (endAt <= now) { note('play', pageTime(at)); show(paused ? 'paused' : 'playing'); }
    endAt = at + buffer.duration;
    source.onended = () => { if (gain === out) finishIfOver(); };
  }
  function take(r) {
    if (r.turn !== turn) {  // a newer turn's reply replaces the one playing
      if (sounding()) cut('(a new turn)');
      turn = r.turn; stopped = done = ended = false;
      if (out) { out.disconnect(); out = null; }
      endAt = 0;
    }
    next = r.next;
    if (r.stopped && !stopped) cut('(the server stopped it)');
    stopped = r.stopped;
    if (!stopped && turn !== dropped && r.pcm) schedule(r.pcm, r.rate);
    done = r.done;
    finishIfOver();
  }
  async function poll() {
    if (polling) return;
    polling = true;
    while (callId) {
      const id = callId;
      let r = null;
      try {
        r = await server.call_reply_audio({call: id, turn, next, stopped, done});
      } catch (error) {
        await new Promise(f => setTimeout(f, 500));  // the server is away for a moment: ask again
        continue;
      }
      if (r && r.call === callId) take(r);
    }
    polling = false;
  }
  return {
    start: ensureContext,
    listen(id) {
      if (id && id !== callId) { callId = id; turn = dropped = -1; next = 0; stopped = done = ended = false; }
      ensureContext();
      poll();
    },
    stop() { callId = null; cut('(the call ended)'); },
    cut,
    pause() {
      if (context && !paused) { paused = true; context.suspend().catch(() => {}); note('pause'); show('paused'); }
    },
    resume() {
      if (paused) { paused = false; context.resume().catch(() => {}); note('resume'); show('playing'); }
    },
    playing: () => !paused && sounding(),
    get paused() { return paused; },
    get turn() { return turn; },
    log,
  };
})();
"""
CALL_PLAYER_HTML = '<div class="call-player">Spoken reply: <span class="call-player-state">none yet</span></div>'
# Defines window.mingCallMeter once: start() opens the microphone with echo cancellation (the reply coming out of
# the speakers is not the visitor) and reads its level every tick_ms; a sound over the noise floor for hold_ms while
# the reply plays pauses the reply ("pause" in its log). confirm() (the server's barge-in, a new turn or the end) or
# the server hearing speech (#call-heard) keeps it paused; once the server has heard past the sound without calling
# it speech, the reply resumes (after max_hold_ms at the latest). stop() closes it.
CALL_METER_JS = """
if (!window.mingCallMeter) window.mingCallMeter = (() => {
  const cfg = __SETTINGS__;
  const minDb = 20 * Math.log10(cfg.min_level);
  let context = null, stream = null, timer = null, analyser = null, samples = null, running = false;
  let floor = null, loudSince = null, lastLoud = -1e9, lastTick = 0, waitQuiet = false, held = null, startedAt = 0;
  const log = [];
  const note = (kind) => { log.push({t: performance.now(), kind}); if (log.length > 200) log.shift(); };
  const player = () => window.mingCallPlayer;  // the reply's audio (CALL_PLAYER_JS)
  function resume(why) {
    const h = held, p = player();
    held = null;
    if (p && p.turn === h.turn && p.paused) {
      p.resume();
      note('resume ' + why);
    }
  }
  function tick() {
    const now = performance.now();
    analyser.getFloatTimeDomainData(samples);
    let energy = 0;
    for (let i = 0; i < samples.length; i++) energy += samples[i] * samples[i];
    const db = 10 * Math.log10(energy / samples.length + 1e-12);
    const dt = lastTick ? now - lastTick : cfg.tick_ms;
    lastTick = now;
    if (floor === null) floor = db;
    const loud = db > Math.max(floor + cfg.margin_db, minDb);
    floor = db < floor ? db : Math.min(db, floor + cfg.floor_rise_db_per_s * dt / 1000);
    // Only a quiet reading ends a sound: on a busy page the readings come late, and the time between two loud
    // ones counts as loud.
    if (loud) {
      if (loudSince === null) loudSince = now;
      lastLoud = now;
    } else if (now - lastLoud > cfg.gap_ms) {
      loudSince = null;
    }
    if (waitQuiet && now - lastLoud >= cfg.quiet_ms) waitQuiet = false;
    if (held) {
      // The server's ear: seconds of microphone audio it has heard, and whether it hears the visitor talking.
      const box = document.querySelector('#call-heard textarea');
      const heard = (box && box.value || '').split(' ');
      const heardS = parseFloat(heard[0]) || 0;
      held.end = Math.max(held.end, lastLoud);
      const over = now - lastLoud >= cfg.quiet_ms;
      // Audio time (s since the meter started) up to which the server must have listened to have judged the sound:
      // its end, and at least the minimum speech length after its start; for a sound still going on, lasting_s more.
      const judged = (held.start - startedAt) / 1000 + cfg.min_speech_s + cfg.verdict_slack_s;
      const verdictAt = over ? Math.max(judged, (held.end - startedAt) / 1000 + cfg.verdict_slack_s)
        : judged + cfg.lasting_s;
      if (!player() || player().turn !== held.turn) {
        held = null;  // another reply took the player
      } else if (heard[1] === 'speech') {
        confirm('(the server hears speech)');
      } else if (heardS >= verdictAt || now - held.at >= cfg.max_hold_ms) {
        waitQuiet = !over;  // a sound that goes on pauses nothing more until it stops
        resume(heardS >= verdictAt ? (over ? '(the server heard no speech)' : '(a lasting sound, not speech)')
          : '(no verdict in time)');
      }
    } else if (loud && loudSince !== null && !waitQuiet && now - loudSince >= cfg.hold_ms) {
      const p = player();
      if (p && p.playing()) {
        held = {turn: p.turn, at: now, start: loudSince, end: now};
        p.pause();
        note('pause');
      }
    }
  }
  async function start() {
    if (running) return;
    running = true;
    try {
      const s = await navigator.mediaDevices.getUserMedia(
        {audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
      if (!running) { s.getTracks().forEach(t => t.stop()); return; }
      stream = s;
      context = new AudioContext();
      if (context.state === 'suspended') context.resume().catch(() => {});
      analyser = context.createAnalyser();
      analyser.fftSize = 1024;
      context.createMediaStreamSource(s).connect(analyser);
      samples = new Float32Array(analyser.fftSize);
      floor = loudSince = held = null;
      lastLoud = -1e9; lastTick = 0; waitQuiet = false; startedAt = performance.now();
      const box = document.querySelector('#call-heard textarea');
      if (box) box.value = '';  // what an earlier call heard
      timer = setInterval(tick, cfg.tick_ms);
      note('start');
    } catch (error) {
      running = false;  // no meter: barge-in still works, at the server's pace
      note('no microphone: ' + error);
    }
  }
  function stop() {
    running = false;
    if (timer) clearInterval(timer);
    if (stream) stream.getTracks().forEach(t => t.stop());
    if (context) context.close().catch(() => {});
    timer = stream = context = analyser = held = null;
    note('stop');
  }
  function confirm(what) {
    note((held ? 'confirmed ' : 'signal ') + what);
    if (held && player()) player().cut(what);  // the paused reply stays stopped
    held = null;
  }
  return {start, stop, confirm, log, settings: cfg};
})();
""".replace("__SETTINGS__", voice_call_flow.tentative_barge_in_json())
CALL_METER_START_JS = ("() => {" + CALL_METER_JS +
                       "window.mingCallMeter.start(); if (window.mingCallPlayer) window.mingCallPlayer.start(); }")
CALL_METER_STOP_JS = "() => { if (window.mingCallMeter) window.mingCallMeter.stop(); }"
CALL_SIGNAL_JS = """(value) => {
    value = value || '';
    const meter = window.mingCallMeter, player = window.mingCallPlayer, call = /call=(\\w+)/.exec(value);
    if (player && call && !value.includes('end=')) player.listen(call[1]);  // fetch this call's replies
    // The server's word: a barge-in, a new turn or the end keeps a tentatively paused reply stopped.
    if (meter && /(stop|turn|end)=/.test(value)) meter.confirm(value);
    if (player && value.includes('stop=')) player.cut('(barge-in)');
    if (value.includes('end=')) {
        if (player) player.stop();
        if (meter) meter.stop();
        const b = document.querySelector('#call-mic .stop-button');
        if (b) b.click();
    }
}"""
CALL_IDLE_STATUS = ("Press **Start call** and allow the microphone, then just talk. Pause to let the model answer; "
                    "talk over the answer to interrupt it.")


def start_call(call, pause_s, voice, max_new_tokens, cloned, request: gr.Request):
    """The recording started (Start call, or the microphone's own button): a new call, unless one is going on."""
    if call is not None and not call.ended:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        call = voice_call_flow.VoiceCall(request.session_hash, voice, pause_s, max_new_tokens, cloned=cloned)
    except UserError as error:
        gr.Warning(error.message, title=error.title)
        return gr.skip(), f"The call did not start: {error.message}", f"end=error seq={id(error)}", gr.skip()
    return call, call.status_update(), gr.skip(), gr.Timer(active=True)


def call_chunk(chunk, call):
    """One microphone chunk: feed the call; tell the page what happened (never runs the model), and how far the
    call has heard (for the page's tentative barge-in)."""
    if call is None or call.ended:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    events = call.feed(chunk)
    signal, status = call.signal(events), call.status_update()
    return signal if signal is not None else gr.skip(), call, status if status is not None else gr.skip(), \
        call.heard()


def end_call(call, reason: str = "hang_up"):
    """Hang up (or the microphone stopped): the reply stops, the page stops the recorder and shows the transcript."""
    if call is None:
        return gr.skip(), gr.skip(), gr.Timer(active=False)
    signal = call.signal(call.hang_up(reason))
    status = call.status_update()
    return signal if signal is not None else gr.skip(), status if status is not None else gr.skip(), \
        gr.Timer(active=False)


def check_call(call):
    """Every few seconds during a call: end it if the microphone has stopped sending sound."""
    if call is None or call.ended:
        return gr.skip(), gr.skip(), gr.Timer(active=False)
    signal = call.signal(call.check_microphone())
    status = call.status_update()
    return (signal if signal is not None else gr.skip(), status if status is not None else gr.skip(),
            gr.Timer(active=False) if call.ended else gr.skip())


@shows_errors
def call_reply(call, voice, max_new_tokens, cloned):
    """Answer the turn that is waiting (each reply its own GPU job), streaming the transcript (the page's player
    fetches the audio itself: `call_reply_audio`)."""
    if call is None:
        return
    call.set_reply_options(voice, max_new_tokens, cloned)
    yield from call.reply()


async def call_reply_audio(since):
    """The page's reply player asks for the newest reply audio of its call (a long poll on the event loop)."""
    return await voice_call_flow.next_reply_audio(since)


def voice_call_turns(audio, pause_s):
    try:
        return voice_call_flow.detected_turns(audio, pause_s)
    except UserError as error:
        raise as_gradio_error(error) from None


@shows_errors
def voice_call_file(audio, pause_s, voice, max_new_tokens, cloned=None, request: gr.Request = None):
    yield from voice_call_flow.whole_call(audio, pause_s, voice, max_new_tokens, request.session_hash, cloned)


def build_voice_call_tab(cloned: gr.State) -> None:
    call = gr.State(None, delete_callback=lambda c: c.hang_up("closed") if c is not None else None)
    gr.Markdown("A hands-free conversation. Press **Start call**, then just talk: when you pause, the model answers "
                "out loud. Talk over the answer to interrupt it. **Hang up** ends the call; the conversation stays "
                "below to replay.")
    with gr.Row():
        with gr.Column(scale=1):
            microphone = gr.Audio(sources=["microphone"], streaming=True, label="Microphone", elem_id="call-mic")
            with gr.Row():
                start = gr.Button("Start call", variant="primary", elem_id="call-start")
                hang_up = gr.Button("Hang up", variant="stop", elem_id="call-hang-up")
            status = gr.Markdown(CALL_IDLE_STATUS, elem_id="call-status")
            voice = voice_dropdown()
            with gr.Accordion("Settings", open=False, elem_id="call-settings"):
                low, high = voice_call_flow.PAUSE_RANGE_S
                pause = gr.Slider(low, high, value=voice_call_flow.DEFAULT_PAUSE_S, step=0.1,
                                  label="Pause that ends your turn (seconds)", elem_id="call-pause",
                                  info="Shorter: quicker answers. Longer: room to think mid-sentence.")
                max_new_tokens = gr.Slider(1, checks.MAX_NEW_TOKENS, value=256, step=1, label="Max new tokens",
                                           elem_id="call-max-tokens")
        with gr.Column(scale=2):
            gr.HTML(CALL_PLAYER_HTML, js_on_load=CALL_PLAYER_JS, server_functions=[call_reply_audio],
                    elem_id="call-player")
            chatbot = gr.Chatbot(label="Call transcript", height=420, elem_id="call-chatbot")
    with gr.Accordion("No microphone? Run a call on a recording", open=False, elem_id="call-file-panel"):
        gr.Markdown("The recording is heard as a microphone would hear it: each pause ends a turn, each turn gets a "
                    "spoken reply, and speech while a reply would still be playing interrupts it.")
        recording = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Recording",
                             elem_id="call-file")
        with gr.Row():
            find_turns = gr.Button("Find the turns", elem_id="call-file-turns-button")
            run_file = gr.Button("Run the call", variant="primary", elem_id="call-file-run")
        file_chatbot = gr.Chatbot(label="The call on the recording", height=300, elem_id="call-file-chatbot")
        turns_json = gr.JSON(label="Turns (seconds into the recording)", elem_id="call-file-turns")
    signal = gr.Textbox("", visible="hidden", elem_id="call-signal")
    heard = gr.Textbox("", visible="hidden", elem_id="call-heard")  # read by the page's tentative barge-in
    timer = gr.Timer(2.0, active=False)

    start.click(None, js=CALL_RECORD_JS)
    microphone.start_recording(None, js=CALL_METER_START_JS)  # the page's own level meter (tentative barge-in)
    microphone.stop_recording(None, js=CALL_METER_STOP_JS)
    microphone.start_recording(start_call, [call, pause, voice, max_new_tokens, cloned], [call, status, signal, timer],
                               show_progress="hidden", api_visibility="private", queue=False)
    microphone.stream(call_chunk, [microphone, call], [signal, call, status, heard], stream_every=0.2,
                      concurrency_id="call-microphone", concurrency_limit=None, show_progress="hidden",
                      api_visibility="private")
    signal.change(None, signal, None, js=CALL_SIGNAL_JS)
    signal.change(call_reply, [call, voice, max_new_tokens, cloned], chatbot, show_progress="hidden",
                  trigger_mode="always_last", api_visibility="private", **GPU_EVENT)
    hang_up.click(end_call, call, [signal, status, timer], show_progress="hidden", api_visibility="private",
                  queue=False)
    microphone.stop_recording(end_call, call, [signal, status, timer], show_progress="hidden",
                              api_visibility="private", queue=False)
    timer.tick(check_call, call, [signal, status, timer], show_progress="hidden", api_visibility="private",
               queue=False)
    cloned.change(lambda v: gr.update(choices=voices_for(v)), cloned, voice, api_visibility="private", queue=False)
    find_turns.click(voice_call_turns, [recording, pause], turns_json, api_name="voice_call_turns",
                     concurrency_id="call-turns", concurrency_limit=2)
    run_file.click(voice_call_file, [recording, pause, voice, max_new_tokens, cloned], [file_chatbot, turns_json],
                   api_name="voice_call", **GPU_EVENT)


CSS = """
#banner { background: #fff4e5; border: 1px solid #f0a030; border-radius: 8px; padding: 4px 12px; }
.limits { font-size: 0.85em; opacity: 0.8; }
/* A failed request says so in its toast; Gradio would also leave a red "Error" badge over the component it was
   writing to (the conversation, an answer) until its small x is clicked. */
[data-testid="status-tracker"]:has(> .error) { display: none !important; }
/* Phone width: every tab on the bar (no overflow menu), a one-line banner, and the message box above the fold. */
@media (max-width: 640px) {
  #intro p { font-size: 0.9em; margin: 0; }
  #intro .intro-more { display: none; }
  #banner { padding: 2px 8px; }
  #banner p, #banner strong { font-size: 13px; line-height: 1.3; }
  #banner .banner-more { display: none; }
  #chat-chatbot, #s2s-chatbot, #call-chatbot { height: 300px !important; max-height: 300px !important; }
  #think-chatbot { height: 220px !important; max-height: 220px !important; }
  #think-ask { order: -1; }  /* the question before the optional image */
}
"""


def banner_markdown() -> str:
    """The line at the top of the page when the answers cannot be trusted (the tiny model) or a part is off."""
    lines = []
    if ENGINE.is_tiny:
        lines.append("**Test mode: a tiny model with random weights, so its answers and its voice are noise.** "
                     "<span class='banner-more'>Every tab, upload and button works as with the real model.</span>")
    if ENGINE.notice:
        lines.append(f"<span class='banner-more'>{ENGINE.notice}</span>")
    return "  \n".join(lines)


def footer_markdown() -> str:
    if ENGINE.is_tiny:
        where = "the CPU" if ENGINE.device.type == "cpu" else "the GPU"
        return f"Model: the tiny test model (random weights), on {where}."
    return (f"Model: `{os.path.basename(ENGINE.checkpoint.rstrip('/'))}` on the "
            f"{'GPU' if ENGINE.device.type == 'cuda' else ENGINE.device.type.upper()}. When many people ask at once, "
            "requests wait their turn in a queue.")


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Ming-Lite-Omni-Preview", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# Ming-Lite-Omni-Preview\nOne open model that sees, listens and speaks<span class='intro-more'>: "
                    "chat with images, video and audio; ask about a picture or a clip; transcribe speech; talk and "
                    "hear the answer while it is being made, or hold a hands-free voice call; or watch it reason "
                    "step by step</span>.", elem_id="intro")
        gr.Markdown(banner_markdown(), visible=bool(banner_markdown()), elem_id="banner")
        cloned = gr.State(None)  # this session's cloned voice (an embedding), shared by Chat and Speech-to-speech
        with gr.Tabs(overflow_behavior="wrap", elem_id="tabs"):  # on a phone, every tab one tap away (no "⋯" menu)
            with gr.Tab("Chat", id="chat"):
                chat_voice = build_chat_tab(cloned)
            with gr.Tab("Image & video QA", id="vision"):
                build_vision_tab()
            with gr.Tab("ASR", id="asr"):
                build_asr_tab()
            with gr.Tab("Speech-to-speech", id="s2s"):
                speech_voice = build_speech_tab(cloned)
            with gr.Tab("Voice call", id="call"):
                build_voice_call_tab(cloned)
            with gr.Tab("Thinking", id="thinking"):
                build_thinking_tab()
        gr.Markdown(footer_markdown(), elem_classes="limits", elem_id="footer")
        # A voice cloned in one tab shows up in the other's list too.
        cloned.change(lambda v: (gr.update(choices=voices_for(v)),) * 2, cloned, [chat_voice, speech_voice],
                      api_visibility="private", queue=False)
    return demo.queue(default_concurrency_limit=1, max_size=64)


demo = build_demo()


def launch(args: argparse.Namespace, block: bool = True) -> str:
    """Serve the demo; returns the local URL (tests call it with block=False)."""
    # quiet: Gradio's own start-up lines would suggest `share=True` in launch(); ours name the --share option.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                max_file_size="500mb", allowed_paths=[EXAMPLES], css=CSS, prevent_thread_lock=True, quiet=True)
    if block:
        print(f"\nThe demo is running: open {demo.local_url} in a browser (Ctrl+C stops it).", flush=True)
        if demo.share_url:
            print(f"Public link for testers: {demo.share_url}", flush=True)
        elif not args.share:
            print("For a public link to send to testers, start it with --share (scripts/demo.sh --share).", flush=True)
    if args.share and not demo.share_url:
        print("\nCould not create a public share link: the gradio.live service cannot be reached from this "
              f"machine. The demo still runs locally at {demo.local_url}\n", flush=True)
    if block:
        demo.block_thread()
    return demo.local_url


if __name__ == "__main__":
    launch(ARGS)
