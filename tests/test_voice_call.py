"""Voice call: the streaming turn detector (real Silero VAD) and the call's state machine, on the CPU.

Speech is the repository's synthesized examples (trimmed to where they are audible) or a synthetic voiced signal;
everything else is made here with fixed seeds. Times are audio seconds, so nothing here depends on the wall clock.
"""

from __future__ import annotations

import glob
import os
import threading

import numpy as np
import pytest
import soundfile
import soxr

from serving.voice_call import (BargeIn, CallEnded, CallSession, CallState, ChunkSkipped, ReplyPiece,
                                SilenceTimeout, SpeechIgnored, SpeechStarted, TurnConfig, TurnDetector, TurnEnded,
                                TurnQueued, as_mono_float, detect_turns, scan)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SR = 16000
SPEECH_FILES = sorted(glob.glob(os.path.join(ROOT, "examples", "audio", "*.wav"))) + [
    os.path.join(HERE, "fixtures", "media", "speech.wav")]


# ------------------------------------------------------------------------------------------------------ audio makers

def load_speech(path: str) -> np.ndarray:
    """A speech file at 16 kHz, cut to where it is audible (10 ms frames above -40 dBFS), so its extent is known."""
    data, rate = soundfile.read(path, dtype="float32")
    assert rate == SR
    frames = data[:len(data) // 160 * 160].reshape(-1, 160)
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > 0.01)
    return data[loud[0] * 160:(loud[-1] + 1) * 160]


def floor(seconds: float, seed: int = 0, level: float = 3e-4) -> np.ndarray:
    """A quiet microphone: a faint noise floor rather than digital zeros."""
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def white(seconds: float, rms: float, seed: int = 1) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def pink(seconds: float, rms: float, seed: int = 2) -> np.ndarray:
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(int(seconds * SR)))
    freqs = np.fft.rfftfreq(int(seconds * SR), 1 / SR)
    spectrum[1:] /= np.sqrt(freqs[1:])  # 1/f power
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, int(seconds * SR))
    return (rms * noise / noise.std()).astype(np.float32)


VOWEL_FORMANTS = [(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240)]


def speech_like(seconds: float, seed: int = 0, f0: float = 120.0, syllables_per_s: float = 4.0) -> np.ndarray:
    """A voiced, speech-like signal: harmonics of a gliding pitch, weighted by three formant resonances that move
    from vowel to vowel, with a syllable-rate loudness envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    pitch = f0 * (1 + 0.12 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    syllable = t * syllables_per_s
    vowels = np.array([VOWEL_FORMANTS[i] for i in rng.integers(0, len(VOWEL_FORMANTS), int(syllable[-1]) + 2)])
    formants = [np.interp(syllable, np.arange(len(vowels)), vowels[:, j]) for j in range(3)]
    out = np.zeros_like(t)
    for k in range(1, 40):
        fk = k * pitch
        gain = sum(0.5 ** j / (1 + ((fk - formants[j]) / bw) ** 2) for j, bw in enumerate((80, 100, 150)))
        out += gain * np.sin(k * phase) / np.sqrt(k)
    out *= np.clip(np.sin(np.pi * (syllable % 1.0)), 0, 1) ** 0.7
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def gradio_chunks(x16: np.ndarray, chunk_s: float = 0.5, rate: int = 48000, stereo: bool = False):
    """What Gradio's streaming microphone sends: (48000, int16) pieces of `chunk_s` seconds."""
    up = soxr.resample(x16, SR, rate)
    pcm = (np.clip(up, -1, 1) * 32767).astype(np.int16)
    if stereo:
        pcm = np.stack([pcm, pcm], axis=1)
    step = int(rate * chunk_s)
    return [(rate, pcm[i:i + step]) for i in range(0, len(pcm), step)]


def feed_all(target, x16: np.ndarray, chunk_s: float = 0.5, **kw) -> list:
    events = []
    for chunk in gradio_chunks(x16, chunk_s, **kw):
        events += target.feed(chunk)
    return events


def of(events, kind) -> list:
    return [e for e in events if isinstance(e, kind)]


