"""A random stand-in for CAM++'s `campplus.onnx`, and synthetic voices to calibrate and test it with.

The real speaker model (3D-Speaker's CAM++, exported to ONNX; Wang et al., "CAM++: A Fast and Efficient Network
for Speaker Verification Using Context-Aware Masking", Interspeech 2023) ships only with real weights. The tiny
checkpoint gets this stand-in instead, so cloning runs end to end through exactly the code that loads the real
file. It has the real export's signature: float input `feature` (B, T, 80) with dynamic B and T, mean-subtracted
povey fbank, -> float output `embedding` (B, 192).

It is a small TDNN (two 1-D convolutions with BatchNorm), mean + standard-deviation pooling, a dense layer and a
BatchNorm without affine parameters, the same head CAM++ ends with. Random weights alone would map every input to
nearly the same direction, so the BatchNorm statistics are measured on a population of synthetic voices (below):
then embeddings of different voices point different ways, as a speaker model's do. The output is scaled to an L2
norm of 13, the size of a raw CAM++ embedding (the release's `luna` has 12.85), so a cloned voice conditions the
talker at the scale a real one does.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..audio import kaldi_fbank, kaldi_mel_banks, kaldi_window
from .weights import seeded_noise

SAMPLE_RATE = 16000
EMBEDDING_NORM = 13.0
INPUT_NAME, OUTPUT_NAME = "feature", "embedding"
OPSET = 17

# Formants (Hz) of five vowels of an adult male voice; other voices scale them.
VOWEL_FORMANTS = np.array([(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)])


def synthetic_voice(
    pitch_hz: float, seconds: float, seed: int = 0, formant_scale: float = 1.0, syllables_per_second: float = 4.0
) -> np.ndarray:
    """A speech-like float32 waveform at 16 kHz, peak 0.3: a gliding harmonic source shaped by vowel formants,
    syllables with a consonant-like noise burst at each onset, a pause every sixth syllable, a faint noise floor.

    `pitch_hz` and `formant_scale` make the "speaker" (about 100 Hz and 1.0 for a low voice, 220 Hz and 1.2 for a
    high one); `seed` picks the vowel order and the noise. The vowels repeat in that order, so any two stretches of
    a few seconds of one voice sound alike."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    pitch = pitch_hz * (1 + 0.06 * np.sin(2 * np.pi * 1.0 * t + rng.uniform(0, 2 * np.pi)) + 0.02 * np.sin(7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE

    syllable = (t * syllables_per_second).astype(int)
    vowel = rng.permutation(len(VOWEL_FORMANTS))[syllable % len(VOWEL_FORMANTS)]
    harmonics = np.arange(1, int(5000 // pitch_hz) + 1)[:, None]  # [K, 1]
    # Harmonic gains change slowly: compute them every 10 ms and hold them.
    hop = SAMPLE_RATE // 100
    freqs = harmonics * pitch[::hop]  # [K, frames]
    formants = VOWEL_FORMANTS[vowel[::hop]].T[:, None, :] * formant_scale  # [3, 1, frames]
    gain = (1.0 / (1.0 + ((freqs - formants) / (60.0 + 0.1 * formants)) ** 2)).sum(axis=0) / np.sqrt(harmonics)
    voiced = (np.repeat(gain, hop, axis=1)[:, :n] * np.sin(harmonics * phase)).sum(axis=0)

    position = t * syllables_per_second % 1.0  # where in its syllable each sample is
    envelope = np.clip(np.sin(np.pi * position), 0.0, None) ** 0.7
    burst = np.diff(rng.standard_normal(n) * (position < 0.08), prepend=0.0)  # high-passed: a fricative onset
    wave = (voiced * envelope + 0.3 * voiced.std() * burst) * (syllable % 6 != 5)
    wave = 0.3 * wave / np.abs(wave).max() + 3e-4 * rng.standard_normal(n)
    return wave.astype(np.float32)


class RandomCampPlus(nn.Module):
    """(B, T, 80) mean-subtracted fbank -> (B, 192) embedding of norm EMBEDDING_NORM."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv1d(80, channels, kernel_size=5, padding=2)
        self.norm1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, padding=2, dilation=2)
        self.norm2 = nn.BatchNorm1d(channels)
        self.dense = nn.Linear(2 * channels, 192)
        self.norm3 = nn.BatchNorm1d(192, affine=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = feature.transpose(1, 2)
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        stats = torch.cat([x.mean(dim=-1), x.std(dim=-1)], dim=-1)  # unbiased std, as CAM++'s pooling
        embedding = self.norm3(self.dense(stats))
        return EMBEDDING_NORM * embedding / embedding.norm(dim=-1, keepdim=True)


def calibration_features(num_voices: int = 24, seconds: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Mean-subtracted povey fbank [num_voices, T, 80] of synthetic voices spread over pitch and formants."""
    rng = np.random.default_rng(seed)
    mel_banks, window = kaldi_mel_banks(), kaldi_window("povey")
    features = []
    for i in range(num_voices):
        wave = synthetic_voice(rng.uniform(85, 260), seconds, seed=1000 + i, formant_scale=rng.uniform(0.85, 1.3))
        fbank = kaldi_fbank(torch.from_numpy(wave), mel_banks, window)
        features.append(fbank - fbank.mean(dim=0))
    return torch.stack(features)


def random_campplus(seed: int = 0) -> RandomCampPlus:
    """The stand-in with seeded weights and BatchNorm statistics measured on synthetic voices, in eval mode."""
    model = RandomCampPlus()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.05 * seeded_noise(f"campplus.{name}", param.shape, seed))
            elif param.dim() > 1:
                param.copy_(seeded_noise(f"campplus.{name}", param.shape, seed) / param[0].numel() ** 0.5)
    # One pass in training mode with cumulative averaging sets every BatchNorm's running mean and variance.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(calibration_features(seed=seed))
    return model.eval()


def write_random_campplus(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the stand-in as an ONNX file at `path` (folders created) and return the path. Same seed, same bytes.

    Needs the `onnx` package (torch's TorchScript-based exporter writes through it)."""
    model = random_campplus(seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    example = torch.zeros(1, 200, 80)
    torch.onnx.export(
        model,
        (example,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "B", 1: "T"}, OUTPUT_NAME: {0: "B"}},
        opset_version=OPSET,
        dynamo=False,
    )
    return path
