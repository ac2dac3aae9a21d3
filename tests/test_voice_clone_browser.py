"""Voice cloning in a real browser (Chromium with a wav as its fake microphone, the tiny checkpoint): record a
voice sample in Speech-to-speech, see "My voice" appear and selected, get a spoken reply in it; a second visitor (a
separate browser context) never sees that voice."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile

from tests import chromium
from tests.test_app import EXAMPLES, serve

if not os.path.exists(chromium.CHROMIUM):
    pytest.skip("Chromium is not installed (apt-get install chromium, or scripts/setup.sh --dev)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory) -> str:
    """Two sentences of one synthetic voice, then a short pause: what the fake microphone plays, on a loop."""
    parts = []
    for name in ("fox_sentence", "robot_story_request"):
        audio, rate = soundfile.read(os.path.join(EXAMPLES, "audio", f"{name}.wav"), dtype="float32")
        parts += [audio, np.zeros(rate // 4, np.float32)]
    path = str(tmp_path_factory.mktemp("mic") / "voice.wav")
    soundfile.write(path, np.concatenate(parts), rate)
    return path


@pytest.fixture(scope="module")
def browser(microphone_wav):
    serve()
    with sync_api.sync_playwright() as playwright:
        browser = chromium.launch(playwright, microphone_wav)
        sync_api.expect.set_options(timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def open_speech_tab(browser):
    import app as space

    context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone"])
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(space.demo.local_url)
    page.wait_for_selector("#chat-input")
    page.get_by_role("tab", name="Speech-to-speech", exact=True).click()
    return page


def visible_voice(page):
    return page.locator("input[aria-label='Voice']:visible")


def voice_options(page) -> list[str]:
    visible_voice(page).click()
    options = page.locator("ul[role=listbox] li:visible").all_inner_texts()
    page.keyboard.press("Escape")
    return [o.strip().splitlines()[-1] for o in options]  # the selected option starts with a check mark


def record(page, component: str, seconds: float) -> None:
    microphone = page.locator(component)
    microphone.get_by_role("button", name="Record", exact=True).click()
    page.wait_for_timeout(int(seconds * 1000))  # the fake microphone plays the wav while this records
    microphone.get_by_role("button", name="Stop", exact=True).click()


def test_a_recorded_voice_becomes_my_voice_for_this_visitor_only(browser):
    expect = sync_api.expect
    page = open_speech_tab(browser)
    assert "My voice" not in voice_options(page)
    page.locator("#s2s-clone").get_by_text("Clone a voice").click()
    record(page, "#s2s-clone-sample", 7)
    page.locator("#s2s-clone-consent input[type=checkbox]").check()
    page.locator("#s2s-clone-button").click()
    expect(visible_voice(page)).to_have_value("My voice")
    assert "My voice" in voice_options(page)

    # A spoken question, answered in the cloned voice: the reply's clip lands in the conversation.
    record(page, "#s2s-audio", 3)
    expect(page.locator("#s2s-chatbot .user-row")).to_have_count(1)
    expect(page.locator("#s2s-chatbot .bot-row audio, #s2s-chatbot .bot-row [data-testid=waveform-Audio]").first
           ).to_be_attached()
    assert not page.get_by_text("Clone a voice first").is_visible()

    other = open_speech_tab(browser)  # another visitor
    assert "My voice" not in voice_options(other)
    other.context.close()
    page.context.close()