@pytest.fixture(scope="module")
def utterances() -> list[np.ndarray]:
    return [load_speech(p) for p in SPEECH_FILES]


# ---------------------------------------------------------------------------------------------------- the detector

def test_vad_fires_on_synthetic_speech_like_signal():
    audio = np.concatenate([floor(1.0), speech_like(2.0), floor(1.5, seed=3)])
    turns = detect_turns((SR, audio))
    assert len(turns) == 1
    assert turns[0].reason == "pause"
    assert abs(turns[0].start_s - 1.0) <= 0.2 and abs(turns[0].end_s - 3.0) <= 0.2


@pytest.mark.parametrize("path", SPEECH_FILES, ids=os.path.basename)
def test_each_speech_file_is_one_turn(path):
    speech = load_speech(path)
    turns = detect_turns((SR, np.concatenate([floor(0.8), speech, floor(1.2, seed=5)])))
    assert len(turns) == 1
    assert abs(turns[0].start_s - 0.8) <= 0.2
    assert abs(turns[0].end_s - (0.8 + len(speech) / SR)) <= 0.2


def test_silence_makes_no_events():
    config = TurnConfig(silence_timeout_s=None)
    assert scan((SR, np.zeros(10 * SR, np.float32)), config) == []
    assert scan((SR, floor(10.0)), config) == []


@pytest.mark.parametrize("noise", ["white 0.03", "white 0.1", "pink 0.05", "pink 0.15"])
def test_background_noise_makes_no_turns(noise):
    kind, rms = noise.split()
    audio = (white if kind == "white" else pink)(20.0, float(rms))
    events = scan((SR, audio), TurnConfig(silence_timeout_s=None))
    assert of(events, SpeechStarted) == [] and of(events, TurnEnded) == []


def test_speech_in_noise_is_still_one_turn(utterances):
    speech = utterances[0]
    audio = np.concatenate([floor(1.0), speech, floor(1.5)])
    noisy = audio + white(len(audio) / SR, rms=0.3 * float(np.sqrt((speech ** 2).mean())))  # about 10 dB SNR
    assert len(detect_turns((SR, noisy))) == 1


@pytest.mark.parametrize("offset_s", [0.3, 1.0, 2.0, 3.0])
def test_cough_length_speech_burst_is_ignored(utterances, offset_s):
    burst = utterances[2][int(offset_s * SR):int((offset_s + 0.2) * SR)]   # 0.2 s of real speech
    events = scan((SR, np.concatenate([floor(1.0), burst, floor(2.0), burst, floor(2.0)])))
    assert of(events, TurnEnded) == [] and of(events, SpeechStarted) == []
    assert len(of(events, SpeechIgnored)) == 2   # the VAD did hear both: they were too short to count


def test_cough_like_noise_burst_is_ignored():
    t = np.arange(int(0.22 * SR)) / SR
    cough = 0.5 * white(0.22, 1.0, seed=7) * np.exp(-t / 0.05)   # a sharp broadband burst that decays
    events = scan((SR, np.concatenate([floor(1.0), cough, floor(2.0)])))
    assert of(events, TurnEnded) == [] and of(events, SpeechStarted) == []


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_two_utterances_from_48k_int16_chunks(utterances, stereo):
    first, second = utterances[0], utterances[1]
    audio = np.concatenate([floor(1.0), first, floor(1.5, seed=1), second, floor(2.0, seed=2)])
    detector = TurnDetector()
    events = feed_all(detector, audio, stereo=stereo)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStarted, TurnEnded, SpeechStarted, TurnEnded]
    truth = [(1.0, 1.0 + len(first) / SR), (2.5 + len(first) / SR, 2.5 + (len(first) + len(second)) / SR)]
    for turn, (start, end), spoken in zip(of(events, TurnEnded), truth, (first, second)):
        assert turn.reason == "pause"
        assert abs(turn.start_s - start) <= 0.2 and abs(turn.end_s - end) <= 0.2
        assert abs(turn.detected_at_s - turn.end_s - TurnConfig.end_pause_s) <= 0.05    # the configured pause
        # The waveform is the utterance (with pre-roll), back at 16 kHz: line it up with the truth and compare.
        offset = int(round((start - turn.audio_start_s) * SR))
        got = turn.audio[offset:offset + len(spoken)]
        assert turn.audio.dtype == np.float32 and len(got) >= len(spoken) - int(0.2 * SR)
        assert np.corrcoef(got, spoken[:len(got)])[0, 1] > 0.9
    starts = of(events, SpeechStarted)
    assert abs(starts[0].onset_s - truth[0][0]) <= 0.2
    assert starts[0].confirmed_at_s - starts[0].onset_s == pytest.approx(0.3, abs=0.07)


