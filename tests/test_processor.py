"""Processor, media loading and tiny tokenizer: prompt strings, token counts, media edge cases, streaming decode,
and parity with goldens from the reference processor (tests/fixtures/processor/README.md)."""

import hashlib
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from ming import media
from ming.audio import write_cmvn
from ming.media import MediaError, load_audio, load_video, num_video_frames, sample_frame_indices, video_duration
from ming.media import audio_duration
from ming.processor import (
    ASR_PROMPT,
    THINKING_SYSTEM_PROMPT,
    MingProcessor,
    asr_messages,
    thinking_messages,
)
from ming.testing.tokenizer import VOCAB_SIZE, load_special_tokens, write_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "processor"
IMAGE, VIDEO, CHIRP = FIXTURES / "image.png", FIXTURES / "video.mp4", FIXTURES / "chirp.wav"


def write_test_checkpoint(out_dir: str) -> None:
    """What the processor reads from a checkpoint: the tiny tokenizer and a fixed am.mvn. (No preprocessor_config:
    the release values are the defaults.) The reference goldens were made from a folder written by this function."""
    write_tiny_tokenizer(out_dir)
    write_cmvn(os.path.join(out_dir, "am.mvn"), shift=-torch.linspace(8.0, 10.0, 560),
               scale=torch.linspace(0.25, 0.35, 560))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("processor_ckpt"))
    write_test_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def processor(checkpoint) -> MingProcessor:
    return MingProcessor.from_pretrained(checkpoint)


def human(*items) -> dict:
    return {"role": "HUMAN", "content": [{"type": "text", "text": i} if isinstance(i, str) else i for i in items]}


def prompt_of(processor: MingProcessor, inputs: dict) -> str:
    return processor.decode(inputs["input_ids"][0], skip_special_tokens=False)


def patches(n: int, token: str = "<imagePatch>") -> str:
    return token * n


# --------------------------------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_has_official_special_ids_and_size(checkpoint):
    tokenizer = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    assert tokenizer.get_vocab_size() == VOCAB_SIZE == 126464
    special = load_special_tokens()
    assert len(special) == 288 and min(special) == 126080 and max(special) == 126367
    for token_id, fields in special.items():
        assert tokenizer.token_to_id(fields["content"]) == token_id
    for token, token_id in [("<|endoftext|>", 126081), ("<role>", 126340), ("<imagePatch>", 126346),
                            ("<image>", 126347), ("<audioPatch>", 126357), ("<audio>", 126358), ("<tts>", 126367)]:
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False).ids == [token_id]


def test_tiny_tokenizer_every_ordinary_id_decodes_to_visible_text(checkpoint):
    tokenizer = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    special = load_special_tokens()
    for token_id in range(256, VOCAB_SIZE):  # 0..255 are the raw bytes (control characters among them)
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        assert text.strip() and all(c.isprintable() or c in "\n\t" for c in text), (token_id, text)


