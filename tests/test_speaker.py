"""One-shot voice cloning: the CAM++ speaker encoder (run on the random stand-in through the real loading code),
its povey fbank, the voice-sample assessment, and a cloned voice driving the tiny speech pipeline.

No network: the hub fallback is never reached (only its offline answers are checked).
"""

import os
import warnings

import numpy as np
import pytest
import soundfile
import torch
from torch import nn

from ming.speech import SpeechGenerator
from ming.speech.speaker import (
    MIN_SPEAKER_SIMILARITY,
    Reason,
    SpeakerEncoder,
    SpeakerModelError,
    SpeakerModelUnavailable,
    assess_voice_sample,
    download_speaker_model,
    find_speaker_model,
    load_speaker_encoder,
    speaker_features,
)
from ming.testing.campplus import EMBEDDING_NORM, synthetic_voice, write_random_campplus
from ming.testing.speech import write_tiny_speech_assets
from test_audio import kaldi_native_fbank

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "audio")
SR = 16000


def example(name: str) -> np.ndarray:
    waveform, sample_rate = soundfile.read(os.path.join(EXAMPLES, name), dtype="float32")
    assert sample_rate == SR  # the examples are written at 16 kHz
    return waveform


def low_voice(seconds: float, seed: int = 1) -> np.ndarray:
    return synthetic_voice(110, seconds, seed=seed)