def test_end_pause_setting_decides_whether_a_gap_splits(utterances):
    audio = np.concatenate([floor(1.0), utterances[0], floor(1.0), utterances[1], floor(2.0)])
    assert len(detect_turns((SR, audio), TurnConfig(end_pause_s=0.6))) == 2
    assert len(detect_turns((SR, audio), TurnConfig(end_pause_s=1.5))) == 1


def test_chunk_size_and_rate_do_not_change_the_turns(utterances):
    audio = np.concatenate([floor(1.0), utterances[3], floor(1.5)])
    reference = detect_turns((SR, audio))
    for chunk_s, rate in [(0.2, 48000), (0.5, 44100), (0.35, 16000)]:
        chunks = gradio_chunks(audio, chunk_s, rate=rate)
        turns = detect_turns(chunks)
        assert len(turns) == len(reference) == 1
        assert abs(turns[0].start_s - reference[0].start_s) <= 0.07
        assert abs(turns[0].end_s - reference[0].end_s) <= 0.07


def test_corrupt_chunks_are_skipped_and_counted(utterances):
    good = gradio_chunks(np.concatenate([floor(1.0), utterances[0], floor(1.5)]))
    bad = [
        (48000, np.full(24000, np.nan, np.float32)),        # NaN
        (48000, np.array([0.1, np.inf], np.float32)),        # infinite
        (48000, np.zeros(0, np.int16)),                      # empty
        (48000, np.zeros((4, 4, 4), np.int16)),              # wrong shape
        (48000, np.zeros((100, 20), np.int16)),              # twenty "channels"
        (48000, np.array(["a", "b"])),                       # wrong dtype
        (48000, np.zeros(100, np.complex64)),                # wrong dtype
        (48000, np.full(100, 12000.0, np.float32)),          # floats on the int16 scale
        (0, np.zeros(100, np.int16)),                        # bad rate
        ("48000", np.zeros(100, np.int16)),                  # bad rate
        None,
        (48000,),
        "not audio",
    ]
    detector = TurnDetector()
    events = []
    for i, chunk in enumerate(good):
        for corrupt in bad[i::len(good)]:   # interleaved through the whole stream
            skipped = detector.feed(corrupt)
            assert len(skipped) == 1 and isinstance(skipped[0], ChunkSkipped), corrupt
        events += detector.feed(chunk)
    assert detector.skipped_chunks == len(bad)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded]
    assert abs(of(events, TurnEnded)[0].start_s - 1.0) <= 0.2


def test_as_mono_float_accepts_gradio_shapes():
    rate, mono = as_mono_float((48000, np.array([[16384, -16384]] * 10, np.int16)))
    assert rate == 48000 and mono.shape == (10,) and np.allclose(mono, 0.0)
    rate, mono = as_mono_float((44100, np.full((2, 300), 0.25, np.float64)))  # channels first
    assert mono.shape == (300,) and mono.dtype == np.float32 and np.allclose(mono, 0.25)
    assert np.allclose(as_mono_float((16000, np.array([-32768, 16384], np.int16)))[1], [-1.0, 0.5])


def test_silence_timeout_fires_once_after_the_configured_time():
    events = scan((SR, floor(65.0)), TurnConfig(silence_timeout_s=30.0))
    timeouts = of(events, SilenceTimeout)
    assert len(timeouts) == 1 and timeouts[0].at_s == pytest.approx(30.0, abs=0.05)


