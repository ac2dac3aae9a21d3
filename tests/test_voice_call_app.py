"""Voice call through the Space: the API endpoints (gradio_client, tiny checkpoint) and the hands-free call in a real
browser (Playwright + Debian's Chromium with a fake microphone playing a wav made here from the repository's
synthesized speech).

The browser tests check what the issue asks of the page: after one click on Start, each pause gets a reply with text
and audio, without any other click; speech over a playing reply cuts it (playback paused in the page, the reply
marked interrupted) and the new utterance gets its reply. The timing of those two scenarios must not depend on how
fast the tiny model runs on a shared CPU (its first audio comes 1.5-15 s after a turn there, while the real model's
comes in 0.3 s), so they swap the engine's GPU job for a scripted one that streams text and a tone at the real
model's pace through the same `stream_job` and stop events; a third browser test runs a reply of the real tiny model
end to end. The barge-in latency (speech onset reaching the page -> reply audio paused, by the page's own level
meter: the tentative barge-in) is measured in the page, bounded and printed; a cough over a reply pauses it only
until the server has heard that it was no speech. The meter's decisions are also checked exactly, on a fake clock,
with node (tests/call_meter_harness.js).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile

from tests import chromium
from tests.test_app import EXAMPLES, message_files, message_texts
from tests.test_voice_call import SR, floor, load_speech

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

QUESTION = os.path.join(EXAMPLES, "audio", "capital_question.wav")
REQUEST = os.path.join(EXAMPLES, "audio", "describe_request.wav")
STORY = os.path.join(EXAMPLES, "audio", "robot_story_request.wav")


# ------------------------------------------------------------------------------------------------------ test audio
speech = load_speech  # a speech file cut to where it is audible: its extent is known
quiet = floor         # a quiet microphone: a faint noise floor, not digital zeros


def call_audio(*parts) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Speech (paths) and silences (seconds) in a row; returns the audio and each utterance's (start, end)."""
    pieces, spans, at = [], [], 0.0
    for i, part in enumerate(parts):
        piece = speech(part) if isinstance(part, str) else quiet(part, seed=i)
        if isinstance(part, str):
            spans.append((at, at + len(piece) / SR))
        pieces.append(piece)
        at += len(piece) / SR
    return np.concatenate(pieces), spans


def write_wav(folder, name: str, audio: np.ndarray) -> str:
    path = os.path.join(str(folder), name)
    soundfile.write(path, audio, SR, subtype="PCM_16")
    return path


# --------------------------------------------------------------------------------------------------------- the API
# `app` and `client`: tests/conftest.py
def test_voice_call_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/voice_call_turns", "/voice_call"} <= set(endpoints)
    names = [p["parameter_name"] for p in endpoints["/voice_call"]["parameters"]]
    assert names == ["audio", "pause_s", "voice", "max_new_tokens"]


def test_turns_are_found_where_the_speaker_pauses(client, tmp_path):
    audio, spans = call_audio(0.8, QUESTION, 1.0, REQUEST, 1.0)
    path = write_wav(tmp_path, "two.wav", audio)
    turns = client.predict(audio=handle_file(path), pause_s=0.6, api_name="/voice_call_turns")
    assert len(turns) == 2
    for turn, (start, end) in zip(turns, spans):
        assert abs(turn["start_s"] - start) <= 0.2 and abs(turn["end_s"] - end) <= 0.2
        assert turn["reason"] == "pause" and turn["detected_at_s"] >= turn["end_s"] + 0.6 - 0.05
    # A pause longer than the gap between the utterances makes them one turn.
    merged = client.predict(audio=handle_file(path), pause_s=1.5, api_name="/voice_call_turns")
    assert len(merged) == 1 and abs(merged[0]["end_s"] - spans[1][1]) <= 0.2


def test_noise_coughs_and_silence_make_no_turns(client, tmp_path):
    rng = np.random.default_rng(7)
    noise = (0.03 * rng.standard_normal(8 * SR)).astype(np.float32)  # a steady background hiss
    cough = np.zeros(int(0.15 * SR), np.float32)
    cough[:] = 0.5 * rng.standard_normal(len(cough)) * np.hanning(len(cough))  # a 150 ms burst
    audio = np.concatenate([noise, quiet(1.0), cough, quiet(1.0), cough, quiet(2.0)])
    assert client.predict(audio=handle_file(write_wav(tmp_path, "noise.wav", audio)), pause_s=0.6,
                          api_name="/voice_call_turns") == []
    assert client.predict(audio=handle_file(write_wav(tmp_path, "silence.wav", quiet(5.0))), pause_s=0.6,
                          api_name="/voice_call_turns") == []


