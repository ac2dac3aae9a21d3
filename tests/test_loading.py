"""Checkpoint layout and loading: the release's key names and shapes, save/load round trips, clear errors."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ming.loading import CheckpointError, save_release_weights
from ming.modeling import MingOmni
from ming.configs import RELEASE_CONFIG
from ming.testing.tiny import build_tiny_checkpoint

PROMPT = torch.tensor([[126340, 100, 200, 300, 126341, 126340, 5, 126341]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), with_speech=False)


def test_released_config_builds_the_released_key_names_and_shapes():
    state = MingOmni.from_config(RELEASE_CONFIG, device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # Shapes from the release (see ming-architecture.md, section 3).
    assert shapes["vision.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["vision.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert shapes["vision.merger.mlp.2.weight"] == (8192, 5120)
    assert shapes["linear_proj.0.weight"] == (2048, 8192)
    assert shapes["linear_proj_audio.0.weight"] == (2048, 512, 1)
    assert shapes["linear_proj_audio.3.weight"] == (2048, 2048)
    assert shapes["audio.encoders0.0.self_attn.fsmn_block.weight"] == (512, 1, 11)
    assert shapes["audio.encoders.48.feed_forward.w_1.weight"] == (2048, 512)
    assert shapes["model.model.word_embeddings.weight"] == (126464, 2048)
    assert shapes["model.model.layers.27.attention.query_key_value.weight"] == (3072, 2048)
    assert shapes["model.model.layers.0.mlp.audio_gate.weight"] == (64, 2048)
    assert shapes["model.model.layers.5.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.model.layers.5.mlp.shared_experts.gate_proj.weight"] == (2816, 2048)
    assert shapes["model.lm_head.weight"] == (126464, 2048)
    assert sum(k.startswith("model.model.layers.") and ".experts." in k for k in shapes) == 28 * 64 * 3
    assert not any("." + name in k for k in shapes for name in ("gate_proj", "up_proj", "down_proj") if k.endswith(name))
    llm_params = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("model."))
    assert abs(llm_params / 1e9 - 16.8) < 0.1  # Ling-Lite: 16.8B total


def test_save_then_load_gives_the_same_model(tiny_dir, tmp_path):
    model = MingOmni.from_pretrained(tiny_dir, dtype=torch.float32)
    want = model(PROMPT).logits
    model.save_pretrained(tmp_path / "saved")
    again = MingOmni.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(again(PROMPT).logits, want, rtol=1e-5, atol=1e-6)
    # Sharded, with an index, as the real 36 GB checkpoint is.
    save_release_weights(model, str(tmp_path / "sharded"), max_shard_bytes=20 << 20)
    model.config.save(tmp_path / "sharded" / "config.json")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = MingOmni.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    torch.testing.assert_close(sharded(PROMPT).logits, want, rtol=1e-5, atol=1e-6)


def test_loads_in_the_requested_dtype(tiny_dir):
    model = MingOmni.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(PROMPT).logits.dtype == torch.float32


def test_a_mismatched_checkpoint_names_every_problem(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_dir):
        if name != "model.safetensors":
            os.symlink(os.path.join(tiny_dir, name), broken / name)
    state = load_file(os.path.join(tiny_dir, "model.safetensors"))
    del state["model.model.layers.1.mlp.experts.3.up_proj.weight"]
    state["model.model.layers.9.attention.dense.weight"] = torch.zeros(2, 2)
    state["linear_proj.2.weight"] = torch.zeros(3, 3)
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        MingOmni.from_pretrained(broken, dtype=torch.float32)
    message = str(error.value)
    assert "1 missing" in message and "model.model.layers.1.mlp.experts.3.up_proj.weight" in message
    assert "1 unexpected" in message and "model.model.layers.9.attention.dense.weight" in message
    assert "1 wrong shape" in message and "linear_proj.2.weight: checkpoint (3, 3) vs model (64, 64)" in message
