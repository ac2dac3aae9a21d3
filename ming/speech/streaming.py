"""Speech that starts while the reply is still being written.

`SpeechGenerator.stream` takes the thinker's text as it arrives, passes every delta straight through, cuts the text
into sentences, and for each sentence runs talker -> S3-BPE decode -> flow decoder + vocoder, yielding int16 audio at
the vocoder's rate as soon as that sentence is ready. The first piece is cut short (at the first comma once it is a
few words long) so the first sound comes early; later pieces run to a sentence end, bounded in length. Consecutive
pieces are joined with a short raised-cosine crossfade so the seams don't click: each piece's last few milliseconds
are held back until the next piece (or the end) arrives.

`synthesize` reads a given text aloud (no thinker conditioning) through the same path and returns the whole clip.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..loading import resolve_checkpoint
from .detokenizer import AudioDetokenizer
from .s3bpe import S3BpeCodec
from .talker import MAX_NEW_TOKENS, Talker, TalkerContext
from .voices import DEFAULT_VOICE, VoiceBank

CROSSFADE_SECONDS = 0.02
MAX_TTS_CHARACTERS = 2000  # standalone TTS; a streamed reply has no limit (it is spoken piece by piece)

# A sentence may run to about 10 s of speech, like the reference's 50-character pieces for Chinese. The cutter
# counts "units": a CJK character takes about as long to say as three Latin letters.
FIRST_PIECE_MIN_UNITS = 12  # the first piece may end at a comma once it is this long (4 CJK characters, 2-3 words)
FIRST_PIECE_MAX_UNITS = 40
PIECE_MIN_UNITS = 4  # shorter "sentences" ("1.", "Hi.") join the next one
PIECE_MAX_UNITS = 150

SENTENCE_ENDS = "。！？；…!?;.\n"
PAUSES = "，、：,:"
CLOSERS = "\"'”’」』）)]】》"
ASCII_STOPS = "!?;.,:"  # only a stop when followed by whitespace: "3.14", "1,000", "10:30", "e.g" are not


def units(char: str) -> int:
    return 3 if is_cjk(char) else 1


def is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0x3040 <= code <= 0x30FF  # kana
        or 0xAC00 <= code <= 0xD7AF  # hangul
        or 0x20000 <= code <= 0x2FA1F  # supplementary ideographs
    )


class SentenceCutter:
    """Cuts streamed text into pieces to speak. Where the cuts fall depends only on the text, not on how it was
    split into deltas."""

    def __init__(self):
        self.buffer = ""
        self.spoken_pieces = 0

    def push(self, delta: str) -> list[str]:
        """Add text; return the pieces it completed."""
        self.buffer = (self.buffer + delta).lstrip()
        return self._cut_all(final=False)

    def flush(self) -> list[str]:
        """End of text: return every remaining piece."""
        pieces = self._cut_all(final=True)
        if self.buffer.strip():
            pieces.append(self.buffer.strip())
        self.buffer = ""
        return pieces

    def _cut_all(self, final: bool) -> list[str]:
        pieces = []
        while (cut := self._find_cut(self.buffer, final)) is not None:
            piece, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:].lstrip()
            pieces.append(piece)
            self.spoken_pieces += is_speakable(piece)
        return pieces

    def _find_cut(self, text: str, final: bool) -> int | None:
        first = self.spoken_pieces == 0
        pause_min_units = FIRST_PIECE_MIN_UNITS if first else None  # later pieces end at a pause only when too long
        max_units = FIRST_PIECE_MAX_UNITS if first else PIECE_MAX_UNITS
        length = 0
        last_pause = last_space = None  # fallback cut points, should the piece reach its bound
        for i, char in enumerate(text):
            length += units(char)
            if length > max_units:
                return last_pause or last_space or i
            if char.isspace():
                last_space = i + 1
            if char not in SENTENCE_ENDS and char not in PAUSES:
                continue
            end = self._end_of_stop(text, i, final)
            if end is None:
                continue
            if char in SENTENCE_ENDS and length >= PIECE_MIN_UNITS:
                return end
            if pause_min_units is not None and length >= pause_min_units:
                return end
            last_pause = end
        return None

    @staticmethod
    def _end_of_stop(text: str, i: int, final: bool) -> int | None:
        """Where a piece ending with the stop at text[i] ends (after repeated stops and closing quotes or
        brackets: "……", "?!", "。」"), or None if text[i] is no stop here or it cannot be told until more text comes."""
        end = i + 1
        while end < len(text) and (text[end] in CLOSERS or text[end] in SENTENCE_ENDS):
            end += 1
        if end == len(text):
            return end if final else None
        if text[i] in ASCII_STOPS and not text[end].isspace():
            return None
        return end


def cut_sentences(text: str) -> list[str]:
    cutter = SentenceCutter()
    return cutter.push(text) + cutter.flush()


# ---------------------------------------------------------------------------------------------------- text cleanup
MARKDOWN_MARKS = "*#`~_"
DROPPED_CATEGORIES = {"So", "Sk", "Cs", "Co", "Cn", "Cf"}  # emoji and pictographs, modifiers, invisible controls


def speakable_text(piece: str) -> str:
    """The piece as the talker should read it: markdown marks, emoji and invisible characters removed, whitespace
    collapsed."""
    kept = [
        " " if char.isspace() else char
        for char in piece
        if char not in MARKDOWN_MARKS
        and unicodedata.category(char) not in DROPPED_CATEGORIES
        and char not in "\ufe0e\ufe0f"  # emoji variation selectors
    ]
    return " ".join("".join(kept).split())


def is_speakable(text: str) -> bool:
    """Whether there is anything to say: a letter or a digit."""
    return any(unicodedata.category(char)[0] in "LN" for char in speakable_text(text))


# ---------------------------------------------------------------------------------------------------- crossfade
def fade_in(n: int) -> np.ndarray:
    """Raised-cosine ramp 0 -> 1; fade_in(n) + fade_in(n)[::-1] == 1."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class Crossfader:
    """Joins consecutive clips, overlapping each seam by `overlap` samples with a raised-cosine crossfade.
    Streaming: the last `overlap` samples of the audio so far are held back until the next clip or `flush`."""

    def __init__(self, overlap: int):
        self.overlap = overlap
        self.held = np.zeros(0, dtype=np.float32)

    def push(self, clip: np.ndarray) -> np.ndarray:
        """Add a clip; return the audio that is now final."""
        n = min(len(self.held), len(clip))
        ramp = fade_in(n)
        seam = self.held[len(self.held) - n :] * ramp[::-1] + clip[:n] * ramp
        audio = np.concatenate([self.held[: len(self.held) - n], seam, clip[n:]]).astype(np.float32)
        keep = min(self.overlap, len(audio))
        self.held = audio[len(audio) - keep :]
        return audio[: len(audio) - keep]

    def flush(self) -> np.ndarray:
        audio, self.held = self.held, np.zeros(0, dtype=np.float32)
        return audio


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