def test_bad_requests_get_messages(client, tmp_path):
    audio, _ = call_audio(0.5, QUESTION, 1.0)
    path = write_wav(tmp_path, "one.wav", audio)
    with pytest.raises(AppError, match="minimum value 0.3|pause must be between 0.3 and 1.5"):
        client.predict(audio=handle_file(path), pause_s=0.1, api_name="/voice_call_turns")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    with pytest.raises(AppError, match="damaged|Could not read|cannot be read"):
        client.predict(audio=handle_file(str(corrupt)), pause_s=0.6, api_name="/voice_call_turns")
    silent = write_wav(tmp_path, "silent.wav", quiet(3.0))
    with pytest.raises(AppError, match="No speech was heard"):
        client.predict(audio=handle_file(silent), pause_s=0.6, voice="luna", max_new_tokens=4, api_name="/voice_call")
    with pytest.raises(AppError, match="Unknown voice|not in the list of choices"):
        client.predict(audio=handle_file(path), pause_s=0.6, voice="nobody", max_new_tokens=4, api_name="/voice_call")
    assert len(client.predict(audio=handle_file(path), pause_s=0.6, api_name="/voice_call_turns")) == 1


def spoken_clip_seconds(path: str) -> float:
    info = soundfile.info(path)
    return info.frames / info.samplerate


def test_a_whole_call_answers_each_turn_with_text_and_audio(client, tmp_path):
    # 3 s between the utterances: the first reply (tiny: under a second of audio) has played out by then.
    audio, spans = call_audio(0.5, QUESTION, 3.0, REQUEST, 0.5)
    job = client.submit(audio=handle_file(write_wav(tmp_path, "call.wav", audio)), pause_s=0.6, voice="luna",
                        max_new_tokens=8, api_name="/voice_call")
    updates = list(job)
    chatbot, turns = job.result()
    assert len(updates) >= 4, "the call streams its replies"
    assert [m["role"] for m in chatbot] == ["user", "assistant"] * 2
    for user, reply in zip(chatbot[0::2], chatbot[1::2]):
        assert len(message_files(user)) == 1 and spoken_clip_seconds(message_files(user)[0]) > 1.0
        assert message_texts(reply)[0].strip() and "interrupted" not in message_texts(reply)[0]
        assert len(message_files(reply)) == 1 and spoken_clip_seconds(message_files(reply)[0]) > 0.05
    assert [t["turn"] for t in turns] == [0, 1]
    for turn, (start, end) in zip(turns, spans):
        assert abs(turn["start_s"] - start) <= 0.2 and abs(turn["end_s"] - end) <= 0.2
        assert turn["reply"].strip() and turn["reply_audio_s"] > 0 and not turn["interrupted"] and not turn["error"]


def test_speech_over_a_reply_interrupts_it_in_a_whole_call(client, tmp_path):
    # The second question starts 0.7 s after the first ends: the first reply is still "playing" (in the
    # recording's time), so it is cut and marked, and the second question gets its own reply.
    audio, _ = call_audio(0.5, QUESTION, 0.7, STORY, 0.5)
    chatbot, turns = client.predict(audio=handle_file(write_wav(tmp_path, "barge.wav", audio)), pause_s=0.6,
                                    voice="luna", max_new_tokens=8, api_name="/voice_call")
    assert [t["interrupted"] for t in turns] == [True, False]
    assert message_texts(chatbot[1])[0].endswith("*(interrupted)*")
    assert turns[1]["reply"].strip() and len(message_files(chatbot[3])) == 1


