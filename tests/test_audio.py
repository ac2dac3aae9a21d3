"""Audio input path: Kaldi fbank + LFR + CMVN frontend and the SANM encoder, against goldens from the reference.

Goldens (tests/fixtures/audio/, see its README): the Preview processor's features and funasr 1.1.14's SANMEncoder
outputs for a tiny config. "Relative error" below = max |ours - reference| / max |reference|.
"""

from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ming.audio import (
    AudioFrontend,
    SANMEncoder,
    apply_lfr,
    kaldi_fbank,
    kaldi_mel_banks,
    kaldi_window,
    num_audio_tokens,
    read_cmvn,
    write_cmvn,
)
from ming.configs import SANMConfig

FIXTURES = Path(__file__).parent / "fixtures" / "audio"
TINY_SANM = SANMConfig(input_size=560, output_size=32, attention_heads=2, linear_units=64, num_blocks=3, kernel_size=11)
CASES = {"long": 36800, "mid": 19680, "short": 1600, "min": 400}  # samples: 2.3 s, 1.23 s, 0.1 s, 25 ms


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "goldens.safetensors")


@pytest.fixture(scope="module")
def frontend() -> AudioFrontend:
    return AudioFrontend(FIXTURES / "am.mvn")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_encoder(goldens) -> SANMEncoder:
    encoder = SANMEncoder(TINY_SANM).eval()
    weights = {k.removeprefix("sanm."): v for k, v in goldens.items() if k.startswith("sanm.")}
    encoder.load_state_dict(weights, strict=True)  # strict: our parameter names are funasr's, all of them
    return encoder


# ---------------------------------------------------------------------------------------------------- am.mvn


def test_read_cmvn_matches_reference_loader(goldens):
    shift, scale = read_cmvn(FIXTURES / "am.mvn")
    assert torch.equal(shift, goldens["cmvn_shift"])
    assert torch.equal(scale, goldens["cmvn_scale"])


def test_write_cmvn_reproduces_the_fixture_file(goldens, tmp_path):
    # The fixture file was written by write_cmvn and read by the reference's and funasr's loaders (see README).
    write_cmvn(tmp_path / "am.mvn", goldens["cmvn_shift"], goldens["cmvn_scale"])
    assert (tmp_path / "am.mvn").read_text() == (FIXTURES / "am.mvn").read_text()


def test_write_read_cmvn_round_trip_is_exact(tmp_path):
    shift = torch.randn(560) * torch.logspace(-30, 30, 560)
    scale = torch.rand(560)
    scale[:4] = torch.tensor([1e-38, 3.4e38, -0.0, 1e-45])  # smallest normal, near max, signed zero, subnormal
    write_cmvn(tmp_path / "am.mvn", shift, scale)
    read_shift, read_scale = read_cmvn(tmp_path / "am.mvn")
    assert torch.equal(read_shift, shift) and torch.equal(read_scale, scale)


def test_read_cmvn_accepts_the_release_layout(tmp_path):
    # The release file has trailing spaces after the tags and a <Splice> block before <AddShift>.
    values = " ".join(["1.5"] * 560)
    text = f"<Nnet> \n<Splice> 560 560\n[ 0 ]\n<AddShift> 560 560 \n<LearnRateCoef> 0 [ {values} ]\n"
    text += f"<Rescale> 560 560 \n<LearnRateCoef> 0 [ {values.replace('1.5', '0.25')} ]\n</Nnet> \n"
    (tmp_path / "am.mvn").write_text(text)
    shift, scale = read_cmvn(tmp_path / "am.mvn")
    assert torch.equal(shift, torch.full((560,), 1.5)) and torch.equal(scale, torch.full((560,), 0.25))


# ---------------------------------------------------------------------------------------------------- frontend


