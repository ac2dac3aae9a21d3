"""Audio input path of Ming-Lite-Omni-Preview: waveform -> 560-dim features -> SANM encoder states.

Frontend (runs in the processor, on CPU):
    16 kHz mono float waveform in [-1, 1]
    -> Kaldi-compatible 80-bin log-mel filterbank (25 ms Hamming frames every 10 ms, `snip_edges`, no dither)
    -> low frame rate (LFR): stack 7 consecutive frames every 6 frames -> 560 dims, one frame per 60 ms
    -> CMVN from the release's `am.mvn`: (x + shift) * scale

Encoder (runs in the model): the FunASR SANM encoder. Each block is a pre-norm transformer layer whose attention
output is summed with an FSMN "memory" (a depthwise 1-D convolution over the value projection). The first block
maps 560 -> D and so has no attention residual. Parameter names equal the release's keys under `audio.`.

One LFR frame becomes one LLM token (no downsampling), so `num_audio_tokens` is also the placeholder length.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .configs import SANMConfig
from .layers import sdpa

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH = 400  # samples: 25 ms
FRAME_SHIFT = 160  # samples: 10 ms
FFT_SIZE = 512  # the frame length rounded up to a power of two, as Kaldi does
PREEMPHASIS = 0.97
LOW_FREQ = 20.0  # Hz, Kaldi's default lower edge of the first mel triangle
LFR_M = 7  # frames stacked into one LFR frame
LFR_N = 6  # hop between LFR frames
LFR_LEFT_PAD = (LFR_M - 1) // 2  # copies of frame 0 in front, so LFR frame i is centred on fbank frame 6i
FEATURE_DIM = NUM_MEL_BINS * LFR_M  # 560


# ---------------------------------------------------------------------------------------------------- CMVN file


def read_cmvn(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `am.mvn` (Kaldi nnet text: `<AddShift>` and `<Rescale>` components) -> (shift, scale), float32 [560].

    The vector of each component is the bracketed list after its `<LearnRateCoef> 0`."""
    with open(path, encoding="utf-8") as f:
        tokens = f.read().split()

    def vector_after(component: str) -> torch.Tensor:
        if component not in tokens:
            raise ValueError(f"{os.fspath(path)}: no {component} component")
        start = tokens.index("[", tokens.index(component)) + 1
        end = tokens.index("]", start)
        return torch.tensor([float(t) for t in tokens[start:end]], dtype=torch.float32)

    shift, scale = vector_after("<AddShift>"), vector_after("<Rescale>")
    if shift.shape != scale.shape:
        raise ValueError(f"{os.fspath(path)}: shift has {shift.numel()} values but scale has {scale.numel()}")
    return shift, scale


