"""One-shot voice cloning: a short recording -> a 192-d CAM++ speaker embedding, the format of a voice.

In the Preview a voice is nothing but that embedding (`luna.pt`): the talker reads it raw through `vp_head` and the
flow decoder through its own speaker projection; no prompt tokens or prompt mel. So cloning = running CAM++.

CAM++ (Wang et al., "CAM++: A Fast and Efficient Network for Speaker Verification Using Context-Aware Masking",
Interspeech 2023; 3D-Speaker) is used through its ONNX export `campplus.onnx`, run with onnxruntime on the CPU as
CosyVoice runs it: no GPU time, ~0.1 s for 10 s of speech. Its input is 16 kHz audio as an 80-bin Kaldi fbank
with the povey window and no dither, minus its mean over time; its output is the raw embedding (norm ~13).

    encoder = load_speaker_encoder(ckpt_dir)          # raises SpeakerModelUnavailable with the reason
    sample = assess_voice_sample(encoder, waveform_16k)
    if sample.ok: speech.stream(..., voice=sample.embedding)
    else: tell the user why (sample.reason, a Reason) and keep the previous voice

Where the model comes from: the checkpoint's `talker/campplus.onnx` (or `campplus.onnx`), else a hub file named by
`MING_SPEAKER_MODEL` (a local path, `repo_id:filename`, or `off`), by default CosyVoice-300M's `campplus.onnx`.
"""

from __future__ import annotations

import enum
import os
import socket
import urllib.parse
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import SAMPLE_RATE, kaldi_fbank, kaldi_mel_banks, kaldi_window
from .voices import SPEAKER_DIM

NUM_MEL_BINS = 80
PEAK = 0.5  # every waveform is scaled to this peak first, so the log floor never makes the embedding gain-dependent
MIN_EMBED_SECONDS = 0.5

MODEL_FILE = "campplus.onnx"
CHECKPOINT_CANDIDATES = (os.path.join("talker", MODEL_FILE), MODEL_FILE)
MODEL_ENV = "MING_SPEAKER_MODEL"
DEFAULT_HUB_MODEL = "FunAudioLLM/CosyVoice-300M:campplus.onnx"


class SpeakerModelError(ValueError):
    """A file is not a usable speaker model (unreadable, or not (B, T, 80) -> (B, 192))."""


class SpeakerModelUnavailable(RuntimeError):
    """No speaker model can be had (none in the checkpoint, download off or failed); the message says why."""


# ---------------------------------------------------------------------------------------------------- features

_MEL_BANKS = kaldi_mel_banks()
_POVEY = kaldi_window("povey")


