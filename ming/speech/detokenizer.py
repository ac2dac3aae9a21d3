"""Audio detokenizer: 50 Hz S3 speech tokens + a 192-d speaker x-vector -> 22,050 Hz waveform.

    detok = AudioDetokenizer.from_pretrained(ckpt_dir + "/talker")
    wave = detok.synthesize(tokens, speaker_embedding, noise_seed=0)   # float32 [tokens / 50 * 22050 samples]

It is the flow-matching decoder (`ming.speech.flow`) followed by the HiFT vocoder (`ming.speech.hift`), configured
from the numbers in `talker/audio_detokenizer.yaml` and loaded from `flow.pt` / `hift.pt` (plain state dicts,
loaded with `weights_only=True`).

The release's yaml is written for hyperpyyaml (`!new:audio_detokenizer.flow.flow.MaskedDiffWithXvec`,
`!ref <spk_embed_dim>`, ...), which instantiates classes while parsing. `read_yaml` parses it with plain PyYAML
instead: every tagged node becomes the plain mapping / list / string it wraps, and `!ref <key>` is looked up.
Nothing is imported or instantiated.
"""

from __future__ import annotations

import os
import re

import torch
import yaml
from torch import nn

from .flow import FlowConfig, FlowDecoder
from .hift import WEIGHT_NORMED_MODULES, HiFTConfig, HiFTGenerator, fold_weight_norm

YAML_NAME = "audio_detokenizer.yaml"
FLOW_NAME = "flow.pt"
HIFT_NAME = "hift.pt"
LEADING_SILENCE_S = 0.02  # the release zeroes the first 20 ms of every clip (vocoder start-up transient)


# ---------------------------------------------------------------------------------------------------------------
# yaml
# ---------------------------------------------------------------------------------------------------------------


class _Ref(str):
    """The target of a `!ref <name>` node, resolved after parsing."""


class _HyperpyyamlLoader(yaml.SafeLoader):
    """SafeLoader that accepts hyperpyyaml tags and reads 1e-06 as a float (YAML 1.2, as hyperpyyaml does)."""


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return _Ref(value) if tag_suffix == "ref" else value


_HyperpyyamlLoader.add_multi_constructor("!", _construct_tagged)
_HyperpyyamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$|^[-+]?[0-9]*\.[0-9]+$"),
    list("-+0123456789."),
)

_REF_TARGET = re.compile(r"^<([A-Za-z_][\w]*)((?:\[[^\]]+\])*)>$")


