"""HiFT vocoder (HiFTNet: neural source filter + iSTFT, as in CosyVoice-1): 80-bin mel -> 22,050 Hz waveform.

  mel -> F0 predictor (convs, |linear|) -> F0 per frame -> upsampled to samples -> harmonic sine source + noise
  (neural source filter) -> STFT of the source;
  mel -> conv -> [leaky ReLU, transposed-conv upsample, + downsampled source STFT, multi-receptive-field resblocks]
  per upsampling stage -> conv to (n_fft/2+1) log-magnitudes and phases -> iSTFT -> clamp.

Each mel frame becomes prod(upsample_rates) * hop_len = 8 * 8 * 4 = 256 samples.

Module attribute paths equal the release's `hift.pt` keys. The release wraps most convs in (old-style) weight
normalisation, so its file stores `weight_g` / `weight_v` pairs; `fold_weight_norm` turns each pair into the plain
`weight` these modules use (computed once at load instead of on every call).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HiFTConfig:
    """The numbers of the `hift:` section of `audio_detokenizer.yaml` (defaults = CosyVoice-300M)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: list[int] = field(default_factory=lambda: [8, 8])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 16])
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 3)
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5]] * 2)
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_cond_channels: int = 512

    @property
    def hop_size(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates) * self.istft_hop_len

    @classmethod
    def from_yaml(cls, config: dict) -> HiFTConfig:
        """Read the numbers from a parsed `audio_detokenizer.yaml` (see `ming.speech.detokenizer.read_yaml`)."""
        hift = config["hift"]
        f0 = hift["f0_predictor"]
        if f0.get("in_channels", hift["in_channels"]) != hift["in_channels"]:
            raise ValueError("hift.f0_predictor.in_channels must equal hift.in_channels")
        return cls(
            in_channels=hift["in_channels"],
            base_channels=hift["base_channels"],
            nb_harmonics=hift["nb_harmonics"],
            sampling_rate=hift["sampling_rate"],
            nsf_alpha=float(hift["nsf_alpha"]),
            nsf_sigma=float(hift["nsf_sigma"]),
            nsf_voiced_threshold=float(hift["nsf_voiced_threshold"]),
            upsample_rates=list(hift["upsample_rates"]),
            upsample_kernel_sizes=list(hift["upsample_kernel_sizes"]),
            istft_n_fft=hift["istft_params"]["n_fft"],
            istft_hop_len=hift["istft_params"]["hop_len"],
            resblock_kernel_sizes=list(hift["resblock_kernel_sizes"]),
            resblock_dilation_sizes=[list(d) for d in hift["resblock_dilation_sizes"]],
            source_resblock_kernel_sizes=list(hift["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=[list(d) for d in hift["source_resblock_dilation_sizes"]],
            lrelu_slope=float(hift["lrelu_slope"]),
            audio_limit=float(hift["audio_limit"]),
            f0_num_class=f0.get("num_class", 1),
            f0_cond_channels=f0["cond_channels"],
        )


# Convs the release wraps in weight normalisation (their keys come as `<name>.weight_g` + `<name>.weight_v`).
WEIGHT_NORMED_MODULES = re.compile(
    r"^(conv_pre|conv_post|ups\.\d+|(source_)?resblocks\.\d+\.convs[12]\.\d+|f0_predictor\.condnet\.\d+)$"
)


_WEIGHT_NORM_LAYOUTS = (
    (".weight_g", ".weight_v"),  # torch.nn.utils.weight_norm (what the release was saved with)
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),  # torch's parametrize version
)


def fold_weight_norm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight-norm (g, v) pair by `weight = v * (g / ||v||)`, the norm taken over all dims but 0.

    Accepts both layouts in `_WEIGHT_NORM_LAYOUTS`; other keys pass through unchanged. The fold uses
    `torch._weight_norm`, the kernel both of torch's weight-norm wrappers call, so the weights are bit-identical to
    the ones the release computes on every call. That matters here: the source module integrates F0 over every
    sample (a cumulative sum), which turns a 1e-7 difference in F0 into ~1e-4 in the waveform.
    """
    folded: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        layout = next(((g, v) for g, v in _WEIGHT_NORM_LAYOUTS if key.endswith(g) or key.endswith(v)), None)
        if layout is None:
            folded[key] = value
            continue
        g_suffix, v_suffix = layout
        if key.endswith(v_suffix):
            continue  # folded together with its g
        prefix = key[: -len(g_suffix)]
        folded[prefix + ".weight"] = torch._weight_norm(state_dict[prefix + v_suffix], value, 0)
    return folded


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel (periodic inductive bias for waveforms)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1)
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation: Snake -> dilated conv -> Snake -> conv, with a residual around each pair."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Five conv + ELU layers, then |linear| per frame: mel [B, 80, T] -> F0 in Hz [B, T]."""

    def __init__(self, in_channels: int, channels: int, num_class: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class HarmonicSource(nn.Module):
    """Neural source filter excitation: F0 harmonics as sines (noise where unvoiced), merged by linear + tanh."""

    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.sampling_rate = config.sampling_rate
        self.num_harmonics = config.nb_harmonics + 1  # fundamental + overtones
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.num_harmonics, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """f0 [B, samples] (Hz, float32) -> excitation [B, 1, samples].

        Random draws, in the release's order: a start phase per overtone, U(-pi, pi) (the fundamental starts at
        0), then Gaussian noise per harmonic and sample. Drawn on the CPU from `generator`.
        """
        batch, length = f0.shape
        harmonics = torch.arange(1, self.num_harmonics + 1, device=f0.device, dtype=torch.float32)
        cycles = f0.unsqueeze(1) * harmonics.view(1, -1, 1) / self.sampling_rate  # cycles per sample
        phase = 2 * math.pi * (torch.cumsum(cycles, dim=-1) % 1)

        start = -math.pi + torch.rand((batch, self.num_harmonics, 1), generator=generator) * (2 * math.pi)
        start[:, 0] = 0
        noise = torch.randn((batch, self.num_harmonics, length), generator=generator).to(f0.device)
        sines = self.sine_amp * torch.sin(phase + start.to(f0.device))

        voiced = (f0 > self.voiced_threshold).float().unsqueeze(1)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        sines = sines * voiced + noise_amp * noise
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    def __init__(self, config: HiFTConfig):
        super().__init__()
        self.config = config
        base = config.base_channels
        n_fft = config.istft_n_fft
        self.f0_predictor = F0Predictor(config.in_channels, config.f0_cond_channels, config.f0_num_class)
        self.m_source = HarmonicSource(config)
        self.conv_pre = nn.Conv1d(config.in_channels, base, 7, 1, padding=3)

        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))
        )

        # The source STFT enters every stage, brought down to that stage's frame rate by a strided conv.
        stage_strides = [math.prod(config.upsample_rates[i + 1 :]) for i in range(len(config.upsample_rates))]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (stride, k, d) in enumerate(
            zip(stage_strides, config.source_resblock_kernel_sizes, config.source_resblock_dilation_sizes)
        ):
            out = base // 2 ** (i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(n_fft + 2, out, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(n_fft + 2, out, stride * 2, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(out, k, d))

        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), n_fft + 2, 7, 1, padding=3)

    def cast_convs(self, dtype: torch.dtype) -> HiFTGenerator:
        """Cast the conv stack to `dtype` (bf16 / fp16 on GPUs), keeping the F0 predictor and the source merge in
        float32: F0 is integrated over every sample into the source phase, which amplifies its rounding errors,
        and both are tiny."""
        for name, child in self.named_children():
            if name not in ("f0_predictor", "m_source"):
                child.to(dtype)
        return self

    def _window(self, device: torch.device) -> torch.Tensor:
        # scipy's periodic Hann as the release builds it: float64, then float32
        return torch.hann_window(self.config.istft_n_fft, periodic=True, dtype=torch.float64, device=device).float()

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        spec = torch.stft(x, n_fft, hop, n_fft, window=self._window(x.device), return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        spec = torch.polar(magnitude.clamp(max=1e2), phase)
        return torch.istft(spec, n_fft, hop, n_fft, window=self._window(spec.device))

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> waveform [B, T * hop_size] float32 in [-audio_limit, audio_limit].

        Convs run in their dtype (see `cast_convs`); F0, the sine source, STFT and iSTFT run in float32.
        """
        config = self.config
        dtype = self.conv_pre.weight.dtype
        mel = mel.to(self.conv_pre.weight.device)

        f0 = self.f0_predictor(mel.float()).repeat_interleave(config.hop_size, dim=-1)  # nearest, to the sample rate
        source = self._stft(self.m_source(f0, generator).squeeze(1)).to(dtype)

        x = self.conv_pre(mel.to(dtype))
        kernels_per_stage = len(config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, config.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame, so the iSTFT yields exactly T * hop
            x = x + self.source_resblocks[i](self.source_downs[i](source))
            stage = self.resblocks[i * kernels_per_stage : (i + 1) * kernels_per_stage]
            total = stage[0](x)
            for block in stage[1:]:
                total = total + block(x)
            x = total / kernels_per_stage
        x = self.conv_post(F.leaky_relu(x)).float()  # the release uses the default slope 0.01 here

        bins = config.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins])
        phase = torch.sin(x[:, bins:])  # the release squashes the phase with sin; kept for identical output
        wave = self._istft(magnitude, phase)
        return wave.clamp(-config.audio_limit, config.audio_limit)