def speaker_features(waveform_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
    """16 kHz mono waveform -> CAM++ input [T, 80]: povey-window Kaldi fbank minus its mean over time.

    The waveform is scaled to a fixed peak first: a gain only shifts every log-mel value by a constant, which the
    mean subtraction removes, except where energies hit the log floor (digital silence); the fixed peak makes the
    features, and so the embedding, independent of the recording's level there too."""
    waveform = torch.as_tensor(np.asarray(waveform_16k), dtype=torch.float32)
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D (mono) waveform, got shape {tuple(waveform.shape)}")
    if waveform.numel() < MIN_EMBED_SECONDS * SAMPLE_RATE:
        raise ValueError(f"audio is too short for a speaker embedding: {waveform.numel() / SAMPLE_RATE:.2f} s")
    peak = waveform.abs().max()
    if not torch.isfinite(peak):
        raise ValueError("audio contains NaN or infinite samples")
    if peak > 0:
        waveform = waveform * (PEAK / peak)
    fbank = kaldi_fbank(waveform, _MEL_BANKS, _POVEY)
    return fbank - fbank.mean(dim=0)


# ---------------------------------------------------------------------------------------------------- encoder


class SpeakerEncoder:
    """A CAM++ ONNX model on onnxruntime's CPU provider: waveform -> raw embedding float32 [1, 192]."""

    sample_rate = SAMPLE_RATE

    def __init__(self, session, path: str):
        self.session = session
        self.path = path
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_file(cls, path: str | os.PathLike, num_threads: int = 1) -> "SpeakerEncoder":
        """Load and check `campplus.onnx`. Raises SpeakerModelError if it cannot be read or its signature is not
        (B, T, 80) float -> (B, 192) float."""
        import onnxruntime

        path = os.fspath(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads  # one request at a time; leave the other cores to the server
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for missing and corrupt files
            raise SpeakerModelError(f"cannot load speaker model {path}: {error}") from error
        _check_signature(session, path)
        encoder = cls(session, path)
        _check_output(encoder, path)
        return encoder

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """CAM++ features [T, 80] or [B, T, 80] -> float32 [B, 192]."""
        batch = features if features.dim() == 3 else features.unsqueeze(0)
        embedding = self.session.run(None, {self.input_name: batch.to(torch.float32).numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(embedding, dtype=np.float32))

    def embed(self, waveform_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """16 kHz mono waveform (at least 0.5 s) -> raw speaker embedding float32 [1, 192], the format of a voice
        (`VoiceBank.get` and `SpeechGenerator.stream(voice=...)` take it as it is)."""
        return self.embed_features(speaker_features(waveform_16k))


def _check_signature(session, path: str) -> None:
    """Declared shapes: one float input (B, T, 80) with T free, first output float (B, 192). Unnamed dims pass."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = "one float input (batch, frames, 80) and a float output (batch, 192)"
    if len(inputs) != 1 or not outputs:
        raise SpeakerModelError(f"{path} is not a CAM++ speaker model: expected {expected}, got "
                                f"{len(inputs)} inputs and {len(outputs)} outputs")  # fmt: skip
    given, produced = inputs[0], outputs[0]

    def fixed(dim) -> int | None:
        return dim if isinstance(dim, int) else None

    problems = []
    if given.type != "tensor(float)" or len(given.shape) != 3 or fixed(given.shape[2]) not in (None, NUM_MEL_BINS):
        problems.append(f"input {given.name!r} is {given.type} {given.shape}")
    elif fixed(given.shape[1]) is not None:
        problems.append(f"input {given.name!r} has a fixed number of frames ({given.shape[1]})")
    output_ok = produced.type == "tensor(float)" and len(produced.shape) == 2
    if not output_ok or fixed(produced.shape[1]) not in (None, SPEAKER_DIM):
        problems.append(f"output {produced.name!r} is {produced.type} {produced.shape}")
    if problems:
        raise SpeakerModelError(f"{path} is not a CAM++ speaker model: expected {expected}; " + "; ".join(problems))


def _check_output(encoder: SpeakerEncoder, path: str) -> None:
    """Run one second of features through it: declared shapes can be missing or wrong, what comes out cannot."""
    probe = torch.zeros(1, 100, NUM_MEL_BINS)
    probe[0, ::2] = 1.0  # not constant in time: a std pooling of a constant would be 0 and may give NaN
    try:
        embedding = encoder.embed_features(probe)
    except Exception as error:
        raise SpeakerModelError(f"{path} is not a CAM++ speaker model: it failed on (1, 100, 80) features: "
                                f"{error}") from error  # fmt: skip
    if tuple(embedding.shape) != (1, SPEAKER_DIM) or not torch.isfinite(embedding).all():
        raise SpeakerModelError(f"{path} is not a CAM++ speaker model: (1, 100, 80) features gave "
                                f"{tuple(embedding.shape)}, expected finite (1, {SPEAKER_DIM})")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- finding it


def find_speaker_model(checkpoint_dir: str | os.PathLike) -> str | None:
    """The checkpoint's own `campplus.onnx` (`talker/campplus.onnx`, then `campplus.onnx`), or None."""
    for candidate in CHECKPOINT_CANDIDATES:
        path = os.path.join(checkpoint_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def download_speaker_model(spec: str | None = None, timeout_s: float = 10.0) -> str:
    """The speaker model named by `spec` (default: env MING_SPEAKER_MODEL, else CosyVoice-300M's campplus.onnx):
    a local file path, or `repo_id:filename` fetched from the hub (the cache first, so it is downloaded once).

    Raises SpeakerModelUnavailable, quickly, when it is switched off (`off`) or cannot be had (offline, no such
    file)."""
    spec = spec if spec is not None else os.environ.get(MODEL_ENV, DEFAULT_HUB_MODEL)
    spec = spec.strip()
    if spec.lower() in ("", "off", "none", "0"):
        raise SpeakerModelUnavailable(f"voice cloning is switched off ({MODEL_ENV}={spec!r})")
    if os.path.isfile(spec):
        return spec
    repo_id, sep, filename = spec.partition(":")
    if not sep or not repo_id or not filename or repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise SpeakerModelUnavailable(f"no speaker model at {spec!r}: not a file, and not 'repo_id:filename'")
    from huggingface_hub import constants, hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except Exception:  # not cached yet: go to the hub
        pass
    # huggingface_hub retries a failed connection for ~25 s; one plain connection attempt answers "offline" at once.
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=timeout_s).close()
    except OSError as error:
        raise SpeakerModelUnavailable(f"cannot download the speaker model {repo_id}/{filename}: {host} cannot be "
                                      f"reached ({error})") from error  # fmt: skip
    try:
        return hf_hub_download(repo_id, filename, etag_timeout=timeout_s)
    except Exception as error:  # offline, timeout, gated or missing repo: all mean "not available here"
        raise SpeakerModelUnavailable(f"cannot download the speaker model {repo_id}/{filename}: "
                                      f"{type(error).__name__}: {error}") from error  # fmt: skip


def load_speaker_encoder(checkpoint_dir: str | os.PathLike | None, download: bool = True) -> SpeakerEncoder:
    """The checkpoint's speaker model, else (with `download`) the configured hub file, loaded and checked.

    Raises SpeakerModelUnavailable with the reason when there is none, or it is not a usable CAM++ model."""
    path = find_speaker_model(checkpoint_dir) if checkpoint_dir is not None else None
    if path is None:
        if not download:
            raise SpeakerModelUnavailable(f"the checkpoint has no {MODEL_FILE}")
        path = download_speaker_model()
    try:
        return SpeakerEncoder.from_file(path)
    except SpeakerModelError as error:
        raise SpeakerModelUnavailable(str(error)) from error


# ---------------------------------------------------------------------------------------------------- assessment
#
# Is a recording usable as a voice sample? A few robust frame measures (10 ms hop), no model: frame level, a noise
# floor, voicing (autocorrelation at a pitch lag), spectral flatness and syllable-rate modulation of the level.
# Speech is loud against its own floor, mostly voiced with a clear pitch, not flat like noise, and rises and falls
# at the syllable rate (~4 Hz) where held notes of music do not (Scheirer & Slaney, ICASSP 1997, use the same 4 Hz
# modulation cue). A packaged VAD can replace `measure_speech` later; the reasons stay.

HOP = 160  # 10 ms
FRAME = 400  # 25 ms, level and flatness
PITCH_FRAME = 800  # 50 ms: room for two periods of a 60 Hz voice
MIN_LAG, MAX_LAG = SAMPLE_RATE // 400, SAMPLE_RATE // 60  # pitch 60-400 Hz

MAX_INPUT_SECONDS = 120.0  # longer is refused outright (the UI asks for 3-30 s)
MAX_EMBED_SECONDS = 30.0  # longer input: the 30 s with the most speech is used
MIN_SPEECH_SECONDS = 2.0
SILENCE_DBFS = -55.0  # the loud frames (95th percentile) of a usable recording are above this
ACTIVE_ABOVE_FLOOR_DB, ACTIVE_BELOW_PEAK_DB = 6.0, 30.0
MAX_PAUSE_FRAMES = 20  # pauses up to 0.2 s count as speech time
MIN_JUDGED_FRAMES = 50  # 0.5 s
VOICED_CORRELATION = 0.4
MIN_VOICED_RATIO = 0.3
MAX_FLATNESS = 0.3
MIN_MODULATION_DB = 2.5
MIN_SNR_DB = 15.0
SEGMENT_SECONDS = 2.0  # the speaker-consistency check embeds pieces at least this long
# Cosine between the mean piece embeddings of two parts of one sample. 0.3 is about CAM++'s verification threshold
# (0.31 on the zh-cn model card); not yet tuned on real recordings with the real model.
MIN_SPEAKER_SIMILARITY = 0.3


class Reason(enum.StrEnum):
    """Why a recording is not usable as a voice sample."""

    INVALID = "invalid"  # NaN/inf samples
    TOO_LONG = "too_long"  # over MAX_INPUT_SECONDS
    SILENT = "silent"  # nothing above SILENCE_DBFS
    TOO_SHORT = "too_short"  # under MIN_SPEECH_SECONDS of speech
    NO_SPEECH = "no_speech"  # sound, but noise-like: unvoiced or spectrally flat
    MUSIC = "music"  # voiced (tonal) but without the syllable rhythm of speech
    NOISY = "noisy"  # speech, but too little above the background
    MULTIPLE_SPEAKERS = "multiple_speakers"  # parts of the sample sound like different people


@dataclass
class SpeechMeasures:
    duration_s: float  # the whole input
    start_s: float  # the part measured (and embedded): at most MAX_EMBED_SECONDS, trimmed to its speech
    end_s: float
    level_dbfs: float  # loud level: 95th percentile of 25 ms frame RMS, dB re full scale
    snr_db: float  # loud level minus the noise floor (10th percentile)
    speech_s: float  # time in active frames (above the floor and near the loud level)
    voiced_ratio: float  # of active frames, those with a clear pitch
    flatness: float  # median spectral flatness of active frames, 100-4000 Hz (white noise ~0.6, vowels < 0.1)
    modulation_db: float  # std of the 2-8 Hz band of the level contour (speech ~6-12, held notes ~1-2)


@dataclass
class VoiceSample:
    """The verdict on a recording: `reason` is None and `embedding` a float32 [1, 192] voice when usable."""

    reason: Reason | None
    embedding: torch.Tensor | None
    measures: SpeechMeasures | None  # None when the input could not be measured at all (invalid, too long)
    speaker_similarity: float | None = None  # lowest cosine between parts; None when too short to split

    @property
    def ok(self) -> bool:
        return self.reason is None


def _frames(waveform: np.ndarray, length: int) -> np.ndarray:
    if len(waveform) < length:
        waveform = np.pad(waveform, (0, length - len(waveform)))
    return np.lib.stride_tricks.sliding_window_view(waveform, length)[::HOP]


def _frame_db(waveform: np.ndarray) -> np.ndarray:
    """Level of each 25 ms frame (10 ms hop) in dB re full scale."""
    frames = _frames(waveform, FRAME)
    return 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)


def _best_window(active: np.ndarray, max_frames: int) -> tuple[int, int]:
    """The `max_frames` consecutive frames with the most active ones (all frames when there are fewer)."""
    if len(active) <= max_frames:
        return 0, len(active)
    counts = np.concatenate([[0], np.cumsum(active)])
    starts = np.arange(0, len(active) - max_frames + 1, 100)  # on a 1 s grid
    best = int(starts[np.argmax(counts[starts + max_frames] - counts[starts])])
    return best, best + max_frames


def _voicing(frames: np.ndarray) -> np.ndarray:
    """Peak normalised autocorrelation at a pitch lag (60-400 Hz), per frame: ~0.6-0.9 for voiced speech."""
    x = frames - frames.mean(axis=1, keepdims=True)
    correlation = np.fft.irfft(np.abs(np.fft.rfft(x, n=2048)) ** 2, n=2048)[:, : MAX_LAG + 1]
    return correlation[:, MIN_LAG:].max(axis=1) / np.maximum(correlation[:, 0], 1e-12)


def _flatness(frames: np.ndarray) -> np.ndarray:
    """Spectral flatness (geometric / arithmetic mean of the power spectrum, 100-4000 Hz) per frame."""
    power = np.abs(np.fft.rfft(frames * np.hanning(FRAME), n=512)) ** 2
    power = power[:, 100 * 512 // SAMPLE_RATE : 4000 * 512 // SAMPLE_RATE] + 1e-10
    return np.exp(np.log(power).mean(axis=1)) / power.mean(axis=1)


def _modulation_db(level_db: np.ndarray) -> float:
    """Std of the 2-8 Hz band of the level contour (100 frames per second)."""
    contour = level_db - level_db.mean()
    spectrum = np.fft.rfft(contour)
    freqs = np.fft.rfftfreq(len(contour), d=HOP / SAMPLE_RATE)
    spectrum[(freqs < 2.0) | (freqs > 8.0)] = 0.0
    return float(np.fft.irfft(spectrum, n=len(contour)).std())


def _close_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """`mask` with runs of False shorter than `max_gap` between two Trues set True (pauses between words)."""
    closed = mask.copy()
    true_at = np.flatnonzero(mask)
    gaps = np.diff(true_at) - 1
    for i in np.flatnonzero((gaps > 0) & (gaps < max_gap)):
        closed[true_at[i] + 1 : true_at[i + 1]] = True
    return closed


def measure_speech(waveform_16k: np.ndarray) -> SpeechMeasures:
    """Frame measures of a finite 16 kHz mono waveform (any gain), over its best MAX_EMBED_SECONDS trimmed to
    the speech in them."""
    waveform = np.asarray(waveform_16k, dtype=np.float32)
    level_db = _frame_db(waveform)
    loud = float(np.percentile(level_db, 95))
    floor = float(np.percentile(level_db, 10))
    # "Sound": anything within 30 dB of the loud level. "Active": also clearly above the floor, which a steady
    # sound (noise, a held chord) never is. Both relative to the recording's own levels, so the gain does not
    # change which part is measured and embedded.
    sound = level_db > loud - ACTIVE_BELOW_PEAK_DB
    active = sound & (level_db > floor + ACTIVE_ABOVE_FLOOR_DB)

    first, last = _best_window(active, int(MAX_EMBED_SECONDS * SAMPLE_RATE / HOP))
    kept = active[first:last] if active[first:last].any() else sound[first:last]
    if kept.any():  # trim what comes before and after
        indices = np.flatnonzero(kept)
        first, last = first + int(indices[0]), first + int(indices[-1]) + 1
    sound, active = sound[first:last], active[first:last]
    start, end = first * HOP, min(len(waveform), (last - 1) * HOP + FRAME)
    part = waveform[start:end]

    # What it sounds like: judged on the active frames, or on all of the sound when it is steady.
    judged = active if active.sum() >= MIN_JUDGED_FRAMES else sound
    if judged.any():
        # Pitch frames start where the level frames do and run 25 ms longer (padded at the end).
        pitch_frames = _frames(np.pad(part, (0, PITCH_FRAME - FRAME)), PITCH_FRAME)[judged]
        voiced_ratio = float(np.mean(_voicing(pitch_frames) > VOICED_CORRELATION))
        flatness = float(np.median(_flatness(_frames(part, FRAME)[judged])))
    else:
        voiced_ratio, flatness = 0.0, 1.0
    return SpeechMeasures(
        duration_s=len(waveform) / SAMPLE_RATE,
        start_s=start / SAMPLE_RATE,
        end_s=end / SAMPLE_RATE,
        level_dbfs=loud,
        snr_db=loud - floor,
        speech_s=float(_close_gaps(active, MAX_PAUSE_FRAMES).sum()) * HOP / SAMPLE_RATE,
        voiced_ratio=voiced_ratio,
        flatness=flatness,
        modulation_db=_modulation_db(np.maximum(level_db[first:last], floor)),
    )


def _verdict(m: SpeechMeasures) -> Reason | None:
    """The first problem found, most basic first, or None."""
    if m.level_dbfs < SILENCE_DBFS:
        return Reason.SILENT
    if m.duration_s < MIN_SPEECH_SECONDS:
        return Reason.TOO_SHORT
    if m.voiced_ratio < MIN_VOICED_RATIO or m.flatness > MAX_FLATNESS:
        return Reason.NO_SPEECH
    if m.modulation_db < MIN_MODULATION_DB:
        return Reason.MUSIC
    if m.snr_db < MIN_SNR_DB:
        return Reason.NOISY
    if m.speech_s < MIN_SPEECH_SECONDS:
        return Reason.TOO_SHORT
    return None


def speaker_similarity(encoder: SpeakerEncoder, speech: np.ndarray) -> float | None:
    """Lowest cosine between the mean embeddings of the parts before and after a cut between SEGMENT_SECONDS-long
    pieces (each part at least a quarter of them): low when one voice speaks first and another later (a voice
    that alternates in short turns is not caught). None when the speech is shorter than two pieces."""
    num_pieces = min(len(speech) // int(SEGMENT_SECONDS * SAMPLE_RATE), 15)
    if num_pieces < 2:
        return None
    piece = len(speech) // num_pieces
    pieces = torch.stack([speaker_features(speech[i * piece : (i + 1) * piece]) for i in range(num_pieces)])
    embeddings = torch.nn.functional.normalize(encoder.embed_features(pieces), dim=1)
    shortest = max(1, num_pieces // 4)  # a single piece against many is the noisiest comparison: keep few of them
    similarities = []
    for cut in range(shortest, num_pieces - shortest + 1):
        before, after = embeddings[:cut].mean(dim=0), embeddings[cut:].mean(dim=0)
        similarities.append(torch.nn.functional.cosine_similarity(before, after, dim=0).item())
    return min(similarities)


def assess_voice_sample(encoder: SpeakerEncoder, waveform_16k: np.ndarray | torch.Tensor) -> VoiceSample:
    """Decide whether a 16 kHz mono recording is usable as a voice sample and, if it is, embed it.

    Input longer than MAX_EMBED_SECONDS (30 s) is not refused: its 30 s with the most speech are used (recordings
    often run on); longer than MAX_INPUT_SECONDS (2 min) is refused as TOO_LONG. The level does not matter (quiet
    recordings work, silence does not). Only the measured part, trimmed to its speech, is embedded."""
    waveform = np.asarray(waveform_16k, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D (mono) waveform, got shape {waveform.shape}")
    if not np.isfinite(waveform).all():
        return VoiceSample(Reason.INVALID, None, None)
    if len(waveform) > MAX_INPUT_SECONDS * SAMPLE_RATE:
        return VoiceSample(Reason.TOO_LONG, None, None)
    measures = measure_speech(waveform)
    reason = _verdict(measures)
    if reason is not None:
        return VoiceSample(reason, None, measures)
    speech = waveform[int(measures.start_s * SAMPLE_RATE) : int(measures.end_s * SAMPLE_RATE)]
    similarity = speaker_similarity(encoder, speech)
    if similarity is not None and similarity < MIN_SPEAKER_SIMILARITY:
        return VoiceSample(Reason.MULTIPLE_SPEAKERS, None, measures, similarity)
    return VoiceSample(None, encoder.embed(speech), measures, similarity)
