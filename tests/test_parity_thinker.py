"""End-to-end parity of the thinker with the official Ming-Lite-Omni-Preview code.

For each request (text, multi-turn chat, image, video, ASR, spoken question, two images with text between them) the
goldens in tests/fixtures/thinker/ hold what the reference produced on the tiny checkpoint: its processor's integers,
its logits (every position on a fixed set of vocab columns, plus the whole last row), the spans its MoE routers used
and its greedy continuation. How they were made: tests/fixtures/thinker/README.md.

Two images: the reference processor expands the second `<image>` inside the first image's block (it always replaces
the first "<image>" of the text, and each expansion starts with one), so the text between the images lands after
both patch blocks. `two_images` is that request exactly as the reference runs it; `two_images_in_place` is the same
request with each image expanded where it stands (the reference model on those ids), so that the text between the
images lies inside the image router's span (the Preview routes everything from the first to the last image patch
through the image gate). The model-only tests below also run our model on the reference's own input_ids, so a
processor difference and a model difference are told apart.

The goldens also store a checksum of the tiny checkpoint's weights. If `ming/testing/tiny.py` changes the weights,
every test here fails with a message saying so (the goldens must then be regenerated), rather than looking like a
model bug.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ming import MingOmni, MingProcessor
from ming.llm import AUDIO, IMAGE, TEXT
from ming.testing.tiny import build_tiny_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_DIR = FIXTURES / "thinker"
MEDIA_DIR = FIXTURES / "media"
MAX_NEW_TOKENS = 12
LOGITS_RTOL = 1e-4

ASR_PROMPT = "Please recognize the language of this speech and transcribe it. Format: oral."

# Media paths are relative to tests/fixtures/; the goldens store these messages verbatim.
CASES = {
    "text": [
        {"role": "HUMAN", "content": [{"type": "text", "text": "Write one sentence about a sunny day at the beach."}]},
    ],
    "chat": [
        {"role": "HUMAN", "content": [{"type": "text", "text": "中国的首都是哪里？"}]},
        {"role": "ASSISTANT", "content": [{"type": "text", "text": "北京"}]},
        {"role": "HUMAN", "content": [{"type": "text", "text": "How many people live there?"}]},
    ],
    "image": [
        {"role": "HUMAN", "content": [{"type": "image", "image": "media/image.png"},
                                      {"type": "text", "text": "What shapes are in this picture?"}]},
    ],
    "video": [
        {"role": "HUMAN", "content": [{"type": "video", "video": "media/video.mp4"},
                                      {"type": "text", "text": "What is moving in this video?"}]},
    ],
    "asr": [
        {"role": "HUMAN", "content": [{"type": "text", "text": ASR_PROMPT},
                                      {"type": "audio", "audio": "media/speech.wav"}]},
    ],
    "speech": [
        {"role": "HUMAN", "content": [{"type": "audio", "audio": "media/speech.wav"}]},
    ],
    "two_images": [
        {"role": "HUMAN", "content": [{"type": "image", "image": "media/image.png"},
                                      {"type": "text", "text": "and this one:"},
                                      {"type": "image", "image": "media/image2.png"},
                                      {"type": "text", "text": "Which of the two pictures shows a house?"}]},
    ],
}
CASES["two_images_in_place"] = CASES["two_images"]  # same request, each <image> expanded where it stands
TWO_IMAGE_CASES = ("two_images", "two_images_in_place")
# Our processor expands each <image> where it stands, so its ids are those of `two_images_in_place`, not the
# reference processor's nested layout. Until that is settled (copy the nesting, or keep it as a stated deviation),
# `two_images` is checked end to end only through the model-only tests on the reference's ids; the strict xfail
# below turns into a failure as soon as our processor produces the reference's ids.
OUR_PROCESSOR_DIFFERS = {"two_images": "our processor expands a second <image> in place; the Preview nests it "
                                       "inside the first image's block (see the module docstring)"}
END_TO_END_CASES = [case for case in CASES if case not in OUR_PROCESSOR_DIFFERS]
PROCESSOR_CASES = [pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=OUR_PROCESSOR_DIFFERS[case]))
                   if case in OUR_PROCESSOR_DIFFERS else case for case in CASES]
INTEGER_KEYS = ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw", "audio_feats_lengths",
                "audio_placeholder_loc_lens")
FLOAT_KEYS = ("pixel_values", "pixel_values_videos", "audio_feats")


def load_golden(case: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(GOLDEN_DIR / f"{case}.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def with_media_paths(messages: list[dict]) -> list[dict]:
    messages = copy.deepcopy(messages)
    for message in messages:
        for item in message["content"]:
            for kind in ("image", "video", "audio"):
                if kind in item:
                    item[kind] = str(FIXTURES / item[kind])
    return messages


def weights_sum_of_squares(folder: Path) -> float:
    """Same checksum as the goldens: float64 sum of squares over every tensor, keys in sorted order."""
    total = torch.zeros((), dtype=torch.float64)
    with safe_open(folder / "model.safetensors", "pt") as f:
        for key in sorted(f.keys()):
            total += f.get_tensor(key).double().pow(2).sum()
    return total.item()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest reference magnitude."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return Path(build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_thinker")), with_speech=False))


@pytest.fixture(scope="module")
def same_checkpoint(checkpoint) -> Path:
    """The tiny checkpoint, after checking it is the one the goldens were made from."""
    golden, _ = load_golden("text")
    expected = golden["checksum.weights_sumsq"].item()
    actual = weights_sum_of_squares(checkpoint)
    if abs(actual - expected) > 1e-9 * abs(expected):
        pytest.fail(f"The tiny checkpoint changed (weights sum of squares {actual!r}, goldens made from "
                    f"{expected!r}): regenerate tests/fixtures/thinker as its README says. Not a model bug.")
    return checkpoint


@pytest.fixture(scope="module")
def processor(same_checkpoint) -> MingProcessor:
    return MingProcessor.from_pretrained(same_checkpoint)


@pytest.fixture(scope="module")
def model(same_checkpoint) -> MingOmni:
    return MingOmni.from_pretrained(same_checkpoint, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def inputs_of(processor):
    """case -> our processor's output for that case (computed once per module)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(case: str) -> dict[str, torch.Tensor]:
        if case not in cache:
            cache[case] = processor(with_media_paths(CASES[case]), add_generation_prompt=True)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_goldens_were_made_from_these_messages(case):
    _, metadata = load_golden(case)
    assert json.loads(metadata["messages"]) == CASES[case]