def _resolve(value, root: dict):
    if isinstance(value, _Ref):
        match = _REF_TARGET.match(value.strip())
        if match is None:
            return str(value)  # hyperpyyaml arithmetic such as `<a> * 2`: kept as text, only plain refs are needed
        if match.group(1) not in root:
            raise ValueError(f"!ref {str(value)!r} names no top-level key of the yaml")
        target = root[match.group(1)]
        for part in re.findall(r"\[([^\]]+)\]", match.group(2)):
            target = target[part]
        return _resolve(target, root)
    if isinstance(value, dict):
        return {k: _resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    return value


def read_yaml(path: str) -> dict:
    """Parse a hyperpyyaml-style file into plain dicts, lists and numbers (tags dropped, `!ref`s resolved)."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=_HyperpyyamlLoader)
    return _resolve(raw, raw)


# ---------------------------------------------------------------------------------------------------------------
# detokenizer
# ---------------------------------------------------------------------------------------------------------------


class AudioDetokenizer:
    """Flow decoder + HiFT vocoder for one utterance at a time."""

    def __init__(self, flow: FlowDecoder, hift: HiFTGenerator):
        if flow.config.hop_size != hift.config.hop_size or flow.config.sample_rate != hift.config.sampling_rate:
            raise ValueError(
                f"flow frames ({flow.config.sample_rate} Hz / hop {flow.config.hop_size}) do not match the "
                f"vocoder ({hift.config.sampling_rate} Hz / hop {hift.config.hop_size})"
            )
        # inference only: no autograd state, so the pieces can also be called outside inference_mode
        self.flow = flow.eval().requires_grad_(False)
        self.hift = hift.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, talker_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> AudioDetokenizer:
        """Build from `talker_dir/audio_detokenizer.yaml` and load `flow.pt` / `hift.pt` (release key names).

        `dtype` applies to the flow network and the vocoder convs; the ODE state, the vocoder's F0 predictor and
        source, the STFTs and the outputs stay float32. bfloat16 / float16 are meant for GPUs. (The release runs
        the flow in fp16 and the vocoder in float32 on its GPU.)
        """
        config = read_yaml(os.path.join(talker_dir, YAML_NAME))
        flow = FlowDecoder(FlowConfig.from_yaml(config))
        hift = HiFTGenerator(HiFTConfig.from_yaml(config))
        _load(flow, torch.load(os.path.join(talker_dir, FLOW_NAME), map_location="cpu", weights_only=True), FLOW_NAME)
        hift_state = torch.load(os.path.join(talker_dir, HIFT_NAME), map_location="cpu", weights_only=True)
        _load(hift, fold_weight_norm(hift_state), HIFT_NAME)
        return cls(flow.to(device=device, dtype=dtype), hift.to(device).cast_convs(dtype))

    def capture_graphs(self, max_frames: int = 1024) -> None:
        """On a GPU, capture the flow decoder's loop and the vocoder for every padded length up to `max_frames`
        (~12 s of speech) now, a few seconds in all, so that no visitor's sentence waits for a capture."""
        self.flow.capture_graphs(max_frames)
        self.hift.capture_graphs(max_frames)

    @property
    def sample_rate(self) -> int:
        return self.hift.config.sampling_rate

    def token_to_mel(
        self,
        speech_tokens: torch.Tensor,
        speaker_embedding: torch.Tensor,
        generator: torch.Generator | None = None,
        n_timesteps: int = 8,
    ) -> torch.Tensor:
        """[1, T] tokens (or [T]) + [1, 192] x-vector -> mel [1, 80, frames] float32 on the model's device.

        frames = trunc(T / 50 * 22050 / 256) (see `ming.speech.flow.mel_frame_count`).
        """
        tokens = self._check_tokens(speech_tokens)
        speaker = self._check_speaker(speaker_embedding)
        # clone: hand back an ordinary tensor, not an inference-mode one (those refuse later in-place edits)
        return self.flow(tokens, speaker, generator=generator, n_timesteps=n_timesteps).clone()

    def mel_to_wave(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [1, 80, frames] -> waveform [frames * 256] float32 (CPU), clamped to +-0.99."""
        if mel.dim() != 3 or mel.shape[0] != 1 or mel.shape[1] != self.hift.config.in_channels:
            raise ValueError(f"mel must be [1, {self.hift.config.in_channels}, frames], got {list(mel.shape)}")
        if mel.shape[2] == 0:
            raise ValueError("mel has no frames")
        return self.hift(mel, generator=generator)[0].float().cpu().clone()

    def synthesize(
        self, speech_tokens: torch.Tensor, speaker_embedding: torch.Tensor, noise_seed: int | None = None
    ) -> torch.Tensor:
        """50 Hz S3 tokens [1, T] + speaker x-vector [1, 192] -> waveform [samples] float32 at `sample_rate`.

        samples = 256 * trunc(T * 441 / 256) ~= T / 50 s. The first 20 ms are zeroed, as the release does.
        `noise_seed` fixes the flow's starting noise and the vocoder's source noise (one generator, drawn in the
        release's order, so a seed here equals `torch.manual_seed(seed)` before the release's flow + vocoder);
        None draws from torch's global RNG.
        """
        generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        mel = self.token_to_mel(speech_tokens, speaker_embedding, generator=generator)
        wave = self.mel_to_wave(mel, generator=generator)
        wave[: int(self.sample_rate * LEADING_SILENCE_S)] = 0.0
        return wave

    def _check_tokens(self, speech_tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(speech_tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"speech_tokens must be [1, T] (one utterance), got shape {list(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex():
            raise ValueError("speech_tokens must be integer ids")
        if tokens.shape[1] == 0:
            raise ValueError("no speech tokens to synthesize")
        vocab = self.flow.config.vocab_size
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"speech token ids must be in [0, {vocab}), got {tokens.min()}..{tokens.max()}")
        return tokens.long()

    def _check_speaker(self, speaker_embedding: torch.Tensor) -> torch.Tensor:
        speaker = torch.as_tensor(speaker_embedding, dtype=torch.float32)
        if speaker.numel() != self.flow.config.spk_embed_dim:
            raise ValueError(
                f"speaker_embedding must hold {self.flow.config.spk_embed_dim} numbers, got {list(speaker.shape)}"
            )
        return speaker.reshape(1, -1)


def _load(module: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name} does not match its yaml: missing keys {missing[:8]}, unexpected {unexpected[:8]}")
