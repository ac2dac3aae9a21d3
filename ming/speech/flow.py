"""Flow-matching mel decoder of the audio detokenizer (CosyVoice-1 `MaskedDiffWithXvec`): 50 Hz speech tokens -> mel.

Pipeline for one utterance:
  tokens -> embedding -> conformer encoder (relative positions) -> Linear to 80 -> length regulator (nearest
  stretch to the mel frame count + convs) = `mu`, the per-frame condition;
  x-vector -> L2 normalise -> Linear(192 -> 80) = the speaker condition;
  noise -> 8 Euler steps of a conditional 1-D U-Net velocity field on a cosine time grid, with classifier-free
  guidance -> 80-bin log-mel at 22,050 Hz / hop 256.

Module attribute paths equal the release's `flow.pt` keys (e.g. `decoder.estimator.mid_blocks.3.1.0.attn1.to_q.weight`),
so the release state dict loads as is. One utterance is decoded at a time, as the release does (batch 1).

On a GPU the Euler loop runs from a CUDA graph captured once per padded length (`frame_bucket`): the U-Net then
takes a frame mask, zeroes the padding before every convolution, normalises groups over the real frames only and
keeps padded keys out of attention, so a padded utterance's real frames get what the unpadded one gets (up to float
rounding; tests/test_detokenizer.py). Capturing per utterance instead cost ~100 ms of Python per sentence, far
more than the GPU work, and several visitors speaking at once queue behind that. Elsewhere (the CPU, graphs off)
the loop runs eagerly on the unpadded utterance.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CapturedStep, graphs_allowed, sdpa


@dataclass
class FlowConfig:
    """The numbers of the `flow:` section of `audio_detokenizer.yaml` (defaults = CosyVoice-300M)."""

    vocab_size: int = 4096
    input_size: int = 512  # token embedding width = encoder input width
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    input_frame_rate: int = 50  # speech tokens per second
    sample_rate: int = 22050
    hop_size: int = 256  # waveform samples per mel frame
    # conformer encoder
    encoder_output_size: int = 512
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_activation: str = "swish"
    # length regulator: one conv + norm + Mish per entry of `sampling_ratios`, then a 1x1 conv
    regulator_channels: int = 80
    regulator_num_convs: int = 4
    regulator_groups: int = 1
    # conditional flow matching
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    # U-Net velocity estimator
    estimator_in_channels: int = 320  # x, mu, speaker, prompt condition: 4 x 80
    estimator_channels: list[int] = field(default_factory=lambda: [256, 256])
    attention_head_dim: int = 64
    num_heads: int = 8
    n_blocks: int = 4  # transformer blocks per U-Net level
    num_mid_blocks: int = 12
    act_fn: str = "gelu"

    @classmethod
    def from_yaml(cls, config: dict) -> FlowConfig:
        """Read the numbers from a parsed `audio_detokenizer.yaml` (see `ming.speech.detokenizer.read_yaml`)."""
        flow = config["flow"]
        encoder = flow["encoder"]
        regulator = flow["length_regulator"]
        cfm = flow["decoder"]["cfm_params"]
        cfm = cfm.get("content", cfm)  # the release wraps these in `!new:omegaconf.DictConfig {content: ...}`
        estimator = flow["decoder"]["estimator"]
        _check_supported_encoder(encoder)
        mel = flow.get("mel_feat_conf", {})
        return cls(
            vocab_size=flow.get("vocab_size", 4096),
            input_size=flow["input_size"],
            output_size=flow["output_size"],
            spk_embed_dim=flow["spk_embed_dim"],
            input_frame_rate=flow.get("input_frame_rate", 50),
            sample_rate=config.get("sample_rate", mel.get("sampling_rate", 22050)),
            hop_size=mel.get("hop_size", 256),
            encoder_output_size=encoder["output_size"],
            encoder_attention_heads=encoder["attention_heads"],
            encoder_linear_units=encoder["linear_units"],
            encoder_num_blocks=encoder["num_blocks"],
            encoder_activation=encoder.get("activation_type", "swish"),
            regulator_channels=regulator["channels"],
            regulator_num_convs=len(regulator["sampling_ratios"]),
            regulator_groups=regulator.get("groups", 1),
            inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
            t_scheduler=cfm.get("t_scheduler", "cosine"),
            estimator_in_channels=estimator["in_channels"],
            estimator_channels=list(estimator.get("channels", [256, 256])),
            attention_head_dim=estimator.get("attention_head_dim", 64),
            num_heads=estimator.get("num_heads", 4),
            n_blocks=estimator.get("n_blocks", 1),
            num_mid_blocks=estimator.get("num_mid_blocks", 2),
            act_fn=estimator.get("act_fn", "snake"),
        )


def _check_supported_encoder(encoder: dict) -> None:
    """The flow encoder of CosyVoice-1 is a conformer without conv module or macaron FFN; refuse anything else."""
    expected = {
        "input_layer": "linear",
        "pos_enc_layer_type": "rel_pos_espnet",
        "selfattention_layer_type": "rel_selfattn",
        "use_cnn_module": False,
        "macaron_style": False,
        "normalize_before": True,
        "use_dynamic_chunk": False,
        "static_chunk_size": 0,
    }
    for key, value in expected.items():
        if encoder.get(key, value) != value:
            raise ValueError(f"flow encoder option {key}={encoder[key]!r} is not supported (expected {value!r})")


def mel_frame_count(num_tokens: int, config: FlowConfig) -> int:
    """Mel frames for `num_tokens` speech tokens: trunc(tokens / 50 * 22050 / 256) = floor(tokens * 441 / 256).

    The release evaluates this on an int32 tensor in float32 and truncates. The same float32 steps are used here so
    the count is identical at every length: it equals the exact floor up to 13,567 tokens (271 s); beyond that,
    float32 rounding moves it by one frame either way.
    """
    tokens = torch.tensor(num_tokens, dtype=torch.float32)
    return int(tokens / config.input_frame_rate * config.sample_rate / config.hop_size)


# ---------------------------------------------------------------------------------------------------------------
# Conformer encoder (ESPnet-style relative positional self-attention, pre-norm, no conv module)
# ---------------------------------------------------------------------------------------------------------------


def relative_position_encoding(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoids for relative positions length-1, ..., 0, ..., -(length-1): [1, 2 * length - 1, dim]."""
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    angles = positions * inv_freq
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)  # interleaved sin, cos
    return table.unsqueeze(0).to(dtype)


