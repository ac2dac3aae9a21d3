"""Tiny random-weight speech assets, in the release's layout, so the whole speech path runs in tests and CI.

`write_tiny_speech_assets(ckpt_dir)` writes:
  talker/config.json            a tiny Qwen2 config (hidden 32, 2 layers, 4 heads / 2 KV heads)
  talker/tokenizer.json         a byte-level text tokenizer with the talker's control tokens
  talker/tokenizer_config.json
  talker/s3_bpe/tokenizer.json  a BPE over the 4096 S3 tokens (one CJK character each) with 256 merges
  talker/s3_bpe/char_mapping.txt
  talker/voices/luna.pt         the release's luna voice
  talker/audio_detokenizer.yaml, flow.pt, hift.pt   (`write_tiny_detokenizer`, below)
  talker/campplus.onnx          a random speaker encoder with CAM++'s signature (`ming.testing.campplus`)
and adds the talker's `talker.*` tensors to `ckpt_dir/model.safetensors` (created if absent), where the release
keeps them. Tensors come from `ming.testing.weights` (seeded by key name), so every run writes the same files.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torch import nn

from ..configs import MingConfig
from ..speech.detokenizer import FLOW_NAME, HIFT_NAME, YAML_NAME, read_yaml
from ..speech.flow import FlowConfig, FlowDecoder
from ..speech.hift import WEIGHT_NORMED_MODULES, HiFTConfig, HiFTGenerator
from ..speech.talker import WEIGHT_PREFIX, Talker, TalkerLMConfig, TalkerTokenizer
from ..speech.voices import BUNDLED_VOICES_DIR, DEFAULT_VOICE
from .campplus import write_random_campplus
from .tokenizer import bpe_model_json, byte_alphabet
from .weights import SEED, seeded_noise, tiny_tensor

S3_CODEBOOK_SIZE = 4096  # CosyVoice-1's speech-token codebook (the tiny flow decoder keeps the real vocab)
S3_FIRST_CHAR = 0x4E00  # S3 token i is written as chr(0x4E00 + i), a CJK ideograph, as the release does
TINY_LM = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0,
)  # fmt: skip
TEXT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + TalkerTokenizer.CONTROL_TOKENS
DEFAULT_THINKER_HIDDEN = 64  # the tiny thinker's width, used when the folder has no config.json yet


def write_tiny_speech_assets(ckpt_dir: str) -> None:
    """Everything the speech path needs, tiny, into `ckpt_dir` (see the module docstring)."""
    write_tiny_talker(ckpt_dir)
    write_tiny_detokenizer(os.path.join(ckpt_dir, "talker"))
    # Later releases ship CAM++ in talker/; the stand-in lets the offline demo and the tests clone voices.
    write_random_campplus(os.path.join(ckpt_dir, "talker", "campplus.onnx"))


def write_tiny_talker(ckpt_dir: str) -> None:
    """The talker part: config, tokenizers, voice, and the `talker.*` weights."""
    talker_dir = os.path.join(ckpt_dir, "talker")
    os.makedirs(os.path.join(talker_dir, "s3_bpe"), exist_ok=True)
    os.makedirs(os.path.join(talker_dir, "voices"), exist_ok=True)

    text_vocab_size = write_text_tokenizer(talker_dir)
    audio_vocab_size = write_s3_bpe(os.path.join(talker_dir, "s3_bpe"))
    vocab_size = text_vocab_size + audio_vocab_size
    with open(os.path.join(talker_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(tiny_lm_config_json(vocab_size), f, indent=2)
    shutil.copy(os.path.join(BUNDLED_VOICES_DIR, f"{DEFAULT_VOICE}.pt"), os.path.join(talker_dir, "voices"))

    config = TalkerLMConfig.from_file(os.path.join(talker_dir, "config.json"))
    with torch.device("meta"):
        talker = Talker(config, TalkerTokenizer.from_dir(talker_dir), thinker_hidden_size(ckpt_dir))
    weights = {
        WEIGHT_PREFIX + key: tiny_tensor(WEIGHT_PREFIX + key, tuple(value.shape)).contiguous()
        for key, value in talker.state_dict().items()
    }
    # A random head almost never picks <audio_eos>, so every sentence would run to its token budget (tens of
    # seconds of noise per reply). A long <audio_eos> row makes its logit large about a third of the time, so tiny
    # sentences end after a dozen or so tokens, as real ones end when the text is spoken.
    eos = talker.tokenizer.ids["<audio_eos>"]
    weights[WEIGHT_PREFIX + "model.lm_head.weight"][eos] *= 8.0
    add_to_model_safetensors(ckpt_dir, weights)


def thinker_hidden_size(ckpt_dir: str) -> int:
    if os.path.exists(os.path.join(ckpt_dir, "config.json")):
        return MingConfig.from_file(ckpt_dir).llm_config.hidden_size
    return DEFAULT_THINKER_HIDDEN


def tiny_lm_config_json(vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **TINY_LM,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": TINY_LM["num_hidden_layers"],
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "tiny_random_weights": True,
    }


def write_text_tokenizer(talker_dir: str) -> int:
    """A byte-level BPE (one token per byte, no merges) plus Qwen2's and the talker's special tokens right after
    the bytes. Returns its size (where the audio tokens start)."""
    vocab = {char: byte for byte, char in byte_alphabet().items()}
    added = [
        {"id": len(vocab) + i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, token in enumerate(TEXT_SPECIAL_TOKENS)
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": bpe_model_json(vocab, []),
    }
    with open(os.path.join(talker_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(talker_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    return len(vocab) + len(added)


def write_s3_bpe(s3_bpe_dir: str) -> int:
    """`char_mapping.txt` for the 4096 S3 tokens and a BPE whose merges join neighbouring codes twice over
    (pairs, then pairs of pairs). Returns the BPE vocabulary size."""
    chars = [chr(S3_FIRST_CHAR + i) for i in range(S3_CODEBOOK_SIZE)]
    write_char_mapping(os.path.join(s3_bpe_dir, "char_mapping.txt"), dict(enumerate(chars)))
    vocab = {char: i for i, char in enumerate(chars)}
    pairs = [(chars[2 * k], chars[2 * k + 1]) for k in range(192)]
    quads = [(pairs[2 * k][0] + pairs[2 * k][1], pairs[2 * k + 1][0] + pairs[2 * k + 1][1]) for k in range(64)]
    merges = pairs + quads
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": bpe_model_json(vocab, merges),
    }
    with open(os.path.join(s3_bpe_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    return len(vocab)


def write_char_mapping(path: str | os.PathLike, mapping: dict[int, str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s3_id in sorted(mapping):
            f.write(f"{s3_id}\t{mapping[s3_id]}\n")


def add_to_model_safetensors(ckpt_dir: str, tensors: dict[str, torch.Tensor]) -> None:
    """Add (or replace) `tensors` in the checkpoint's single `model.safetensors`, keeping what is there."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    if os.path.exists(path):
        with safe_open(path, framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
    state.update(tensors)
    save_file(state, path, metadata={"format": "pt"})


# Same layout, tags and keys as the release's yaml (CosyVoice-300M's flow / hift sections with the fork's class
# paths); small encoder, U-Net and vocoder widths. Mel bins (80), x-vector size (192), vocab (4096), frame rates
# and the 256-sample hop are the real ones.
TINY_YAML = """\
# Tiny random-weight audio detokenizer written by ming.testing.speech.write_tiny_detokenizer.
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


def write_tiny_detokenizer(talker_dir: str, seed: int = SEED) -> None:
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


def random_flow_state(config: FlowConfig, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Deterministic random `flow.pt` contents for `config` (release key names)."""
    with torch.device("meta"):
        model = FlowDecoder(config)
    return {key: _random_tensor("flow." + key, model, seed) for key in model.state_dict()}


def random_hift_state(config: HiFTConfig, seed: int = SEED) -> dict[str, torch.Tensor]:
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
            scale = gain * (1.0 + 0.1 * seeded_noise("hift." + module_name + ".weight_g", norm.shape, seed))
            state[module_name + ".weight_g"] = norm * scale
            state[module_name + ".weight_v"] = v
        else:
            state[key] = _random_tensor("hift." + key, model, seed)
    return state


def _random_tensor(name: str, model: nn.Module, seed: int) -> torch.Tensor:
    """Scale chosen per parameter role so activations stay O(1) and the vocoder sees a voice-range F0."""
    key = name.split(".", 1)[1]
    module_name, _, param = key.rpartition(".")
    module = model.get_submodule(module_name)
    shape = model.get_parameter(key).shape
    noise = seeded_noise(name, shape, seed)
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