def test_tiny_checkpoint_is_the_one_the_goldens_used(checkpoint):
    sums = set()
    for case in CASES:
        golden, _ = load_golden(case)
        sums.add(golden["checksum.weights_sumsq"].item())
    assert len(sums) == 1, "goldens from different checkpoints are mixed"
    expected = sums.pop()
    actual = weights_sum_of_squares(checkpoint)
    assert abs(actual - expected) <= 1e-9 * abs(expected), (
        f"ming.tiny now writes different weights ({actual!r} != {expected!r}): regenerate tests/fixtures/thinker")


@pytest.mark.parametrize("case", PROCESSOR_CASES)
def test_processor_matches_reference(case, inputs_of):
    golden, _ = load_golden(case)
    inputs = inputs_of(case)
    for key in INTEGER_KEYS:
        if key in golden:
            assert key in inputs, f"{key} missing from our processor output"
            assert torch.equal(inputs[key].long(), golden[key]), f"{key} differs from the reference"
        else:
            assert inputs.get(key) is None, f"{key}: the reference has none for this request"
    for key in FLOAT_KEYS:
        if f"{key}.shape" not in golden:
            assert inputs.get(key) is None, f"{key}: the reference has none for this request"
            continue
        ours = inputs[key].double().reshape(-1, inputs[key].shape[-1])
        assert list(ours.shape) == golden[f"{key}.shape"].tolist(), key
        for stat, value in (("row_sum", ours.sum(1)), ("row_sumsq", ours.pow(2).sum(1)), ("col_sum", ours.sum(0))):
            ref = golden[f"{key}.{stat}"]
            assert relative_error(value, ref) < 1e-5, f"{key}.{stat} differs: {relative_error(value, ref):.3g}"


