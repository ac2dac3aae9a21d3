"""The Space in a real browser: Playwright drives Debian's Chromium (headless) against app.py on localhost with the
tiny checkpoint. Every tab is visited; each runs one of its examples, and real media go through the page's own
upload inputs (an image in Chat, a video in Image & video QA, a wav in ASR), Chromium's fake microphone (a wav
played as the mic) for a voice turn and its fake camera for a webcam photo. Screenshots land in tests/artifacts/
(gitignored).

The test checks what a user sees: text that grows while it streams, the "Thinking" block, and audio players.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import pytest

from tests import chromium

os.environ.setdefault("MING_MODEL", "tiny")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if not os.path.exists(chromium.CHROMIUM):
    pytest.skip("Chromium is not installed (apt-get install chromium, or scripts/setup.sh --dev)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
expect = sync_api.expect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")
MICROPHONE_WAV = os.path.join(EXAMPLES, "audio", "capital_question.wav")
TIMEOUT_MS = 90_000  # generous: the CPU may be shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    """One server per test process, shared with test_app.py: Gradio removes its cached example files when a demo
    closes, so the demo is never closed and relaunched."""
    import app as space

    if not space.demo.is_running:
        space.launch(argparse.Namespace(host="127.0.0.1", port=free_port(), share=False), block=False)
    return space.demo.local_url


@pytest.fixture(scope="module")
def page(url):
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = chromium.launch(playwright, MICROPHONE_WAV)
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone", "camera"])
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)  # assertions wait as long as actions (5 s is too short on a busy CPU)
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#chat-input")
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


class Reader:
    """Reads a component's current text, from Python (`read()`) and, for `watch`, from inside the page (`js`)."""

    def __init__(self, page, js: str):
        self.page, self.js = page, js

    def __call__(self) -> str:
        return self.page.evaluate(self.js)


def textarea_text(page, elem_id: str) -> Reader:
    return Reader(page, f"() => (document.querySelector('#{elem_id} textarea') || {{}}).value || ''")


def last_bot_text(page, chatbot: str) -> Reader:
    return Reader(page, f"""() => {{
        const bots = document.querySelectorAll('#{chatbot} .bot-row');
        return bots.length ? bots[bots.length - 1].innerText.trim() : '';
    }}""")


def watch(read: Reader, done, timeout: float = TIMEOUT_MS / 1000) -> list[str]:
    """Record every distinct non-empty value `read` shows until `done()`; return them in order (the streamed
    states). The page records them itself every 5 ms, so a fast stream is seen as the browser showed it, not as
    often as Python can ask."""
    read.page.evaluate(
        """js => {
            const read = eval(js);
            window.__states = [];
            clearInterval(window.__recorder);
            window.__recorder = setInterval(() => {
                const value = read();
                const states = window.__states;
                if (value && states[states.length - 1] !== value) states.push(value);
            }, 5);
        }""",
        read.js,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"timed out; last value seen: {read()!r}")
    read.page.wait_for_timeout(50)  # let the recorder see the final value
    seen = read.page.evaluate("() => { clearInterval(window.__recorder); return window.__states; }")
    value = read()
    if value and (not seen or seen[-1] != value):
        seen.append(value)
    return seen


def finished(page, elem_id: str):
    """A check that turns true once the event writing to this component has run and ended: its progress tracker
    shows (pending, then "generating" while it streams), then hides again."""
    tracker = page.locator(f"#{elem_id} [data-testid=status-tracker]").first
    busy = False

    def done() -> bool:
        nonlocal busy
        if "hide" not in (tracker.get_attribute("class") or ""):
            busy = True
        return busy and "hide" in (tracker.get_attribute("class") or "")

    return done


def wait_until_playable(page, selector: str) -> None:
    """The streaming player's audio element has loaded a clip with a real length."""
    page.wait_for_function("s => [...document.querySelectorAll(s)].some(a => a.duration > 0)", arg=selector)


def clips_in_history(page, chatbot: str):
    """The replayable clips in a conversation's replies (Gradio's compact audio player inside the chatbot)."""
    return page.locator(f"#{chatbot} .bot-row [data-testid=waveform-Audio]")


def assert_clip_has_length(page, chatbot: str) -> None:
    """The newest clip in the history was decoded by the player: its waveform (drawn by wavesurfer inside a shadow
    root, from the decoded samples) has a drawn canvas. Tiny replies can be under a second, so the "0:00" duration
    text alone says nothing."""
    expect(clips_in_history(page, chatbot).last.locator(".timestamp")).to_be_visible()
    page.wait_for_function(
        """c => {
            const clips = document.querySelectorAll('#' + c + ' .bot-row [data-testid=waveform-Audio] .waveform-wrapper > div');
            const host = clips[clips.length - 1];
            const canvases = host && host.shadowRoot ? [...host.shadowRoot.querySelectorAll('canvas')] : [];
            return canvases.some(canvas => canvas.width > 0);
        }""",
        arg=chatbot,
    )


