"""Audio detokenizer (ming/speech/flow.py, hift.py, detokenizer.py): yaml, loading, lengths, parity with the reference.

Goldens in tests/fixtures/detokenizer/golden.safetensors were made by running the reference modules on the tiny
weights that `write_tiny_detokenizer` writes (see the README there).
"""

import os
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ming.speech.detokenizer import AudioDetokenizer, read_yaml
from ming.testing.speech import write_tiny_detokenizer
from ming.speech.flow import FlowConfig, frame_bucket, mel_frame_count
from ming.speech.hift import HiFTConfig, fold_weight_norm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "detokenizer")
GOLDEN = os.path.join(FIXTURES, "golden.safetensors")


@pytest.fixture(scope="module")
def talker_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("talker"))
    write_tiny_detokenizer(path)
    return path


@pytest.fixture(scope="module")
def detok(talker_dir) -> AudioDetokenizer:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return AudioDetokenizer.from_pretrained(talker_dir)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


def golden_meta() -> dict[str, str]:
    with safe_open(GOLDEN, "pt") as f:
        return f.metadata()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def state_crc(state: dict[str, torch.Tensor]) -> int:
    crc = 0
    for key in sorted(state):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(state[key].contiguous().numpy().tobytes(), crc)
    return crc


# --- yaml -------------------------------------------------------------------------------------------------------


TINY_FLOW = FlowConfig(
    input_size=32,
    encoder_output_size=32,
    encoder_attention_heads=2,
    encoder_linear_units=64,
    encoder_num_blocks=2,
    regulator_num_convs=2,
    estimator_channels=[32, 32],
    attention_head_dim=8,
    num_heads=2,
    n_blocks=1,
    num_mid_blocks=2,
)
TINY_HIFT = HiFTConfig(base_channels=32, f0_cond_channels=32)


def test_tiny_yaml_round_trip(talker_dir):
    config = read_yaml(os.path.join(talker_dir, "audio_detokenizer.yaml"))
    assert FlowConfig.from_yaml(config) == TINY_FLOW
    assert HiFTConfig.from_yaml(config) == TINY_HIFT
    # hyperpyyaml constructs: !ref resolved, !apply lists kept, 1e-06 read as a float (YAML 1.2)
    assert config["flow"]["spk_embed_dim"] == 192 and config["hift"]["sampling_rate"] == 22050
    assert config["__set_seed3"] == [1986]
    assert config["flow"]["decoder"]["cfm_params"]["content"]["sigma_min"] == 1e-06


def test_public_cosyvoice_yaml_gives_full_size_defaults():
    """The same parser reads CosyVoice-300M's public yaml (the layout the release follows) into the full sizes."""
    config = read_yaml(os.path.join(FIXTURES, "cosyvoice-300m.yaml"))
    assert FlowConfig.from_yaml(config) == FlowConfig()
    assert HiFTConfig.from_yaml(config) == HiFTConfig()
    assert config["hifigan"]["generator"]["base_channels"] == 512  # `!ref <hift>` resolved to the mapping


def test_unsupported_encoder_option_is_refused(talker_dir):
    config = read_yaml(os.path.join(talker_dir, "audio_detokenizer.yaml"))
    config["flow"]["encoder"]["use_cnn_module"] = True
    with pytest.raises(ValueError, match="use_cnn_module"):
        FlowConfig.from_yaml(config)


# --- weights ----------------------------------------------------------------------------------------------------


def test_weights_load_with_weights_only_and_release_keys(talker_dir):
    flow = torch.load(os.path.join(talker_dir, "flow.pt"), map_location="cpu", weights_only=True)
    hift = torch.load(os.path.join(talker_dir, "hift.pt"), map_location="cpu", weights_only=True)
    assert "decoder.estimator.mid_blocks.1.1.0.attn1.to_q.weight" in flow
    assert "encoder.encoders.1.self_attn.pos_bias_u" in flow
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "f0_predictor.condnet.8.weight_g"} <= set(hift)
    assert "source_downs.0.weight" in hift  # not weight-normalised in the release
    # the goldens were made from exactly these tiny weights
    meta = golden_meta()
    assert state_crc(flow) == int(meta["flow_pt_crc"]), "tiny flow weights changed: regenerate the goldens"
    assert state_crc(hift) == int(meta["hift_pt_crc"]), "tiny hift weights changed: regenerate the goldens"


def test_fold_weight_norm_matches_definition():
    v = torch.randn(6, 4, 5)
    g = torch.rand(6, 1, 1) + 0.5
    folded = fold_weight_norm({"conv.weight_g": g, "conv.weight_v": v, "conv.bias": torch.ones(6)})
    assert set(folded) == {"conv.weight", "conv.bias"}
    expected = v * g / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(folded["conv.weight"], expected)
    # torch's parametrization layout folds the same way
    new_layout = {"conv.parametrizations.weight.original0": g, "conv.parametrizations.weight.original1": v}
    torch.testing.assert_close(fold_weight_norm(new_layout)["conv.weight"], expected)


# --- parity with the reference ----------------------------------------------------------------------------------


