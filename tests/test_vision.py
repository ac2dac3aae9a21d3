"""Tests of the vision encoder (ming/vision.py): parity with the reference ViT, layout, batching, dtypes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ming.configs import VisionConfig
from ming.vision import VisionEncoder

GOLDEN = Path(__file__).parent / "fixtures" / "vision" / "golden.safetensors"
COLUMN_STRIDE = 64  # the fixture keeps every 64th output column (see fixtures/vision/README.md)


def tiny_vision_config(**overrides) -> VisionConfig:
    sizes = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=[1, 3])
    sizes.update(overrides)
    return VisionConfig(**sizes)


def random_encoder(seed: int = 0, **overrides) -> VisionEncoder:
    torch.manual_seed(seed)
    overrides.setdefault("out_hidden_size", 64)  # the release's 8192 only matters for the golden test
    return VisionEncoder(tiny_vision_config(**overrides)).eval()


def random_pixels(grid_thw: torch.Tensor, seed: int = 1) -> torch.Tensor:
    num_patches = int(grid_thw.prod(-1).sum())
    return torch.randn(num_patches, 1176, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation, relative to the largest magnitude of the expected tensor."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def load_golden() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder state dict, everything else). Stored floats are int8 codes times a power-of-two `.scale`."""
    stored = load_file(GOLDEN)

    def decode(name: str) -> torch.Tensor:
        return stored[name].float() * stored[name + ".scale"]

    state = {
        name.removeprefix("state."): decode(name)
        for name in stored
        if name.startswith("state.") and not name.endswith(".scale")
    }
    data = {name: tensor for name, tensor in stored.items() if not name.startswith("state.")}
    data["pixel_values"] = decode("pixel_values")
    return state, data


@pytest.fixture(scope="module")
def golden():
    state, data = load_golden()
    encoder = VisionEncoder(tiny_vision_config(out_hidden_size=8192)).eval()
    encoder.load_state_dict(state, strict=True)
    return encoder, data


