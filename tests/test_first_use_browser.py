"""A tester's first minutes (issue 14), in headless Chromium against app.py on the tiny checkpoint.

- Bad input in every tab (a text file named .png, a truncated mp4, a 0-byte wav, an empty message): the message is
  a toast with our own title, it names no temp path, no "Errno" and no "preprocess", nothing stays over the
  conversation or the inputs once it has shown, and the next normal request works without any extra click.
- Enter asks in every question box (Shift+Enter is a new line), and Enter while a reply streams queues the message.
- Phone width (390 x 844): every tab is one tap away and the active tab's input is on the first screen; the
  screenshots are kept in tests/artifacts/phone/ (committed).

The server and the browser are shared with tests/test_browser.py and tests/test_app.py when they run in one process.
"""

from __future__ import annotations

import os

import pytest

from tests import chromium
from test_browser import (  # noqa: F401  (fixtures)
    ARTIFACTS,
    EXAMPLES,
    MICROPHONE_WAV,
    TIMEOUT_MS,
    expect,
    finished,
    last_bot_text,
    open_tab,
    set_number,
    sync_api,
    textarea_text,
    url,
    watch,
)

PHONE_ARTIFACTS = os.path.join(ARTIFACTS, "phone")
IMAGE = os.path.join(EXAMPLES, "images", "street.png")
TABS = {  # tab name: the element a visitor starts with
    "Chat": "#chat-input",
    "Image & video QA": "#vqa-image",
    "ASR": "#asr-audio",
    "Speech-to-speech": "#s2s-audio",
    "Voice call": "#call-start",
    "Thinking": "#think-question",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad_input")
    files = {"notimage": folder / "notimage.png", "truncated": folder / "truncated.mp4", "empty": folder / "empty.wav"}
    files["notimage"].write_text("This is a text file with a .png name.\n")
    with open(os.path.join(EXAMPLES, "video", "bouncing_ball.mp4"), "rb") as f:
        files["truncated"].write_bytes(f.read()[:3000])
    files["empty"].write_bytes(b"")
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = chromium.launch(playwright, MICROPHONE_WAV)
        yield browser
        browser.close()


def new_context(browser, **options):
    ctx = browser.new_context(permissions=["microphone", "camera"], **options)
    ctx.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    return ctx


@pytest.fixture(scope="module")
def page(url, browser):  # noqa: F811
    ctx = new_context(browser, viewport={"width": 1280, "height": 1000})
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("#chat-input")
    yield page
    ctx.close()


# ----------------------------------------------------------------------------------------------------------- helpers
def close_toasts(page) -> None:
    page.evaluate("() => document.querySelectorAll('.toast-close').forEach(b => b.click())")
    expect(page.locator(".toast-body.error")).to_have_count(0)


def toast(page) -> tuple[str, str]:
    """(title, message) of the error toast that shows next (an info toast, e.g. "stopped at max new tokens", may
    come and go beside it)."""
    # Gradio 6.31 heads every toast with its kind ("Error") and groups messages of one kind in one toast; ours start
    # with their own title in bold. (The page's own player may add "Video not playable" for a broken video.)
    text = page.locator(".toast-body.error .toast-message-text:has(strong)").last
    expect(text).to_be_visible()
    return text.locator("strong").first.inner_text().strip().rstrip("."), text.inner_text().strip()


def assert_plain(title: str, message: str, want_title: str) -> None:
    assert title.lower() == want_title.lower(), f"toast titled {title!r}, want {want_title!r} ({message!r})"
    for internal in ("/tmp/", "Errno", "preprocess"):
        assert internal.lower() not in message.lower(), f"{internal!r} in the message {message!r}"


def assert_nothing_covers(page, *selectors: str) -> None:
    """No error badge shows anywhere, and a click in the middle of each element lands on that element itself."""
    stuck = page.evaluate("""() => [...document.querySelectorAll('[data-testid=status-tracker]')].filter(t => {
        const s = getComputedStyle(t);
        return t.querySelector('.error') && s.display !== 'none' && parseFloat(s.opacity) > 0;
    }).length""")
    assert stuck == 0, f"{stuck} error overlay(s) still show"
    for selector in selectors:
        covered = page.evaluate("""s => {
            const el = document.querySelector(s);
            const r = el.getBoundingClientRect();
            const hit = document.elementFromPoint(r.left + r.width / 2, r.top + Math.min(r.height / 2, 40));
            return hit && !el.contains(hit) ? (hit.className || hit.tagName) + '' : null;
        }""", selector)
        assert covered is None, f"something ({covered}) covers {selector}"


def check_bad_input(page, want_title: str, *uncovered: str) -> None:
    title, message = toast(page)
    assert_plain(title, message, want_title)
    close_toasts(page)
    assert_nothing_covers(page, *uncovered)


def upload(page, selector: str, path: str) -> None:
    page.locator(f"{selector} input[type=file]").first.set_input_files(path)


def chat_send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def settled(page, chatbot: str) -> None:
    """The newest reply in `chatbot` has arrived and the server runs nothing any more (a 4-token reply can come and
    go between two looks at the progress tracker, so that is not watched here)."""
    import time

    import app as space

    page.wait_for_function("""c => { const box = document.querySelector('#' + c + ' textarea');
        if (box) return box.value.trim() !== '';
        const b = document.querySelectorAll('#' + c + ' .bot-row');
        return b.length && b[b.length - 1].innerText.trim() && b[b.length - 1].innerText.trim() !== '…'; }""",
                           arg=chatbot)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    quiet_since = None
    while time.monotonic() < deadline:
        if space.ENGINE.active_jobs == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.5:
                page.wait_for_timeout(200)
                return
        else:
            quiet_since = None
        time.sleep(0.05)
    raise AssertionError("the server is still busy")


def bot_rows(page, chatbot: str):
    return page.locator(f"#{chatbot} .bot-row")


# ------------------------------------------------------------------------------------------------------- bad input
def test_chat_bad_files_and_empty_message_leave_the_page_usable(page, bad):
    open_tab(page, "Chat")
    set_number(page, "chat-max-tokens", 4)
    chat_send(page, "Hi")
    settled(page, "chat-chatbot")
    for name, want in (("notimage", "Unreadable image"), ("truncated", "Unreadable video"),
                       ("empty", "Unreadable audio")):
        upload(page, "#chat-input", bad[name])
        expect(page.locator("#chat-input [aria-label='File thumbnail'], #chat-input .thumbnail-item")).not_to_have_count(0)
        chat_send(page, "What is this?")
        check_bad_input(page, want, "#chat-chatbot", "#chat-input")
        # The next message goes through at once (the bad file went with the failed request).
        rows = bot_rows(page, "chat-chatbot").count()
        page.evaluate("() => document.querySelectorAll('#chat-input button[aria-label^=Remove], "
                      "#chat-input .delete-button').forEach(b => b.click())")
        chat_send(page, "Hello again")
        expect(bot_rows(page, "chat-chatbot")).to_have_count(rows + 1)
        settled(page, "chat-chatbot")
    page.locator("#chat-input textarea").fill("")
    page.locator("#chat-input textarea").press("Enter")
    check_bad_input(page, "Empty message", "#chat-chatbot", "#chat-input")
    rows = bot_rows(page, "chat-chatbot").count()
    chat_send(page, "Still there?")
    expect(bot_rows(page, "chat-chatbot")).to_have_count(rows + 1)


def clear_video(page, tries: int = 4) -> None:
    """Empty the video box with its Clear button, as a user would: pointer over the box, click, and again while the
    video stays. Right after the error the box is still settling. Clicking without hovering first, the button was
    hidden for 15 s or more in 2 of 12 runs (90 s once, in a loaded full-suite run), and in about one run in ten the
    first click was lost (the button showed, the video stayed); with the hover, 12 of 12 cleared within 23 s."""
    for attempt in range(tries):
        try:
            page.locator("#vqa-video").hover()
            page.locator("#vqa-video button[aria-label=Clear]:visible").first.click(timeout=15_000)
            expect(page.locator("#vqa-video video")).to_have_count(0, timeout=5_000)
            return
        except (AssertionError, sync_api.TimeoutError):
            if attempt == tries - 1:
                raise


def test_vision_qa_bad_image_and_video(page, bad):
    open_tab(page, "Image & video QA")
    page.locator("#vqa-settings").get_by_text("Settings").click()
    set_number(page, "vqa-max-tokens", 4)
    question = page.locator("#vqa-question textarea")
    upload(page, "#vqa-video", bad["truncated"])
    question.fill("What happens?")
    page.get_by_role("button", name="Ask", exact=True).click()
    check_bad_input(page, "Unreadable video", "#vqa-video", "#vqa-question", "#vqa-answer")
    clear_video(page)
    upload(page, "#vqa-image", bad["notimage"])
    question.fill("What is this?")
    question.press("Enter")  # Enter asks
    check_bad_input(page, "Unreadable image", "#vqa-image", "#vqa-question", "#vqa-answer")
    # The next request (an example, which puts a real picture in the image box) is answered.
    page.evaluate("() => { document.querySelector('#vqa-answer textarea').value = ''; }")
    page.get_by_text("Read a shop sign", exact=True).click()
    settled(page, "vqa-answer")
    assert textarea_text(page, "vqa-answer")()


def test_asr_and_speech_to_speech_empty_recordings(page, bad):
    open_tab(page, "ASR")
    page.locator("#asr-audio button[aria-label='Upload file']").click()
    upload(page, "#asr-audio", bad["empty"])
    page.get_by_role("button", name="Transcribe", exact=True).click()
    title, message = toast(page)
    assert title in ("Unreadable audio", "No audio"), (title, message)
    assert_plain(title, message, title)
    close_toasts(page)
    assert_nothing_covers(page, "#asr-audio", "#asr-transcript")
    page.get_by_text("English: the quick brown fox", exact=True).click()
    settled(page, "asr-transcript")
    assert textarea_text(page, "asr-transcript")()

    open_tab(page, "Speech-to-speech")
    page.locator("#s2s-settings").get_by_text("Settings").click()
    set_number(page, "s2s-max-tokens", 4)
    page.get_by_role("button", name="Send", exact=True).click()  # nothing recorded yet
    check_bad_input(page, "No audio", "#s2s-chatbot", "#s2s-audio")
    page.locator("#s2s-audio button[aria-label='Upload file']").click()
    upload(page, "#s2s-audio", bad["empty"])
    page.get_by_role("button", name="Send", exact=True).click()
    title, message = toast(page)
    assert_plain(title, message, title)
    assert title in ("Unreadable audio", "No audio"), (title, message)
    close_toasts(page)
    assert_nothing_covers(page, "#s2s-chatbot", "#s2s-audio")
    rows = bot_rows(page, "s2s-chatbot").count()
    page.get_by_text("“What is the capital of France?”", exact=True).click()
    expect(bot_rows(page, "s2s-chatbot")).to_have_count(rows + 1)
    settled(page, "s2s-chatbot")


def test_voice_call_recording_panel_empty_file(page, bad):
    open_tab(page, "Voice call")
    page.locator("#call-file-panel").get_by_text("No microphone? Run a call on a recording").click()
    page.locator("#call-file button[aria-label='Upload file']").click()
    upload(page, "#call-file", bad["empty"])
    page.locator("#call-file-turns-button").click()
    title, message = toast(page)
    assert_plain(title, message, title)
    assert title != "Error", message
    close_toasts(page)
    assert_nothing_covers(page, "#call-file", "#call-file-turns")


def test_thinking_bad_image_empty_question_and_enter(page, bad):
    open_tab(page, "Thinking")
    set_number(page, "think-max-tokens", 120)
    question = page.locator("#think-question textarea")
    question.fill("")
    question.press("Enter")  # Enter asks, even with nothing written
    check_bad_input(page, "Empty message", "#think-chatbot", "#think-question", "#think-image")
    # Shift+Enter is a new line; Enter asks.
    question.fill("First line")
    question.press("Shift+Enter")
    question.type("second line")
    assert question.input_value() == "First line\nsecond line"
    question.press("Enter")
    expect(page.locator("#think-chatbot .user-row")).to_have_count(1)
    settled(page, "think-chatbot")

    upload(page, "#think-image", bad["notimage"])
    question.fill("What is in the picture?")
    question.press("Enter")
    check_bad_input(page, "Unreadable image", "#think-chatbot", "#think-question", "#think-image")
    # The next request (an example without a picture, which empties the image box) is answered.
    page.get_by_text("Word problem", exact=True).click()
    expect(page.locator("#think-chatbot .user-row")).to_have_count(2)
    settled(page, "think-chatbot")


def test_thinking_example_closes_its_reasoning_and_answers(page):
    """The tiny model ends its reasoning (its "</thinking>" row is lengthened, as the talker's <audio_eos>). It is
    sampled (temperature 0.7, no seed in the tab): alone in a fresh conversation, the word problem's reasoning ended
    within 600 tokens in 9 of 10 replies (earlier turns in the conversation change the odds), so the conversation
    is cleared before each of up to three tries (a failure ~1 in 1,000)."""
    open_tab(page, "Thinking")
    set_number(page, "think-max-tokens", 600)
    for attempt in range(3):
        page.locator("#think-ask").get_by_role("button", name="Clear", exact=True).click()
        expect(page.locator("#think-chatbot .user-row")).to_have_count(0)
        page.get_by_text("Word problem", exact=True).click()
        expect(page.locator("#think-chatbot .user-row")).to_have_count(1)
        settled(page, "think-chatbot")
        expect(page.locator("#think-chatbot").get_by_text("Thinking").first).to_be_visible()
        # The answer, not "(no final answer: the model did not finish its reasoning)", follows the reasoning block.
        if "did not finish its reasoning" not in page.locator("#think-chatbot .bot-row").last.inner_text():
            break
    else:
        raise AssertionError("three replies in a row did not finish their reasoning within 600 tokens")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "thinking-closed.png"), full_page=True)


