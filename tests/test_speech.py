"""Speech output: talker parity with the reference, S3-BPE, voices, sentence cutting, crossfade, streaming, TTS.

Streaming logic is tested with a small fake detokenizer (defined here, test-only) so the checks are exact and fast;
the end-to-end and bad-input tests run the real tiny detokenizer.
"""

import os
import random
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ming.loading import CheckpointError
from ming.speech import SpeechGenerator, VoiceBank
from ming.speech.s3bpe import S3BpeCodec
from ming.speech.streaming import (
    FIRST_PIECE_MAX_UNITS,
    MAX_TTS_CHARACTERS,
    PIECE_MAX_UNITS,
    Crossfader,
    SentenceCutter,
    cut_sentences,
    fade_in,
    is_speakable,
    speakable_text,
    to_int16,
    units,
)
from ming.speech.talker import Talker
from ming.testing.speech import write_tiny_speech_assets, write_tiny_talker
from ming.speech.voices import BUNDLED_VOICES_DIR

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "speech")
SAMPLE_RATE = 22050

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def talker_ckpt(tmp_path_factory):
    """Talker-only tiny checkpoint (what the reference golden was made from)."""
    path = str(tmp_path_factory.mktemp("talker_ckpt"))
    write_tiny_talker(path)
    return path


@pytest.fixture(scope="module")
def speech_ckpt(tmp_path_factory):
    """Talker + tiny flow decoder and vocoder."""
    path = str(tmp_path_factory.mktemp("speech_ckpt"))
    write_tiny_speech_assets(path)
    return path


@pytest.fixture(scope="module")
def talker(talker_ckpt):
    return Talker.from_pretrained(talker_ckpt)


class FakeDetokenizer:
    """Test-only stand-in for AudioDetokenizer: each 50 Hz token becomes 441 samples of a tone set by the token, so
    clips are deterministic and tell their tokens apart."""

    sample_rate = SAMPLE_RATE

    def __init__(self):
        self.calls = 0

    def synthesize(self, speech_tokens, speaker_embedding, noise_seed=None):
        assert speech_tokens.shape[0] == 1 and speaker_embedding.shape == (1, 192)
        self.calls += 1
        n = torch.arange(441, dtype=torch.float32) / SAMPLE_RATE
        tones = [0.3 * torch.sin(2 * torch.pi * (100 + 10 * (int(t) % 50)) * n) for t in speech_tokens[0]]
        return torch.cat(tones)


@pytest.fixture(scope="module")
def fake_speech(talker_ckpt, talker):
    codec = S3BpeCodec.from_dir(os.path.join(talker_ckpt, "talker", "s3_bpe"))
    return SpeechGenerator(talker, codec, FakeDetokenizer(), VoiceBank.from_checkpoint(talker_ckpt), max_new_tokens=12)


@pytest.fixture(scope="module")
def speech(speech_ckpt):
    generator = SpeechGenerator.from_pretrained(speech_ckpt)
    generator.max_new_tokens = 12  # random tiny talker: keep clips short
    return generator


# ---------------------------------------------------------------------------------------------------- talker
def test_talker_matches_reference_logits(talker):
    golden = load_file(os.path.join(FIXTURES, "talker_golden.safetensors"))
    with safe_open(os.path.join(FIXTURES, "talker_golden.safetensors"), framework="pt") as f:
        text = f.metadata()["text"]
    tok = talker.tokenizer
    text_ids = tok.encode(text)
    layout = tok.shared_prefix(golden["thinker_states"].shape[1])

    # Same prefix layout as the reference builds.
    assert layout.ids + [tok.ids["<audio_bos>"]] == golden["audio_prefix_ids"][0].tolist()
    assert layout.ids + text_ids[:1] == golden["text_prefix_ids"][0].tolist()
    assert text_ids[1:4] == golden["step_text_ids"].tolist()

    with torch.inference_mode():
        decoder = talker.model.model
        cache = talker.model.model.new_cache(32, talker.dtype, talker.device)
        shared = decoder.prefill(talker.embed_prefix(golden["speaker_embedding"], golden["thinker_states"]), cache)
        steps = [(tok.ids["<audio_bos>"], text_ids[0])] + list(zip(golden["step_audio_ids"], golden["step_text_ids"]))
        hidden = [
            decoder.decode(talker.embed_streams(torch.tensor([[a]]), torch.tensor([[t]])), torch.tensor([i]), cache)
            for i, (a, t) in enumerate(steps, start=shared.shape[1])
        ]
        prefix_logits = talker.logits(torch.cat([shared, hidden[0]], dim=1))
        step_logits = talker.logits(torch.cat(hidden[1:], dim=1))[0]

    for ours, ref in ((prefix_logits, golden["prefix_logits"]), (step_logits, golden["step_logits"])):
        assert ours.shape == ref.shape
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, rel