def test_coughs_do_not_reset_the_silence_timeout(utterances):
    burst = utterances[2][SR:int(1.2 * SR)]
    audio = np.concatenate([floor(10.0), burst, floor(10.0), burst, floor(15.0)])
    timeouts = of(scan((SR, audio)), SilenceTimeout)
    assert len(timeouts) == 1 and timeouts[0].at_s == pytest.approx(30.0, abs=0.05)


def test_long_speech_is_cut_at_the_limit_then_ignored_until_a_pause(utterances):
    ramble = np.concatenate([np.concatenate([u, floor(0.1)]) for u in utterances * 3])   # ~45 s, no long pause
    audio = np.concatenate([floor(1.0), ramble, floor(2.0), utterances[1], floor(1.5)])
    turns = detect_turns((SR, audio), TurnConfig(max_utterance_s=10.0))
    assert [t.reason for t in turns] == ["max_length", "pause"]
    assert turns[0].duration_s == pytest.approx(10.0, abs=0.05)
    assert len(turns[0].audio) / SR == pytest.approx(10.0 + 0.3, abs=0.1)   # with the pre-roll
    second_start = 3.0 + len(ramble) / SR
    assert abs(turns[1].start_s - second_start) <= 0.2


def test_detect_turns_reads_a_wav_file(tmp_path, utterances):
    path = tmp_path / "two.wav"
    audio = np.concatenate([floor(0.5), utterances[0], floor(1.5), utterances[4], floor(1.0)])
    soundfile.write(path, soxr.resample(audio, SR, 48000), 48000, subtype="PCM_16")
    turns = detect_turns(str(path))
    assert len(turns) == 2
    summary = turns[0].summary()
    assert set(summary) == {"start_s", "end_s", "duration_s", "reason", "detected_at_s"}
    assert summary["reason"] == "pause"


def test_a_turn_still_going_at_the_end_of_the_stream_is_flushed(utterances):
    turns = detect_turns((SR, np.concatenate([floor(0.5), utterances[0]])))
    assert [t.reason for t in turns] == ["end_of_stream"]


@pytest.mark.parametrize("bad", [dict(end_pause_s=0.2), dict(end_pause_s=2.0), dict(threshold=1.0),
                                 dict(max_utterance_s=0.5), dict(silence_timeout_s=0.0),
                                 dict(post_roll_s=0.9, end_pause_s=0.6)])
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValueError):
        TurnConfig(**bad)


# ------------------------------------------------------------------------------------------------------ the session

class FakeResponder:
    """Yields `pieces` pieces of text and 0.2 s of 24 kHz audio; remembers how it was called and stopped."""

    def __init__(self, pieces: int = 4, fail_after: int | None = None) -> None:
        self.pieces, self.fail_after = pieces, fail_after
        self.calls: list[tuple[int, int, threading.Event]] = []
        self.closed: list[int] = []

    def __call__(self, audio: np.ndarray, turn_index: int, stop: threading.Event):
        self.calls.append((turn_index, len(audio), stop))
        try:
            for i in range(self.pieces):
                if stop.is_set():
                    return
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("model fell over")
                yield ReplyPiece(text=f"w{i} ", audio=np.full(4800, 100 * (i + 1), np.int16), sample_rate=24000)
        except GeneratorExit:
            self.closed.append(turn_index)
            raise


def queued_session(utterances, responder=None, **kw) -> tuple[CallSession, FakeResponder, list]:
    responder = responder or FakeResponder()
    session = CallSession(responder, **kw)
    events = feed_all(session, np.concatenate([floor(1.0), utterances[0], floor(1.0)]))
    return session, responder, events


def test_a_turn_goes_listening_thinking_speaking_listening(utterances):
    session, responder, events = queued_session(utterances)
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, TurnQueued]
    assert events[-1].turn_index == 0 and events[-1].reason == "pause"
    assert session.state is CallState.THINKING
    reply = session.run_reply()
    assert next(reply).text == "w0 "
    assert session.state is CallState.SPEAKING
    assert [p.text for p in reply] == ["w1 ", "w2 ", "w3 "]
    assert responder.calls[0][0] == 0
    assert responder.calls[0][1] == len(session.transcript()[0].user_audio)
    # Generation is done, but the browser is still playing 0.8 s of audio plus its lag.
    assert session.state is CallState.SPEAKING
    feed_all(session, floor(2.5, seed=9))
    assert session.state is CallState.LISTENING
    [turn] = session.transcript()
    assert (turn.reply_text, turn.interrupted, turn.done, turn.error) == ("w0 w1 w2 w3 ", False, True, None)
    assert len(turn.reply_audio) == 4 and turn.reply_audio_s == pytest.approx(0.8)
    assert {"queued", "reply_started", "first_text", "first_audio", "reply_done"} <= set(turn.timing)
    assert session.stats()["interrupted"] == 0