@pytest.mark.parametrize("case", ["image", "video", "both"])
def test_matches_reference_in_float32(golden, case):
    encoder, data = golden
    grid_thw = data[f"grid_thw.{case}"]
    num_image_patches = int(data["grid_thw.image"].prod())
    pixels = {
        "image": data["pixel_values"][:num_image_patches],
        "video": data["pixel_values"][num_image_patches:],
        "both": data["pixel_values"],
    }[case]

    with torch.no_grad():
        out = encoder(pixels, grid_thw)

    assert out.shape == (pixels.shape[0] // 4, 8192)
    assert out.dtype == torch.float32
    expected_columns = data[f"output.{case}.columns"]
    assert relative_error(out[:, ::COLUMN_STRIDE], expected_columns) < 1e-4
    abs_sum = data[f"output.{case}.row_abs_sum"]
    assert relative_error(out.double().abs().sum(-1), abs_sum) < 1e-4
    row_sum_error = (out.double().sum(-1) - data[f"output.{case}.row_sum"]).abs() / abs_sum
    assert row_sum_error.max() < 1e-4


def test_state_dict_uses_release_key_names_and_shapes():
    with torch.device("meta"):  # release sizes, no memory
        encoder = VisionEncoder(VisionConfig(depth=1, fullatt_block_indexes=[]))
    shapes = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["blocks.0.attn.qkv.weight"] == (3840, 1280)
    assert shapes["blocks.0.attn.proj.bias"] == (1280,)
    assert shapes["blocks.0.mlp.gate_proj.weight"] == (3456, 1280)
    assert shapes["blocks.0.mlp.down_proj.bias"] == (1280,)
    assert shapes["blocks.0.norm1.weight"] == shapes["blocks.0.norm2.weight"] == (1280,)
    assert shapes["merger.ln_q.weight"] == (1280,)
    assert shapes["merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["merger.mlp.2.weight"] == (8192, 5120)
    assert len(shapes) == 1 + 12 + 5


@pytest.mark.parametrize(
    "grids",
    [[(1, 2, 2)], [(1, 4, 6)], [(1, 16, 20)], [(3, 10, 2)], [(1, 2, 30), (2, 12, 8), (1, 18, 24)]],
)
def test_one_output_row_per_merged_unit(grids):
    encoder = random_encoder(out_hidden_size=24)
    grid_thw = torch.tensor(grids)
    with torch.no_grad():
        out = encoder(random_pixels(grid_thw), grid_thw)
    assert out.shape == (sum(t * h * w // 4 for t, h, w in grids), 24)
    assert torch.isfinite(out).all()


def run_lengths(segments) -> list[int]:
    return sorted(group.shape[1] for group in segments.groups for _ in range(group.shape[0]))


def test_window_layout_of_a_ragged_image():
    encoder = random_encoder()
    layout = encoder.layout([(1, 16, 20), (2, 12, 8)], torch.device("cpu"))
    # Image: 8 x 10 units -> windows 4x4, 4x4, 4x2 in two rows. Video: 6 x 4 units per frame -> 4x4, 2x4.
    assert run_lengths(layout.window_segments) == sorted([64, 64, 32] * 2 + [64, 32] * 2)
    assert run_lengths(layout.frame_segments) == [96, 96, 320]
    assert torch.equal(layout.unit_order.sort().values, torch.arange(80 + 48))
    # The first window of the image holds units (rows 0-3, columns 0-3), row by row.
    assert layout.unit_order[:16].tolist() == [r * 10 + c for r in range(4) for c in range(4)]


def test_window_blocks_do_not_mix_windows():
    # With windows only, changing the patches of one window changes exactly that window's output rows.
    encoder = random_encoder(fullatt_block_indexes=[])
    grid_thw = torch.tensor([[1, 16, 20]])
    pixels = random_pixels(grid_thw)
    changed = pixels.clone()
    # Unit (row 1, col 9) lies in the top-right window (unit rows 0-3, columns 8-9); its 4 patches are rows 4u..4u+3.
    unit = 1 * 10 + 9
    changed[4 * unit : 4 * unit + 4] += 1.0
    with torch.no_grad():
        differs = (encoder(pixels, grid_thw) - encoder(changed, grid_thw)).abs().amax(-1) > 1e-6
    top_right_window = {r * 10 + c for r in range(4) for c in (8, 9)}
    assert set(differs.nonzero().flatten().tolist()) == top_right_window


def test_full_attention_stays_inside_each_frame():
    # The full-attention blocks attend within one temporal slice of a video, like the release.
    encoder = random_encoder()
    grid_thw = torch.tensor([[2, 12, 8]])
    pixels = random_pixels(grid_thw)
    changed = pixels.clone()
    changed[96:] += 1.0  # second frame only
    with torch.no_grad():
        out, out_changed = encoder(pixels, grid_thw), encoder(changed, grid_thw)
    torch.testing.assert_close(out[:24], out_changed[:24], rtol=0, atol=1e-6)
    assert not torch.allclose(out[24:], out_changed[24:])


def test_full_attention_blocks_see_the_whole_frame():
    encoder = random_encoder()
    grid_thw = torch.tensor([[1, 16, 20]])
    pixels = random_pixels(grid_thw)
    changed = pixels.clone()
    changed[:4] += 1.0  # the top-left unit
    with torch.no_grad():
        differs = (encoder(pixels, grid_thw) - encoder(changed, grid_thw)).abs().amax(-1) > 1e-6
    assert differs.all()


def test_images_encoded_together_equal_images_encoded_alone():
    encoder = random_encoder()
    grids = [(1, 16, 20), (1, 6, 10), (2, 12, 8)]
    grid_thw = torch.tensor(grids)
    pixels = random_pixels(grid_thw)
    with torch.no_grad():
        together = encoder(pixels, grid_thw)
        alone = []
        start = 0
        for grid in grids:
            n = grid[0] * grid[1] * grid[2]
            alone.append(encoder(pixels[start : start + n], torch.tensor([grid])))
            start += n
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_bfloat16_runs_close_to_float32():
    encoder = random_encoder()
    grid_thw = torch.tensor([[1, 16, 20], [2, 12, 8]])
    pixels = random_pixels(grid_thw)
    with torch.no_grad():
        reference = encoder(pixels, grid_thw)
        out = encoder.to(torch.bfloat16)(pixels, grid_thw)  # float32 pixels are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - reference).norm() / reference.norm() < 3e-2


def test_rejects_inconsistent_inputs():
    encoder = random_encoder()
    with pytest.raises(ValueError, match="patches"):
        encoder(torch.zeros(16, 1176), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples"):
        encoder(torch.zeros(15, 1176), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match="1176"):
        encoder(torch.zeros(16, 588), torch.tensor([[1, 4, 4]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    encoder = random_encoder()
    grid_thw = torch.tensor([[1, 16, 20], [2, 12, 8]])
    pixels = random_pixels(grid_thw)
    with torch.no_grad():
        reference = encoder(pixels, grid_thw)
        out = encoder.to("cuda", dtype)(pixels.cuda(), grid_thw.cuda())
    assert out.device.type == "cuda" and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.float().cpu() - reference).norm() / reference.norm() < tolerance