class LinearInput(nn.Module):
    """Linear + LayerNorm on the token embeddings, then scaling by sqrt(width) before positions are mixed in."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(input_size, output_size), nn.LayerNorm(output_size, eps=1e-5))
        self.scale = math.sqrt(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL attention: content score (q + u) k^T plus position score (q + v) p^T over relative offsets."""

    def __init__(self, num_heads: int, dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.linear_q(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.linear_k(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.linear_v(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.num_heads, self.head_dim).transpose(1, 2)

        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # [B, H, T, 2T-1]
        # Column j of `position` holds offset (T-1-j); query i attending key k needs offset i-k, i.e. j = T-1-i+k.
        rows = torch.arange(length, device=x.device)
        offset_index = (length - 1 - rows.unsqueeze(1) + rows.unsqueeze(0)).expand(batch, self.num_heads, -1, -1)
        position = position.gather(-1, offset_index)

        scores = (content + position) / math.sqrt(self.head_dim)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.linear_out(out.transpose(1, 2).reshape(batch, length, -1))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = activation
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual (the flow's conformer has no conv module)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, activation: nn.Module):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(num_heads, dim)
        self.feed_forward = PositionwiseFeedForward(dim, hidden, activation)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class ConformerEncoder(nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        dim = config.encoder_output_size
        self.embed = LinearInput(config.input_size, dim)
        activation = _ACTIVATIONS[config.encoder_activation]()
        self.encoders = nn.ModuleList(
            ConformerLayer(dim, config.encoder_attention_heads, config.encoder_linear_units, activation)
            for _ in range(config.encoder_num_blocks)
        )
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        pos_emb = relative_position_encoding(x.shape[1], x.shape[2], x.device, x.dtype)
        for layer in self.encoders:
            x = layer(x, pos_emb)
        return self.after_norm(x)


class LengthRegulator(nn.Module):
    """Stretch token-rate features to the mel frame count (nearest neighbour), then smooth with convs."""

    def __init__(self, channels: int, num_convs: int, groups: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [B, T_tokens, C] -> [B, C, num_frames]"""
        x = F.interpolate(x.transpose(1, 2), size=num_frames, mode="nearest")
        return self.model(x)


# ---------------------------------------------------------------------------------------------------------------
# U-Net velocity estimator (Matcha-TTS `Decoder` layout with diffusers-style transformer blocks)
# ---------------------------------------------------------------------------------------------------------------


def timestep_sinusoids(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, dim] (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = scale * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def masked_group_norm(x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor) -> torch.Tensor:
    """`norm(x)` with each group's mean and variance taken over the real frames only: x [B, C, T], mask [B, 1, T]
    (1 real, 0 padding)."""
    B, C, T = x.shape
    groups = norm.num_groups
    xg = x.float().view(B, groups, C // groups, T)
    m = mask.float().view(B, 1, 1, T)
    count = m.sum(dim=(2, 3), keepdim=True) * (C // groups)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
    var = ((xg - mean) * m).square().sum(dim=(2, 3), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(B, C, T)
    return (y * norm.weight.float()[:, None] + norm.bias.float()[:, None]).to(x.dtype)


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self.block(x)
        conv, norm, activation = self.block
        return activation(masked_group_norm(conv(zero_padding(x, mask)), norm, mask))


class ResnetBlock1D(nn.Module):
    """Two conv blocks with the time embedding added in between, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x)


class Downsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head self-attention; the inner width heads * head_dim may differ from the model width."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim]; key_mask [B, T] bool (False: padding no query may see), or None."""
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, -1).transpose(1, 2)

        # The release hands diffusers a 0/1 float mask, which it *adds* to the scores; over the real frames that is a
        # constant shift, which softmax ignores, so only padding needs masking.
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = sdpa(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)), mask)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, length, -1))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Slot 1 is the (inactive at inference) dropout; it keeps the release's key numbering `net.0` / `net.2`.
        self.net = nn.Sequential(GELUProjection(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward over time steps, on [B, T, C]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_mask)
        return x + self.ff(self.norm3(x))


def _run_transformers(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply transformer blocks to a [B, C, T] feature map (mask [B, 1, T] or None)."""
    key_mask = None if mask is None else mask[:, 0] > 0
    x = x.transpose(1, 2)
    for block in blocks:
        x = block(x, key_mask)
    return x.transpose(1, 2)


def fill_padded(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Copy value [..., n] into the first n positions of buffer [..., N] and zero the rest (a captured graph's
    padded input)."""
    buffer.zero_()
    buffer[..., : value.shape[-1]] = value


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [..., T] with its padded positions zeroed (mask broadcast to x, 1 / True real, 0 / False padding), as a
    convolution of the unpadded signal sees beyond its end; x itself when nothing is padded (mask None)."""
    return x if mask is None else x * mask.to(x.dtype)


class ConditionalUNet(nn.Module):
    """1-D U-Net predicting the flow velocity from (x_t, mu, speaker, cond) and t.

    Each level is [resnet, transformer blocks, resample]: down levels halve time except the last, up levels
    double it (transposed conv) except the last, with skip connections concatenated on channels.
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        if config.act_fn != "gelu":
            raise ValueError(f"estimator act_fn {config.act_fn!r} is not supported (the release uses 'gelu')")
        channels = list(config.estimator_channels)
        in_channels = config.estimator_in_channels
        time_dim = channels[0] * 4
        self.in_channels = in_channels
        self.time_mlp = TimestepEmbedding(in_channels, time_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, config.num_heads, config.attention_head_dim) for _ in range(config.n_blocks)
            )

        self.down_blocks = nn.ModuleList()
        width = in_channels
        for i, out in enumerate(channels):
            is_last = i == len(channels) - 1
            resample = nn.Conv1d(out, out, 3, padding=1) if is_last else Downsample1D(out)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(width, out, time_dim), transformers(out), resample]))
            width = out

        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(width, width, time_dim), transformers(width)])
            for _ in range(config.num_mid_blocks)
        )

        up_channels = channels[::-1] + [channels[0]]
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            out = up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            resample = nn.Conv1d(out, out, 3, padding=1) if is_last else Upsample1D(out)
            resnet = ResnetBlock1D(up_channels[i] * 2, out, time_dim)
            self.up_blocks.append(nn.ModuleList([resnet, transformers(out), resample]))

        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], config.output_size, 1)

    def forward(
        self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, speaker: torch.Tensor, cond: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; t [B]; speaker [B, 80] -> velocity [B, 80, T]. mask [B, 1, T] (1 real, 0 padding;
        T even) or None: no padding."""
        time_emb = self.time_mlp(timestep_sinusoids(t, self.in_channels).to(x.dtype))
        speaker = speaker.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([x, mu, speaker, cond], dim=1)

        skips, masks = [], []
        for resnet, blocks, downsample in self.down_blocks:
            x = _run_transformers(blocks, resnet(x, time_emb, mask), mask)
            skips.append(x)
            masks.append(mask)
            x = downsample(zero_padding(x, mask))
            if mask is not None and isinstance(downsample, Downsample1D):
                mask = mask[:, :, ::2]  # frame j of the halved map is real when frame 2j was
        for resnet, blocks in self.mid_blocks:
            x = _run_transformers(blocks, resnet(x, time_emb, mask), mask)
        for resnet, blocks, upsample in self.up_blocks:
            skip, mask = skips.pop(), masks.pop()
            # an odd length comes back one frame longer from the transposed conv: crop to the skip
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = upsample(zero_padding(_run_transformers(blocks, resnet(x, time_emb, mask), mask), mask))
        return self.final_proj(self.final_block(x, mask))


FRAME_BUCKET = 128  # the GPU pads an utterance's frames to a multiple of this (one captured loop per multiple)
MAX_BUCKETED_FRAMES = 4096  # ~48 s; past 1,024 frames the padded lengths double. Longer runs eagerly, unpadded.


def frame_bucket(frames: int) -> int | None:
    """The padded length whose captured Euler loop decodes an utterance of `frames` mel frames, or None (too long)."""
    if frames <= 1024:
        return max(FRAME_BUCKET, -(-frames // FRAME_BUCKET) * FRAME_BUCKET)
    padded = 1 << (frames - 1).bit_length()
    return padded if padded <= MAX_BUCKETED_FRAMES else None


class ConditionalFlowMatching(nn.Module):
    """Euler ODE solver from noise (t=0) to mel (t=1) with classifier-free guidance."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.cfg_rate = config.inference_cfg_rate
        self.t_scheduler = config.t_scheduler
        self.estimator = ConditionalUNet(config)
        self.captured: dict[tuple[int, int], CapturedSolve] = {}  # per (padded frames, steps), on a GPU

    def _apply(self, fn, *args, **kwargs):
        self.captured.clear()  # captured for the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def time_grid(self, n_timesteps: int, device: torch.device) -> torch.Tensor:
        t = torch.linspace(0, 1, n_timesteps + 1, device=device)
        if self.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)  # small steps near the noise end
        return t

    def forward(
        self, noise: torch.Tensor, mu: torch.Tensor, speaker: torch.Tensor, n_timesteps: int
    ) -> torch.Tensor:
        """noise, mu [1, 80, T]; speaker [1, 80] -> mel [1, 80, T] (float32). On a GPU, from the captured loop of
        T's padded length (captured on first use); elsewhere eagerly."""
        padded = frame_bucket(mu.shape[-1])
        if not graphs_allowed(mu.device) or padded is None:
            return self.solve(noise, mu, speaker, n_timesteps)
        key = (padded, n_timesteps)
        if key not in self.captured:
            self.captured[key] = CapturedSolve(self, padded, n_timesteps, mu, speaker)
        return self.captured[key](noise, mu, speaker)

    def solve(
        self, noise: torch.Tensor, mu: torch.Tensor, speaker: torch.Tensor, n_timesteps: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Euler loop: noise, mu [1, 80, T]; speaker [1, 80] -> mel [1, 80, T] (float32). With `mask` [1, 1, T]
        the utterance is the real frames of a padded one (padding zero in noise and mu)."""
        dtype = mu.dtype
        cond = torch.zeros_like(mu)  # the prompt-mel condition; the Preview never fills it
        guided = self.cfg_rate > 0
        if guided:  # conditional and unconditional (all conditions zeroed) velocities in one batch of two
            mu = torch.cat([mu, torch.zeros_like(mu)])
            speaker = torch.cat([speaker, torch.zeros_like(speaker)])
            cond = torch.cat([cond, cond])
            mask = None if mask is None else mask.expand(2, -1, -1)
        x = noise.float()
        t_grid = self.time_grid(n_timesteps, x.device)
        for step in range(n_timesteps):
            t = t_grid[step].expand(mu.shape[0])
            x_in = x.to(dtype).expand(mu.shape[0], -1, -1)
            velocity = self.estimator(x_in, mu, t, speaker, cond, mask).float()
            if guided:
                conditional, unconditional = velocity.chunk(2)
                velocity = (1.0 + self.cfg_rate) * conditional - self.cfg_rate * unconditional
            x = x + (t_grid[step + 1] - t_grid[step]) * velocity
        return x


class CapturedSolve:
    """`ConditionalFlowMatching.solve` for every utterance of up to `frames` frames, from one CUDA graph of the
    whole Euler loop: the utterance is copied into fixed padded buffers with its frame mask, the graph replayed,
    its real frames copied out. A lock keeps callers from sharing the buffers."""

    def __init__(self, flow: ConditionalFlowMatching, frames: int, n_timesteps: int, mu: torch.Tensor,
                 speaker: torch.Tensor):
        self.noise = torch.zeros(1, mu.shape[1], frames, dtype=torch.float32, device=mu.device)
        self.mu = torch.zeros(1, mu.shape[1], frames, dtype=mu.dtype, device=mu.device)
        self.speaker = torch.zeros_like(speaker)
        self.mask = torch.zeros(1, 1, frames, dtype=mu.dtype, device=mu.device)
        self.mask[..., : mu.shape[-1]] = 1  # the warm-up runs on a real-looking utterance
        self.lock = threading.Lock()
        self.run = CapturedStep(lambda: flow.solve(self.noise, self.mu, self.speaker, n_timesteps, self.mask),
                                mu.device)

    def __call__(self, noise: torch.Tensor, mu: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        frames = mu.shape[-1]
        with self.lock:
            fill_padded(self.noise, noise)
            fill_padded(self.mu, mu)
            self.speaker.copy_(speaker)
            self.mask.zero_()
            self.mask[..., :frames] = 1
            return self.run()[..., :frames].clone()


class FlowDecoder(nn.Module):
    """Speech tokens + x-vector -> mel spectrogram (`MaskedDiffWithXvec.inference` of the release)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = ConformerEncoder(config)
        self.encoder_proj = nn.Linear(config.encoder_output_size, config.output_size)
        self.length_regulator = LengthRegulator(
            config.regulator_channels, config.regulator_num_convs, config.regulator_groups
        )
        self.decoder = ConditionalFlowMatching(config)

    @torch.inference_mode()
    def capture_graphs(self, max_frames: int = 1024, n_timesteps: int = 8) -> None:
        """Capture the Euler loop of every padded length up to `max_frames` (~12 s of speech) now, half a second or
        so each, so that no visitor's sentence waits for a capture. Nothing happens where graphs are off."""
        device = self.input_embedding.weight.device
        if not graphs_allowed(device):
            return
        channels = self.config.output_size
        speaker = torch.zeros(1, channels, dtype=self.input_embedding.weight.dtype, device=device)
        for frames in range(FRAME_BUCKET, max_frames + 1, FRAME_BUCKET):
            mu = torch.zeros(1, channels, frames, dtype=speaker.dtype, device=device)
            self.decoder(torch.zeros(1, channels, frames, device=device), mu, speaker, n_timesteps)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        speaker_embedding: torch.Tensor,
        generator: torch.Generator | None = None,
        n_timesteps: int = 8,
    ) -> torch.Tensor:
        """tokens [1, T] (0 <= id < vocab), speaker_embedding [1, spk_embed_dim] -> mel [1, 80, frames] float32.

        The starting noise is drawn on the CPU as `torch.randn([1, 80, frames])` from `generator` (the global RNG
        when None), the same draw the release makes with `randn_like(mu)`, so a seed gives the same noise here,
        in the release, and on any device.
        """
        dtype = self.input_embedding.weight.dtype
        device = self.input_embedding.weight.device
        num_frames = mel_frame_count(tokens.shape[1], self.config)

        speaker = F.normalize(speaker_embedding.to(device=device, dtype=torch.float32), dim=1)
        speaker = self.spk_embed_affine_layer(speaker.to(dtype))

        h = self.encoder(self.input_embedding(tokens.to(device)))
        mu = self.length_regulator(self.encoder_proj(h), num_frames)

        noise = torch.randn((1, self.config.output_size, num_frames), generator=generator)
        return self.decoder(noise.to(device), mu, speaker, n_timesteps)