def test_talker_decode_steps_equal_one_causal_pass(talker):
    """A prefill followed by one-position decode steps through the cache gives the states of one causal pass."""
    with torch.inference_mode():
        embeds = talker.embed_prefix(torch.randn(1, 192), torch.randn(1, 9, 64))
        n = embeds.shape[1]
        decoder = talker.model.model
        whole = decoder.prefill(embeds, decoder.new_cache(n, talker.dtype, talker.device))
        cache = decoder.new_cache(n + 3, talker.dtype, talker.device)
        parts = [decoder.prefill(embeds[:, :5], cache)]
        parts += [decoder.decode(embeds[:, i : i + 1], torch.tensor([i]), cache) for i in range(5, n)]
    assert cache.valid[0].tolist() == [True] * n + [False] * 3
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_talker_weights_are_in_the_main_safetensors(talker_ckpt, tmp_path):
    with safe_open(os.path.join(talker_ckpt, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "talker.model.model.embed_tokens.weight" in keys
    assert "talker.model.lm_head.weight" in keys
    assert {"talker.thinker_to_talker_proj.weight", "talker.thinker_to_talker_proj.bias"} <= keys
    assert {"talker.vp_head.weight", "talker.vp_head.bias"} <= keys
    assert "talker.model.model.layers.1.self_attn.q_proj.bias" in keys
    assert not [name for name in os.listdir(os.path.join(talker_ckpt, "talker")) if name.endswith(".safetensors")]

    # A checkpoint without talker tensors says so.
    empty = tmp_path / "no_talker"
    empty.mkdir()
    (empty / "talker").symlink_to(os.path.join(talker_ckpt, "talker"))
    from safetensors.torch import save_file

    save_file({"model.model.norm.weight": torch.ones(4)}, str(empty / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no talker weights"):
        Talker.from_pretrained(str(empty))


def test_talker_loads_tied_head_and_base_vocab_config(talker_ckpt, tmp_path):
    """The release's talker/config.json is a base Qwen2 one (vocab 151936, maybe tied embeddings) while its table was
    resized to text + audio vocab: sizes come from the weights, a missing lm_head means it is tied."""
    import json
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(os.path.join(talker_ckpt, "talker"), tmp_path / "talker")
    config_path = tmp_path / "talker" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(vocab_size=300, tie_word_embeddings=True)
    config_path.write_text(json.dumps(config))
    weights = load_file(os.path.join(talker_ckpt, "model.safetensors"))
    del weights["talker.model.lm_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))

    tied = Talker.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    assert tied.config.vocab_size == weights["talker.model.model.embed_tokens.weight"].shape[0]
    assert tied.model.lm_head.weight.dtype == torch.bfloat16
    context = tied.start(torch.randn(1, 192), None)
    assert 10 <= len(tied.generate(context, "Hi.", torch.Generator().manual_seed(0), max_new_tokens=11)) <= 11


def test_talker_generates_audio_ids_and_reuses_its_prefix(talker):
    speaker = VoiceBank.from_checkpoint("/nonexistent").get("luna")
    context = talker.start(speaker, torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0)))
    prefix_length = context.prefix_length
    audio_vocab = talker.config.vocab_size - talker.tokenizer.audio_offset

    first = talker.generate(context, "Hello.", torch.Generator().manual_seed(1), max_new_tokens=15)
    other = talker.generate(context, "Something else entirely.", torch.Generator().manual_seed(2), max_new_tokens=15)
    again = talker.generate(context, "Hello.", torch.Generator().manual_seed(1), max_new_tokens=15)

    assert context.prefix_length == prefix_length  # the shared prefix was run once and kept
    assert first == again  # rolling back to the prefix forgets the previous sentence completely
    assert first != other
    assert 10 <= len(first) <= 15  # <audio_eos> is refused for 10 steps, then the cap holds
    assert all(0 <= i < audio_vocab for i in first + other)

    stop = threading.Event()
    stop.set()
    assert talker.generate(context, "Hello.", max_new_tokens=15, stop_event=stop) == []
    with pytest.raises(ValueError):
        talker.generate(context, "<audio_eos>", max_new_tokens=15)  # control tokens typed in the text are dropped


# ---------------------------------------------------------------------------------------------------- S3-BPE
def test_s3bpe_round_trip(talker_ckpt):
    codec = S3BpeCodec.from_dir(os.path.join(talker_ckpt, "talker", "s3_bpe"))
    assert codec.codebook_size == 4096
    rng = random.Random(0)
    for _ in range(20):
        tokens = [rng.randrange(4096) for _ in range(rng.randrange(1, 120))]
        assert codec.decode(codec.encode(tokens)) == tokens
    # Runs the merges cover are compressed 4:1 and still come back exactly.
    merged = [0, 1, 2, 3, 4, 5, 6, 7]
    assert len(codec.encode(merged)) == 2
    assert codec.decode(codec.encode(merged)) == merged
    assert codec.decode([]) == []


# ---------------------------------------------------------------------------------------------------- voices
def test_voices(talker_ckpt, tmp_path):
    bank = VoiceBank.from_checkpoint(talker_ckpt)
    assert bank.names[0] == "luna"
    luna = bank.get("luna")
    assert luna.shape == (1, 192) and luna.dtype == torch.float32
    assert abs(luna.norm().item() - 12.85) < 0.01  # the release's CAM++ embedding

    custom = tmp_path / "mine.pt"
    torch.save(torch.arange(192, dtype=torch.float32) / 192, custom)
    assert torch.equal(bank.get(str(custom))[0, :3], torch.tensor([0.0, 1 / 192, 2 / 192]))
    assert bank.get(torch.zeros(192)).shape == (1, 192)

    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(3, 7), bad)
    with pytest.raises(ValueError, match="192"):
        bank.get(str(bad))
    with pytest.raises(ValueError, match="unknown voice 'nobody'.*luna"):
        bank.get("nobody")

    # A checkpoint voice of the same name wins over the bundled one.
    ckpt = tmp_path / "ckpt"
    (ckpt / "talker" / "voices").mkdir(parents=True)
    torch.save(torch.ones(1, 192), ckpt / "talker" / "voices" / "luna.pt")
    torch.save(torch.ones(1, 192), ckpt / "talker" / "voices" / "aria.pt")
    bank = VoiceBank.from_checkpoint(str(ckpt))
    assert bank.names == ["luna", "aria"] and torch.equal(bank.get("luna"), torch.ones(1, 192))
    assert os.path.exists(os.path.join(BUNDLED_VOICES_DIR, "luna.pt"))


# ---------------------------------------------------------------------------------------------------- sentence cutting
def piece_units(piece: str) -> int:
    return sum(units(c) for c in piece)


def test_cut_english_sentences():
    text = "Hello there. How are you today? I am fine, thanks! The value of pi is 3.14, about 1,000 times 0.00314."
    assert cut_sentences(text) == [
        "Hello there.",
        "How are you today?",
        "I am fine, thanks!",
        "The value of pi is 3.14, about 1,000 times 0.00314.",
    ]


def test_cut_chinese_sentences():
    text = "你好。今天天气很好！我们去公园散步吧？好的；走吧……"
    assert cut_sentences(text) == ["你好。", "今天天气很好！", "我们去公园散步吧？", "好的；", "走吧……"]


def test_first_piece_is_short():
    english = "Well, the weather today is lovely, and the forecast says it will stay sunny until the weekend."
    pieces = cut_sentences(english)
    assert pieces[0] == "Well, the weather today is lovely,"  # first comma after a few words
    assert pieces[1] == "and the forecast says it will stay sunny until the weekend."  # later: to the sentence end
    chinese = "我来为你介绍一下，这座城市的历史很长，它建于一千多年前。"
    assert cut_sentences(chinese) == ["我来为你介绍一下，", "这座城市的历史很长，它建于一千多年前。"]
    # Too short at its first comma ("好的，") and too long at its second: the first piece is bounded.
    chinese = "好的，我来为你介绍一下这座城市的历史，它建于一千多年前，曾经是重要的贸易中心。"
    pieces = cut_sentences(chinese)
    assert pieces == ["好的，", "我来为你介绍一下这座城市的历史，它建于一千多年前，曾经是重要的贸易中心。"]
    assert piece_units(pieces[0]) <= FIRST_PIECE_MAX_UNITS


def test_long_sentences_are_cut_at_the_bound():
    words = " ".join(f"word{i}" for i in range(200))  # no punctuation at all
    pieces = cut_sentences(words)
    assert " ".join(pieces) == words
    assert piece_units(pieces[0]) <= FIRST_PIECE_MAX_UNITS
    assert all(piece_units(p) <= PIECE_MAX_UNITS for p in pieces)
    assert all(not p.endswith("word") for p in pieces)  # cut between words, not inside one

    hanzi = "这是一个没有任何标点符号的很长的句子" * 12
    pieces = cut_sentences(hanzi)
    assert "".join(pieces) == hanzi
    assert all(piece_units(p) <= PIECE_MAX_UNITS for p in pieces) and len(pieces) >= 5

    clauses = "first clause here, " * 20  # long sentence with commas: cut at the last comma within the bound
    pieces = cut_sentences(clauses.strip())
    assert all(p.endswith(",") for p in pieces[:-1]) and all(piece_units(p) <= PIECE_MAX_UNITS for p in pieces)


def test_cuts_do_not_depend_on_how_the_text_is_streamed():
    text = (
        "Sure! Here is a plan: 1. Wake up at 7.30 am. 2. Eat breakfast, then walk the dog. 你好，世界。"
        "这是第二句话！And a last one without a full stop"
    )
    expected = cut_sentences(text)
    rng = random.Random(0)
    for _ in range(30):
        cutter, pieces, i = SentenceCutter(), [], 0
        while i < len(text):
            step = rng.randrange(1, 6)
            pieces += cutter.push(text[i : i + step])
            i += step
        assert pieces + cutter.flush() == expected
    assert "1." not in expected  # too short to be a piece on its own


def test_speakable_text():
    assert speakable_text("**Bold** and `code` 😀👍🏽 ok\n\nnext") == "Bold and code ok next"
    assert is_speakable("42") and is_speakable("好") and not is_speakable("。！？……") and not is_speakable("🎉🎉")


# ---------------------------------------------------------------------------------------------------- crossfade
def crossfade_join(clips: list[np.ndarray], overlap: int) -> np.ndarray:
    """Reference join, written independently of Crossfader: a[:-n] + (a[-n:] fading out + b[:n] fading in) + b[n:]."""
    out = clips[0]
    for clip in clips[1:]:
        ramp = fade_in(overlap)
        out = np.concatenate([out[:-overlap], out[-overlap:] * (1 - ramp) + clip[:overlap] * ramp, clip[overlap:]])
    return out


def test_crossfade():
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (1000, 300, 2000)]
    fader = Crossfader(100)
    streamed = np.concatenate([fader.push(c) for c in clips] + [fader.flush()])
    assert len(streamed) == sum(map(len, clips)) - 2 * 100
    np.testing.assert_allclose(streamed, crossfade_join(clips, 100), atol=1e-6)

    # Ramps sum to one: a constant stays constant across the seam (no dip, no click).
    fader = Crossfader(64)
    ones = np.concatenate([fader.push(np.ones(500, np.float32)), fader.push(np.ones(500, np.float32)), fader.flush()])
    np.testing.assert_allclose(ones, 1.0, atol=1e-6)
    assert to_int16(np.array([2.0, -2.0, 0.5], np.float32)).tolist() == [32767, -32767, 16384]


# ---------------------------------------------------------------------------------------------------- streaming
def test_stream_equals_pieces_synthesized_separately(fake_speech):
    text = "Hello there. How are you today? 你好，今天天气很好。"
    deltas = ["Hel", "lo there.", " How are", " you today? 你好，", "今天天气", "很好。"]
    events = list(fake_speech.stream(deltas, seed=7))

    assert [e.text_delta for e in events if e.text_delta] == deltas
    audio_events = [e for e in events if e.audio is not None]
    pieces = [e.audio_text for e in audio_events if e.audio_text]
    assert pieces == cut_sentences(text) == ["Hello there.", "How are you today?", "你好，今天天气很好。"]
    assert all(e.audio.dtype == np.int16 for e in audio_events)
    streamed = np.concatenate([e.audio for e in audio_events])

    separately = [fake_speech.speak(p, seed=7 + k) for k, p in enumerate(pieces)]
    expected = to_int16(crossfade_join(separately, fake_speech.crossfade_samples))
    np.testing.assert_array_equal(streamed, expected)

    sample_rate, whole = fake_speech.synthesize(text, seed=7)
    assert sample_rate == SAMPLE_RATE
    np.testing.assert_array_equal(whole, streamed)


def test_speech_to_speech_first_audio_before_text_ends(fake_speech):
    order = []

    def thinker_text():  # stands in for the thinker's streamed reply
        for delta in ["Sure", ", here", " is the", " answer.", " It has", " three", " parts.", " Bye", " now."]:
            order.append(f"text:{delta}")
            yield delta
        order.append("text done")

    thinker_states = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(3))
    for event in fake_speech.stream(thinker_text(), thinker_states=thinker_states, seed=0):
        if event.audio is not None:
            order.append(f"audio:{event.audio_text}")

    first_audio = next(i for i, e in enumerate(order) if e.startswith("audio:"))
    assert first_audio < order.index("text done")
    assert order[first_audio] == "audio:Sure, here is the answer."
    # Spoken as soon as the sentence is known to be complete: when the next delta shows what follows its full stop.
    assert order.index("text: It has") == first_audio - 1
    assert len([e for e in order if e.startswith("audio:") and e != "audio:"]) == 3


