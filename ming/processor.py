"""Chat messages -> model inputs for Ming-Lite-Omni-Preview, and token ids -> text.

A request is a list of messages in the reference's format:

    [{"role": "HUMAN", "content": [{"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is this?"}]}]

Roles are HUMAN (or USER), ASSISTANT and SYSTEM (any case); `content` may also be a plain string. The prompt is built
the way the Preview reference builds it:

    <role>HUMAN</role>{turn 1}<role>ASSISTANT</role>{answer 1}<role>HUMAN</role>{turn 2}<role>ASSISTANT</role>

with a system prompt, if any, in front as `<role>SYSTEM</role>{system}` (the reference's `system_template` slot).
Media items become placeholders where they sit in the content list:

    image  <image> + N x <imagePatch> + </image> + "\\n"        N = grid_t * grid_h * grid_w / 4
    video  <video> + N x <imagePatch> + </video> + "\\n"
    audio  <audio> + N x <audioPatch> + </audio>               N = LFR feature frames

Preview limits (the model was built for them): at most one audio per request, and images and videos cannot be mixed
(both fill the same <imagePatch> slots, so the model could not tell which features go where).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from .audio import AudioFrontend
from .media import (
    IMAGE_FACTOR,
    MediaError,
    load_audio,
    load_image,
    load_video,
    smart_resize,
)

ASR_PROMPT = "Please recognize the language of this speech and transcribe it. Format: oral."
# The Preview's chain-of-thought prompt. It is not a system turn: it is prefixed to the user's text.
THINKING_SYSTEM_PROMPT = (
    "SYSTEM: You are a helpful assistant. When the user asks a question, your response must include two parts: "
    "first, the reasoning process enclosed in <thinking>...</thinking> tags, then the final answer enclosed in "
    "<answer>...</answer> tags. The critical answer or key result should be placed within \\boxed{}.\n"
)

HUMAN_PREFIX = "<role>HUMAN</role>"
ASSISTANT_PREFIX = "<role>ASSISTANT</role>"
SYSTEM_PREFIX = "<role>SYSTEM</role>"
IMAGE_PATCH = "<imagePatch>"
AUDIO_PATCH = "<audioPatch>"
AUDIO_START = "<audio>"
VIDEO_START, VIDEO_END = "<video>", "</video>"
END_OF_TEXT = "<|endoftext|>"

# Image pixel bounds of the first resize (the reference's fetch_image); the second comes from preprocessor_config.
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 1024 * 28 * 28
# Video frames are resized a second time within these bounds (the image processor's video defaults).
VIDEO_PROCESSOR_MIN_PIXELS = 128 * 28 * 28
VIDEO_PROCESSOR_MAX_PIXELS = 768 * 28 * 28


def asr_messages(audio: Any) -> list[dict]:
    """A speech-recognition request: the ASR instruction, then the audio."""
    return [{"role": "HUMAN", "content": [{"type": "text", "text": ASR_PROMPT}, {"type": "audio", "audio": audio}]}]


def thinking_messages(messages: list[dict]) -> list[dict]:
    """The same conversation with the chain-of-thought prompt prefixed to the last user turn's first text."""
    messages = [dict(m, content=_content_items(m["content"])) for m in messages]
    for message in reversed(messages):
        if _role(message) == "HUMAN":
            items = message["content"]
            for i, item in enumerate(items):
                if item["type"] == "text":
                    items[i] = dict(item, text=THINKING_SYSTEM_PROMPT + item["text"])
                    return messages
            items.append({"type": "text", "text": THINKING_SYSTEM_PROMPT})
            return messages
    raise ValueError("thinking_messages needs at least one HUMAN message.")


def _role(message: dict) -> str:
    role = str(message.get("role", "")).upper()
    if role == "USER":
        return "HUMAN"
    if role not in ("HUMAN", "ASSISTANT", "SYSTEM"):
        raise ValueError(f"Unknown message role {message.get('role')!r}; use HUMAN, ASSISTANT or SYSTEM.")
    return role