def kaldi_native_fbank(waveform: np.ndarray, window: str) -> torch.Tensor:
    """80-bin fbank from kaldi-native-fbank, an implementation independent of ours (C++ Kaldi port), no dither."""
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = 16000
    options.frame_opts.dither = 0.0
    options.frame_opts.window_type = window
    options.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(16000, np.asarray(waveform, dtype=np.float32).tolist())
    fbank.input_finished()
    return torch.tensor(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


@pytest.mark.parametrize("case", CASES)
def test_frontend_fbank_matches_torchaudio_kaldi(goldens, frontend, case):
    # The frontend's own window and mel banks, not ones built here, so a wrong window in the frontend fails.
    waveform = goldens["waveform"][: CASES[case]]
    fbank = kaldi_fbank(waveform * 32768.0, frontend.mel_banks, frontend.window)
    reference = goldens[f"{case}.fbank"]
    assert fbank.shape == reference.shape
    assert relative_error(fbank, reference) < 1e-4


@pytest.mark.parametrize("scale", [1.0, 32768.0])
def test_frontend_fbank_matches_kaldi_native_fbank(goldens, frontend, scale):
    waveform = goldens["waveform"] * scale
    reference = kaldi_native_fbank(waveform.numpy(), window="hamming")
    fbank = kaldi_fbank(waveform, frontend.mel_banks, frontend.window)
    assert fbank.shape == reference.shape
    assert relative_error(fbank, reference) < 1e-4


@pytest.mark.parametrize("scale", [1.0, 32768.0])
def test_povey_fbank_matches_kaldi_native_fbank(goldens, scale):
    waveform = goldens["waveform"] * scale
    reference = kaldi_native_fbank(waveform.numpy(), window="povey")
    fbank = kaldi_fbank(waveform, kaldi_mel_banks(), kaldi_window("povey"))
    assert fbank.shape == reference.shape
    assert relative_error(fbank, reference) < 1e-4


def test_windows_differ_and_unknown_window_is_refused():
    assert not torch.allclose(kaldi_window("hamming"), kaldi_window("povey"), atol=1e-3)
    with pytest.raises(ValueError, match="unknown fbank window"):
        kaldi_window("hann")


@pytest.mark.parametrize("case", CASES)
def test_lfr_matches_reference(goldens, case):
    # LFR only gathers frames, so it must be exact.
    assert torch.equal(apply_lfr(goldens[f"{case}.fbank"]), goldens[f"{case}.lfr"])


@pytest.mark.parametrize("case", CASES)
def test_frontend_matches_reference_processor(goldens, frontend, case):
    features = frontend(goldens["waveform"][: CASES[case]])
    reference = goldens[f"{case}.feats"]
    assert features.dtype == torch.float32
    assert features.shape == reference.shape
    assert features.shape[0] == num_audio_tokens(CASES[case])
    assert relative_error(features, reference) < 1e-4


def test_num_audio_tokens_matches_frontend(frontend):
    generator = torch.Generator().manual_seed(0)
    for num_samples in [400, 401, 559, 560, 1359, 1360, 1361, 2320, 2321, 3000, 4321, 16000, 32000]:
        waveform = 0.1 * torch.randn(num_samples, generator=generator)
        assert frontend(waveform).shape == (num_audio_tokens(num_samples), 560), num_samples
    assert num_audio_tokens(32000) == 33  # 2 s of audio: 198 fbank frames -> 33 LFR frames


def test_too_short_audio_raises_value_error(frontend):
    for num_samples in [0, 1, 399]:
        with pytest.raises(ValueError, match="too short"):
            frontend(torch.zeros(num_samples))
        with pytest.raises(ValueError, match="too short"):
            num_audio_tokens(num_samples)
    assert frontend(torch.zeros(400)).shape == (1, 560)  # one 25 ms frame is the minimum


def test_frontend_from_tensors_equals_from_file(goldens, frontend):
    from_tensors = AudioFrontend(shift=goldens["cmvn_shift"], scale=goldens["cmvn_scale"])
    waveform = goldens["waveform"][:4000]
    assert torch.equal(from_tensors(waveform), frontend(waveform))


# ---------------------------------------------------------------------------------------------------- SANM encoder


def test_encoder_matches_funasr_on_a_padded_batch(goldens, tiny_encoder):
    feats, lengths = goldens["batch.feats"], goldens["batch.lengths"][:, 0]
    with torch.no_grad():
        hidden, out_lengths = tiny_encoder(feats, lengths)
    assert hidden.shape == goldens["sanm_out.batch"].shape
    assert torch.equal(out_lengths, goldens["sanm_out.batch_lengths"])
    for b, length in enumerate(lengths.tolist()):
        assert relative_error(hidden[b, :length], goldens["sanm_out.batch"][b, :length]) < 1e-4
        assert relative_error(hidden[b, :length], goldens[f"sanm_out.single{b}"]) < 1e-4
        assert torch.all(hidden[b, length:] == 0)  # padded frames are zeroed (funasr leaves values there)


def test_encoder_padded_batch_equals_single_runs(tiny_encoder):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([13, 30, 4])
    feats = torch.randn(3, 30, 560, generator=generator)
    for b, length in enumerate(lengths.tolist()):
        feats[b, length:] = 1e3 * torch.randn(30 - length, 560, generator=generator)  # loud garbage in the padding
    with torch.no_grad():
        hidden, _ = tiny_encoder(feats, lengths)
        for b, length in enumerate(lengths.tolist()):
            alone, _ = tiny_encoder(feats[b : b + 1, :length], lengths[b : b + 1])
            torch.testing.assert_close(hidden[b, :length], alone[0], rtol=1e-5, atol=1e-5)


def test_encoder_parameter_names_are_the_release_keys():
    with torch.device("meta"):
        encoder = SANMEncoder(SANMConfig())  # the release: 560 -> 512, 50 blocks, kernel 11
    shapes = {name: tuple(p.shape) for name, p in encoder.named_parameters()}
    assert shapes["encoders0.0.self_attn.linear_q_k_v.weight"] == (1536, 560)
    assert shapes["encoders0.0.self_attn.fsmn_block.weight"] == (512, 1, 11)
    assert shapes["encoders0.0.norm1.weight"] == (560,)
    assert shapes["encoders.48.feed_forward.w_1.weight"] == (2048, 512)
    assert shapes["encoders.48.feed_forward.w_2.bias"] == (512,)
    assert shapes["after_norm.bias"] == (512,)
    assert "encoders.49.norm1.weight" not in shapes
    blocks = ["encoders0.0", *(f"encoders.{i}" for i in range(49))]
    with_bias = ["norm1", "norm2", "self_attn.linear_q_k_v", "self_attn.linear_out", "feed_forward.w_1",
                 "feed_forward.w_2"]
    expected = {f"{block}.{module}.{p}" for block in blocks for module in with_bias for p in ("weight", "bias")}
    expected |= {f"{block}.self_attn.fsmn_block.weight" for block in blocks}
    expected |= {"after_norm.weight", "after_norm.bias"}
    assert set(shapes) == expected
