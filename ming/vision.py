"""Vision encoder of Ming-Lite-Omni-Preview: a Qwen2.5-VL-style vision transformer.

Input is what the processor produces: `pixel_values [N, 3 * 2 * 14 * 14]`, one row per patch (channels, then the
2 frames of a temporal patch, then 14 x 14 pixels), and `grid_thw [n, 3]`, the (t, h, w) patch grid of each image or
video, in the order their patches are concatenated. Inside a frame the patches come in merge order: each 2 x 2 block of
neighbouring patches (a "merged unit", which becomes one LLM token) is 4 consecutive rows, and the blocks go row by row.

The encoder:
1. embeds each patch with one matmul (the release stores it as a Conv3d whose stride equals its kernel);
2. reorders the merged units so that each 112-px window (4 x 4 units) of a frame is a contiguous run of tokens;
3. runs pre-norm blocks of attention + SwiGLU MLP. Most blocks attend only inside their window; the blocks in
   `fullatt_block_indexes` attend across a whole frame (every temporal slice of a video separately). Queries and keys
   carry a 2-D rotary embedding of the patch's (row, column);
4. merges every 4 patches of a unit into one `out_hidden_size` vector and undoes the reordering of step 2.

Output: `[N // 4, out_hidden_size]`, one row per merged unit, in the input's order.

Attention never builds a mask: runs of tokens that attend among themselves are gathered into dense batches of equal
length (see `AttentionSegments`), so a long video costs a few `scaled_dot_product_attention` calls per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ming.configs import VisionConfig
from ming.layers import sdpa

ROPE_THETA = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale (the release's rounding order in bfloat16).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A convolution whose kernel covers the whole patch is a matmul on the flattened patch; the flattened weight
        # [hidden, channels * t * h * w] uses the same value order as the processor's patch rows.
        return F.linear(patches, self.proj.weight.flatten(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [tokens, ..., head_dim]` by per-token angles; `cos`, `sin` are float32 and broadcast against `x`.

    Rotation pairs are (i, i + head_dim / 2), as in `rotate_half` RoPE. Computed in float32.
    """
    x_float = x.float()
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x_float[..., half:], x_float[..., :half]), dim=-1)
    return (x_float * cos + rotated_half * sin).to(x.dtype)