def _content_items(content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    items = list(content)
    for item in items:
        if not isinstance(item, dict) or item.get("type") not in ("text", "image", "video", "audio"):
            raise ValueError(f"Unsupported content item {item!r}: expected a dict with type text/image/video/audio.")
        if item["type"] not in item:
            raise ValueError(f"Content item of type {item['type']!r} has no {item['type']!r} field.")
    return items


def video_processor_size(height: int, width: int) -> tuple[int, int]:
    """The image processor's second resize of video frames (the reference resizes sampled frames twice)."""
    return smart_resize(height, width, IMAGE_FACTOR, VIDEO_PROCESSOR_MIN_PIXELS, VIDEO_PROCESSOR_MAX_PIXELS)


@dataclass
class VideoPrompt:
    """A conversation about one video, split where a cached video prefix ends (see `MingProcessor.video_prompt`).

    head_ids + <imagePatch> x N + tail_ids + continuation_ids is the token sequence `MingProcessor.__call__` would
    build (the split falls on special tokens, so the pieces tokenize exactly as the whole)."""

    video: Any  # the video item's source
    max_frames: int | None
    head_ids: torch.Tensor  # [1, n]: system turn, "<role>HUMAN</role>", text before the video, "<video>"
    tail_ids: torch.Tensor  # [1, 1]: "</video>"
    continuation_ids: torch.Tensor  # [1, m]: "\n", the rest of the conversation, the generation prompt


# ----------------------------------------------------------------------------------------------------- pixels

@dataclass
class VisionSettings:
    """Image-processor settings (preprocessor_config.json of the release)."""

    min_pixels: int = 78400
    max_pixels: int = 802816
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    @classmethod
    def from_json(cls, path: str) -> "VisionSettings":
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return cls(**{name: config[name] for name in cls.__dataclass_fields__ if name in config})


def _normalize(frames: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 CLIP-normalised, with the reference's arithmetic (x/255 in float64, rounded
    to float32, then (x - mean) / std in float32) so values match it bit for bit."""
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(settings.image_mean, dtype=np.float32)
    std = np.array(settings.image_std, dtype=np.float32)
    return (scaled - mean) / std


def _patchify(frames: np.ndarray, settings: VisionSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [T, H, W, 3] (T a multiple of the temporal patch) -> patches [t*h*w, 3*2*14*14], (t, h, w).

    Each row is one 14x14 patch over 2 consecutive frames, flattened as (channel, time, row, col). Rows are ordered
    so that the 2x2 patches the vision merger fuses into one LLM token are consecutive (Qwen2-VL order)."""
    p, tp, m = settings.patch_size, settings.temporal_patch_size, settings.merge_size
    t, height, width, channels = frames.shape
    grid = (t // tp, height // p, width // p)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, C, H, W]
    x = x.reshape(grid[0], tp, channels, grid[1] // m, m, p, grid[2] // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(grid[0] * grid[1] * grid[2], channels * tp * p * p).contiguous(), grid


def _pil_bicubic(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


# -------------------------------------------------------------------------------------------------- streaming

class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get text deltas that never split a UTF-8 character.

    It decodes a short window of recent ids and holds the delta back while it ends in U+FFFD (a character whose
    bytes have not all arrived). A context id before the window keeps word-boundary spacing the same as a full
    decode. `flush()` returns whatever is still held (e.g. a genuinely invalid byte, as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: already-emitted ids kept as context
        self._read = 0  # ids before this have been emitted

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._prefix, len(self._ids))
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._decode(self._prefix, self._read)):]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        delta = self._decode(self._prefix, len(self._ids))[len(self._decode(self._prefix, self._read)):]
        self._prefix = self._read = len(self._ids)
        return delta


# -------------------------------------------------------------------------------------------------- processor

class MingProcessor:
    """Turns chat messages into the model's input tensors and generated ids back into text."""

    def __init__(self, tokenizer: Tokenizer, vision: VisionSettings, audio_frontend: AudioFrontend | None):
        self.tokenizer = tokenizer
        self.vision = vision
        self.audio_frontend = audio_frontend
        self.eos_token_id = self._token_id(END_OF_TEXT)
        self.audio_start_id = self._token_id(AUDIO_START)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MingProcessor":
        """Load tokenizer.json, preprocessor_config.json (release defaults if absent) and am.mvn (if present)."""
        path = os.fspath(path)
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config_path = os.path.join(path, "preprocessor_config.json")
        vision = VisionSettings.from_json(config_path) if os.path.exists(config_path) else VisionSettings()
        cmvn_path = os.path.join(path, "am.mvn")
        frontend = AudioFrontend(cmvn_path) if os.path.exists(cmvn_path) else None
        return cls(tokenizer, vision, frontend)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"The tokenizer has no {token} token.")
        return token_id

    # ---- media -> tensors

    def image_patches(self, image: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image -> patches [N, 1176], grid (1, h, w). Resized twice, as the reference does: first to
        [4, 1024] x 28^2 pixels, then to the processor's [min_pixels, max_pixels]; PIL bicubic both times."""
        image = load_image(image)
        height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)
        image = _pil_bicubic(image, height, width)
        height, width = smart_resize(height, width, IMAGE_FACTOR, self.vision.min_pixels, self.vision.max_pixels)
        image = _pil_bicubic(image, height, width)
        frame = _normalize(np.asarray(image)[None], self.vision)
        # A still image is a 2-frame clip of itself (the patch embedding is 3-D with temporal size 2).
        return _patchify(np.repeat(frame, self.vision.temporal_patch_size, axis=0), self.vision)

    def video_patches(self, video: Any, max_frames: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One video -> patches [N, 1176], grid (frames / 2, h, w). Frames are sampled at ~2 fps and resized
        (torch bicubic + antialias) by `load_video`; the image processor's second bounds may resize them again."""
        return self.frames_to_patches(self.video_frames(video, max_frames))

    def video_frames(self, video: Any, max_frames: int | None = None) -> np.ndarray:
        """The sampled frames of a video as the model sees them, uint8 [T, H, W, 3] (before normalisation)."""
        frames = load_video(video, max_frames=max_frames)
        height, width = video_processor_size(frames.shape[1], frames.shape[2])
        if (height, width) != frames.shape[1:3]:
            frames = np.stack([np.asarray(_pil_bicubic(Image.fromarray(f), height, width)) for f in frames])
        return frames

    def frames_to_patches(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames [T, H, W, 3] (T even, sides multiples of 28) -> patches [N, 1176], grid (T / 2, h, w)."""
        return _patchify(_normalize(frames, self.vision), self.vision)

    def audio_features(self, item: dict) -> torch.Tensor:
        """One audio item -> features [T, 560]. `item["audio"]` is a path, bytes, a (sample_rate, samples) tuple,
        or a bare array/tensor at `item.get("sample_rate", 16000)`."""
        if self.audio_frontend is None:
            raise ValueError("This checkpoint has no am.mvn, so the processor cannot prepare audio.")
        source = item["audio"]
        if isinstance(source, (np.ndarray, torch.Tensor)):
            source = (item.get("sample_rate", 16000), np.asarray(source))
        waveform = load_audio(source)
        return self.audio_frontend(torch.from_numpy(waveform))

    # ---- messages -> prompt + tensors

    def _check_limits(self, turns: list[tuple[str, list[dict]]]) -> None:
        kinds = [item["type"] for _, items in turns for item in items]
        num_audio = sum(len(item["audio"]) if isinstance(item["audio"], list) else 1
                        for _, items in turns for item in items if item["type"] == "audio")
        if num_audio > 1:
            raise ValueError(f"This request has {num_audio} audio clips; Ming-Lite-Omni-Preview accepts at most one "
                             "audio per request (the model has a single audio slot).")
        if "image" in kinds and "video" in kinds:
            raise ValueError("Images and a video cannot be mixed in one request: the Preview model puts both into "
                             "the same <imagePatch> slots and could not tell which features go where. Send them in "
                             "separate conversations.")

    def __call__(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Messages -> {input_ids, attention_mask, [pixel_values, image_grid_thw], [pixel_values_videos,
        video_grid_thw], [audio_feats, audio_feats_lengths, audio_placeholder_loc_lens]}, batch of one.

        `system_prompt` overrides a SYSTEM message (as the reference tokenizer's `system or sys_msg`)."""
        turns, system_prompt = self._turns(messages, system_prompt)
        images, videos, audios = [], [], []

        def placeholder(kind: str, item: dict) -> str:
            if kind == "image":
                placeholders = []
                for image in item["image"] if isinstance(item["image"], list) else [item["image"]]:
                    images.append(self.image_patches(image))
                    placeholders.append("<image>" + IMAGE_PATCH * self._num_tokens(images[-1][1]) + "</image>\n")
                return "\n".join(placeholders)
            if kind == "video":
                videos.append(self.video_patches(item["video"], max_frames=item.get("max_frames")))
                return VIDEO_START + IMAGE_PATCH * self._num_tokens(videos[-1][1]) + VIDEO_END + "\n"
            audio_item = dict(item, audio=item["audio"][0]) if isinstance(item["audio"], list) else item
            audios.append(self.audio_features(audio_item))
            return AUDIO_START + AUDIO_PATCH * audios[-1].shape[0] + "</audio>"

        text = self._render(turns, system_prompt, add_generation_prompt, placeholder)
        input_ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False).ids], dtype=torch.long)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            inputs["pixel_values"] = torch.cat([patches for patches, _ in images])
            inputs["image_grid_thw"] = torch.tensor([grid for _, grid in images], dtype=torch.long)
        if videos:
            inputs["pixel_values_videos"] = torch.cat([patches for patches, _ in videos])
            inputs["video_grid_thw"] = torch.tensor([grid for _, grid in videos], dtype=torch.long)
        if audios:
            feats = audios[0]
            start = input_ids[0].tolist().index(self.audio_start_id) + 1  # first <audioPatch>
            inputs["audio_feats"] = feats[None]
            inputs["audio_feats_lengths"] = torch.tensor([[feats.shape[0]]], dtype=torch.long)
            inputs["audio_placeholder_loc_lens"] = torch.tensor([[[start, feats.shape[0]]]], dtype=torch.long)
        return inputs

    def _turns(self, messages: Sequence[dict], system_prompt: str | None) -> tuple[list, str | None]:
        """(role, items) of the non-system messages, and the system prompt (the argument wins over a message)."""
        turns: list[tuple[str, list[dict]]] = []
        for message in messages:
            role, items = _role(message), _content_items(message["content"])
            if role == "SYSTEM":
                if system_prompt is None:
                    system_prompt = "".join(i["text"] for i in items if i["type"] == "text")
            else:
                turns.append((role, items))
        self._check_limits(turns)
        return turns, system_prompt

    @staticmethod
    def _render(turns: list, system_prompt: str | None, add_generation_prompt: bool, placeholder) -> str:
        """The prompt string; `placeholder(kind, item)` gives each media item's text (and may load it)."""
        text = ""
        for role, items in turns:
            if role == "ASSISTANT":
                text += ASSISTANT_PREFIX
            for item in items:
                text += item["text"] if item["type"] == "text" else placeholder(item["type"], item)
            if role == "ASSISTANT":
                text += HUMAN_PREFIX
        if add_generation_prompt:
            text += ASSISTANT_PREFIX
        prefix = HUMAN_PREFIX if system_prompt is None else SYSTEM_PREFIX + system_prompt + HUMAN_PREFIX
        return prefix + text

    def video_prompt(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, system_prompt: str | None = None
    ) -> VideoPrompt:
        """Split a conversation about one video (a long one, whose tokens go through a compressed cache rather than
        the prompt) into the token ids before the video, after it, and of the rest of the conversation.

        The head and tail depend only on the system prompt and the text before the video, so a follow-up question
        (the same messages plus new turns) gives the same head and tail: the serving layer can key a cached video
        prefix by them and prefill only `continuation_ids`. Only text may accompany the video."""
        turns, system_prompt = self._turns(messages, system_prompt)
        found: list[dict] = []

        def placeholder(kind: str, item: dict) -> str:
            if kind != "video" or found:
                raise ValueError("A long-video conversation holds one video and text only.")
            found.append(item)
            return VIDEO_START + VIDEO_END

        text = self._render(turns, system_prompt, add_generation_prompt, placeholder)
        if not found:
            raise ValueError("video_prompt needs a conversation with a video.")
        head, rest = text.split(VIDEO_START + VIDEO_END, 1)
        encode = self.tokenizer.encode
        return VideoPrompt(
            video=found[0]["video"],
            max_frames=found[0].get("max_frames"),
            head_ids=torch.tensor([encode(head + VIDEO_START, add_special_tokens=False).ids], dtype=torch.long),
            tail_ids=torch.tensor([encode(VIDEO_END, add_special_tokens=False).ids], dtype=torch.long),
            continuation_ids=torch.tensor([encode("\n" + rest, add_special_tokens=False).ids], dtype=torch.long),
        )

    def _num_tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.vision.merge_size ** 2

    # ---- ids -> text

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self.tokenizer, skip_special_tokens)


__all__ = [
    "ASR_PROMPT",
    "THINKING_SYSTEM_PROMPT",
    "MediaError",
    "MingProcessor",
    "StreamDecoder",
    "VideoPrompt",
    "asr_messages",
    "thinking_messages",
]
