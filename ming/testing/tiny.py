"""Write a tiny random-weight checkpoint in the release's layout: `python -m ming.testing.tiny OUT_DIR`.

Same config structure, key names, special-token ids and vocab size as the real Ming-Lite-Omni-Preview, with small
layers, so tests, CI and the offline demo exercise exactly the loading and inference code the real model uses.
Every tensor comes from `ming.testing.weights.tiny_tensor` (seeded by key name), so the same checkpoint comes out on
every machine.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from safetensors.torch import save_file

from ..audio import write_cmvn
from ..configs import RELEASE_CONFIG, RELEASE_DATA_DIR, MingConfig
from ..modeling import MingOmni
from .speech import write_tiny_speech_assets
from .tokenizer import THINKING_END_ID, write_tiny_tokenizer
from .weights import SEED, tiny_tensor

TINY_MARKER = "tiny_random_weights"  # config.json key: the UI shows a banner when it is set

# A random thinker never writes "</thinking>", so a thinking-mode reply would never leave its reasoning. As the tiny
# talker's <audio_eos> row is lengthened so tiny sentences end (ming/testing/speech.py), the thinker's lm_head row
# of the tokenizer's one-token "</thinking>" is lengthened. The tiny thinker's logits are only ~0.02 apart over a
# 126k vocabulary, so the row must be ~200x to matter: sampled at the Thinking tab's settings (temperature 0.7,
# top-p 0.9) the reasoning of a text question ends within 200 tokens in ~60% of replies (measured 2026-11-29, 16
# replies; less with a picture, whose hidden states differ), and the token is ~6% of other replies' noise (the tag
# is not shown). Greedy decoding picks it at most steps. (A longer row helps little: the head's norm_head rescales
# every column by its norm, which this row then dominates.)
#
# Only the demo's checkpoint (with speech) gets this row. The thinker-only checkpoint (--no-speech), from which the
# parity goldens in tests/fixtures/thinker were made, keeps the plain random row: with it the "</thinking>" logit
# (up to ~8 where the others are ~0.02) would dominate every logits row, so the goldens' tolerance, relative to a
# row's largest logit, would loosen ~100x for every other column, most greedy tokens would be "</thinking>", and
# the reference script's own token-margin check fails (see tests/fixtures/thinker/README.md).
THINKING_END_SCALE = 200.0


def tiny_config() -> MingConfig:
    """The released config.json with every size shrunk; all other fields (token ids, rope, flags) kept."""
    config = MingConfig.from_file(RELEASE_CONFIG)
    llm = config.llm_config
    llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers = 64, 128, 2
    llm.num_attention_heads, llm.num_key_value_heads = 4, 2
    llm.num_experts, llm.num_experts_per_tok, llm.moe_intermediate_size = 8, 3, 32
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 4, 32, 48, 2
    vision.fullatt_block_indexes = [1, 3]
    audio = config.audio_config
    audio.audio_encoder_output_size = 32
    sanm = audio.audio_encoder_config_sanm
    sanm.output_size, sanm.attention_heads, sanm.linear_units, sanm.num_blocks = 32, 2, 64, 3
    config.extra[TINY_MARKER] = True
    return config


def is_tiny_checkpoint(folder: str) -> bool:
    try:
        return bool(MingConfig.from_file(folder).extra.get(TINY_MARKER, False))
    except OSError:
        return False


def build_tiny_checkpoint(out_dir: str, with_speech: bool = True, reasoning_end: bool | None = None) -> str:
    """Write the tiny checkpoint into `out_dir` (created if needed) and return it. `reasoning_end` (default: the
    same as `with_speech`, i.e. the demo's checkpoint): lengthen the thinker's "</thinking>" row (see above)."""

    os.makedirs(out_dir, exist_ok=True)
    config = tiny_config()
    config.save(os.path.join(out_dir, "config.json"))
    shapes = {k: tuple(v.shape) for k, v in MingOmni.from_config(config, device="meta").state_dict().items()}
    weights = {k: tiny_tensor(k, s).contiguous() for k, s in shapes.items()}
    if with_speech if reasoning_end is None else reasoning_end:
        weights["model.lm_head.weight"][THINKING_END_ID] *= THINKING_END_SCALE
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    # CMVN that brings log-mel fbank values (about 0..20 for int16-scaled speech) near zero mean, unit scale.
    dim = config.audio_config.audio_encoder_config_sanm.input_size
    generator = torch.Generator().manual_seed(SEED)
    shift = -(8.0 + 2.0 * torch.rand(dim, generator=generator))
    scale = 0.25 + 0.1 * torch.rand(dim, generator=generator)
    write_cmvn(os.path.join(out_dir, "am.mvn"), shift, scale)
    write_tiny_tokenizer(out_dir)
    _copy_release_data(out_dir)
    if with_speech:
        write_tiny_speech_assets(out_dir)
    return out_dir


def _copy_release_data(out_dir: str) -> None:
    """The release's preprocessor settings ship with the package (ming/data) and go into every checkpoint."""
    src = os.path.join(RELEASE_DATA_DIR, "preprocessor_config.json")
    if os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, "preprocessor_config.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--no-speech", action="store_true", help="skip the talker / flow / vocoder assets")
    args = parser.parse_args()
    print(build_tiny_checkpoint(args.out_dir, with_speech=not args.no_speech))


if __name__ == "__main__":
    main()