class AttentionSegments:
    """A split of the token sequence into contiguous runs; each token attends only to tokens of its own run.

    Runs of equal length are stacked, so attention is one dense batched call per distinct run length. `groups` holds,
    per distinct length, the token indices `[num_runs, run_length]`.
    """

    def __init__(self, run_lengths: list[int], device: torch.device):
        starts_by_length: dict[int, list[int]] = {}
        start = 0
        for length in run_lengths:
            starts_by_length.setdefault(length, []).append(start)
            start += length
        self.groups: list[torch.Tensor] = [
            (torch.tensor(starts)[:, None] + torch.arange(length)).to(device)
            for length, starts in starts_by_length.items()
        ]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: AttentionSegments
    ) -> torch.Tensor:
        num_tokens, hidden = x.shape
        qkv = self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim)
        # Queries and keys get the same rotation: rotate both in one pass ([tokens, 2, heads, head_dim]).
        qk = apply_rotary(qkv[:, :2], cos, sin)
        v = qkv[:, 2]

        out = x.new_empty(num_tokens, hidden)
        for index in segments.groups:
            q_runs, k_runs = qk[index].permute(2, 0, 3, 1, 4)  # each [runs, heads, length, head_dim]
            v_runs = v[index].transpose(1, 2)
            attended = sdpa(q_runs, k_runs, v_runs)
            out[index.flatten()] = attended.transpose(1, 2).reshape(-1, hidden)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {config.hidden_act!r} is not supported (the release uses 'silu')")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size)
        self.attn = VisionAttention(config)
        self.norm2 = RMSNorm(config.hidden_size)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: AttentionSegments
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate the patches of a merged unit, project to the LLM-side width."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.unit_size = config.spatial_merge_size**2
        merged_dim = config.hidden_size * self.unit_size
        self.ln_q = RMSNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(merged_dim, merged_dim),
            nn.GELU(),
            nn.Linear(merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = self.ln_q(x).view(-1, self.unit_size * x.shape[-1])
        return self.mlp(units)


@dataclass
class VisionLayout:
    """Everything about token order and attention ranges that depends only on `grid_thw`; shared by all blocks."""

    unit_order: torch.Tensor  # [units]: input index of the unit at each position of the window-ordered sequence
    cos: torch.Tensor  # [patches, 1, 1, head_dim] float32, window order; broadcasts over (query/key, heads)
    sin: torch.Tensor
    window_segments: AttentionSegments
    frame_segments: AttentionSegments


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        self.unit_size = config.spatial_merge_size**2
        self.patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.head_dim = config.hidden_size // config.num_heads
        # The window side in merged units: 112 px / (14 px per patch * 2 patches per unit) = 4.
        self.window_units = config.window_size // (config.patch_size * config.spatial_merge_size)
        self.full_attention_blocks = set(config.fullatt_block_indexes)

        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode patches `[N, 1176]` of the images/videos described by `grid_thw [n, 3]` to `[N // 4, out]`.

        The output has the encoder's parameter dtype (the input is cast to it).
        """
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        self._check_inputs(pixel_values, grids)
        layout = self.layout(grids, pixel_values.device)

        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = x.view(-1, self.unit_size, x.shape[-1])[layout.unit_order].flatten(0, 1)
        for i, block in enumerate(self.blocks):
            segments = layout.frame_segments if i in self.full_attention_blocks else layout.window_segments
            x = block(x, layout.cos, layout.sin, segments)
        merged = self.merger(x)

        restored = torch.empty_like(merged)
        restored[layout.unit_order] = merged
        return restored

    def _check_inputs(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {self.patch_dim}], got {list(pixel_values.shape)}")
        for t, h, w in grids:
            if min(t, h, w) < 1 or h % self.merge_size or w % self.merge_size:
                raise ValueError(f"grid (t={t}, h={h}, w={w}) must have t >= 1 and h, w multiples of {self.merge_size}")
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != num_patches:
            raise ValueError(f"grid_thw describes {num_patches} patches but pixel_values has {pixel_values.shape[0]}")

    def layout(self, grids: list[tuple[int, int, int]], device: torch.device) -> VisionLayout:
        """Window order, rotary angles and attention segments for the given (t, h, w) patch grids."""
        m, window = self.merge_size, self.window_units
        unit_orders, angle_parts, window_lengths, frame_lengths = [], [], [], []
        units_before = 0
        for t, h, w in grids:
            units_h, units_w = h // m, w // m
            windows_h, windows_w = -(-units_h // window), -(-units_w // window)

            # Window id of every unit, counted frame by frame, then window row by window row. A stable sort by it
            # keeps units row-major inside each window, which is the release's order.
            frame = torch.arange(t).view(t, 1, 1)
            unit_row = torch.arange(units_h).view(1, units_h, 1)
            unit_col = torch.arange(units_w).view(1, 1, units_w)
            window_id = ((frame * windows_h + unit_row // window) * windows_w + unit_col // window).flatten()
            unit_orders.append(torch.argsort(window_id, stable=True) + units_before)
            # Edge windows are smaller; no window is empty.
            window_lengths += (torch.bincount(window_id) * self.unit_size).tolist()
            frame_lengths += [h * w] * t
            units_before += t * units_h * units_w

            angle_parts.append(self._rotary_angles(t, h, w))

        unit_order = torch.cat(unit_orders)
        # Angles follow their patches into window order.
        angles = torch.cat(angle_parts).view(-1, self.unit_size, self.head_dim)[unit_order]
        angles = angles.view(-1, 1, 1, self.head_dim)
        return VisionLayout(
            unit_order=unit_order.to(device),
            cos=angles.cos().to(device),
            sin=angles.sin().to(device),
            window_segments=AttentionSegments(window_lengths, device),
            frame_segments=AttentionSegments(frame_lengths, device),
        )

    def _rotary_angles(self, t: int, h: int, w: int) -> torch.Tensor:
        """Rotary angles `[t * h * w, head_dim]` float32 for one grid's patches, in merge order.

        head_dim / 4 frequencies are driven by the patch's row and head_dim / 4 by its column; these head_dim / 2
        angles are then repeated, so each rotation pair (i, i + head_dim / 2) shares one angle.
        """
        m = self.merge_size
        rotary_dim = self.head_dim // 2
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        # Merge order is (unit row, unit col, row in unit, col in unit).
        rows = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m).flatten()
        cols = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m).flatten()
        half = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)
        return torch.cat((half, half), dim=-1).repeat(t, 1)