def test_stream_stop_event(fake_speech):
    stop = threading.Event()
    seen = []
    for event in fake_speech.stream(["One sentence here. ", "Two sentences here. ", "Three. "], seed=0, stop_event=stop):
        seen.append(event)
        if event.audio is not None:
            stop.set()
    assert len([e for e in seen if e.audio is not None]) == 1


def test_stream_rejects_wrong_thinker_states(fake_speech):
    with pytest.raises(ValueError, match="thinker_states"):
        list(fake_speech.stream(["Hi."], thinker_states=torch.zeros(1, 3, 65)))


# ---------------------------------------------------------------------------------------------------- real tiny pipeline
def test_speech_generator_end_to_end(speech):
    assert speech.voices[0] == "luna" and speech.sample_rate == 22050
    thinker_states = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    events = list(speech.stream(["你好，我是", "小明。", " Nice to meet you!"], thinker_states=thinker_states))
    chunks = [e for e in events if e.audio is not None]
    assert [e.audio_text for e in chunks if e.audio_text] == ["你好，我是小明。", "Nice to meet you!"]
    audio = np.concatenate([e.audio for e in chunks])
    assert audio.dtype == np.int16 and len(audio) > 0.2 * speech.sample_rate and np.abs(audio).max() > 0


@pytest.mark.parametrize("text", ["", "   \n ", "。！？……", "🎉🎉🎉", "x" * 5000, None])
def test_tts_rejects_unreadable_text(speech, text):
    with pytest.raises(ValueError) as error:
        speech.synthesize(text)
    assert str(error.value)[0].isupper()  # a sentence for the user, not a traceback fragment
    if text == "x" * 5000:
        assert str(MAX_TTS_CHARACTERS) in str(error.value)


