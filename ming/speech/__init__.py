"""Speech output: the talker (text -> S3-BPE speech tokens), the audio detokenizer (speech tokens -> 22.05 kHz
waveform) and sentence-by-sentence streaming on top of them.

    speech = SpeechGenerator.from_pretrained(ckpt_dir, device="cpu", dtype=torch.float32)
    for event in speech.stream(text_deltas, thinker_states=stream.thinker_states, voice="luna"): ...
    sample_rate, pcm = speech.synthesize("Text to read aloud.", voice="luna")
"""

from .detokenizer import AudioDetokenizer
from .streaming import SpeechEvent, SpeechGenerator
from .talker import Talker
from .voices import DEFAULT_VOICE, VoiceBank

__all__ = ["AudioDetokenizer", "DEFAULT_VOICE", "SpeechEvent", "SpeechGenerator", "Talker", "VoiceBank"]