def high_voice(seconds: float, seed: int = 2) -> np.ndarray:
    return synthetic_voice(220, seconds, seed=seed, formant_scale=1.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A folder with the stand-in where the release keeps it: talker/campplus.onnx."""
    path = tmp_path_factory.mktemp("speaker_ckpt")
    write_random_campplus(path / "talker" / "campplus.onnx")
    return str(path)


@pytest.fixture(scope="module")
def encoder(checkpoint) -> SpeakerEncoder:
    return load_speaker_encoder(checkpoint, download=False)  # the path a real checkpoint's file takes


# ---------------------------------------------------------------------------------------------------- stand-in


def test_standin_has_the_campplus_signature(encoder, checkpoint):
    assert encoder.path == os.path.join(checkpoint, "talker", "campplus.onnx")
    (given,), (produced,) = encoder.session.get_inputs(), encoder.session.get_outputs()
    assert (given.name, given.type, given.shape) == ("feature", "tensor(float)", ["B", "T", 80])
    assert (produced.type, produced.shape) == ("tensor(float)", ["B", 192])
    for batch, frames in [(1, 30), (3, 1214)]:  # dynamic batch and length
        out = encoder.embed_features(torch.randn(batch, frames, 80))
        assert out.shape == (batch, 192) and out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=1), torch.full((batch,), EMBEDDING_NORM), atol=1e-3)


def test_standin_is_deterministic(tmp_path, checkpoint):
    again = write_random_campplus(tmp_path / "campplus.onnx")
    with open(again, "rb") as f, open(find_speaker_model(checkpoint), "rb") as g:
        assert f.read() == g.read()


def test_find_speaker_model(tmp_path):
    assert find_speaker_model(tmp_path) is None
    (tmp_path / "campplus.onnx").write_bytes(b"x")
    assert find_speaker_model(tmp_path) == str(tmp_path / "campplus.onnx")
    (tmp_path / "talker").mkdir()
    (tmp_path / "talker" / "campplus.onnx").write_bytes(b"x")
    assert find_speaker_model(tmp_path) == str(tmp_path / "talker" / "campplus.onnx")  # the release's place first


def test_no_speaker_model_is_reported_without_network(tmp_path, monkeypatch):
    with pytest.raises(SpeakerModelUnavailable, match="no campplus.onnx"):
        load_speaker_encoder(tmp_path, download=False)
    monkeypatch.setenv("MING_SPEAKER_MODEL", "off")
    with pytest.raises(SpeakerModelUnavailable, match="switched off"):
        load_speaker_encoder(tmp_path)
    with pytest.raises(SpeakerModelUnavailable, match="not a file"):
        download_speaker_model(str(tmp_path / "missing.onnx"))


def test_speaker_model_from_a_local_path(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("MING_SPEAKER_MODEL", find_speaker_model(checkpoint))
    assert load_speaker_encoder(tmp_path).path == find_speaker_model(checkpoint)


class PooledLinear(nn.Module):
    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(bins, dim)

    def forward(self, feature):
        return self.linear(feature.mean(dim=1))


def export(model: nn.Module, path, bins: int = 80, dynamic_frames: bool = True) -> str:
    axes = {"feature": {0: "B", 1: "T"} if dynamic_frames else {0: "B"}, "embedding": {0: "B"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 50, bins),), str(path), input_names=["feature"],
                          output_names=["embedding"], dynamic_axes=axes, dynamo=False)  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("40 bins", r"input 'feature' is tensor\(float\) \['B', 'T', 40\]"),
        ("256-d", r"output 'embedding' is tensor\(float\) \['B', 256\]"),
        ("fixed frames", "fixed number of frames"),
        ("corrupt", "cannot load speaker model"),
    ],
)
def test_bad_speaker_model_is_refused(tmp_path, case, match):
    path = tmp_path / "campplus.onnx"
    if case == "40 bins":
        export(PooledLinear(40, 192), path, bins=40)
    elif case == "256-d":
        export(PooledLinear(80, 256), path)
    elif case == "fixed frames":
        export(PooledLinear(80, 192), path, dynamic_frames=False)
    else:
        path.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(SpeakerModelError, match=match) as error:
        SpeakerEncoder.from_file(path)
    assert isinstance(error.value, ValueError) and str(path) in str(error.value)
    with pytest.raises(SpeakerModelUnavailable, match=match):  # what the serving layer sees
        load_speaker_encoder(tmp_path, download=False)


# ---------------------------------------------------------------------------------------------------- features


def test_speaker_features_match_kaldi_native_fbank():
    waveform = example("fox_sentence.wav")
    # The reference gets the same fixed peak; mean subtraction as CosyVoice does it.
    reference = kaldi_native_fbank(waveform * (0.5 / np.abs(waveform).max()), window="povey")
    reference = reference - reference.mean(dim=0)
    features = speaker_features(waveform)
    assert features.shape == reference.shape == (506, 80)
    assert ((features - reference).abs().max() / reference.abs().max()).item() < 1e-4
    assert features.mean(dim=0).abs().max() < 1e-4


@pytest.mark.parametrize("gain", [0.1, 3.0])
def test_embedding_is_gain_invariant(encoder, gain):
    waveform = example("capital_question.wav")
    reference = encoder.embed(waveform)
    assert reference.shape == (1, 192) and reference.dtype == torch.float32
    assert torch.allclose(encoder.embed(waveform * gain), reference, atol=1e-4)


def test_embedding_tells_voices_apart(encoder):
    low, low_again = encoder.embed(low_voice(6)), encoder.embed(low_voice(6, seed=9))
    high = encoder.embed(high_voice(6))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(low, low_again).item() > cosine(low, high).item() + 0.3


# ---------------------------------------------------------------------------------------------------- assessment


def noisy(waveform: np.ndarray, snr_db: float) -> np.ndarray:
    noise = np.random.default_rng(0).standard_normal(len(waveform)).astype(np.float32)
    noise *= np.sqrt(np.mean(waveform**2) / np.mean(noise**2)) / 10 ** (snr_db / 20)
    return waveform + noise


def chords(seconds: float) -> np.ndarray:
    """Held three-note chords, a new one every second: tonal, but with no syllable rhythm."""
    t = np.arange(int(seconds * SR)) / SR
    roots = np.array([220, 277, 330, 247, 294, 370])[(t // 1).astype(int) % 6]
    return (0.2 * sum(np.sin(2 * np.pi * roots * ratio * t) for ratio in (1, 1.26, 1.5))).astype(np.float32)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("1.5 s of speech", Reason.TOO_SHORT),
        ("digital silence", Reason.SILENT),
        ("faint hiss", Reason.SILENT),
        ("white noise", Reason.NO_SPEECH),
        ("held chords", Reason.MUSIC),
        ("speech under noise at 0 dB", Reason.NOISY),
        ("two speakers", Reason.MULTIPLE_SPEAKERS),
        ("NaN", Reason.INVALID),
        ("3 minutes", Reason.TOO_LONG),
    ],
)
def test_assessment_refuses_bad_samples(encoder, case, reason):
    waveform = {
        "1.5 s of speech": lambda: example("fox_sentence.wav")[: int(1.5 * SR)],
        "digital silence": lambda: np.zeros(5 * SR, np.float32),
        "faint hiss": lambda: 1e-4 * np.random.default_rng(0).standard_normal(5 * SR).astype(np.float32),
        "white noise": lambda: 0.1 * np.random.default_rng(0).standard_normal(6 * SR).astype(np.float32),
        "held chords": lambda: chords(6),
        "speech under noise at 0 dB": lambda: noisy(example("fox_sentence.wav"), 0.0),
        "two speakers": lambda: np.concatenate([low_voice(4), high_voice(4)]),
        "NaN": lambda: np.full(3 * SR, np.nan, np.float32),
        "3 minutes": lambda: np.zeros(180 * SR, np.float32),
    }[case]()
    sample = assess_voice_sample(encoder, waveform)
    assert sample.reason == reason and not sample.ok and sample.embedding is None
    if reason == Reason.MULTIPLE_SPEAKERS:
        assert sample.speaker_similarity < MIN_SPEAKER_SIMILARITY


@pytest.mark.parametrize("case", ["one real voice, 5 s", "one synthetic voice, 8 s", "four real clips, 15 s"])
def test_assessment_accepts_one_clear_voice(encoder, case):
    names = ["capital_question.wav", "describe_request.wav", "fox_sentence.wav", "robot_story_request.wav"]
    waveform = {
        "one real voice, 5 s": lambda: example("fox_sentence.wav"),
        "one synthetic voice, 8 s": lambda: low_voice(8),
        "four real clips, 15 s": lambda: np.concatenate([example(name) for name in names]),
    }[case]()
    sample = assess_voice_sample(encoder, waveform * 0.05)  # a quiet recording is fine
    assert sample.ok, sample
    assert sample.embedding.shape == (1, 192) and abs(sample.embedding.norm().item() - EMBEDDING_NORM) < 1e-3
    assert sample.measures.speech_s >= 2.0
    if sample.speaker_similarity is not None:
        assert sample.speaker_similarity >= MIN_SPEAKER_SIMILARITY
    # Loudness does not change the verdict or the voice.
    assert torch.allclose(assess_voice_sample(encoder, waveform).embedding, sample.embedding, atol=1e-4)


def test_long_input_uses_its_best_30_seconds(encoder):
    speech = example("fox_sentence.wav")
    waveform = np.concatenate([np.zeros(25 * SR, np.float32)] + [speech] * 7)  # 25 s of silence, then 35 s of speech
    sample = assess_voice_sample(encoder, waveform)
    assert sample.ok
    assert sample.measures.end_s - sample.measures.start_s <= 30.0
    assert sample.measures.start_s >= 25.0


# ---------------------------------------------------------------------------------------------------- cloning


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("speech_ckpt"))
    write_tiny_speech_assets(path)
    generator = SpeechGenerator.from_pretrained(path)
    generator.max_new_tokens = 12  # random tiny talker: keep clips short
    return generator


def test_cloned_voice_drives_the_talker_and_flow(encoder, speech, tmp_path):
    sample = assess_voice_sample(encoder, example("fox_sentence.wav"))
    assert sample.ok
    text = "Hello there."
    _, luna = speech.synthesize(text, voice="luna", seed=3)
    _, cloned = speech.synthesize(text, voice=sample.embedding, seed=3)
    assert len(cloned) > 0 and not np.array_equal(cloned, luna)
    torch.save(sample.embedding, tmp_path / "my_voice.pt")  # the embedding is a voice file as it is
    _, from_file = speech.synthesize(text, voice=str(tmp_path / "my_voice.pt"), seed=3)
    assert np.array_equal(from_file, cloned)