@pytest.mark.parametrize("text", ["Mixed 中文 and English, 没问题！", "Party time 🎉🎉 let's go"])
def test_tts_reads_mixed_and_emoji_text(speech, text):
    sample_rate, pcm = speech.synthesize(text, seed=0)
    assert sample_rate == 22050 and pcm.dtype == np.int16 and len(pcm) > 0


def test_tts_unknown_voice(speech):
    with pytest.raises(ValueError, match="unknown voice"):
        speech.synthesize("Hello.", voice="nobody")


def test_speech_to_speech_on_the_tiny_checkpoint(tmp_path):
    """Audio question in; the thinker's streamed text feeds the talker; audio chunks come out while it writes."""
    from ming import MingOmni, MingProcessor
    from ming.testing.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(str(tmp_path / "tiny"))
    processor = MingProcessor.from_pretrained(ckpt)
    model = MingOmni.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    speech = SpeechGenerator.from_pretrained(ckpt)
    speech.max_new_tokens = 12

    t = np.arange(32000) / 16000
    question = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    inputs = processor([{"role": "HUMAN", "content": [{"type": "audio", "audio": (16000, question)}]}],
                       add_generation_prompt=True)  # fmt: skip
    stream = model.generate_stream(**inputs, max_new_tokens=40, do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    decoder = processor.stream_decoder()
    order = []

    def thinker_text():
        for token in stream:
            delta = decoder.push(token)
            if delta:
                order.append("text")
                yield delta
        order.append("text done")
        yield decoder.flush()

    chunks = []
    for event in speech.stream(thinker_text(), thinker_states=stream.thinker_states, seed=0):
        if event.audio is not None:
            order.append("audio")
            chunks.append(event.audio)
    assert stream.thinker_states.shape[0] == 1 and stream.thinker_states.shape[2] == 64
    assert order.count("audio") >= 2
    assert order.index("audio") < order.index("text done")
    assert all(c.dtype == np.int16 for c in chunks) and sum(map(len, chunks)) > 0
