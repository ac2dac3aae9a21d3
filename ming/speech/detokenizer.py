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
import zlib

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


# ---------------------------------------------------------------------------------------------------------------
# tiny assets for tests and CI
# ---------------------------------------------------------------------------------------------------------------

TINY_SEED = 1234

# Same layout, tags and keys as the release's yaml (CosyVoice-300M's flow / hift sections with the fork's class
# paths); small encoder, U-Net and vocoder widths. Mel bins (80), x-vector size (192), vocab (4096), frame rates
# and the 256-sample hop are the real ones.
TINY_YAML = """\
# Tiny random-weight audio detokenizer written by ming.speech.detokenizer.write_tiny_detokenizer.
# Same structure as the release's talker/audio_detokenizer.yaml; small widths.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 22050
spk_embed_dim: 192

flow: !new:audio_detokenizer.flow.flow.MaskedDiffWithXvec
    input_size: 32
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 4096
    input_frame_rate: 50
    only_mask_loss: True
    encoder: !new:audio_detokenizer.transformer.encoder.ConformerEncoder
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 32
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:audio_detokenizer.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1]
    decoder: !new:audio_detokenizer.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:audio_detokenizer.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32, 32]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 2
            num_heads: 2
            act_fn: 'gelu'

hift: !new:audio_detokenizer.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 32
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:audio_detokenizer.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 32
"""


def write_tiny_detokenizer(talker_dir: str, seed: int = TINY_SEED) -> None:
    """Write `audio_detokenizer.yaml`, `flow.pt` and `hift.pt` with tiny random weights into `talker_dir`.

    Every tensor is drawn from a generator seeded by (seed, file, key), so the files are identical on every machine
    and independent of module construction order. `hift.pt` stores weight-norm pairs as the release does.
    """
    os.makedirs(talker_dir, exist_ok=True)
    yaml_path = os.path.join(talker_dir, YAML_NAME)
    with open(yaml_path, "w", encoding="utf-8") as f:
        f.write(TINY_YAML)
    config = read_yaml(yaml_path)
    torch.save(random_flow_state(FlowConfig.from_yaml(config), seed), os.path.join(talker_dir, FLOW_NAME))
    torch.save(random_hift_state(HiFTConfig.from_yaml(config), seed), os.path.join(talker_dir, HIFT_NAME))


def random_flow_state(config: FlowConfig, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Deterministic random `flow.pt` contents for `config` (release key names)."""
    with torch.device("meta"):
        model = FlowDecoder(config)
    return {key: _random_tensor("flow." + key, model, seed) for key in model.state_dict()}


def random_hift_state(config: HiFTConfig, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Deterministic random `hift.pt` contents for `config`: release key names, weight-norm (g, v) pairs."""
    with torch.device("meta"):
        model = HiFTGenerator(config)
    state = {}
    for key in model.state_dict():
        module_name, _, param = key.rpartition(".")
        if param == "weight" and WEIGHT_NORMED_MODULES.match(module_name):
            v = _random_tensor("hift." + key, model, seed)
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            gain = 0.3 if module_name == "conv_post" else 1.0  # keeps log-magnitudes small: audio mostly unclipped
            scale = gain * (1.0 + 0.1 * _noise("hift." + module_name + ".weight_g", norm.shape, seed))
            state[module_name + ".weight_g"] = norm * scale
            state[module_name + ".weight_v"] = v
        else:
            state[key] = _random_tensor("hift." + key, model, seed)
    return state


def _noise(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator)


def _random_tensor(name: str, model: nn.Module, seed: int) -> torch.Tensor:
    """Scale chosen per parameter role so activations stay O(1) and the vocoder sees a voice-range F0."""
    key = name.split(".", 1)[1]
    module_name, _, param = key.rpartition(".")
    module = model.get_submodule(module_name)
    shape = model.get_parameter(key).shape
    noise = _noise(name, shape, seed)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and param == "weight":
        return 1.0 + 0.1 * noise
    if param == "alpha":  # Snake frequency: near 1, positive
        return 1.0 + 0.1 * noise
    if key == "f0_predictor.classifier.bias":  # centre F0 near 120 Hz
        return 120.0 + 10.0 * noise
    if key == "f0_predictor.classifier.weight":  # wide spread around it: mostly voiced, some unvoiced frames
        return 100.0 * noise / shape[-1] ** 0.5
    if key == "conv_post.bias":  # log-magnitude bins (the first n_fft/2+1 channels) start near exp(-2)
        bins = (shape[0] - 2) // 2 + 1
        return 0.05 * noise - 2.0 * (torch.arange(shape[0]) < bins)
    if param == "bias" or param.startswith("pos_bias"):
        return 0.05 * noise
    if isinstance(module, nn.Embedding):
        return noise
    fan_in = shape[1:].numel() if not isinstance(module, nn.ConvTranspose1d) else shape[0] * shape[2]
    return noise / fan_in**0.5