def test_seeded_noise_is_the_reference_draw(golden):
    """A seed gives the same starting noise as `torch.manual_seed(seed)` + the release's `randn_like(mu)`."""
    noise = torch.randn(golden["flow_noise"].shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(noise, golden["flow_noise"], rtol=0, atol=0)


def test_flow_modules_match_reference(detok, golden):
    flow = detok.flow
    with torch.inference_mode():
        hidden = flow.encoder(flow.input_embedding(golden["tokens"]))
        mu = flow.length_regulator(flow.encoder_proj(hidden), golden["mu"].shape[-1])
        speaker = flow.spk_embed_affine_layer(torch.nn.functional.normalize(golden["speaker"], dim=1))
        x, t = golden["estimator_x"], golden["estimator_t"]
        velocity = flow.decoder.estimator(x, mu, t, speaker, torch.zeros_like(mu))
    assert relative_error(mu, golden["mu"]) < 1e-5
    assert relative_error(speaker, golden["estimator_spks"]) < 1e-6
    assert relative_error(velocity, golden["estimator_velocity"]) < 1e-5


def test_flow_mel_matches_reference(detok, golden):
    mel = detok.token_to_mel(golden["tokens"], golden["speaker"], generator=torch.Generator().manual_seed(11))
    assert mel.shape == golden["mel"].shape == (1, 80, 63)  # 37 tokens -> odd frame count: U-Net crop path
    assert relative_error(mel, golden["mel"]) < 1e-4
    short = detok.token_to_mel(golden["short_tokens"], golden["speaker"], generator=torch.Generator().manual_seed(11))
    assert short.shape == (1, 80, 1)
    assert relative_error(short, golden["short_mel"]) < 1e-4


def test_hift_waveform_matches_reference(detok, golden):
    wave = detok.mel_to_wave(golden["mel"], generator=torch.Generator().manual_seed(22))
    assert wave.shape == golden["wave"].shape == (63 * 256,)
    assert relative_error(wave, golden["wave"]) < 1e-4
    short = detok.mel_to_wave(golden["short_mel"], generator=torch.Generator().manual_seed(22))
    assert relative_error(short, golden["short_wave"]) < 1e-4


def test_synthesize_matches_reference_pipeline(detok, golden):
    """Flow + vocoder + 20 ms zeroing, one seed, as `torch.manual_seed(33)` before the release's flow and HiFT.

    Looser than the module tests: the vocoder integrates F0 over every sample into its source phase, so the
    ~4e-7 mel difference grows to ~2e-4 in the waveform (the same happens between two torch builds).
    """
    wave = detok.synthesize(golden["tokens"], golden["speaker"], noise_seed=33)
    assert torch.all(wave[:441] == 0)
    assert relative_error(wave, golden["synth_wave"]) < 2e-3


# --- lengths and inputs -----------------------------------------------------------------------------------------


def test_mel_frame_count_matches_reference_rule(golden):
    counts = torch.tensor([mel_frame_count(int(t), TINY_FLOW) for t in golden["frame_count_tokens"]])
    assert torch.equal(counts, golden["frame_count_frames"].long())
    # = floor(T * 441 / 256) for these lengths (the float32 rule first departs from it at 13,568 tokens)
    assert torch.equal(counts, golden["frame_count_tokens"].long() * 441 // 256)


@pytest.mark.parametrize("num_tokens", [2, 50, 101])
def test_output_length_is_tokens_over_50_seconds(detok, num_tokens):
    tokens = torch.randint(0, 4096, (1, num_tokens), generator=torch.Generator().manual_seed(num_tokens))
    wave = detok.synthesize(tokens, torch.randn(1, 192), noise_seed=0)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert len(wave) == 256 * mel_frame_count(num_tokens, TINY_FLOW)
    assert num_tokens * 441 - 512 < len(wave) <= num_tokens * 441  # 22050 / 50 = 441 samples per token
    assert detok.sample_rate == 22050
    assert wave.abs().max() <= 0.99 and torch.isfinite(wave).all()


def test_seed_makes_synthesis_deterministic(detok):
    tokens = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(0))
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(1))
    first = detok.synthesize(tokens, speaker, noise_seed=5)
    assert torch.equal(first, detok.synthesize(tokens, speaker, noise_seed=5))
    assert not torch.equal(first, detok.synthesize(tokens, speaker, noise_seed=6))


def test_one_token_gives_short_silent_clip(detok):
    wave = detok.synthesize(torch.tensor([[17]]), torch.randn(1, 192), noise_seed=0)
    assert wave.shape == (256,)  # one mel frame, inside the zeroed first 20 ms


@pytest.mark.parametrize(
    "tokens, speaker, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), torch.randn(1, 192), "no speech tokens"),
        (torch.tensor([[1, 4096]]), torch.randn(1, 192), r"\[0, 4096\)"),
        (torch.tensor([[-1, 3]]), torch.randn(1, 192), r"\[0, 4096\)"),
        (torch.tensor([[1.0, 2.0]]), torch.randn(1, 192), "integer"),
        (torch.zeros(2, 5, dtype=torch.long), torch.randn(1, 192), "one utterance"),
        (torch.tensor([[1, 2]]), torch.randn(1, 80), "192"),
    ],
)
def test_bad_input_raises_clear_error(detok, tokens, speaker, message):
    with pytest.raises(ValueError, match=message):
        detok.synthesize(tokens, speaker)


