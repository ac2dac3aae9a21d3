"""MingOmni: the Ming-Lite-Omni-Preview thinker (vision encoder + audio encoder + projectors + Ling MoE LLM).

Media become LLM embeddings as the Preview does: the ViT output goes through `linear_proj` and is L2-normalised,
then written at the `<imagePatch>` positions (images and video frames alike); the SANM output goes through
`linear_proj_audio`, is L2-normalised, and is written over the audio placeholder span. Each token is then routed
by its modality's gate over the Preview's position spans (see `router_ids`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .audio import SANMEncoder
from .configs import MingConfig
from .sampling import SamplingConfig
from .generation import CachePrefix, Decoder, TokenStream, key_valid_of
from .layers import prompt_mask, set_kernel_tuning
from .llm import AUDIO, IMAGE, TEXT, BailingMoeForCausalLM
from .loading import (
    load_release_weights,
    materialize,
    params_on_meta,
    resolve_checkpoint,
    save_release_weights,
)
from .vision import VisionEncoder


class Transpose(nn.Module):
    """Swaps the channel and time axes inside `linear_proj_audio` (keeps the release's Sequential indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2)


@dataclass
class MingOutput:
    logits: torch.Tensor  # [B, L, vocab], float32
    hidden_states: torch.Tensor  # [B, L, H], after the final norm
    inputs_embeds: torch.Tensor  # [B, L, H], with media merged in


class MingOmni(nn.Module):
    def __init__(self, config: MingConfig):
        super().__init__()
        self.config = config
        llm, hidden = config.llm_config, config.llm_config.hidden_size
        self.vision = VisionEncoder(config.vision_config)
        self.audio = SANMEncoder(config.audio_config.audio_encoder_config_sanm)
        self.model = BailingMoeForCausalLM(llm)
        self.captured_steps: dict = {}  # decode steps per (batch, cache bucket), CUDA graphs on a GPU

        image_proj: list[nn.Module] = [nn.Linear(config.vision_config.out_hidden_size, hidden)]
        for _ in range(1, config.mlp_depth):
            image_proj += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.linear_proj = nn.Sequential(*image_proj)

        ac = config.audio_config
        audio_proj: list[nn.Module] = [
            nn.Conv1d(ac.audio_encoder_output_size, hidden, ac.ds_kernel_size, ac.ds_stride, ac.ds_kernel_size // 2),
            Transpose(),
        ]
        for _ in range(1, config.mlp_depth):
            audio_proj += [nn.GELU(), nn.Linear(hidden, hidden)]
        audio_proj.append(Transpose())
        self.linear_proj_audio = nn.Sequential(*audio_proj)

    # ------------------------------------------------------------------ construction and loading
    @classmethod
    def from_config(
        cls, config: MingConfig | str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "MingOmni":
        """A model with uninitialised weights (`device="meta"`: no memory at all)."""
        if not isinstance(config, MingConfig):
            config = MingConfig.from_file(config)
        with params_on_meta():
            model = cls(config)
        if torch.device(device).type != "meta":
            materialize(model, device, dtype)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        revision: str | None = None,
    ) -> "MingOmni":
        folder = resolve_checkpoint(os.fspath(path_or_hub_id), revision)
        model = cls.from_config(MingConfig.from_file(folder), device=device, dtype=dtype)
        load_release_weights(model, folder, skip_prefixes=("talker.",))
        model.model.normalize_head_()
        return model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and safetensors in the release's layout (the head is saved as loaded, normalised)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.config.save(os.path.join(folder, "config.json"))
        save_release_weights(self, folder)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    # ------------------------------------------------------------------ media -> embeddings
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N_patches, 1176] -> [N_patches / 4, H], unit-norm rows."""
        features = self.vision(pixel_values.to(self.device, self.dtype), grid_thw.to(self.device))
        return F.normalize(self.linear_proj(features.to(self.dtype)), dim=-1)

    def encode_audio(self, audio_feats: torch.Tensor, audio_feats_lengths: torch.Tensor) -> list[torch.Tensor]:
        """audio_feats [B, T, 560] with lengths [B, 1] -> one [T_b, H] unit-norm tensor per sample."""
        lengths = audio_feats_lengths.reshape(audio_feats.shape[0], -1)[:, 0].to(self.device)
        hidden, out_lengths = self.audio(audio_feats.to(self.device, self.dtype), lengths)
        projected = F.normalize(self.linear_proj_audio(hidden.transpose(1, 2)).transpose(1, 2), dim=-1)
        return [projected[b, : int(out_lengths[b])] for b in range(projected.shape[0])]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        audio_feats: torch.Tensor | None = None,
        audio_feats_lengths: torch.Tensor | None = None,
        audio_placeholder_loc_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the media merged in, and the per-token router ids [B, L]."""
        input_ids = input_ids.to(self.device)
        vocab = self.model.model.word_embeddings.num_embeddings
        embeds = self.model.model.word_embeddings(input_ids.clamp(0, vocab - 1))
        patch_id = self.config.llm_config.image_patch_token
        is_patch = input_ids == patch_id
        for pixels, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)):
            if pixels is None:
                continue
            features = self.encode_images(pixels, grid)
            if int(is_patch.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(is_patch.sum())} <imagePatch> tokens but {features.shape[0]} visual features; "
                    "an image and a video cannot share one request in the Preview model"
                )
            embeds = embeds.masked_scatter(is_patch[..., None], features.to(embeds.dtype))

        router_ids = torch.full_like(input_ids, TEXT)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        for b in range(input_ids.shape[0]):
            patch_positions = is_patch[b].nonzero().squeeze(-1)
            if patch_positions.numel() and (pixel_values is not None or pixel_values_videos is not None):
                # The Preview routes the whole span from the first to the last patch (text between images too).
                span = (positions >= patch_positions[0]) & (positions <= patch_positions[-1])
                router_ids[b, span] = IMAGE

        if audio_feats is not None:
            if audio_placeholder_loc_lens is None:
                raise ValueError("audio_feats needs audio_placeholder_loc_lens")
            loc_lens = audio_placeholder_loc_lens.reshape(input_ids.shape[0], -1, 2)
            if loc_lens.shape[1] != 1:
                raise ValueError("the Preview model takes one audio per request")
            for b, features in enumerate(self.encode_audio(audio_feats, audio_feats_lengths)):
                start, length = int(loc_lens[b, 0, 0]), int(loc_lens[b, 0, 1])
                n = min(length, features.shape[0])
                embeds[b, start : start + n] = features[:n].to(embeds.dtype)
                router_ids[b, start : start + length] = AUDIO
        return embeds, router_ids

    # ------------------------------------------------------------------ forward
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **media: torch.Tensor | None
    ) -> MingOutput:
        """Full forward over the prompt (no cache)."""
        embeds, router_ids = self.embed(input_ids, **media)
        key_valid = key_valid_of(attention_mask, input_ids, self.device)
        position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.model(embeds, position_ids, prompt_mask(key_valid), router_ids)
        return MingOutput(logits=self.model.logits(hidden), hidden_states=hidden, inputs_embeds=embeds)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        stop_event: threading.Event | None = None,
        prefix: CachePrefix | None = None,
        **kwargs,
    ) -> TokenStream:
        """Prefill now; iterate the result for the new token ids of one prompt.

        kwargs: the processor's media tensors and the `SamplingConfig` fields (max_new_tokens, do_sample,
        temperature, top_p, top_k, no_repeat_ngram_size, seed). `prefix`: keys and values of the prompt's start,
        computed earlier; `input_ids` then holds only the rest."""
        if input_ids.shape[0] != 1:
            raise ValueError("generate_stream takes one prompt; use generate() for a batch")
        return TokenStream(self._decoder(input_ids, attention_mask, kwargs, prefix), stop_event)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        stop_event: threading.Event | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Only the new token ids [B, n]; rows that finish early are padded with the pad id. kwargs as for
        `generate_stream`."""
        decoder = self._decoder(input_ids, attention_mask, kwargs)
        rows = [[] for _ in range(input_ids.shape[0])]
        while not decoder.done and not (stop_event is not None and stop_event.is_set()):
            for row, token in zip(rows, decoder.step()):
                if token is not None:
                    row.append(token)
        pad = self.config.llm_config.pad_token_id
        n = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long)

    def _decoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict,
                 prefix: CachePrefix | None = None) -> Decoder:
        cfg, media = split_generation_kwargs(kwargs)
        embeds, router_ids = self.embed(input_ids, **media)
        return Decoder(self.model, self.captured_steps, embeds, router_ids, input_ids.to(self.device),
                       attention_mask, cfg, prefix)

    # ------------------------------------------------------------------ captured decode steps
    def set_kernel_tuning(self, tuning) -> None:
        """Block shapes for the GPU decode kernels (`ming.kernels.KernelTuning`); steps are captured again."""
        set_kernel_tuning(self, tuning)
        self.captured_steps.clear()

    def _apply(self, fn, *args, **kwargs):
        self.captured_steps.clear()  # captured for the old device / dtype
        return super()._apply(fn, *args, **kwargs)


def split_generation_kwargs(kwargs: dict) -> tuple[SamplingConfig, dict]:
    """Separate the SamplingConfig fields from the media tensors (anything else is a mistake worth naming)."""
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    sampling = {k: v for k, v in kwargs.items() if k in fields}
    media = {k: v for k, v in kwargs.items() if k not in fields}
    unknown = set(media) - set(inspect.signature(MingOmni.embed).parameters)
    if unknown:
        raise TypeError(f"unexpected generation arguments: {sorted(unknown)}")
    return SamplingConfig(**sampling), media
