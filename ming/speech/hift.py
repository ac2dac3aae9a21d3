"""HiFT vocoder (HiFTNet: neural source filter + iSTFT, as in CosyVoice-1): 80-bin mel -> 22,050 Hz waveform.

  mel -> F0 predictor (convs, |linear|) -> F0 per frame -> upsampled to samples -> harmonic sine source + noise
  (neural source filter) -> STFT of the source;
  mel -> conv -> [leaky ReLU, transposed-conv upsample, + downsampled source STFT, multi-receptive-field resblocks]
  per upsampling stage -> conv to (n_fft/2+1) log-magnitudes and phases -> iSTFT -> clamp.

Each mel frame becomes prod(upsample_rates) * hop_len = 8 * 8 * 4 = 256 samples.

On a GPU the whole vocoder runs from a CUDA graph captured once per padded length (`ming.speech.flow.frame_bucket`,
as the flow decoder does): the padding is zeroed before every convolution, the source's STFT reflects at the real
end and the iSTFT normalises by the real frames' window envelope, so the real samples are the unpadded mel's (up to
float rounding). Eagerly, a sentence's ~400 small launches cost more Python than GPU time, which several replies
speaking at once queue behind.

Module attribute paths equal the release's `hift.pt` keys. The release wraps most convs in (old-style) weight
normalisation, so its file stores `weight_g` / `weight_v` pairs; `fold_weight_norm` turns each pair into the plain
`weight` these modules use (computed once at load instead of on every call).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CapturedStep, graphs_allowed
from .flow import fill_padded, frame_bucket, zero_padding


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

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(zero_padding(act2(conv1(zero_padding(act1(x), keep))), keep))
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

    def forward(self, mel: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = mel
        for layer in self.condnet:
            x = layer(zero_padding(x, keep) if isinstance(layer, nn.Conv1d) else x)
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


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

    def draw(self, batch: int, samples: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The random draws, on the CPU from `generator`, in the release's order: a start phase per overtone,
        U(-pi, pi) (the fundamental starts at 0) [B, H, 1], then Gaussian noise per harmonic and sample [B, H, samples]."""
        start = -math.pi + torch.rand((batch, self.num_harmonics, 1), generator=generator) * (2 * math.pi)
        start[:, 0] = 0
        return start, torch.randn((batch, self.num_harmonics, samples), generator=generator)

    def forward(self, f0: torch.Tensor, start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [B, samples] (Hz, float32), the draws (`draw`) -> excitation [B, 1, samples]. The phase is a running
        sum, so a sample never depends on later ones (padding after the real signal changes nothing)."""
        harmonics = torch.arange(1, self.num_harmonics + 1, device=f0.device, dtype=torch.float32)
        cycles = f0.unsqueeze(1) * harmonics.view(1, -1, 1) / self.sampling_rate  # cycles per sample
        phase = 2 * math.pi * (torch.cumsum(cycles, dim=-1) % 1)
        noise = noise.to(f0.device)
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
        self.captured: dict[int, CapturedVocoder] = {}  # per padded frame count, on a GPU

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

    def _stft(self, x: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
        """STFT of x [B, L] (centred: reflected n_fft / 2 at both ends) -> [B, n_fft + 2, L / hop + 1]. With
        `samples`, x is that many real samples then padding: the end is reflected at the real end, as the unpadded
        signal's would be, and the frames past it are garbage for the caller to zero."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        if samples is None:
            spec = torch.stft(x, n_fft, hop, n_fft, window=self._window(x.device), return_complex=True)
        else:
            half = n_fft // 2
            where = torch.arange(-half, x.shape[-1] + half, device=x.device).abs()  # reflected at the start
            where = torch.where(where >= samples, 2 * (samples - 1) - where, where)  # and at the real end
            inside = torch.arange(where.shape[0], device=x.device) < samples + 2 * half
            extended = x[:, where.clamp(0, x.shape[-1] - 1)] * inside
            spec = torch.stft(extended, n_fft, hop, n_fft, window=self._window(x.device), center=False,
                              return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n_fft / 2 + 1, F] magnitudes and phases -> [B, (F - 1) * hop] samples (centred iSTFT). With `frames`,
        only that many frames are real: the others add nothing and the window envelope is the real frames' (what
        `torch.istft` gives the unpadded spectrum), so the real samples come first, then zeros."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop_len
        spec = torch.polar(magnitude.clamp(max=1e2), phase)
        window = self._window(spec.device)
        if frames is None:
            return torch.istft(spec, n_fft, hop, n_fft, window=window)
        count = spec.shape[-1]
        real = (torch.arange(count, device=spec.device) < frames).float()
        pieces = torch.fft.irfft(spec, n=n_fft, dim=1) * window[:, None] * real  # [B, n_fft, F]
        length = n_fft + hop * (count - 1)

        def overlap_add(columns: torch.Tensor) -> torch.Tensor:
            return F.fold(columns, (1, length), kernel_size=(1, n_fft), stride=(1, hop)).flatten(1)

        signal = overlap_add(pieces)
        envelope = overlap_add((window.square()[:, None] * real).expand(1, -1, -1))
        signal = torch.where(envelope > 1e-11, signal / envelope, 0.0)
        return signal[:, n_fft // 2 : n_fft // 2 + hop * (count - 1)]

    def _apply(self, fn, *args, **kwargs):
        self.captured.clear()  # captured for the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.inference_mode()
    def capture_graphs(self, max_frames: int = 1024) -> None:
        """Capture the vocoder for every padded length up to `max_frames` now (see `FlowDecoder.capture_graphs`)."""
        device = self.conv_pre.weight.device
        if not graphs_allowed(device):
            return
        for frames in range(frame_bucket(1), max_frames + 1, frame_bucket(1)):
            self(torch.zeros(1, self.config.in_channels, frames, device=device), torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> waveform [B, T * hop_size] float32 in [-audio_limit, audio_limit]. On a GPU one mel at a
        time runs from the captured graph of its padded length (captured on first use); elsewhere eagerly."""
        mel = mel.to(self.conv_pre.weight.device)
        start, noise = self.m_source.draw(mel.shape[0], mel.shape[-1] * self.config.hop_size, generator)
        padded = frame_bucket(mel.shape[-1])
        if mel.shape[0] != 1 or padded is None or not graphs_allowed(mel.device):
            return self.synthesize(mel, start, noise)
        if padded not in self.captured:
            self.captured[padded] = CapturedVocoder(self, padded)
        return self.captured[padded](mel, start, noise)

    def synthesize(self, mel: torch.Tensor, start: torch.Tensor, noise: torch.Tensor,
                   frames: torch.Tensor | None = None) -> torch.Tensor:
        """The vocoder on mel [B, 80, T] and the source's draws (`HarmonicSource.draw`). With `frames` (a 0-d
        tensor on the device), mel holds that many real frames, then padding that is kept out of the real samples
        (zeroed before every conv, the STFT and iSTFT edges at the real end); the real samples come first.

        Convs run in their dtype (see `cast_convs`); F0, the sine source, STFT and iSTFT run in float32.
        """
        config = self.config
        dtype = self.conv_pre.weight.dtype
        stft_frames = config.hop_size // config.istft_hop_len  # per mel frame

        def keep(length: int, real) -> torch.Tensor | None:
            """Which of `length` positions hold the real signal (None: all)."""
            return None if frames is None else torch.arange(length, device=mel.device) < real

        mel_keep = keep(mel.shape[-1], frames)
        f0 = self.f0_predictor(mel.float(), mel_keep).repeat_interleave(config.hop_size, dim=-1)  # nearest
        source = self.m_source(f0, start, noise).squeeze(1)
        source = self._stft(source, None if frames is None else frames * config.hop_size)
        real_stft_frames = None if frames is None else frames * stft_frames + 1
        source = zero_padding(source, keep(source.shape[-1], real_stft_frames)).to(dtype)

        x = self.conv_pre(zero_padding(mel.to(dtype), mel_keep))
        x_keep, scale = mel_keep, 1
        kernels_per_stage = len(config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(zero_padding(F.leaky_relu(x, config.lrelu_slope), x_keep))
            scale *= config.upsample_rates[i]
            x_keep = keep(x.shape[-1], None if frames is None else frames * scale)
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one more frame, so the iSTFT yields exactly T * hop
                x_keep = keep(x.shape[-1], real_stft_frames)
            x = x + self.source_resblocks[i](self.source_downs[i](source), x_keep)
            stage = self.resblocks[i * kernels_per_stage : (i + 1) * kernels_per_stage]
            total = stage[0](x, x_keep)
            for block in stage[1:]:
                total = total + block(x, x_keep)
            x = total / kernels_per_stage
        # the release uses the default slope 0.01 here
        x = self.conv_post(zero_padding(F.leaky_relu(x), x_keep)).float()

        bins = config.istft_n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins])
        phase = torch.sin(x[:, bins:])  # the release squashes the phase with sin; kept for identical output
        wave = self._istft(magnitude, phase, real_stft_frames)
        return wave.clamp(-config.audio_limit, config.audio_limit)


class CapturedVocoder:
    """`HiFTGenerator.synthesize` for every mel of up to `frames` frames, from one CUDA graph: the mel and the
    source's draws are copied into fixed padded buffers, the real length into a device scalar, the graph replayed
    and the real samples copied out. A lock keeps callers from sharing the buffers."""

    def __init__(self, vocoder: HiFTGenerator, frames: int):
        device, config = vocoder.conv_pre.weight.device, vocoder.config
        samples = frames * config.hop_size
        self.mel = torch.zeros(1, config.in_channels, frames, device=device)
        self.start = torch.zeros(1, vocoder.m_source.num_harmonics, 1, device=device)
        self.noise = torch.zeros(1, vocoder.m_source.num_harmonics, samples, device=device)
        self.frames = torch.tensor(frames, device=device)
        self.lock = threading.Lock()
        self.run = CapturedStep(lambda: vocoder.synthesize(self.mel, self.start, self.noise, self.frames), device)

    def __call__(self, mel: torch.Tensor, start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        frames, samples = mel.shape[-1], noise.shape[-1]
        with self.lock:
            fill_padded(self.mel, mel)
            fill_padded(self.noise, noise)
            self.start.copy_(start)
            self.frames.fill_(frames)
            return self.run()[:, :samples].clone()
