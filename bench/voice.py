"""Voice figures for the cloning and hands-free call issues: `python -m bench.voice --out bench/results`.

1. Cloning: the time to make a voice from a 10 s recording (speech measures + CAM++ embedding on the CPU through
   onnxruntime, as the Space does), and the first audio of a spoken reply in the cloned voice vs a stock voice.
   The CAM++ here is the random stand-in of `ming.testing.campplus` (257 KB); the real `campplus.onnx` (28 MB, 7M
   parameters) was measured at ~115 ms for 10 s of speech on a 2-core CPU (shared reference notes): both are quoted.
2. A hands-free turn, end of the visitor's speech -> first reply audio, split into: the turn detector's pause (Silero
   VAD over 0.2 s microphone chunks at 48 kHz, as the browser sends them; audio time from the true end of speech to
   the turn's end, plus the detector's CPU time), then the thinker (audio frontend, SANM, prefill, decode to the first
   sentence piece), the talker and flow + vocoder for the first piece: the speech-to-speech path of bench/speech.py,
   full-size thinker with random weights and a 0.5B talker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import numpy as np
import soundfile
import soxr
import torch

from bench.bench import AUDIO_PATCH, fill_random_, media_prompt
from bench.speech import REPLY, build_speech, scripted_reply
from ming.audio import SAMPLE_RATE, AudioFrontend
from ming.configs import RELEASE_CONFIG
from ming.modeling import MingOmni
from ming.speech.speaker import SpeakerEncoder, assess_voice_sample
from ming.testing.campplus import write_random_campplus
from serving.voice_call import TurnConfig, TurnDetector, TurnEnded

SPEECH = os.path.join(os.path.dirname(__file__), "..", "examples", "audio", "capital_question.wav")
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "audio", "robot_story_request.wav")


def speech_16k(path: str) -> np.ndarray:
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE).astype(np.float32)


def clone_time() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        encoder = SpeakerEncoder.from_file(write_random_campplus(os.path.join(folder, "campplus.onnx")))
    sample = speech_16k(SAMPLE)
    sample = np.tile(sample, int(np.ceil(10 * SAMPLE_RATE / len(sample))))[: 10 * SAMPLE_RATE]
    assess_voice_sample(encoder, sample)  # warm-up
    assess, embed = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        assess_voice_sample(encoder, sample)
        assess.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        encoder.embed(sample)
        embed.append(time.perf_counter() - t0)
    return {"clone_10s_total_ms": 1000 * statistics.median(assess),
            "clone_10s_embedding_only_ms": 1000 * statistics.median(embed)}


def pause_detection(pause_s: float = TurnConfig.end_pause_s) -> dict[str, float]:
    """Audio time from the true end of speech to the turn's end, and the detector's CPU time per second of audio."""
    speech = speech_16k(SPEECH)
    active = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    true_end = active[-1] / SAMPLE_RATE
    audio = np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), speech, np.zeros(3 * SAMPLE_RATE, np.float32)])
    mic = (soxr.resample(audio, SAMPLE_RATE, 48000) * 32767).astype(np.int16)
    detector = TurnDetector(TurnConfig(end_pause_s=pause_s))
    step = int(0.2 * 48000)
    ended, cpu = None, 0.0
    for start in range(0, len(mic), step):
        t0 = time.perf_counter()
        events = detector.feed((48000, mic[start:start + step]))
        cpu += time.perf_counter() - t0
        ended = ended or next((e for e in events if isinstance(e, TurnEnded)), None)
    if ended is None:
        raise RuntimeError("the turn detector found no turn in the test speech")
    return {"pause_setting_s": pause_s,
            "turn_detected_after_speech_end_ms": 1000 * (ended.detected_at_s - (0.5 + true_end)),
            "turn_detector_cpu_ms_per_audio_s": 1000 * cpu / (len(audio) / SAMPLE_RATE)}


def first_reply_audio(model: MingOmni, speech, voices: dict[str, torch.Tensor]) -> dict[str, float]:
    frontend = AudioFrontend(shift=torch.zeros(560), scale=torch.ones(560))
    waveform = torch.from_numpy(speech_16k(SPEECH))
    words = [w + " " for w in REPLY.split()]

    def turn(voice: torch.Tensor) -> tuple[float, float, float]:
        speech.talker.calls.clear()
        speech.detokenizer.calls.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = frontend(waveform)
        n = feats.shape[0]
        inputs = {"input_ids": media_prompt(AUDIO_PATCH, n), "audio_feats": feats[None],
                  "audio_feats_lengths": torch.tensor([[n]]), "audio_placeholder_loc_lens": torch.tensor([[[4, n]]])}
        stream = model.generate_stream(**inputs, max_new_tokens=len(words) + 1)
        for event in speech.stream(scripted_reply(stream, words), stream.thinker_states, voice=voice, seed=0):
            if event.audio is not None:
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                _, talker_s = speech.talker.calls[0]
                return first, talker_s, speech.detokenizer.calls[0]
        raise RuntimeError("no audio")

    results = {}
    for name, voice in voices.items():
        turn(voice)  # warm-up
        runs = sorted(turn(voice) for _ in range(5))
        first, talker_s, detokenizer_s = runs[2]
        results[f"first_audio_{name}_ms"] = 1000 * first
        results[f"first_audio_{name}_talker_ms"] = 1000 * talker_s
        results[f"first_audio_{name}_flow_vocoder_ms"] = 1000 * detokenizer_s
        results[f"first_audio_{name}_thinker_ms"] = 1000 * (first - talker_s - detokenizer_s)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    results: dict[str, float] = {}
    results.update(clone_time())
    results.update(pause_detection())
    model = MingOmni.from_config(RELEASE_CONFIG, device="cuda", dtype=torch.bfloat16)
    fill_random_(model)
    speech = build_speech("0.5b", model.config.llm_config.hidden_size, model.device)
    with tempfile.TemporaryDirectory() as folder:
        encoder = SpeakerEncoder.from_file(write_random_campplus(os.path.join(folder, "campplus.onnx")))
    cloned = encoder.embed(speech_16k(SAMPLE))
    stock = torch.randn(1, 192, generator=torch.Generator().manual_seed(0))
    results.update(first_reply_audio(model, speech, {"stock_voice": stock, "cloned_voice": cloned}))
    results["call_turn_end_of_speech_to_first_audio_ms"] = (results["turn_detected_after_speech_end_ms"]
                                                            + results["first_audio_stock_voice_ms"])
    date = datetime.date.today().isoformat()
    name = f"{date}_{card.replace(' ', '_')}_voice"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"card": card, **results}, f, indent=2)
    lines = [f"# Voice cloning and hands-free turn latency: {card}, {date}", "",
             "Full-size thinker (random bf16 weights), 0.5B talker, CosyVoice-size flow + HiFT; `python -m bench.voice`.",
             "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results.items()]
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