def test_tiny_tokenizer_is_deterministic_and_round_trips(tmp_path, checkpoint):
    write_tiny_tokenizer(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == Path(checkpoint, name).read_bytes()
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "<role>HUMAN</role>The quick brown fox 跳过了懒狗 😀\n<role>ASSISTANT</role>"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 126340 and ids[-1] == 126341
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges are used: not one token per byte


# ------------------------------------------------------------------------------------------------ prompt strings

def test_prompt_text_only(processor):
    inputs = processor([human("Hello! 你好")])
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert prompt_of(processor, inputs) == "<role>HUMAN</role>Hello! 你好<role>ASSISTANT</role>"
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["attention_mask"].all()
    assert inputs["input_ids"].dtype == torch.long


def test_prompt_plain_string_content_and_no_generation_prompt(processor):
    inputs = processor([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert prompt_of(processor, inputs) == "<role>HUMAN</role>Hi"


def test_prompt_multi_turn(processor):
    messages = [human("Capital of China?"), {"role": "ASSISTANT", "content": "Beijing."}, human("And France?")]
    assert prompt_of(processor, processor(messages)) == (
        "<role>HUMAN</role>Capital of China?<role>ASSISTANT</role>Beijing.<role>HUMAN</role>And France?"
        "<role>ASSISTANT</role>")


def test_prompt_system_message_and_argument(processor):
    expected = "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role>"
    assert prompt_of(processor, processor([human("Hi")], system_prompt="Be brief.")) == expected
    assert prompt_of(processor, processor([{"role": "SYSTEM", "content": "Be brief."}, human("Hi")])) == expected
    # The argument wins over a SYSTEM message, as in the reference tokenizer.
    both = processor([{"role": "SYSTEM", "content": "Ignored."}, human("Hi")], system_prompt="Be brief.")
    assert prompt_of(processor, both) == expected


def test_prompt_image(processor):
    inputs = processor([human({"type": "image", "image": str(IMAGE)}, "What is it?")])
    assert inputs["image_grid_thw"].tolist() == [[1, 18, 24]]  # 308x224 -> 336x252
    assert inputs["pixel_values"].shape == (432, 1176) and inputs["pixel_values"].dtype == torch.float32
    assert prompt_of(processor, inputs) == (
        "<role>HUMAN</role><image>" + patches(108) + "</image>\nWhat is it?<role>ASSISTANT</role>")


def test_prompt_two_images_each_expanded_in_place(processor):
    image = Image.open(IMAGE)
    inputs = processor([human({"type": "image", "image": image}, "A", {"type": "image", "image": [image, image]})])
    assert inputs["image_grid_thw"].tolist() == [[1, 18, 24]] * 3
    block = "<image>" + patches(108) + "</image>\n"
    assert prompt_of(processor, inputs) == f"<role>HUMAN</role>{block}A{block}\n{block}<role>ASSISTANT</role>"


def test_prompt_video(processor):
    inputs = processor([human({"type": "video", "video": str(VIDEO)}, "What moves?")])
    assert inputs["video_grid_thw"].tolist() == [[2, 20, 28]]  # 4 frames of 280x392 (from 160x120)
    assert inputs["pixel_values_videos"].shape == (2 * 20 * 28, 1176)
    assert "pixel_values" not in inputs
    assert prompt_of(processor, inputs) == (
        "<role>HUMAN</role><video>" + patches(280) + "</video>\nWhat moves?<role>ASSISTANT</role>")


def test_prompt_audio_and_placeholder_location(processor):
    inputs = processor(asr_messages(str(CHIRP)))
    assert prompt_of(processor, inputs) == (
        f"<role>HUMAN</role>{ASR_PROMPT}<audio>" + patches(33, "<audioPatch>") + "</audio><role>ASSISTANT</role>")
    start, length = inputs["audio_placeholder_loc_lens"][0, 0].tolist()
    ids = inputs["input_ids"][0]
    assert length == 33 and ids[start - 1] == 126358 and ids[start + length] == 126359
    assert (ids[start:start + length] == 126357).all()
    assert inputs["audio_feats"].shape == (1, 33, 560) and inputs["audio_feats_lengths"].tolist() == [[33]]


def test_thinking_messages_prefix_the_last_user_text():
    messages = thinking_messages([human({"type": "image", "image": "x.png"}, "Find x.")])
    assert messages[0]["content"][1]["text"] == THINKING_SYSTEM_PROMPT + "Find x."
    assert THINKING_SYSTEM_PROMPT.startswith("SYSTEM: You are a helpful assistant.")
    assert THINKING_SYSTEM_PROMPT.endswith("within \\boxed{}.\n")


# ------------------------------------------------------------------------------------------------- request limits

def test_two_audios_are_refused(processor):
    with pytest.raises(ValueError, match="at most one audio"):
        processor([human({"type": "audio", "audio": str(CHIRP)}), {"role": "ASSISTANT", "content": "ok"},
                   human({"type": "audio", "audio": str(CHIRP)})])


def test_image_and_video_cannot_be_mixed(processor):
    with pytest.raises(ValueError, match="cannot be mixed"):
        processor([human({"type": "image", "image": str(IMAGE)}, {"type": "video", "video": str(VIDEO)})])


# ---------------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize(("width", "height", "grid"), [
    (308, 224, (1, 18, 24)),  # upscaled to the 78,400-pixel floor: 336x252
    (1, 1, (1, 20, 20)),  # 28x28 -> 56x56 (first bounds) -> 280x280 (processor floor): 100 tokens
    (10000, 100, (1, 6, 640)),  # capped at 802,816 pixels: 8960x84, 960 tokens
    (1024, 768, (1, 54, 74)),  # within bounds: sides rounded to multiples of 28
    (4000, 3000, (1, 54, 72)),  # downscaled below the 802,816-pixel ceiling: 1008x756, 972 tokens
])
def test_image_token_counts(processor, width, height, grid):
    pixel_values, image_grid = processor.image_patches(Image.new("RGB", (width, height), (10, 200, 30)))
    assert image_grid == grid
    assert pixel_values.shape == (grid[1] * grid[2], 1176)
    assert 100 <= grid[1] * grid[2] // 4 <= 1024


def test_image_aspect_ratio_limit(processor):
    with pytest.raises(MediaError, match="aspect ratio"):
        processor.image_patches(Image.new("RGB", (10000, 40)))


def test_image_sources_agree(processor):
    reference, grid = processor.image_patches(str(IMAGE))
    pil = Image.open(IMAGE)
    for source in (pil, np.asarray(pil.convert("RGB")), IMAGE.read_bytes(), pil.convert("RGBA"), IMAGE):
        values, other_grid = processor.image_patches(source)
        assert other_grid == grid and torch.equal(values, reference)


# ----------------------------------------------------------------------------------------------------- video

@pytest.mark.parametrize(("total", "fps", "max_frames", "expected"), [
    (20, 10.0, None, 4),  # 2 s -> 4 frames
    (10, 10.0, None, 4),  # 1 s -> 2, raised to the minimum of 4
    (31, 10.0, None, 6),  # 3.1 s -> 6
    (75, 25.0, None, 6),  # 3 s at 25 fps -> 6
    (55, 10.0, None, 10),  # 5.5 s -> 11 -> even 10
    (3000, 30.0, None, 128),  # 100 s -> 200, capped at 128
    (3000, 30.0, 16, 16),  # max_frames override
    (3000, 30.0, 3, 4),  # odd / too-small max_frames: floored to 2, raised to 4
])
def test_num_video_frames(total, fps, max_frames, expected):
    assert num_video_frames(total, fps, max_frames) == expected


def test_sample_frame_indices_are_bin_midpoints():
    assert sample_frame_indices(4, 20) == [2, 7, 12, 17]
    assert sample_frame_indices(4, 10) == [0, 3, 5, 8]  # bin edges 0, 2, 5, 7, 10
    assert sample_frame_indices(4, 2) == [0, 0, 1, 1]  # fewer frames than wanted: repeats


def write_video(path: Path, seconds: float, fps: int = 10, size=(64, 48)) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            image = np.full((size[1], size[0], 3), (i * 9) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(("seconds", "grid"), [(1.0, (2, 20, 28)), (5.0, (5, 20, 28))])
def test_video_token_counts(processor, tmp_path, seconds, grid):
    path = write_video(tmp_path / "clip.mp4", seconds)
    assert video_duration(path) == pytest.approx(seconds, abs=0.05)
    values, video_grid = processor.video_patches(str(path))
    assert video_grid == grid and values.shape == (grid[0] * grid[1] * grid[2], 1176)


def test_video_pyav_fallback_gives_the_same_frames(monkeypatch):
    decoded = load_video(str(VIDEO))

    def broken_decord(*args):
        raise RuntimeError("decord cannot open this file")

    monkeypatch.setattr(media, "_open_with_decord", broken_decord)
    assert np.array_equal(load_video(VIDEO.read_bytes()), decoded)


def test_video_max_frames_and_pixel_budget(tmp_path):
    path = write_video(tmp_path / "long.mp4", 10.0, size=(640, 360))
    frames = load_video(str(path), max_frames=16)
    assert frames.shape[0] == 16 and frames.dtype == np.uint8
    assert frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    assert frames.shape[1] * frames.shape[2] <= 768 * 28 * 28


# ----------------------------------------------------------------------------------------------------- audio

def write_audio(path: Path, codec: str, seconds: float, rate: int, layout: str = "mono") -> Path:
    """Encode with PyAV: left channel a 440 Hz tone at 0.5, right channel silence."""
    t = np.arange(int(seconds * rate)) / rate
    left = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    planes = np.stack([left, np.zeros_like(left)]) if layout == "stereo" else left[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, planes.shape[1], frame_size):
            chunk = planes[:, start:start + frame_size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
            for converted in resampler.resample(frame):
                for packet in stream.encode(converted):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_stereo_mp3_at_44k_keeps_the_first_channel(tmp_path):
    path = write_audio(tmp_path / "stereo.mp3", "libmp3lame", 1.5, 44100, "stereo")
    waveform = load_audio(str(path))
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(waveform.size - 1.5 * 16000) < 0.1 * 16000
    rms = float(np.sqrt(np.mean(waveform[4000:-4000] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)  # the left tone: not silence, not a downmix
    assert audio_duration(str(path)) == pytest.approx(1.5, abs=0.1)


@pytest.mark.parametrize(("name", "codec"), [("a.flac", "flac"), ("a.m4a", "aac"), ("a.webm", "libopus")])
def test_common_audio_formats(tmp_path, name, codec):
    rate = 48000 if codec == "libopus" else 22050
    waveform = load_audio(str(write_audio(tmp_path / name, codec, 1.0, rate)))
    assert abs(waveform.size - 16000) < 0.1 * 16000
    assert float(np.abs(waveform).max()) == pytest.approx(0.5, abs=0.05)


def test_gradio_style_int16_tuple(processor):
    samples = (np.sin(np.arange(32000) / 16000 * 2 * np.pi * 300) * 12000).astype(np.int16)
    feats = processor.audio_features({"audio": (16000, np.stack([samples, samples], axis=1))})
    assert feats.shape == (33, 560)


@pytest.mark.parametrize(("num_samples", "tokens"), [(1600, 2), (16000, 17), (32000, 33), (160000, 167)])
def test_audio_token_counts(processor, num_samples, tokens):
    # fbank frames = 1 + (n - 400) // 160, then one token per 6 frames (rounded up); 0.1 s gives 2 tokens.
    waveform = np.random.default_rng(0).uniform(-0.3, 0.3, num_samples).astype(np.float32)
    inputs = processor([human({"type": "audio", "audio": waveform, "sample_rate": 16000})])
    assert inputs["audio_feats"].shape == (1, tokens, 560)
    assert inputs["audio_placeholder_loc_lens"][0, 0, 1].item() == tokens


def test_audio_shorter_than_one_window_is_a_clear_error(processor):
    with pytest.raises(MediaError, match="too short"):
        processor(asr_messages((16000, np.zeros(320, dtype=np.float32))))


# ------------------------------------------------------------------------------------------------- bad files

@pytest.mark.parametrize(("name", "kind"), [("photo.png", "image"), ("clip.mp4", "video"), ("voice.wav", "audio"),
                                            ("voice.mp3", "audio")])
def test_corrupt_file_raises_media_error_naming_the_file(processor, tmp_path, name, kind):
    path = tmp_path / name
    path.write_bytes(b"this is not a media file" * 10)
    with pytest.raises(MediaError) as error:
        processor([human({"type": kind, kind: str(path)})])
    assert name in str(error.value) and "Could not read" in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback


def test_missing_file_is_a_media_error(processor, tmp_path):
    with pytest.raises(MediaError, match="File not found"):
        processor([human({"type": "image", "image": str(tmp_path / "nope.jpg")})])


# ------------------------------------------------------------------------------------------------- decoding

def test_decode_skips_special_tokens(processor):
    ids = processor([human("Hi 你好")])["input_ids"][0]
    assert processor.decode(ids) == "HUMANHi 你好ASSISTANT"
    assert processor.decode(ids.tolist() + [processor.eos_token_id]) == "HUMANHi 你好ASSISTANT"


def test_stream_decoder_never_splits_characters(processor):
    text = "你好，世界！😀👍🏽 Hello 🎉 多语言 streaming ✓"
    ids = processor.tokenizer.encode(text, add_special_tokens=False).ids
    decoder = processor.stream_decoder()
    deltas = [decoder.push(token_id) for token_id in ids]
    tail = decoder.flush()
    assert "".join(deltas) + tail == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 3  # multi-byte emoji arrive over several byte tokens and are held back


def test_stream_decoder_does_not_stall_on_invalid_bytes(processor):
    byte_ff = processor.tokenizer.token_to_id("ÿ")  # byte-level symbol of byte 0xFF, never valid UTF-8
    decoder = processor.stream_decoder()
    out = [decoder.push(byte_ff), decoder.push(processor.tokenizer.token_to_id("a"))]
    assert "".join(out) + decoder.flush() == "\ufffda"
    assert decoder.push(processor.eos_token_id) == "" and decoder.flush() == ""


# ------------------------------------------------------------------------------------- parity with the reference

def golden_case(name: str) -> dict:
    return json.loads((FIXTURES / "golden.json").read_text(encoding="utf-8"))[name]


def golden_messages(name: str) -> list[dict]:
    media = {"image": str(IMAGE), "video": str(VIDEO), "audio": str(CHIRP)}
    large_image, hd_video = str(FIXTURES / "image_large.png"), str(FIXTURES / "video_hd.mp4")
    messages = {
        "text": [human("Hello! 请介绍一下你自己。")],
        "multiturn": [human("中国的首都是哪里？"), {"role": "ASSISTANT", "content": [{"type": "text", "text": "北京。"}]},
                      human("What about France?")],
        "system": [human("Name three colours.")],
        "image": [human({"type": "image", "image": media["image"]}, "What is in the picture?")],
        "video": [human({"type": "video", "video": media["video"]}, "What moves?")],
        "image_large": [human({"type": "image", "image": large_image}, "Describe it.")],
        "video_hd": [human({"type": "video", "video": hd_video}, "Describe it.")],
        "audio": [human(ASR_PROMPT, {"type": "audio", "audio": media["audio"]})],
    }
    return messages[name]


@pytest.mark.parametrize("name", ["text", "multiturn", "system", "image", "video", "image_large", "video_hd", "audio"])
def test_parity_input_ids(processor, name):
    golden = golden_case(name)
    inputs = processor(golden_messages(name), system_prompt=golden["system"])
    assert inputs["input_ids"][0].tolist() == golden["input_ids"]
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid_key in golden:
            assert inputs[grid_key].tolist() == golden[grid_key]
            values = inputs[key].numpy().astype("<f4")
            assert float(values.astype(np.float64).sum()) == pytest.approx(golden["pixel_sum"], rel=1e-9)
            assert hashlib.sha256(values.tobytes()).hexdigest() == golden["pixel_sha256"]  # bit-exact pixels
    if "audio_placeholder_loc_lens" in golden:
        assert inputs["audio_placeholder_loc_lens"].tolist() == golden["audio_placeholder_loc_lens"]
        assert inputs["audio_feats_lengths"].tolist() == golden["audio_feats_lengths"]


def golden_pixels(kind: str) -> torch.Tensor:
    arrays = np.load(FIXTURES / "golden.npz")
    codes, table = arrays[f"{kind}_codes"], arrays[f"{kind}_table"]
    channel = np.arange(codes.shape[1]) // (codes.shape[1] // 3)
    return torch.from_numpy(table[np.broadcast_to(channel, codes.shape), codes])


def test_parity_image_pixels(processor):
    values, _ = processor.image_patches(str(IMAGE))
    assert torch.equal(values, golden_pixels("image"))


def test_parity_video_pixels(processor):
    values, _ = processor.video_patches(str(VIDEO))
    assert torch.equal(values, golden_pixels("video"))


def test_parity_audio_features(processor):
    feats = processor(golden_messages("audio"))["audio_feats"]
    expected = torch.from_numpy(np.load(FIXTURES / "golden.npz")["audio_feats"])
    # float32 FFTs and mel matmuls differ between CPUs (AVX2 / AVX-512 kernels) by up to ~7e-5 after CMVN, on the
    # quietest bins; 1e-4 is the fbank tolerance of tests/test_audio.py too. A wrong window or scale is off by >1e-2.
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