def test_page_shows_the_tiny_model_banner_and_six_tabs(page):
    expect(page.locator("#banner")).to_contain_text("a tiny model with random weights, so its answers and its voice "
                                                    "are noise")
    for name in ("Chat", "Image & video QA", "ASR", "Speech-to-speech", "Voice call", "Thinking"):
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    screenshot(page, "00-start")


def test_chat_runs_an_example_an_upload_and_a_spoken_reply(page):
    open_tab(page, "Chat")
    set_number(page, "chat-max-tokens", 48)
    page.get_by_text("Image: describe a street scene", exact=True).click()
    states = watch(last_bot_text(page, "chat-chatbot"), finished(page, "chat-chatbot"))
    assert len(states) >= 2, f"the reply should stream, saw {states!r}"
    expect(page.locator("#chat-chatbot .user-row img")).to_have_count(1)

    # An image uploaded through the message box's own file input, with a question.
    page.locator("#chat-input input[type=file]").set_input_files(os.path.join(EXAMPLES, "images", "fruit_chart.png"))
    expect(page.locator("#chat-input img")).to_have_count(1)  # the attachment preview
    page.locator("#chat-input textarea").fill("Which fruit sold the most?")
    page.locator("#chat-input textarea").press("Enter")
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(2)
    states = watch(last_bot_text(page, "chat-chatbot"), finished(page, "chat-chatbot"))
    assert len(states) >= 2, f"the reply should stream, saw {states!r}"

    # "Reply with voice": the streaming player appears and the reply keeps its full clip in the history.
    page.locator("#chat-speak input[type=checkbox]").check()
    expect(page.locator("#chat-reply-audio")).to_be_visible()
    set_number(page, "chat-max-tokens", 10)
    page.locator("#chat-input textarea").fill("Say hello.")
    page.locator("#chat-input textarea").press("Enter")
    watch(last_bot_text(page, "chat-chatbot"), finished(page, "chat-chatbot"))
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(3)
    expect(clips_in_history(page, "chat-chatbot")).to_have_count(1)  # the whole spoken reply, replayable
    expect(page.locator("#chat-reply-audio audio")).to_be_attached()  # the player the chunks streamed to
    wait_until_playable(page, "#chat-reply-audio audio")
    assert_clip_has_length(page, "chat-chatbot")
    screenshot(page, "01-chat")

    # Retry answers the last message again, in place.
    before = last_bot_text(page, "chat-chatbot")()
    page.locator("#chat-chatbot button[aria-label=Retry]").last.click()
    assert watch(last_bot_text(page, "chat-chatbot"), finished(page, "chat-chatbot"))[-1] != before
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(3)

    # Undo takes the last turn back into the message box.
    page.locator("#chat-chatbot button[aria-label=Undo]").last.click()
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(2)
    expect(page.locator("#chat-input textarea")).to_have_value("Say hello.")

    # A webcam photo (Chromium's fake camera) joins the message being written.
    page.locator("#chat-speak input[type=checkbox]").uncheck()
    page.get_by_text("Webcam (attach a photo or a clip to the next message)").click()
    page.locator("#chat-photo").get_by_text("Click to Access Webcam").click()
    # Capture only once the fake camera delivers frames: a click before that takes nothing (seen on a busy CPU).
    page.wait_for_function("() => { const v = document.querySelector('#chat-photo video'); "
                           "return v && v.readyState >= 2 && v.videoWidth > 0; }")
    page.locator("#chat-photo button[aria-label='capture photo']").click()
    expect(page.locator("#chat-input [aria-label='File thumbnail']")).to_have_count(1)
    page.locator("#chat-input textarea").fill("What do you see on the camera?")
    page.locator("#chat-input textarea").press("Enter")
    watch(last_bot_text(page, "chat-chatbot"), finished(page, "chat-chatbot"))
    expect(page.locator("#chat-chatbot .user-row").last.locator("img")).to_have_count(1)