def test_enter_during_a_streaming_reply_queues_the_message(page):
    open_tab(page, "Chat")
    set_number(page, "chat-max-tokens", 60)
    rows = page.locator("#chat-chatbot .user-row").count()
    chat_send(page, "Tell me a long story.")
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(rows + 1)
    page.wait_for_function("() => { const b = document.querySelectorAll('#chat-chatbot .bot-row'); "
                           "return b.length && b[b.length - 1].innerText.trim().length > 5; }")
    chat_send(page, "And then?")  # while the first reply still streams
    expect(page.locator("#chat-input textarea")).to_have_value("And then?")  # waiting in the box, not lost
    expect(page.locator("#chat-chatbot .user-row")).to_have_count(rows + 2)  # sent when the first reply ended
    expect(page.locator("#chat-chatbot .user-row").last).to_contain_text("And then?")
    settled(page, "chat-chatbot")


# ----------------------------------------------------------------------------------------------------------- phone
def test_phone_every_tab_one_tap_and_its_input_on_the_first_screen(url, browser):  # noqa: F811
    os.makedirs(PHONE_ARTIFACTS, exist_ok=True)
    ctx = new_context(browser, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                      device_scale_factor=2)
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("#chat-input")
    page.wait_for_timeout(1000)
    page.screenshot(path=os.path.join(PHONE_ARTIFACTS, "0-chat.png"))
    for index, (name, first_input) in enumerate(TABS.items()):
        tab = page.get_by_role("tab", name=name, exact=True)
        expect(tab).to_be_visible()  # on the bar, not in an overflow menu
        tab.tap()
        page.evaluate("() => window.scrollTo(0, 0)")
        box = page.locator(first_input).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + min(box["height"], 80) <= 844, \
            f"{name}: {first_input} is not on the first screen ({box})"
        if index:
            page.screenshot(path=os.path.join(PHONE_ARTIFACTS, f"{index}-{name.split()[0].lower()}.png"))
    ctx.close()