# ---------------------------------------------------------------------------------------------------- the generator
@dataclass
class SpeechEvent:
    text_delta: str = ""  # a text delta as pulled from the input ("" for audio events)
    audio: np.ndarray | None = None  # int16 mono samples at SpeechGenerator.sample_rate
    audio_text: str = ""  # the piece of text this audio speaks ("" for the final crossfade tail)


class SpeechGenerator:
    """Talker + S3-BPE + audio detokenizer, with voices; speaks streamed or whole text."""

    def __init__(
        self,
        talker: Talker,
        codec: S3BpeCodec,
        detokenizer: AudioDetokenizer,
        voice_bank: VoiceBank,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ):
        self.talker = talker
        self.codec = codec
        self.detokenizer = detokenizer
        self.voice_bank = voice_bank
        self.max_new_tokens = max_new_tokens
        self.crossfade_samples = round(CROSSFADE_SECONDS * detokenizer.sample_rate)

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "SpeechGenerator":
        ckpt_dir = resolve_checkpoint(os.fspath(ckpt_dir))
        talker_dir = os.path.join(ckpt_dir, "talker")
        return cls(
            Talker.from_pretrained(ckpt_dir, device, dtype),
            S3BpeCodec.from_dir(os.path.join(talker_dir, "s3_bpe")),
            AudioDetokenizer.from_pretrained(talker_dir, device, dtype),
            VoiceBank.from_checkpoint(ckpt_dir),
        )

    def to(self, device: str | torch.device) -> "SpeechGenerator":
        """Move the talker, flow decoder and vocoder (ZeroGPU wants weights loaded on the CPU, then moved)."""
        self.talker.to(device)
        self.detokenizer.flow.to(device)
        self.detokenizer.hift.to(device)
        return self

    @property
    def voices(self) -> list[str]:
        return self.voice_bank.names

    @property
    def sample_rate(self) -> int:
        return self.detokenizer.sample_rate

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        text_deltas: Iterable[str],
        thinker_states: torch.Tensor | None = None,
        voice: str | os.PathLike | torch.Tensor = DEFAULT_VOICE,
        seed: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[SpeechEvent]:
        """Speak text as it is written. thinker_states: [1, L_prompt, thinker_hidden] (the thinker's
        `TokenStream.thinker_states`) or None for plain TTS. With a seed, piece k is spoken exactly as
        `speak(piece, seed=seed + k)` would speak it (same talker sampling and detokenizer noise)."""
        speaker = self.voice_bank.get(voice)
        self._check_thinker_states(thinker_states)
        cutter = SentenceCutter()
        fader = Crossfader(self.crossfade_samples)
        context: TalkerContext | None = None  # the talker's prefix, run when the first piece is ready
        spoken = 0

        def stopped() -> bool:
            return stop_event is not None and stop_event.is_set()

        def speak(pieces: list[str]) -> Iterator[SpeechEvent]:
            nonlocal context, spoken
            for piece in pieces:
                if stopped():
                    return
                if not is_speakable(piece):
                    continue
                if context is None:
                    context = self.talker.start(speaker, thinker_states, self.max_new_tokens)
                piece_seed = None if seed is None else seed + spoken
                spoken += 1
                clip = self._speak_piece(context, speakable_text(piece), speaker, piece_seed, stop_event)
                audio = fader.push(clip)
                if len(audio):
                    yield SpeechEvent(audio=to_int16(audio), audio_text=piece)

        for delta in text_deltas:
            yield SpeechEvent(text_delta=delta)
            yield from speak(cutter.push(delta))
            if stopped():
                return
        yield from speak(cutter.flush())
        tail = fader.flush()
        if len(tail) and not stopped():
            yield SpeechEvent(audio=to_int16(tail))

    # ------------------------------------------------------------------ whole text
    def synthesize(
        self, text: str, voice: str | os.PathLike | torch.Tensor = DEFAULT_VOICE, seed: int | None = None
    ) -> tuple[int, np.ndarray]:
        """Read `text` aloud (no thinker conditioning). Returns (sample_rate, int16 samples).

        Raises ValueError, with a message fit for the user, for text that cannot be read."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("Please enter some text to read aloud.")
        if len(text) > MAX_TTS_CHARACTERS:
            raise ValueError(
                f"The text is too long to read aloud ({len(text)} characters; the limit is {MAX_TTS_CHARACTERS})."
            )
        if not is_speakable(text):
            raise ValueError("There is nothing to read aloud: the text has no letters or digits.")
        chunks = [event.audio for event in self.stream([text], voice=voice, seed=seed) if event.audio is not None]
        return self.sample_rate, np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def speak(
        self,
        text: str,
        voice: str | os.PathLike | torch.Tensor = DEFAULT_VOICE,
        thinker_states: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """One piece of text, as is (no cutting, no crossfade): float32 samples from the vocoder."""
        speaker = self.voice_bank.get(voice)
        self._check_thinker_states(thinker_states)
        context = self.talker.start(speaker, thinker_states, self.max_new_tokens)
        return self._speak_piece(context, speakable_text(text), speaker, seed, None)

    # ------------------------------------------------------------------ internals
    @torch.inference_mode()
    def _speak_piece(
        self,
        context: TalkerContext,
        text: str,
        speaker: torch.Tensor,
        seed: int | None,
        stop_event: threading.Event | None,
    ) -> np.ndarray:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # Bound the talker by the text's length (about 1.2 s of speech per text token, plus 2 s at ~32 S3-BPE
        # tokens per second): a sentence the talker fails to end stops there, not after 30 s of babble.
        budget = min(self.max_new_tokens, 64 + 40 * len(self.talker.tokenizer.encode(text)))
        bpe_ids = self.talker.generate(context, text, generator, budget, stop_event=stop_event)
        speech_tokens = self.codec.decode(bpe_ids)
        if not speech_tokens:
            return np.zeros(0, dtype=np.float32)
        # Host tensors in: the detokenizer moves them itself, so that this thread launches no GPU work of its own
        # (with several replies speaking at once, another thread may be capturing a CUDA graph meanwhile).
        waveform = self.detokenizer.synthesize(torch.tensor([speech_tokens], dtype=torch.long), speaker,
                                               noise_seed=seed)
        return waveform.detach().float().cpu().numpy().reshape(-1)

    def _check_thinker_states(self, thinker_states: torch.Tensor | None) -> None:
        width = self.talker.thinker_to_talker_proj.in_features
        if thinker_states is not None and (thinker_states.dim() != 3 or thinker_states.shape[-1] != width):
            raise ValueError(f"thinker_states must be [1, L, {width}], got {tuple(thinker_states.shape)}")