def test_vision_qa_answers_about_an_uploaded_video_and_an_example(page):
    open_tab(page, "Image & video QA")
    page.locator("#vqa-settings").get_by_text("Settings").click()
    set_number(page, "vqa-max-tokens", 48)
    page.locator("#vqa-video input[type=file]").set_input_files(os.path.join(EXAMPLES, "video", "bouncing_ball.mp4"))
    expect(page.locator("#vqa-video video")).to_be_attached()
    page.locator("#vqa-question textarea").fill("What moves in this clip?")
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = page.locator("#vqa-answer textarea")
    states = watch(textarea_text(page, "vqa-answer"), finished(page, "vqa-answer"))
    assert len(states) >= 2, f"the answer should stream, saw {states!r}"

    # Stop: a 2000-token answer is cut short, and the model is free again.
    set_number(page, "vqa-max-tokens", 2000)
    previous = answer.input_value()
    page.get_by_role("button", name="Ask", exact=True).click()
    watch(textarea_text(page, "vqa-answer"), lambda: answer.input_value() != previous and len(answer.input_value()) > 40)
    page.locator("#vqa-stop").click()
    import app as space

    deadline = time.monotonic() + 30
    while space.ENGINE.active_jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert space.ENGINE.active_jobs == 0, "Stop ends the generation on the server"
    # The last update in flight (e.g. the decoder's flush of a half-written character) may still land; after that the
    # answer must stay as it is.
    page.wait_for_timeout(1000)
    stopped = answer.input_value()
    page.wait_for_timeout(1500)
    assert answer.input_value() == stopped and len(stopped) < 3000, "nothing streams after Stop"
    set_number(page, "vqa-max-tokens", 48)

    page.locator("#vqa-video button[aria-label=Clear]").click()
    page.get_by_text("Read a shop sign", exact=True).click()
    expect(page.locator("#vqa-image img")).to_be_attached()
    assert watch(textarea_text(page, "vqa-answer"), finished(page, "vqa-answer"))[-1] != states[-1]
    screenshot(page, "02-vision-qa")


def test_asr_transcribes_an_uploaded_wav_and_an_example(page):
    open_tab(page, "ASR")
    page.locator("#asr-audio button[aria-label='Upload file']").click()  # the microphone is the default source
    page.locator("#asr-audio input[type=file]").set_input_files(os.path.join(EXAMPLES, "audio", "fox_sentence.wav"))
    expect(page.locator("#asr-audio audio").first).to_be_attached()  # the upload has finished (Transcribe needs it)
    page.get_by_role("button", name="Transcribe", exact=True).click()
    states = watch(textarea_text(page, "asr-transcript"), finished(page, "asr-transcript"))
    assert len(states) >= 2, f"the transcript should stream, saw {states!r}"

    page.get_by_text("English: a request", exact=True).click()
    assert watch(textarea_text(page, "asr-transcript"), finished(page, "asr-transcript"))[-1] != states[-1]
    screenshot(page, "03-asr")


def test_speech_to_speech_takes_a_microphone_turn_and_an_example(page):
    open_tab(page, "Speech-to-speech")
    page.locator("#s2s-settings").get_by_text("Settings").click()
    set_number(page, "s2s-max-tokens", 8)
    microphone = page.locator("#s2s-audio")
    microphone.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(2500)  # the fake microphone plays the wav while this records
    microphone.get_by_role("button", name="Stop", exact=True).click()  # stopping the recording sends it

    states = watch(last_bot_text(page, "s2s-chatbot"), finished(page, "s2s-chatbot"))
    assert states[-1], "the spoken reply comes with its text"
    expect(page.locator("#s2s-chatbot .user-row [data-testid=waveform-Audio]")).to_have_count(1)  # the question
    expect(clips_in_history(page, "s2s-chatbot")).to_have_count(1)
    expect(page.locator("#s2s-reply-audio audio")).to_be_attached()
    wait_until_playable(page, "#s2s-reply-audio audio")
    assert_clip_has_length(page, "s2s-chatbot")

    page.get_by_text("“Tell me a story about a robot”", exact=True).click()
    expect(page.locator("#s2s-chatbot .user-row")).to_have_count(2)
    watch(last_bot_text(page, "s2s-chatbot"), finished(page, "s2s-chatbot"))
    expect(clips_in_history(page, "s2s-chatbot")).to_have_count(2)
    assert_clip_has_length(page, "s2s-chatbot")
    screenshot(page, "04-speech-to-speech")


def test_thinking_streams_reasoning_in_a_collapsible_block(page):
    open_tab(page, "Thinking")
    set_number(page, "think-max-tokens", 48)
    page.get_by_text("Visual math: a right triangle", exact=True).click()
    expect(page.locator("#think-chatbot").get_by_text("Thinking").first).to_be_visible()
    states = watch(last_bot_text(page, "think-chatbot"), finished(page, "think-chatbot"))
    assert len(states) >= 2, f"the reasoning should stream, saw {states!r}"
    expect(page.locator("#think-chatbot .user-row img")).to_have_count(1)
    screenshot(page, "05-thinking")