def test_empty_mel_raises(detok):
    with pytest.raises(ValueError, match="no frames"):
        detok.mel_to_wave(torch.zeros(1, 80, 0))


def test_half_precision_runs(talker_dir, detok):
    """bf16 is meant for GPUs; on CPU it checks the dtype plumbing (float32 ODE state, F0 and iSTFT)."""
    tokens = torch.randint(0, 4096, (1, 30), generator=torch.Generator().manual_seed(3))
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(4))
    half = AudioDetokenizer.from_pretrained(talker_dir, dtype=torch.bfloat16)
    assert half.hift.f0_predictor.classifier.weight.dtype == torch.float32
    mel = detok.token_to_mel(tokens, speaker, generator=torch.Generator().manual_seed(0))
    mel_half = half.token_to_mel(tokens, speaker, generator=torch.Generator().manual_seed(0))
    assert mel_half.dtype == torch.float32 and relative_error(mel_half, mel) < 0.05
    wave = detok.mel_to_wave(mel, generator=torch.Generator().manual_seed(0))
    wave_half = half.mel_to_wave(mel, generator=torch.Generator().manual_seed(0))
    assert wave_half.dtype == torch.float32 and relative_error(wave_half, wave) < 0.1


# --- padded utterances (the GPU's captured loop per padded length) ------------------------------------------------


@pytest.mark.parametrize("frames", [1, 37, 64, 101])
def test_padded_utterance_decodes_as_the_unpadded_one(detok, frames):
    """The Euler loop over a padded utterance with its frame mask (what the GPU replays for every length up to a
    bucket) gives the unpadded utterance's mel on the real frames: odd and even lengths, the halved U-Net level
    included, and padding that holds garbage (the mask must keep it out, not luck)."""
    flow = detok.flow.decoder
    generator = torch.Generator().manual_seed(frames)
    noise = torch.randn(1, 80, frames, generator=generator)
    mu = torch.randn(1, 80, frames, generator=generator)
    speaker = torch.randn(1, 80, generator=generator)
    padded = frame_bucket(frames)
    assert padded % 2 == 0 and padded >= frames
    mask = torch.zeros(1, 1, padded)
    mask[..., :frames] = 1
    garbage = torch.randn(1, 80, padded - frames, generator=generator)
    with torch.inference_mode():
        want = flow.solve(noise, mu, speaker, 4)
        got = flow.solve(torch.cat([noise, garbage], -1), torch.cat([mu, garbage.flip(-1)], -1), speaker, 4, mask)
    torch.testing.assert_close(got[..., :frames], want, rtol=1e-4, atol=1e-4)


def test_frame_buckets_cover_every_length_up_to_the_limit():
    assert [frame_bucket(n) for n in (1, 128, 129, 1024, 1025, 4096)] == [128, 128, 256, 1024, 2048, 4096]
    assert frame_bucket(4097) is None


@pytest.mark.parametrize("frames", [1, 2, 37, 64])
def test_padded_mel_vocodes_as_the_unpadded_one(detok, frames):
    """The vocoder over a padded mel with its real length (what the GPU replays for every length up to a bucket)
    gives the unpadded mel's samples: the padding kept out of every conv, the source's STFT reflected at the real
    end, the iSTFT's envelope from the real frames only. The padding holds garbage, so only the masking can pass."""
    hift = detok.hift
    generator = torch.Generator().manual_seed(frames)
    mel = torch.randn(1, 80, frames, generator=generator)
    samples = frames * hift.config.hop_size
    start, noise = hift.m_source.draw(1, samples, torch.Generator().manual_seed(7))
    padded = frame_bucket(frames)
    garbage = 3 * torch.randn(1, 80, padded - frames, generator=generator)
    noise_garbage = torch.randn(1, noise.shape[1], (padded - frames) * hift.config.hop_size, generator=generator)
    with torch.inference_mode():
        want = hift.synthesize(mel, start, noise)
        got = hift.synthesize(torch.cat([mel, garbage], -1), start, torch.cat([noise, noise_garbage], -1),
                              torch.tensor(frames))
    assert got.shape == (1, padded * hift.config.hop_size)
    torch.testing.assert_close(got[:, :samples], want, rtol=1e-4, atol=1e-5)


def test_vocoder_draws_are_the_release_order(detok):
    """forward draws the source's start phases, then its noise, from the one generator (the release's order),
    so a seed gives the same waveform as before the draws moved out of the source module."""
    hift = detok.hift
    mel = torch.randn(1, 80, 20, generator=torch.Generator().manual_seed(0))
    start, noise = hift.m_source.draw(1, 20 * hift.config.hop_size, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(hift(mel, torch.Generator().manual_seed(5)), hift.synthesize(mel, start, noise),
                                   rtol=0, atol=0)