# ------------------------------------------------------------------------------------------------- the serving flow
def test_barge_in_stops_the_running_generation_through_the_engine(app, monkeypatch):
    """The microphone's barge-in sets the engine's stop event of the call's job (no Gradio involved)."""
    import serving.engine
    from serving.engine import Chunk
    from serving.voice_call_flow import VoiceCall

    started, stops = threading.Event(), []

    def endless(job):
        stop = serving.engine.get_engine().stop_events.setdefault(job.session, threading.Event())
        stops.append(stop)  # what the model's generate_stream and the talker check at every step
        started.set()
        while not stop.wait(0.01):
            yield Chunk(text="la ")
        yield Chunk(segment_done=True, finish_reason="stopped")

    monkeypatch.setattr(serving.engine, "run_job", endless)
    call = VoiceCall("flow-test", "luna", 0.6, 64, silence_timeout_s=None)
    audio, _ = call_audio(0.5, QUESTION, 1.0)
    for i in range(0, len(audio), 3200):
        call.feed((SR, audio[i:i + 3200]))
    replies = []
    thread = threading.Thread(target=lambda: replies.extend(call.reply()))
    thread.start()
    assert started.wait(30)
    deadline = time.monotonic() + 10
    while not call.call.transcript()[0].reply_text and time.monotonic() < deadline:
        time.sleep(0.01)  # the reply is being spoken
    again, _ = call_audio(0.2, REQUEST)
    events = []
    for i in range(0, len(again), 3200):
        events += call.feed((SR, again[i:i + 3200]))
    assert any(type(e).__name__ == "BargeIn" for e in events)
    assert stops[0].wait(5), "barge-in must stop the generation itself, not only the stream"
    thread.join(5)
    assert call.call.transcript()[0].interrupted and "*(interrupted)*" in str(replies[-1][1]["content"])


def test_the_page_player_fetches_each_piece_of_the_reply_as_it_is_made(app, monkeypatch):
    """The reply player's long poll (what app.py's `call_reply_audio` answers): it waits for news, gets the newest
    turn's audio from where it is as 16-bit PCM, then that the reply is done; an unknown call gets nothing."""
    import asyncio
    import base64

    import serving.engine
    from serving.voice_call_flow import VoiceCall, next_reply_audio

    monkeypatch.setattr(serving.engine, "run_job", scripted_model(piece_s=0.25))
    call = VoiceCall("player-test", "luna", 0.6, 20, silence_timeout_s=None)
    audio, _ = call_audio(0.5, QUESTION, 1.0)
    for i in range(0, len(audio), 3200):
        call.feed((SR, audio[i:i + 3200]))
    since = {"call": call.id, "turn": -1, "next": 0}
    first = asyncio.run(next_reply_audio(since, wait_s=0.2))  # the turn is queued: its (empty) reply is news
    assert (first["turn"], first["next"], first["pcm"], first["done"]) == (0, 0, "", False)
    since = {key: first[key] for key in ("call", "turn", "next", "stopped", "done")}
    started = time.monotonic()
    assert asyncio.run(next_reply_audio(since, wait_s=0.3)) is None  # nothing new: it waited, then said so
    assert time.monotonic() - started >= 0.25
    thread = threading.Thread(target=lambda: list(call.reply()))
    thread.start()
    got = asyncio.run(next_reply_audio(since, wait_s=5))  # answered as soon as the first piece is made
    rate = serving.engine.get_engine().speech.sample_rate
    assert got["rate"] == rate and got["next"] >= 1 and not got["stopped"]
    assert len(base64.b64decode(got["pcm"])) == 2 * got["next"] * int(0.25 * rate)
    thread.join(10)
    since = {key: got[key] for key in ("call", "turn", "next", "stopped", "done")}
    last = asyncio.run(next_reply_audio(since, wait_s=1))
    assert last["done"] and last["next"] == 2 and not last["stopped"]
    assert asyncio.run(next_reply_audio({"call": "nobody"}, wait_s=0.05)) is None
    call.hang_up()


# ------------------------------------------------------------------------------------------------------ the browser
TIMEOUT_MS = 90_000

# Installed before the page's scripts: taps the microphone stream Gradio opens (an analyser records when speech
# reaches the page); `window.__call.replies()` reads the reply player's log (app.py CALL_PLAYER_JS) as plays (a reply
# starts to sound, or sounds again) and pauses (it stops sounding; `ended` when it played to its end), all on the
# page's clock.
PAGE_PROBE = """
window.__call = {onsets: []};  // times: performance.now(), ms
(() => {
  const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const stream = await open(constraints);
    if (constraints && constraints.audio) {  // every stream (the page may open more than one): onsets deduplicated
      const context = new AudioContext();
      const analyser = context.createAnalyser();
      analyser.fftSize = 256;
      context.createMediaStreamSource(stream).connect(analyser);
      const samples = new Float32Array(analyser.fftSize);
      let quietSince = performance.now(), loud = false;
      setInterval(() => {
        analyser.getFloatTimeDomainData(samples);
        let energy = 0;
        for (const x of samples) energy += x * x;
        const now = performance.now();
        if (Math.sqrt(energy / samples.length) > 0.01) {
          const onsets = window.__call.onsets;
          if (!loud && now - quietSince > 400 && !(onsets.length && now - onsets[onsets.length - 1] < 400)) {
            onsets.push(now);
          }
          loud = true;
        } else {
          if (loud) quietSince = now;
          loud = false;
        }
      }, 2);
    }
    return stream;
  };
  window.__call.replies = () => {
    const log = window.mingCallPlayer ? window.mingCallPlayer.log : [];
    return {onsets: window.__call.onsets,
            plays: log.filter(e => e.kind === 'play' || e.kind === 'resume').map(e => e.t),
            pauses: log.filter(e => e.kind === 'pause' || e.kind === 'end' || e.kind.startsWith('cut'))
                       .map(e => ({t: e.t, ended: e.kind === 'end'}))};
  };
})();
"""


