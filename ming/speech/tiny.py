"""Tiny random-weight speech assets, in the release's layout, so the whole speech path runs in tests and CI.

`write_tiny_speech_assets(ckpt_dir)` writes:
  talker/config.json            a tiny Qwen2 config (hidden 32, 2 layers, 4 heads / 2 KV heads)
  talker/tokenizer.json         a byte-level text tokenizer with the talker's control tokens
  talker/tokenizer_config.json
  talker/s3_bpe/tokenizer.json  a BPE over the 4096 S3 tokens (one CJK character each) with 256 merges
  talker/s3_bpe/char_mapping.txt
  talker/voices/luna.pt         the release's luna voice
  talker/audio_detokenizer.yaml, flow.pt, hift.pt   (`ming.speech.detokenizer.write_tiny_detokenizer`)
and adds the talker's `talker.*` tensors to `ckpt_dir/model.safetensors` (created if absent), where the release
keeps them. Tensors come from `ming.tiny.tiny_tensor` (seeded by key name), so every run writes the same files.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..configs import MingConfig
from ..tiny import tiny_tensor
from ..tokenizer import bpe_model_json, byte_alphabet
from .detokenizer import write_tiny_detokenizer
from .s3bpe import write_char_mapping
from .talker import WEIGHT_PREFIX, Talker, TalkerLMConfig, TalkerTokenizer
from .voices import BUNDLED_VOICES_DIR, DEFAULT_VOICE

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


def add_to_model_safetensors(ckpt_dir: str, tensors: dict[str, torch.Tensor]) -> None:
    """Add (or replace) `tensors` in the checkpoint's single `model.safetensors`, keeping what is there."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    if os.path.exists(path):
        with safe_open(path, framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
    state.update(tensors)
    save_file(state, path, metadata={"format": "pt"})
