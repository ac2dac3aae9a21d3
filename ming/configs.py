"""Configuration classes that read the released Ming-Lite-Omni-Preview `config.json` as it is.

Field names are the release's own (`llm_config`, `vision_config`, `audio_config`, `mlp_depth`, ...), so a
config.json written by the release, by `ming.testing.tiny`, or by `MingConfig.save` round-trips unchanged. Unknown keys
are kept in `extra` and written back, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# The release's config.json and preprocessor settings ship with the package (see data/README.md).
RELEASE_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RELEASE_CONFIG = os.path.join(RELEASE_DATA_DIR, "config.json")


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names and k != "extra"}
    extra = {k: v for k, v in data.items() if k not in names}
    obj = cls(**known)
    obj.extra = extra
    return obj


def _to_dict(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
    out.update(obj.extra)
    return out


@dataclass
class LLMConfig:
    """The Ling / BailingMoe language model (`llm_config`)."""

    vocab_size: int = 126464
    hidden_size: int = 2048
    intermediate_size: int | None = 5632
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    norm_head: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    num_experts: int = 64
    num_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 1408
    first_k_dense_replace: int = 0
    multi_gate: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    image_patch_token: int = 126346
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    from_dict = classmethod(_from_dict)
    to_dict = _to_dict


@dataclass
class VisionConfig:
    """The Qwen2.5-VL-style vision transformer (`vision_config`)."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3456
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 8192
    tokens_per_second: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    from_dict = classmethod(_from_dict)
    to_dict = _to_dict


@dataclass
class SANMConfig:
    """The FunASR SANM audio encoder (`audio_config.audio_encoder_config_sanm`)."""

    input_size: int = 560
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50
    kernel_size: int = 11
    sanm_shfit: int = 0  # sic: the release's spelling
    normalize_before: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    from_dict = classmethod(_from_dict)
    to_dict = _to_dict


@dataclass
class AudioConfig:
    """Audio encoder and its projector settings (`audio_config`)."""

    audio_encoder_output_size: int = 512
    ds_conv_type: str = "conv"
    ds_kernel_size: int = 1
    ds_stride: int = 1
    norm_query_embeds: bool = True
    audio_encoder_config_sanm: SANMConfig = field(default_factory=SANMConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AudioConfig":
        data = dict(data)
        data["audio_encoder_config_sanm"] = SANMConfig.from_dict(data.get("audio_encoder_config_sanm", {}))
        return _from_dict(cls, data)

    to_dict = _to_dict


@dataclass
class MingConfig:
    """The whole model: thinker (LLM + encoders + projectors). The talker has its own config in `talker/`."""

    llm_config: LLMConfig = field(default_factory=LLMConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    mlp_depth: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MingConfig":
        data = dict(data)
        data["llm_config"] = LLMConfig.from_dict(data.get("llm_config", {}))
        data["vision_config"] = VisionConfig.from_dict(data.get("vision_config", {}))
        data["audio_config"] = AudioConfig.from_dict(data.get("audio_config", {}))
        return _from_dict(cls, data)

    to_dict = _to_dict

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "MingConfig":
        """Read a config.json, or the config.json inside a checkpoint folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