def test_barge_in_stops_the_reply_and_takes_the_next_turn(utterances):
    session, responder, _ = queued_session(utterances)
    reply = session.run_reply()
    next(reply), next(reply)
    assert session.state is CallState.SPEAKING
    second = utterances[1]
    events = feed_all(session, second[:int(0.6 * SR)])          # the visitor starts talking over the reply
    assert [type(e) for e in events] == [SpeechStarted, BargeIn]
    assert events[1].turn_index == 0
    assert session.state is CallState.INTERRUPTED
    stop = responder.calls[0][2]
    assert stop.is_set()
    assert list(reply) == []                                    # the reply generator ends at once
    assert responder.closed == [0]
    first = session.transcript()[0]
    assert first.interrupted and first.done and first.reply_text == "w0 w1 " and len(first.reply_audio) == 2
    events = feed_all(session, np.concatenate([second[int(0.6 * SR):], floor(1.0)]))
    assert [type(e) for e in events] == [TurnEnded, TurnQueued]
    assert events[1].turn_index == 1 and session.state is CallState.THINKING
    assert len(list(session.run_reply())) == 4
    assert [c[0] for c in responder.calls] == [0, 1]
    # the new utterance is the whole of it, onset included (not only what followed the barge-in)
    assert len(session.transcript()[1].user_audio) >= len(second)
    assert not session.transcript()[1].interrupted
    assert session.stats()["interrupted"] == 1


def test_the_page_player_reads_the_newest_replys_audio_as_it_is_made(utterances):
    session, _, _ = queued_session(utterances)
    nothing = session.reply_audio(-1)
    assert (nothing.turn_index, nothing.pieces, nothing.done) == (0, [], False)  # the turn waits for its reply
    reply = session.run_reply()
    next(reply), next(reply)
    so_far = session.reply_audio(0)
    assert (so_far.turn_index, so_far.start, len(so_far.pieces), so_far.sample_rate) == (0, 0, 2, 24000)
    assert not so_far.done and not so_far.stopped
    list(reply)
    rest = session.reply_audio(0, 2)
    assert (rest.start, [int(p[0]) for p in rest.pieces], rest.done) == (2, [300, 400], True)
    # Speech over the reply cuts it: the player hears that it stopped, then the next turn replaces it.
    feed_all(session, utterances[1][:int(0.6 * SR)])
    assert session.reply_audio(0, 4).stopped
    feed_all(session, np.concatenate([utterances[1][int(0.6 * SR):], floor(1.0)]))
    newer = session.reply_audio(0, 4)
    assert (newer.turn_index, newer.start, newer.pieces, newer.stopped) == (1, 0, [], False)