@pytest.mark.parametrize("case", END_TO_END_CASES)
def test_logits_match_reference(case, model, inputs_of):
    golden, _ = load_golden(case)
    with torch.no_grad():
        logits = model(**inputs_of(case)).logits[0]
    assert logits.dtype == torch.float32
    assert logits.shape == (golden["input_ids"].shape[1], golden["logits.last"].shape[0])
    columns = golden["logits.columns"]
    error_all_positions = relative_error(logits[:, columns], golden["logits.values"])
    error_last_row = relative_error(logits[-1], golden["logits.last"])
    assert error_all_positions < LOGITS_RTOL, f"logits (all positions) relative error {error_all_positions:.3g}"
    assert error_last_row < LOGITS_RTOL, f"last-position logits relative error {error_last_row:.3g}"


@pytest.mark.parametrize("case", END_TO_END_CASES)
def test_greedy_generation_matches_reference(case, model, inputs_of):
    golden, metadata = load_golden(case)
    new_ids = model.generate(**inputs_of(case), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert new_ids.tolist() == golden["new_ids"].tolist(), f"reference continuation: {metadata['decoded']!r}"


@pytest.mark.parametrize("case", END_TO_END_CASES)
def test_kv_cache_generation_equals_full_recomputation(case, model, inputs_of):
    """Greedy decoding with the KV cache must pick, at every step, the token that a full forward pass over the whole
    sequence picks (media features and routing spans included)."""
    inputs = inputs_of(case)
    new_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    sequence = inputs["input_ids"]
    recomputed = []
    with torch.no_grad():
        for _ in range(len(new_ids)):
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), **media).logits
            token = int(logits[0, -1].argmax())
            recomputed.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert new_ids == recomputed


def on_reference_ids(case: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our processor's media tensors with the reference processor's input_ids and attention_mask."""
    golden, _ = load_golden(case)
    return {**inputs, "input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]}


def router_ids_of_spans(spans: torch.Tensor, length: int) -> torch.Tensor:
    """The reference's router masks: image gate where image_start < position < image_end, audio gate likewise
    (99999 / 999999 mean no span), the text gate elsewhere."""
    image_start, image_end, audio_start, audio_end = spans.tolist()
    positions = torch.arange(length)
    want = torch.full((length,), TEXT)
    want[(positions > image_start) & (positions < image_end)] = IMAGE
    want[(positions > audio_start) & (positions < audio_end)] = AUDIO
    return want


@pytest.mark.parametrize("case", CASES)
def test_router_spans_match_reference(case, model, inputs_of):
    """Which gate routes each position, on the reference's own input_ids (so only the model's span rule is tested)."""
    golden, _ = load_golden(case)
    inputs = on_reference_ids(case, inputs_of(case))
    media = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        _, router_ids = model.embed(**media)
    want = router_ids_of_spans(golden["router.spans"], golden["input_ids"].shape[1])
    assert router_ids[0].tolist() == want.tolist(), f"router spans differ from the reference's {golden['router.spans']}"


@pytest.mark.parametrize("case", TWO_IMAGE_CASES)
def test_model_on_reference_input_ids(case, model, inputs_of):
    """Logits and greedy tokens of our model fed the reference processor's input_ids (our pixels, which the processor
    test pins to the reference's): parity of the model alone, whatever our processor does with two images."""
    golden, _ = load_golden(case)
    inputs = on_reference_ids(case, inputs_of(case))
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    error_all_positions = relative_error(logits[:, golden["logits.columns"]], golden["logits.values"])
    error_last_row = relative_error(logits[-1], golden["logits.last"])
    assert error_all_positions < LOGITS_RTOL, f"logits (all positions) relative error {error_all_positions:.3g}"
    assert error_last_row < LOGITS_RTOL, f"last-position logits relative error {error_last_row:.3g}"
    new_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert new_ids.tolist() == golden["new_ids"].tolist()
