"""Conversations: a session's turns, and the prompt built from them (what stays in the model's view, and what is
dropped when the context is full)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ming import MingProcessor
from ming.audio import SAMPLE_RATE
from ming.media import DEMO_MAX_FRAMES, MediaError
from ming.sampling import SamplingConfig

from .checks import (
    CHARS_PER_TOKEN_CEILING,
    MAX_AUDIO_SECONDS,
    MAX_IMAGES_PER_REQUEST,
    check_audio,
    check_image,
    check_video,
    media_kind,
)
from .errors import UserError


@dataclass
class Turn:
    """One exchange of a conversation: the user's text and media, the reply, and the spoken reply's full clip."""

    text: str
    media: list[tuple[str, str]] = field(default_factory=list)  # (kind, path) in the order they were attached
    reply: str = ""
    reply_audio: str | None = None  # wav of the whole spoken reply, replayable from the history
    seconds: float = 0.0  # how long the reply took (shown on thinking blocks)
    audio: np.ndarray | None = field(default=None, repr=False)  # its audio clip, decoded once (16 kHz float32)
    interrupted: bool = False  # the reply was cut short (Stop, or the visitor spoke over it)
    status: str = ""  # while the reply waits on a long video: how far its preparation is (shown, never sent)


def new_turn(text: str | None, files: list[str] | None, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> Turn:
    """A checked user turn; raises a user-facing error for anything the model cannot take."""
    text = (text or "").strip()
    media = [(media_kind(path), path) for path in files or [] if path]
    if not text and not media:
        raise UserError("The message is empty: type something or attach a file.", title="Empty message")
    counts = {kind: sum(k == kind for k, _ in media) for kind in ("image", "video", "audio")}
    if counts["audio"] > 1:
        raise UserError("Ming-Lite-Omni-Preview takes one audio clip per message.", title="Too many audio clips")
    if counts["video"] > 1 or (counts["video"] and counts["image"]):
        raise UserError("Send either one video or up to four images per message (the Preview model cannot mix "
                         "them).", title="Too many visual inputs")
    if counts["image"] > MAX_IMAGES_PER_REQUEST:
        raise UserError(f"At most {MAX_IMAGES_PER_REQUEST} images per message.", title="Too many images")
    audio = None
    for kind, path in media:
        if kind == "image":
            check_image(path)
        elif kind == "video":
            check_video(path)
        else:
            audio = check_audio(path, max_audio_seconds)
    return Turn(text=text, media=media, audio=audio)


def kept_media(turns: list[Turn]) -> set[tuple[int, int]]:
    """Which (turn, item) media stay in the prompt: the newest audio clip, and the images or video of the newest
    turn that has any. The Preview takes one audio per request and routes every token between the first and the
    last image patch through its vision router, so visual media spread over several turns would mis-route the
    text between them; older media drop out (their turns' text stays)."""
    kept: set[tuple[int, int]] = set()
    audio_kept = visual_kept = False
    for t in range(len(turns) - 1, -1, -1):
        visual = [i for i, (kind, _) in enumerate(turns[t].media) if kind in ("image", "video")]
        if visual and not visual_kept:
            kept.update((t, i) for i in visual)
            visual_kept = True
        audio = [i for i, (kind, _) in enumerate(turns[t].media) if kind == "audio"]
        if audio and not audio_kept:
            kept.add((t, audio[0]))
            audio_kept = True
    return kept


def prompt_messages(turns: list[Turn], system_prompt: str = "", with_media: bool = True) -> list[dict]:
    """The processor's chat messages for a conversation whose last turn awaits its reply (`with_media=False`: the
    text alone, to count its tokens without decoding any media)."""
    keep = kept_media(turns) if with_media else set()
    messages: list[dict] = []
    if system_prompt.strip():
        messages.append({"role": "SYSTEM", "content": system_prompt.strip()})
    for t, turn in enumerate(turns):
        content: list[dict] = []
        for i, (kind, path) in enumerate(turn.media):
            if (t, i) in keep:
                source = (SAMPLE_RATE, turn.audio) if kind == "audio" and turn.audio is not None else path
                item = {"type": kind, kind: source}
                if kind == "video":
                    item["max_frames"] = DEMO_MAX_FRAMES
                content.append(item)
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        if not content and with_media:  # its media dropped out of the context
            content.append({"type": "text", "text": "(a message with media that is no longer shown)"})
        messages.append({"role": "HUMAN", "content": content})
        if t < len(turns) - 1:
            messages.append({"role": "ASSISTANT", "content": turn.reply})
    return messages


def prepare_inputs(processor: MingProcessor, max_context: int, turns: list[Turn], system_prompt: str,
                   sampling: SamplingConfig,
                   build: Callable[[list[dict]], list[dict]] = lambda m: m) -> dict[str, torch.Tensor]:
    """Processor inputs for the conversation, dropping the oldest turns until prompt + reply fit the context.

    The processor (which decodes the media) runs once, or twice when turns must go: their count comes from the
    text alone, since only the newest media are ever in the prompt."""
    budget = max_context - sampling.max_new_tokens
    if len(turns[-1].text) > budget * CHARS_PER_TOKEN_CEILING:
        raise context_error(len(turns[-1].text), budget, max_context, unit="characters")

    def process(kept: list[Turn]) -> dict[str, torch.Tensor]:
        try:
            return processor(build(prompt_messages(kept, system_prompt)), add_generation_prompt=True)
        except MediaError as error:
            raise UserError(str(error), title="Unreadable file") from None
        except ValueError as error:  # the processor's own limits (one audio, no image + video mix)
            raise UserError(str(error)) from None

    def text_tokens(kept: list[Turn]) -> int:
        messages = build(prompt_messages(kept, system_prompt, with_media=False))
        return processor(messages, add_generation_prompt=True)["input_ids"].shape[1]

    inputs = process(turns)
    length = inputs["input_ids"].shape[1]
    if length <= budget:
        return inputs
    media_tokens = length - text_tokens(turns)
    first = next((f for f in range(1, len(turns)) if media_tokens + text_tokens(turns[f:]) <= budget), len(turns) - 1)
    for first in range(first, len(turns)):
        inputs = process(turns[first:])
        length = inputs["input_ids"].shape[1]
        if length <= budget:
            return inputs
    raise context_error(length, budget, max_context, unit="tokens")


def context_error(size: int, budget: int, max_context: int, unit: str) -> UserError:
    return UserError(
        f"The message is too long for the model: {size:,} {unit}, while the context holds {max_context:,} "
        f"tokens of which the reply may use {max_context - budget:,} (max new tokens). "
        "Shorten the message or lower max new tokens.",
        title="Message too long",
    )