def _float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32, so files stay small and round-trip exactly."""
    target = torch.tensor(value, dtype=torch.float32)
    for digits in range(6, 9):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=torch.float32) == target:
            return text
    return f"{value:.9g}"  # 9 significant digits always identify a float32


def write_cmvn(path: str | os.PathLike, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Write `am.mvn` in the layout FunASR's loader reads: each vector on the line after its component tag,
    as `<LearnRateCoef> 0 [ v1 v2 ... ]`."""
    shift, scale = shift.detach().float().reshape(-1), scale.detach().float().reshape(-1)
    if shift.shape != scale.shape:
        raise ValueError(f"shift has {shift.numel()} values but scale has {scale.numel()}")
    dim = shift.numel()

    def vector(values: torch.Tensor) -> str:
        return "<LearnRateCoef> 0 [ " + " ".join(_float32_text(v) for v in values.tolist()) + " ]"

    lines = [
        "<Nnet>",
        f"<Splice> {dim} {dim}",
        "[ 0 ]",
        f"<AddShift> {dim} {dim}",
        vector(shift),
        f"<Rescale> {dim} {dim}",
        vector(scale),
        "</Nnet>",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- frontend


def _check_length(num_samples: int) -> None:
    if num_samples < FRAME_LENGTH:
        raise ValueError(
            f"audio is too short: {num_samples} samples at 16 kHz; at least {FRAME_LENGTH} (25 ms, one fbank frame) "
            "are needed"
        )


def num_fbank_frames(num_samples: int) -> int:
    """Kaldi frame count with `snip_edges`: only frames that fit entirely in the signal."""
    _check_length(num_samples)
    return 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def num_audio_tokens(num_samples: int) -> int:
    """LFR frames (= audio placeholder tokens) for a 16 kHz waveform of `num_samples` samples.

    Raises ValueError below 400 samples (25 ms), where there is no fbank frame at all."""
    return -(-num_fbank_frames(num_samples) // LFR_N)  # ceil: the last LFR frame is completed by repetition


def _mel(hz: torch.Tensor) -> torch.Tensor:
    """Kaldi's mel scale."""
    return 1127.0 * (1.0 + hz / 700.0).log()


def kaldi_mel_banks() -> torch.Tensor:
    """Triangular filters [80, 257] over the power spectrum, equally spaced on Kaldi's mel scale from 20 Hz to
    Nyquist. Computed in float32 in the same order as torchaudio's Kaldi port, to match it to the last bit."""
    # Band edges as Python floats (float64), FFT bin frequencies as float32 tensors: torchaudio's precision.
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + (SAMPLE_RATE / 2) / 700.0)
    mel_step = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    bin_index = torch.arange(NUM_MEL_BINS).unsqueeze(1)
    left = mel_low + bin_index * mel_step
    center = mel_low + (bin_index + 1.0) * mel_step
    right = mel_low + (bin_index + 2.0) * mel_step

    fft_bin_mel = _mel((SAMPLE_RATE / FFT_SIZE) * torch.arange(FFT_SIZE // 2)).unsqueeze(0)
    rising = (fft_bin_mel - left) / (center - left)
    falling = (right - fft_bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return F.pad(banks, (0, 1))  # the Nyquist bin gets no weight


WindowKind = Literal["hamming", "povey"]


def kaldi_window(kind: WindowKind) -> torch.Tensor:
    """Kaldi's analysis window [400], symmetric (periodic=False) as Kaldi builds it.

    "hamming": what the Preview's audio encoder was trained with. "povey" (Kaldi's default, a Hann window raised
    to 0.85): what CAM++ speaker embeddings are computed with."""
    if kind == "hamming":
        return torch.hamming_window(FRAME_LENGTH, periodic=False, alpha=0.54, beta=0.46)
    if kind == "povey":
        return torch.hann_window(FRAME_LENGTH, periodic=False).pow(0.85)
    raise ValueError(f"unknown fbank window {kind!r}; expected 'hamming' or 'povey'")


def kaldi_fbank(waveform: torch.Tensor, mel_banks: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Log-mel filterbank [frames, 80] of a float32 waveform (Kaldi's defaults: 25/10 ms frames, `snip_edges`,
    DC removal, pre-emphasis 0.97, power spectrum, log floored at float32 eps, no dither).

    The waveform's scale only matters where energies reach the log floor: the audio encoder feeds the int16 range
    (x32768, as its training did), CAM++ feeds [-1, 1] (as CosyVoice and 3D-Speaker do)."""
    frames = waveform.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)  # DC removal, per frame
    # Pre-emphasis inside each frame; the first sample uses itself as its predecessor.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - PREEMPHASIS * previous) * window
    frames = F.pad(frames, (0, FFT_SIZE - FRAME_LENGTH))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    energies = power @ mel_banks.T
    return energies.clamp_min(torch.finfo(torch.float32).eps).log()


def apply_lfr(fbank: torch.Tensor) -> torch.Tensor:
    """Stack frames: LFR frame i = fbank frames 6i-3 .. 6i+3 -> [ceil(T / 6), 560].

    Indices before the start repeat frame 0 (the 3-frame left pad) and indices past the end repeat the last frame
    (how the final, incomplete LFR frame is filled)."""
    num_frames = fbank.shape[0]
    num_lfr = -(-num_frames // LFR_N)
    starts = torch.arange(num_lfr).unsqueeze(1) * LFR_N - LFR_LEFT_PAD
    indices = (starts + torch.arange(LFR_M)).clamp(0, num_frames - 1)
    return fbank[indices].reshape(num_lfr, LFR_M * fbank.shape[1])


class AudioFrontend:
    """16 kHz waveform -> CMVN-normalised LFR features, exactly as the Preview processor computes them.

    Build it from the release's `am.mvn` (`AudioFrontend("ckpt/am.mvn")`) or from tensors
    (`AudioFrontend(shift=..., scale=...)`).
    """

    def __init__(
        self,
        cmvn_file: str | os.PathLike | None = None,
        *,
        shift: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ):
        if cmvn_file is not None:
            if shift is not None or scale is not None:
                raise ValueError("give either cmvn_file or shift and scale, not both")
            shift, scale = read_cmvn(cmvn_file)
        elif shift is None or scale is None:
            raise ValueError("give cmvn_file, or both shift and scale")
        if shift.numel() != FEATURE_DIM or scale.numel() != FEATURE_DIM:
            raise ValueError(f"CMVN vectors must have {FEATURE_DIM} values, got {shift.numel()} and {scale.numel()}")
        self.shift = shift.detach().float().reshape(-1)
        self.scale = scale.detach().float().reshape(-1)
        self.mel_banks = kaldi_mel_banks()
        self.window = kaldi_window("hamming")

    def __call__(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        """waveform [samples] float in [-1, 1] at 16 kHz -> features [num_audio_tokens(samples), 560] float32.

        Raises ValueError for a waveform that is not 1-D, or shorter than 400 samples (25 ms)."""
        waveform = torch.as_tensor(waveform_16k).cpu()
        if waveform.dim() != 1:
            raise ValueError(f"expected a 1-D (mono) waveform, got shape {tuple(waveform.shape)}")
        _check_length(waveform.numel())
        waveform = waveform.float() * 32768.0  # Kaldi works on the int16 scale (this matters for the log floor)
        features = apply_lfr(kaldi_fbank(waveform, self.mel_banks, self.window))
        return (features + self.shift) * self.scale


# ---------------------------------------------------------------------------------------------------- SANM encoder


def sinusoidal_position_encoding(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim] float32 = [sin | cos] of positions 1..T (1-based) over `dim / 2` geometric
    frequencies from 1 down to 1/10000 (the FunASR/tensor2tensor layout: not interleaved)."""
    half = dim // 2
    positions = torch.arange(1, num_positions + 1, dtype=torch.float32)
    log_step = torch.log(torch.tensor(10000.0)) / (half - 1)
    inv_timescales = torch.exp(torch.arange(half, dtype=torch.float32) * -log_step)
    angles = positions[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SANMAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory branch over the values.

    Padded frames are excluded as attention keys, and zeroed before and after the FSMN convolution, so they
    never reach a valid frame."""

    def __init__(self, in_size: int, size: int, num_heads: int, kernel_size: int, sanm_shift: int):
        super().__init__()
        if size % num_heads:
            raise ValueError(f"output size {size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = size // num_heads
        self.linear_q_k_v = nn.Linear(in_size, 3 * size)
        self.linear_out = nn.Linear(size, size)
        self.fsmn_block = nn.Conv1d(size, size, kernel_size, groups=size, bias=False)  # depthwise, [D, 1, k]
        # Zero padding keeps the length; a positive sanm_shift moves the window towards the past.
        self.left_pad = (kernel_size - 1) // 2 + sanm_shift
        self.right_pad = kernel_size - 1 - self.left_pad

    def fsmn_memory(self, value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """value [B, T, D] -> memory [B, T, D]: the masked value plus its depthwise convolution over time."""
        value = value * valid
        memory = self.fsmn_block(F.pad(value.transpose(1, 2), (self.left_pad, self.right_pad))).transpose(1, 2)
        return (memory + value) * valid

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, in_size], key_mask [B, T] bool (True = real frame) -> [B, T, size]."""
        batch, length, _ = x.shape
        query, key, value = self.linear_q_k_v(x).chunk(3, dim=-1)
        memory = self.fsmn_memory(value, key_mask.unsqueeze(-1).to(value.dtype))

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        attended = sdpa(heads(query), heads(key), heads(value), key_mask[:, None, None, :])
        attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.linear_out(attended) + memory


class SANMFeedForward(nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class SANMBlock(nn.Module):
    """Pre-norm block. The attention residual exists only when the block keeps the width (not in the 560 -> D
    first block); the feed-forward residual always does."""

    def __init__(self, in_size: int, config: SANMConfig):
        super().__init__()
        size = config.output_size
        self.has_attention_residual = in_size == size
        # FunASR's LayerNorm uses eps 1e-12.
        self.norm1 = nn.LayerNorm(in_size, eps=1e-12)
        self.self_attn = SANMAttention(in_size, size, config.attention_heads, config.kernel_size, config.sanm_shfit)
        self.norm2 = nn.LayerNorm(size, eps=1e-12)
        self.feed_forward = SANMFeedForward(size, config.linear_units)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        attended = self.self_attn(self.norm1(x), key_mask)
        x = x + attended if self.has_attention_residual else attended
        return x + self.feed_forward(self.norm2(x))


class SANMEncoder(nn.Module):
    """FunASR SANMEncoder with `input_layer="pe"` (no subsampling): [B, T, 560] -> [B, T, D]."""

    def __init__(self, config: SANMConfig):
        super().__init__()
        # The release's variant; other funasr options (subsampling input layers, post-norm) are not implemented.
        variant = (config.extra.get("input_layer", "pe"), config.extra.get("selfattention_layer_type", "sanm"))
        if variant != ("pe", "sanm") or not config.normalize_before:
            raise ValueError(f"unsupported SANM variant: input_layer/selfattention_layer_type {variant}, "
                             f"normalize_before={config.normalize_before}")
        self.config = config
        self.encoders0 = nn.ModuleList([SANMBlock(config.input_size, config)])
        self.encoders = nn.ModuleList([SANMBlock(config.output_size, config) for _ in range(config.num_blocks - 1)])
        self.after_norm = nn.LayerNorm(config.output_size, eps=1e-12)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, input_size] (right-padded), lengths [B] valid frames -> (hidden [B, T, D], lengths [B]).

        Frames at or past a sample's length do not influence its valid frames, so a padded batch gives the same
        valid frames as running each sample alone. Padded frames of `hidden` are set to zero."""
        length = feats.shape[1]
        lengths = lengths.to(feats.device)
        key_mask = torch.arange(length, device=feats.device)[None, :] < lengths[:, None]

        # The scale is sqrt(output size) although the PE is added at the input width: FunASR does it this way.
        x = feats * self.config.output_size**0.5
        x = x + sinusoidal_position_encoding(length, feats.shape[-1]).to(feats.device, feats.dtype)
        for block in [*self.encoders0, *self.encoders]:
            x = block(x, key_mask)
        hidden = self.after_norm(x).masked_fill(~key_mask.unsqueeze(-1), 0.0)
        return hidden, lengths