@pytest.fixture
def call_page(app):
    """Opens the Voice call tab in a fresh Chromium whose microphone plays the given wav (from its start, when the
    page opens the microphone; a long silent tail keeps it from looping during a test)."""
    if not os.path.exists(chromium.CHROMIUM):
        pytest.skip("Chromium is not installed (apt-get install chromium, or scripts/setup.sh --dev)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browsers = []

        def open_page(microphone_wav: str, max_new_tokens: int, pause_s: float = 0.6):
            while browsers:  # a retried scenario's earlier browser would go on playing and streaming beside it
                browsers.pop().close()
            browser = chromium.launch(playwright, microphone_wav, "--autoplay-policy=no-user-gesture-required")
            browsers.append(browser)
            context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone"])
            context.set_default_timeout(TIMEOUT_MS)
            context.add_init_script(PAGE_PROBE)
            page = context.new_page()
            page.goto(app[1])
            page.wait_for_selector("#chat-input")
            page.get_by_role("tab", name="Voice call", exact=True).click()
            page.locator("#call-settings").get_by_text("Settings").click()
            for elem_id, value in (("call-max-tokens", max_new_tokens), ("call-pause", pause_s)):
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            return page

        yield open_page
        for browser in browsers:
            browser.close()


def scripted_model(piece_s: float = 0.25):
    """A stand-in for the engine's GPU job with the real model's pace on an H200 (first audio after ~0.3 s, speech
    made ~10x faster than it plays): a word and `piece_s` of a tone per piece, one piece per 10 max new tokens.
    It honours the engine's stop event the way `run_job` does."""
    import serving.engine
    from serving.engine import Chunk

    def run_job(job):
        engine = serving.engine.get_engine()
        stop = engine.stop_events.setdefault(job.session, threading.Event())
        rate = engine.speech.sample_rate
        t = np.arange(int(piece_s * rate)) / rate
        tone = (8000 * np.sin(2 * np.pi * 330 * t) * np.hanning(len(t))).astype(np.int16)
        if stop.wait(0.25):  # prefill and the first sentence
            yield Chunk(segment_done=True, finish_reason="stopped")
            return
        for k in range(max(job.sampling.max_new_tokens // 10, 1)):
            yield Chunk(text=f"word{k} ")
            yield Chunk(audio=tone)
            if stop.wait(piece_s / 10):
                break
        yield Chunk(segment_done=True, finish_reason="stopped" if stop.is_set() else "eos")

    return run_job


def bot_texts(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('#call-chatbot .bot-row')].map(r => r.innerText)")


def clips(page, role: str):
    return page.locator(f"#call-chatbot .{role}-row [data-testid=waveform-Audio]")


def wait_for(check, timeout: float = TIMEOUT_MS / 1000, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_call(page) -> None:
    page.locator("#call-start").click()
    sync_expect()(page.locator("#call-mic .stop-button")).to_be_visible()  # the recorder runs


def sync_expect():
    from playwright.sync_api import expect

    return expect


def hang_up(page) -> None:
    page.locator("#call-hang-up").click()
    sync_expect()(page.locator("#call-status")).to_contain_text("Call ended")
    sync_expect()(page.locator("#call-mic .record-button")).to_be_visible()  # the recorder stopped


def onsets(page) -> list[float]:
    return page.evaluate("() => window.__call.onsets")


def replies(page) -> dict:
    """What the page heard and played: {onsets, plays, pauses} (see PAGE_PROBE)."""
    return page.evaluate("() => window.__call.replies()")


def onset_of(page, seconds_after_first: float) -> float:
    """The onset the probe heard `seconds_after_first` after the first one (the fake microphone's wav has its
    sounds at known places): the nearest to that time, from 0.3 s early to 1.5 s late. A loaded 2-core machine
    feeds the fake microphone late, never early: a fresh-clone run heard a sound 7.89 s into the wav 0.4-0.6 s late
    in three attempts running. The page hears it then, so that is where its reaction is measured from."""
    heard = onsets(page)
    assert heard, "no sound reached the page"
    want = heard[0] + 1000 * seconds_after_first
    near = [t for t in heard if -300 <= t - want <= 1500]
    assert near, f"no onset near {seconds_after_first:.2f} s after the first: {heard}"
    return min(near, key=lambda t: abs(t - want))


def diagnosis(page) -> dict:
    """What the page shows of the call, for a failure's message."""
    return page.evaluate("""() => ({
        status: document.querySelector('#call-status').innerText,
        signal: (document.querySelector('#call-signal textarea') || {}).value,
        heard: (document.querySelector('#call-heard textarea') || {}).value,
        replies: window.__call.replies(), meter: window.mingCallMeter ? window.mingCallMeter.log : null})""")


def meter_log(page) -> list[dict]:
    """The page's tentative barge-in decisions: {t (performance.now(), ms), kind: "start" | "pause" | "confirmed ..."
    | "resume ..." | "stop"}."""
    return page.evaluate("() => window.mingCallMeter ? window.mingCallMeter.log : []")


def machine_too_busy_for_real_time() -> bool:
    """Real-time call scenarios need the page's audio and the server to keep up with the wall clock; on a machine
    whose load is far above its cores (other test suites running beside this one) they cannot, whatever the code."""
    return os.getloadavg()[0] > 3 * (os.cpu_count() or 1)


def real_time_scenario(test):
    """Browser call scenarios assume the page plays audio in real time while the server keeps up; on a loaded 2-core
    machine a run can fall behind (a reply starts playing seconds late, so a question lands on it). Such a scenario
    runs up to three times in a fresh browser and must pass once; a real defect fails all three."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        if machine_too_busy_for_real_time():
            pytest.skip(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: too busy for real time")
        for attempt in range(3):
            try:
                return test(*args, **kwargs)
            except AssertionError as error:
                if attempt == 2:
                    raise
                print(f"\n{test.__name__}: attempt {attempt + 1} failed: {str(error)[:1500]}")

    return run


def long_reply_call(call_page, monkeypatch, tmp_path, name: str, audio: np.ndarray):
    """A started call whose microphone plays `audio`, each question answered with a 16 s reply (scripted)."""
    import serving.engine

    monkeypatch.setattr(serving.engine, "run_job", scripted_model(piece_s=0.25))
    page = call_page(write_wav(tmp_path, name, audio), max_new_tokens=640, pause_s=0.6)
    start_call(page)
    return page


def paused_by(page, onset: float) -> tuple[dict, float]:
    """The page's record ({onsets, plays, pauses}) and when the reply was paused by the sound at `onset`, after
    checking that the reply was sounding then."""
    record = replies(page)
    assert any(p < onset for p in record["plays"]), f"the reply was not playing when the sound came {record}"
    assert not any(p["ended"] and p["t"] < onset for p in record["pauses"]), f"the reply had already ended {record}"
    paused = [p["t"] for p in record["pauses"] if p["t"] > onset and not p["ended"]]
    assert paused, f"the reply's playback was never paused: {record} {meter_log(page)}"
    return record, paused[0]


@real_time_scenario
def test_browser_call_answers_two_turns_without_a_click(call_page, monkeypatch, tmp_path):
    import serving.engine

    monkeypatch.setattr(serving.engine, "run_job", scripted_model(piece_s=0.15))
    # Two questions 2.5 s apart. With a 0.3 s pause the first reply (0.15 s of audio) has played out before the
    # second question starts, so neither is an interruption. (1.5 s apart, a fresh-clone run of the whole suite on 2
    # cores once started the first reply 0.15 s after the second question, three attempts running.)
    audio, spans = call_audio(1.0, QUESTION, 2.5, REQUEST, 40.0)
    page = call_page(write_wav(tmp_path, "two_questions.wav", audio), max_new_tokens=10, pause_s=0.3)
    start_call(page)
    expect = sync_expect()
    expect(clips(page, "user")).to_have_count(2)
    expect(clips(page, "bot")).to_have_count(2)  # each reply's clip, once it is done
    texts = bot_texts(page)
    assert len(texts) == 2 and all("word0" in t and "interrupted" not in t for t in texts), texts
    wait_for(lambda: (lambda r: len(r["plays"]) >= 2 and r["pauses"] and r["pauses"][-1]["ended"]
                      and r["pauses"][-1]["t"] > r["plays"][-1])(replies(page)), 15, "the second reply to play out")
    record = replies(page)
    heard, plays = record["onsets"], record["plays"]
    # Each reply played after its own question: the first one started before the second question, and nothing
    # paused it before then. (Whether it had also played out by then depends on the machine's speed: printed. If
    # not, the page pauses its last instant when the second question starts, as for any speech over a reply.)
    assert len(heard) >= 2 and len(plays) >= 2 and heard[0] < plays[0] < heard[1] < plays[-1], record
    assert not any(p["t"] < heard[1] and not p["ended"] for p in record["pauses"]), record
    ends = [heard[i] + 1000 * (spans[i][1] - spans[i][0]) for i in range(2)]  # the wav's utterances, page clock
    delays = [(min(t for t in plays if t > end) - end) / 1000 for end in ends]
    over = [p["t"] for p in record["pauses"] if p["ended"] and p["t"] < heard[1]]
    print(f"\nend of speech -> reply audio playing (0.3 s pause): {delays[0] * 1000:.0f} ms, {delays[1] * 1000:.0f} ms;"
          + (f" the first reply was over {(heard[1] - over[0]) / 1000:.2f} s before the second question" if over
             else " the first reply was still playing when the second question began"))
    hang_up(page)
    expect(clips(page, "bot")).to_have_count(2)  # the transcript stays, replayable
    page.screenshot(path=os.path.join(os.path.dirname(__file__), "artifacts", "06-voice-call.png"), full_page=True)


@real_time_scenario
def test_browser_call_barge_in_cuts_the_reply_and_answers_the_new_question(call_page, monkeypatch, tmp_path):
    # A long reply (16 s of audio) to the first question; the second starts 5 s after the first ends, while the
    # reply plays (the slack lets a slow machine start the reply late and still be mid-reply).
    audio, spans = call_audio(1.0, QUESTION, 5.0, REQUEST, 40.0)
    page = long_reply_call(call_page, monkeypatch, tmp_path, "barge_in.wav", audio)
    try:
        sync_expect()(clips(page, "user")).to_have_count(2)
    except AssertionError:
        raise AssertionError(f"the two questions were not heard: {diagnosis(page)}") from None
    wait_for(lambda: len(bot_texts(page)) == 2 and "word0" in bot_texts(page)[1], what="the second reply")
    texts = bot_texts(page)
    assert "interrupted" in texts[0] and "word0" in texts[0], texts
    assert "interrupted" not in texts[1], texts
    onset = onset_of(page, spans[1][0] - spans[0][0])
    _, paused = paused_by(page, onset)
    latency = (paused - onset) / 1000
    # The page's own level meter pauses the reply once the voice has lasted hold_ms (tentative barge-in); the
    # server's confirmation (Gradio's microphone uploads a 0.1 s wav per chunk, which reaches the handler 0.3-0.8 s
    # after capture on a loaded 2-core machine; the VAD confirms after 0.3 s of speech; the signal reaches the page
    # 0.1-0.25 s later) then keeps it stopped: 0.9-1.3 s, which was the latency before the meter.
    print(f"\nbarge-in latency (speech onset reaching the page -> reply audio paused): {latency * 1000:.0f} ms")
    assert latency < 0.5, f"{latency:.3f} s {meter_log(page)}"
    # The pause was the tentative one, the server confirmed it, and the first reply never played again.
    log = meter_log(page)
    after = [entry for entry in log if entry["t"] > onset]
    kinds = [entry["kind"].split()[0] for entry in after]
    assert kinds[:2] == ["pause", "confirmed"] and "resume" not in kinds, log
    print(f"the server confirmed it {(after[1]['t'] - after[0]['t']) / 1000:.2f} s later ({after[1]['kind']})")
    wait_for(lambda: any(p > paused for p in replies(page)["plays"]), 15, "the second reply to play")
    sync_expect()(clips(page, "bot")).to_have_count(2)
    hang_up(page)


def cough(seconds: float = 0.25, seed: int = 3) -> np.ndarray:
    """A cough-like burst: loud noise shaped like speech's spectrum (most energy under 2 kHz), a sharp attack and
    a decay. Louder than the voice, but no voice: the VAD never finds 0.3 s of speech in it."""
    rng = np.random.default_rng(seed)
    noise = np.cumsum(rng.standard_normal(int(seconds * SR)))  # brown-ish noise: mostly low frequencies
    noise = noise - np.convolve(noise, np.ones(64) / 64, mode="same")  # no rumble under ~250 Hz
    envelope = np.minimum(np.linspace(0, 8, len(noise)), 1.0) * np.exp(-np.linspace(0, 2.5, len(noise)))
    burst = noise * envelope
    return (0.5 * burst / np.abs(burst).max()).astype(np.float32)


@real_time_scenario
def test_browser_call_a_cough_pauses_the_reply_briefly_and_it_goes_on(call_page, monkeypatch, tmp_path):
    from serving.voice_call_flow import TENTATIVE_BARGE_IN

    # A 16 s reply to the question; a cough 7 s after the question, while the reply plays (the slack lets a slow
    # machine start the reply late and still be mid-reply).
    question, spans = call_audio(1.0, QUESTION, 7.0)
    audio = np.concatenate([question, cough(), quiet(40.0, seed=9)])
    page = long_reply_call(call_page, monkeypatch, tmp_path, "cough.wav", audio)
    sync_expect()(clips(page, "user")).to_have_count(1)
    wait_for(lambda: any(p["ended"] for p in replies(page)["pauses"]), 40, "the reply to play to its end")
    onset = onset_of(page, len(question) / SR - spans[0][0])
    record, paused = paused_by(page, onset)
    log = meter_log(page)
    resumed = [t for t in record["plays"] if t > paused]
    assert resumed, f"the reply never resumed: {record} {log}"
    gap = (resumed[0] - paused) / 1000
    after = [entry for entry in log if entry["t"] > onset]
    print(f"\ncough: onset -> pause {paused - onset:.0f} ms, paused for {gap * 1000:.0f} ms "
          f"({after[1]['kind'] if len(after) > 1 else '?'})")
    kinds = [entry["kind"].split()[0] for entry in after]
    assert kinds[:2] == ["pause", "resume"] and "confirmed" not in kinds, log
    # Resumed once the server had heard the cough out (typically under a second), and well within the limit.
    assert gap < TENTATIVE_BARGE_IN["max_hold_ms"] / 1000 + 0.5, f"paused too long {record} {log}"
    texts = bot_texts(page)
    assert len(texts) == 1 and "word0" in texts[0] and "interrupted" not in texts[0], texts
    sync_expect()(clips(page, "bot")).to_have_count(1)  # the whole reply's clip; the cough was no turn
    assert len(clips(page, "user").all()) == 1
    hang_up(page)


def test_browser_call_with_the_tiny_model(call_page, tmp_path):
    """A real reply of the tiny model, end to end: text streams in and the clip lands in the transcript."""
    audio, _ = call_audio(1.0, QUESTION, 40.0)
    page = call_page(write_wav(tmp_path, "one_question.wav", audio), max_new_tokens=6)
    start_call(page)
    expect = sync_expect()
    expect(clips(page, "user")).to_have_count(1)
    expect(clips(page, "bot")).to_have_count(1)
    assert bot_texts(page)[0].strip()
    hang_up(page)


# ------------------------------------------------------------------------------------- the page's level meter (node)
def test_the_page_meter_pauses_for_a_voice_at_once_and_resumes_after_a_cough(app, tmp_path):
    """The page's tentative barge-in (app.py's CALL_METER_JS) on a fake clock, microphone and reply player
    (tests/call_meter_harness.js, run by node), with the server's ear (#call-heard) 0.7 s behind the microphone: the
    exact decisions, whatever the machine's load."""
    from serving.voice_call_flow import TENTATIVE_BARGE_IN as cfg

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    meter = tmp_path / "meter.js"
    meter.write_text(app[0].CALL_METER_JS)
    harness = os.path.join(os.path.dirname(__file__), "call_meter_harness.js")
    runs = json.loads(subprocess.run([node, harness, str(meter)], capture_output=True, text=True, timeout=60,
                                     check=True).stdout)
    kinds = {name: [kind for _, kind in run["kinds"]] for name, run in runs.items()}
    at = {name: {kind: t for t, kind in run["kinds"]} for name, run in runs.items()}
    tick = cfg["tick_ms"]
    # A voice over the reply (from 1 s): paused after hold_ms; the server then hears speech: the reply is cut.
    assert kinds["voice"] == ["start", "pause", "confirmed"] and runs["voice"]["paused"] and runs["voice"]["cuts"] == 1
    assert cfg["hold_ms"] <= runs["voice"]["pause_ms"] <= cfg["hold_ms"] + 2 * tick
    # A 200 ms cough: paused, then resumed as soon as the server has heard its minimum speech length after the
    # cough began (plus the slack) without hearing speech.
    assert kinds["cough"] == ["start", "pause", "resume"] and not runs["cough"]["paused"]
    heard_out = 1000 + tick + 1000 * (cfg["min_speech_s"] + cfg["verdict_slack_s"]) + 700
    assert abs(at["cough"]["resume"] - heard_out) <= 2 * tick
    # With no word from the server at all, it resumes after max_hold_ms.
    assert kinds["cough_no_server"] == ["start", "pause", "resume"] and not runs["cough_no_server"]["paused"]
    assert abs(at["cough_no_server"]["resume"] - at["cough_no_server"]["pause"] - cfg["max_hold_ms"]) <= 2 * tick
    # A 60 ms click pauses nothing, nor does a voice while no reply plays.
    assert kinds["click_and_idle"] == ["start"] and runs["click_and_idle"]["pauses"] == 0
    # A lasting noise: paused, resumed once the server heard lasting_s more of it, never paused again while it
    # lasts; a voice after it pauses again.
    assert kinds["lasting"] == ["start", "pause", "resume", "pause"] and runs["lasting"]["pauses_while_it_lasted"] == 1


# ------------------------------------------------------------------------------------------- the page's handlers
def test_a_microphone_that_stops_sending_ends_the_call_politely(app):
    from serving.voice_call_flow import MIC_FIRST_CHUNK_S, MIC_QUIET_S, VoiceCall

    space = app[0]
    call = VoiceCall("handler-test", "luna")
    assert not isinstance(space.check_call(call)[0], str) and not call.ended  # a fresh call is left alone ...
    call.check_microphone(now=call.started_at + MIC_FIRST_CHUNK_S - 1)
    assert not call.ended  # ... while the visitor may still be answering the permission prompt
    call.feed((48000, np.zeros(4800, np.int16)))
    assert call.check_microphone(now=call.last_chunk_at + MIC_QUIET_S - 1) == []
    call.last_chunk_at -= MIC_QUIET_S + 1  # nothing came for longer than that
    signal, status, timer = space.check_call(call)
    assert call.ended and "end=no_audio" in signal and "microphone stopped sending sound" in status
    assert not isinstance(space.check_call(call)[0], str)  # an ended call sends no second signal


def test_silence_ends_the_call_with_a_message(app):
    from serving.voice_call_flow import SILENCE_TIMEOUT_S, VoiceCall

    call = VoiceCall("handler-test", "luna")
    signal = status = None
    chunk = (48000, np.zeros(4800, np.int16))
    for _ in range(int(SILENCE_TIMEOUT_S / 0.1) + 5):
        signal, _, status, heard = app[0].call_chunk(chunk, call)
        assert heard.split()[0].replace(".", "").isdigit()  # seconds heard, for the page's tentative barge-in
        if isinstance(signal, str):
            break
    assert "end=silence_timeout" in signal and f"Nobody spoke for {SILENCE_TIMEOUT_S:.0f} seconds" in status


def test_a_visitor_who_never_pauses_is_cut_with_a_message(app):
    from serving.checks import MAX_AUDIO_SECONDS
    from serving.voice_call_flow import VoiceCall

    call = VoiceCall("handler-test", "luna", silence_timeout_s=None)
    talk = np.concatenate([np.concatenate([speech(p), quiet(0.1, seed=i)])
                           for i, p in enumerate([QUESTION, REQUEST, STORY] * 10)])
    assert len(talk) / SR > MAX_AUDIO_SECONDS + 2
    events = []
    for i in range(0, int((MAX_AUDIO_SECONDS + 2) * SR), 8000):
        events += call.feed((SR, talk[i:i + 8000]))
    queued = [e for e in events if type(e).__name__ == "TurnQueued"]
    assert [e.reason for e in queued] == ["max_length"]
    assert "without a pause" in call.status() and call.signal(events).startswith("turn=0")
    call.hang_up()
