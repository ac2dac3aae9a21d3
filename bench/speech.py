"""Speech-path figures for bench.bench: first audio chunk of a speech-to-speech turn, and the real-time factor.

The release's talker size is not public (its `talker/config.json` ships only with the weights). We time a Qwen2
talker of the size given by --talker (0.5B: hidden 896 x 24 layers, the size v1.5's code implies; 1.5B: hidden
1536 x 28 layers, the upper estimate from the release's load figure), the CosyVoice-300M flow decoder and HiFT
vocoder at their public sizes, all with random weights.

A random thinker writes random token ids with no sentence ends, which would hide the sentence cutting. So the
reply's *text* is scripted while its *cost* is real: every scripted word is released only after a real thinker
decode step, and the audio question really goes through the frontend, SANM encoder and prefill.

Likewise a random talker never says <audio_eos>, so it would babble to its safety budget (64 + 40 per text token:
about 15 s of audio for a 3 s sentence). A trained talker stops when the sentence is spoken, so each sentence's
talker run is capped at the token count of natural speech (14 characters per second, 32 S3-BPE ids per second);
every token is still a real talker step. The first chunk's parts (thinker text, talker, flow + vocoder) are timed.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from ming.speech.detokenizer import AudioDetokenizer
from ming.speech.flow import FlowConfig, FlowDecoder
from ming.speech.hift import HiFTConfig, HiFTGenerator
from ming.speech.streaming import SpeechGenerator
from ming.speech.talker import Talker, TalkerLMConfig, TalkerTokenizer
from ming.testing.speech import write_text_tokenizer
from ming.speech.voices import VoiceBank

TALKER_SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
REPLY = (
    "Sure, here is a short answer to your question. The weather will be sunny tomorrow, with a light wind from the "
    "west. Temperatures reach twenty degrees in the afternoon. In the evening it gets cooler, so bring a jacket. "
    "Have a nice day and enjoy the sunshine while it lasts!"
)


class ExpandingCodec:
    """Stands in for the S3-BPE decode: the release's BPE shortens 50 Hz speech tokens by about 36%, so each BPE id
    expands to 1.56 speech tokens on average (9 of every 16 ids become two tokens)."""

    def decode(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for k, i in enumerate(ids):
            out += [i % 4096] * (2 if k % 16 < 9 else 1)
        return out


CHARACTERS_PER_SECOND = 14  # natural English speech, ~150 words per minute
BPE_IDS_PER_SECOND = 32  # 50 Hz speech tokens / 1.56 (ExpandingCodec)


class SpeakingRateTalker:
    """The real talker, stopped after as many tokens as the sentence takes to say (a trained talker's
    <audio_eos>), timing each call."""

    def __init__(self, talker: Talker, synchronize: bool = True):
        self.talker = talker
        self.synchronize = synchronize  # off where other threads capture CUDA graphs meanwhile (bench.load)
        self.calls: list[tuple[int, float]] = []  # (tokens, seconds) per sentence

    def __getattr__(self, name: str):
        return getattr(self.talker, name)

    def generate(self, context, text: str, generator=None, max_new_tokens: int = 1000, **kwargs) -> list[int]:
        natural = math.ceil(len(text) / CHARACTERS_PER_SECOND * BPE_IDS_PER_SECOND)
        if self.synchronize:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = self.talker.generate(context, text, generator, min(max_new_tokens, natural), min_new_tokens=natural, **kwargs)
        if self.synchronize:
            torch.cuda.synchronize()
        self.calls.append((len(ids), time.perf_counter() - t0))
        return ids


class TimedDetokenizer:
    """The flow decoder + vocoder, timing each sentence."""

    def __init__(self, detokenizer: AudioDetokenizer):
        self.detokenizer = detokenizer
        self.calls: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.detokenizer, name)

    def synthesize(self, *args, **kwargs) -> torch.Tensor:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        wave = self.detokenizer.synthesize(*args, **kwargs)
        torch.cuda.synchronize()
        self.calls.append(time.perf_counter() - t0)
        return wave


def build_speech(size: str, thinker_hidden: int, device: torch.device) -> SpeechGenerator:
    with tempfile.TemporaryDirectory() as folder:
        write_text_tokenizer(folder)
        tokenizer = TalkerTokenizer.from_dir(folder)
    config = TalkerLMConfig(vocab_size=184445, rope_theta=1e6, tie_word_embeddings=True, **TALKER_SIZES[size])
    with torch.device(device):
        talker = Talker(config, tokenizer, thinker_hidden)
    talker = talker.to(torch.bfloat16).eval()
    talker.model.lm_head.weight = talker.model.model.embed_tokens.weight
    flow = FlowDecoder(FlowConfig()).to(device, torch.bfloat16).eval()
    hift = HiFTGenerator(HiFTConfig()).to(device).cast_convs(torch.bfloat16).eval()
    return SpeechGenerator(
        SpeakingRateTalker(talker), ExpandingCodec(), TimedDetokenizer(AudioDetokenizer(flow, hift)), VoiceBank({})
    )


def scripted_reply(stream, words: list[str]):
    """Yield one scripted word per real thinker token (the thinker's real cost, readable text)."""
    for word, _ in zip(words, stream):
        yield word


def measure_speech(model, audio_inputs, image_inputs: dict, size: str = "0.5b") -> dict[str, float]:
    """model: the full-size MingOmni on CUDA; audio_inputs(waveform) -> model inputs of a spoken question;
    image_inputs: model inputs of an image question (for the memory of an image chat with a spoken reply)."""
    speech = build_speech(size, model.config.llm_config.hidden_size, model.device)
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(0))
    words = [w + " " for w in REPLY.split()]
    waveform = 0.1 * torch.randn(5 * 16000, generator=torch.Generator().manual_seed(1))
    results: dict[str, float] = {}

    def turn(inputs: dict | None = None) -> tuple[float, float, float]:
        speech.talker.calls.clear()
        speech.detokenizer.calls.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = inputs if inputs is not None else audio_inputs(waveform)  # the frontend is part of the turn
        stream = model.generate_stream(**inputs, max_new_tokens=len(words) + 1)
        first = None
        audio_seconds = 0.0
        for event in speech.stream(scripted_reply(stream, words), stream.thinker_states, voice=speaker, seed=0):
            if event.audio is not None:
                audio_seconds += len(event.audio) / speech.sample_rate
                if first is None:
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    tokens, talker_s = speech.talker.calls[0]
                    breakdown.append((first, tokens, talker_s, speech.detokenizer.calls[0]))
        torch.cuda.synchronize()
        return first, time.perf_counter() - t0, audio_seconds

    breakdown: list[tuple[float, int, float, float]] = []
    turn()  # warm-up: kernel selection, graph captures
    torch.cuda.reset_peak_memory_stats()
    breakdown.clear()
    runs = [turn() for _ in range(3)]
    runs.sort()
    first, total, audio = runs[1]
    results["speech_first_chunk_ms"] = 1000 * first
    # The first chunk's parts (median run): the thinker until the first piece of text, then talker, flow + vocoder.
    first, tokens, talker_s, detokenizer_s = sorted(breakdown)[1]
    results["speech_first_piece_talker_tokens"] = tokens
    results["speech_first_chunk_talker_ms"] = 1000 * talker_s
    results["speech_first_chunk_detokenizer_ms"] = 1000 * detokenizer_s
    results["speech_first_chunk_thinker_ms"] = 1000 * (first - talker_s - detokenizer_s)
    results["speech_turn_rtf"] = total / audio
    results["speech_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    turn(image_inputs)
    results["image_speech_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # Real-time factor of talker + decoder + vocoder alone: the whole reply, text given at once.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    chunks = [e.audio for e in speech.stream([REPLY], None, voice=speaker, seed=1) if e.audio is not None]
    torch.cuda.synchronize()
    results["speech_rtf"] = (time.perf_counter() - t0) / (sum(len(c) for c in chunks) / speech.sample_rate)
    results["speech_talker_size_b"] = float(size.rstrip("b"))
    return results