def test_barge_in_before_the_reply_started_leaves_the_turn_unanswered(utterances):
    session, responder, _ = queued_session(utterances)
    events = feed_all(session, np.concatenate([utterances[1], floor(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, BargeIn, TurnEnded, TurnQueued]
    assert list(session.run_reply()) != []
    assert [c[0] for c in responder.calls] == [1]
    first, second = session.transcript()
    assert first.interrupted and first.done and first.reply_text == ""
    assert not second.interrupted and second.reply_text == "w0 w1 w2 w3 "


def test_speech_while_the_reply_still_plays_is_a_barge_in(utterances):
    session, responder, _ = queued_session(utterances, responder=FakeResponder(pieces=20))   # 4 s of audio
    list(session.run_reply())
    events = feed_all(session, floor(1.0, seed=4))
    assert session.state is CallState.SPEAKING
    events = feed_all(session, np.concatenate([utterances[1], floor(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, BargeIn, TurnEnded, TurnQueued]
    assert session.transcript()[0].interrupted


def test_speech_confirmed_before_playback_ends_is_a_barge_in_even_if_its_chunk_ends_after(utterances):
    """The state is judged at the moment speech is confirmed, not at the end of the (long) chunk carrying it."""
    session, _, _ = queued_session(utterances)
    list(session.run_reply())                              # 0.8 s of audio: playback ends 1.6 s from now
    feed_all(session, floor(1.0, seed=4))
    assert session.state is CallState.SPEAKING
    # One 2 s chunk: speech starts 0.1 s into it and is confirmed ~0.4 s in, before playback ends (0.6 s in),
    # while the chunk itself ends well after.
    speech = np.concatenate([floor(0.1, seed=6), utterances[1][:int(1.9 * SR)]])
    events = feed_all(session, speech, chunk_s=2.0)
    assert [type(e) for e in events] == [SpeechStarted, BargeIn]
    assert session.transcript()[0].interrupted


def test_speech_after_playback_is_a_new_turn_not_a_barge_in(utterances):
    session, _, _ = queued_session(utterances)
    list(session.run_reply())
    feed_all(session, floor(2.0, seed=4))
    assert session.state is CallState.LISTENING
    events = feed_all(session, np.concatenate([utterances[1], floor(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, TurnQueued]
    assert [t.interrupted for t in session.transcript()] == [False, False]


def test_barge_in_can_be_switched_off(utterances):
    session, responder, _ = queued_session(utterances, barge_in=False)
    reply = session.run_reply()
    next(reply)
    events = feed_all(session, np.concatenate([utterances[1], floor(1.0)]))
    assert of(events, BargeIn) == [] and of(events, TurnQueued) == []
    assert len(list(reply)) == 3
    assert len(session.transcript()) == 1 and not session.transcript()[0].interrupted


def test_hang_up_stops_the_reply_and_ends_the_call(utterances):
    session, responder, _ = queued_session(utterances)
    reply = session.run_reply()
    next(reply)
    assert session.hang_up() == [CallEnded("hang_up")]
    assert session.state is CallState.ENDED and session.end_reason == "hang_up"
    assert responder.calls[0][2].is_set()
    assert list(reply) == []
    assert session.transcript()[0].interrupted and session.transcript()[0].reply_text == "w0 "
    assert feed_all(session, np.concatenate([utterances[1], floor(1.0)])) == []
    assert session.stats()["chunks_after_end"] > 0
    assert list(session.run_reply(wait_s=0.05)) == [] and len(responder.calls) == 1
    assert session.hang_up() == [] and session.state is CallState.ENDED


def test_hang_up_mid_sentence_drops_the_unfinished_utterance(utterances):
    session = CallSession(FakeResponder())
    feed_all(session, np.concatenate([floor(1.0), utterances[0][:SR]]))
    assert session.user_speaking and session.state is CallState.LISTENING
    session.hang_up()
    assert not session.user_speaking
    assert session.transcript() == []


def test_thirty_seconds_without_speech_times_the_call_out():
    session = CallSession(FakeResponder())
    events = feed_all(session, floor(31.0))
    assert of(events, SilenceTimeout)[0].at_s == pytest.approx(30.0, abs=0.05)
    assert of(events, CallEnded) == [CallEnded("silence_timeout")]
    assert session.state is CallState.ENDED and session.end_reason == "silence_timeout"


def test_the_timeout_counts_from_the_end_of_the_reply_playback(utterances):
    session, _, events = queued_session(utterances, responder=FakeResponder(pieces=50))     # 10 s of audio
    replied_at = session.now_s
    list(session.run_reply())
    turn_end = of(events, TurnEnded)[0].end_s
    events = feed_all(session, floor(45.0))
    assert session.state is CallState.ENDED
    [timeout] = of(events, SilenceTimeout)
    # Not 30 s after the visitor stopped talking: 30 s after the 10 s reply (and its lag) finished playing.
    assert timeout.at_s > turn_end + 30 + 10
    assert timeout.at_s == pytest.approx(replied_at + 10.0 + 0.8 + 30.0, abs=0.05)


def test_a_five_minute_monologue_is_cut_at_the_limit(utterances):
    session = CallSession(FakeResponder(), TurnConfig(max_utterance_s=60.0))
    talk = np.concatenate([np.concatenate([u, floor(0.1)]) for u in utterances])
    monologue = np.concatenate([floor(1.0), np.tile(talk, int(np.ceil(300 * SR / len(talk))))[:300 * SR]])
    chunk = 8 * SR   # big chunks: the same detection, fewer Python round trips
    events = []
    for i in range(0, len(monologue), chunk):
        events += session.feed((SR, monologue[i:i + chunk]))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, TurnQueued]
    assert events[2].reason == "max_length"
    [turn] = session.transcript()
    assert turn.end_reason == "max_length" and turn.end_s - turn.start_s == pytest.approx(60.0, abs=0.05)
    assert len(turn.user_audio) / SR == pytest.approx(60.3, abs=0.1)
    assert session.state is CallState.THINKING   # the rest of the monologue did not barge in


def test_a_corrupt_chunk_is_skipped_and_the_call_goes_on(utterances):
    session = CallSession(FakeResponder())
    feed_all(session, floor(1.0))
    events = session.feed((48000, np.full(24000, np.nan, np.float32)))
    assert [type(e) for e in events] == [ChunkSkipped] and session.state is CallState.LISTENING
    events = feed_all(session, np.concatenate([utterances[0], floor(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, TurnQueued]
    assert session.stats()["skipped_chunks"] == 1


def test_a_responder_error_is_recorded_and_the_call_recovers(utterances):
    session, responder, _ = queued_session(utterances, responder=FakeResponder(fail_after=1))
    reply = session.run_reply()
    next(reply)
    with pytest.raises(RuntimeError, match="fell over"):
        next(reply)
    assert session.transcript()[0].error == "RuntimeError: model fell over"
    assert session.transcript()[0].done
    feed_all(session, floor(2.0))
    assert session.state is CallState.LISTENING
    responder.fail_after = None
    feed_all(session, np.concatenate([utterances[1], floor(1.0)]))
    assert len(list(session.run_reply())) == 4


def test_microphone_and_reply_threads_together(utterances):
    session = CallSession(FakeResponder())
    answered: list[str] = []
    errors: list[BaseException] = []

    def reply_loop() -> None:   # what the UI's reply event does, turn after turn
        try:
            while session.state is not CallState.ENDED:
                text = "".join(p.text for p in session.run_reply(wait_s=0.05))
                if text:
                    answered.append(text)
        except BaseException as error:  # noqa: BLE001 - surfaced by the assert below
            errors.append(error)

    thread = threading.Thread(target=reply_loop)
    thread.start()
    try:
        for utterance in utterances[:3]:
            feed_all(session, np.concatenate([utterance, floor(1.0)]))
            for _ in range(200):   # let the reply finish before speaking again (no barge-in wanted here)
                if session.transcript()[-1].done:
                    break
                threading.Event().wait(0.01)
            feed_all(session, floor(1.5))   # and let it "play"
    finally:
        session.hang_up()
        thread.join(5)
    assert not thread.is_alive() and errors == []
    assert answered == ["w0 w1 w2 w3 "] * 3
    assert [t.interrupted for t in session.transcript()] == [False] * 3


def test_timing_stamps_are_in_order(utterances):
    ticks = iter(range(100, 200))
    session, _, _ = queued_session(utterances, clock=lambda: float(next(ticks)))
    list(session.run_reply())
    timing = session.transcript()[0].timing
    # Queued when the chunk holding the 0.6 s pause had arrived whole (0.5 s chunks): the estimate puts the end
    # of speech the pause plus the rest of that chunk earlier.
    assert 0.6 <= timing["queued"] - timing["speech_end"] <= 0.6 + 0.5 + 0.04
    order = ["speech_end", "queued", "reply_started", "first_text", "first_audio", "reply_done"]
    assert [timing[k] for k in order] == sorted(timing[k] for k in order)
