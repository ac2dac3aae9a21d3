"""Voices. A voice is one 192-d CAM++ speaker embedding: the talker reads it through `vp_head`, the flow decoder
through its own speaker projection.

Voices are found, by name, in the package (`ming/data/voices/*.pt`: the release's `luna`), then in the checkpoint
(`talker/voices/*.pt`, and `data/spks/*.pt` where the release's code keeps them); a later folder wins on a name
clash. A path to a `.pt` file or a tensor works as a voice too. Files are read with `torch.load(weights_only=True)`,
which never runs code from the file.
"""

from __future__ import annotations

import os

import torch

SPEAKER_DIM = 192
DEFAULT_VOICE = "luna"
BUNDLED_VOICES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "voices")
CHECKPOINT_VOICE_DIRS = (os.path.join("talker", "voices"), os.path.join("data", "spks"))


def as_speaker_embedding(value: torch.Tensor, source: str) -> torch.Tensor:
    """Check and shape a speaker embedding as float32 [1, 192]."""
    if not isinstance(value, torch.Tensor) or value.numel() != SPEAKER_DIM or not value.is_floating_point():
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{source} is not a voice: expected {SPEAKER_DIM} floating-point numbers, got {got}")
    embedding = value.detach().to("cpu", torch.float32).reshape(1, SPEAKER_DIM)
    if not torch.isfinite(embedding).all():
        raise ValueError(f"{source} is not a voice: it contains NaN or infinite values")
    return embedding


def load_voice_file(path: str | os.PathLike) -> torch.Tensor:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or one holding pickled code: either way not a voice we can use
        raise ValueError(f"cannot read voice file {path}: {error}") from error
    return as_speaker_embedding(value, os.fspath(path))


def find_voice_files(folders: list[str]) -> dict[str, str]:
    """{voice name: path} for the `*.pt` files of `folders` (missing folders are skipped; later folders win)."""
    files: dict[str, str] = {}
    for folder in folders:
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".pt"):
                    files[name[: -len(".pt")]] = os.path.join(folder, name)
    return files


class VoiceBank:
    """Named voices, loaded on first use."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._loaded: dict[str, torch.Tensor] = {}

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike) -> "VoiceBank":
        folders = [BUNDLED_VOICES_DIR] + [os.path.join(ckpt_dir, sub) for sub in CHECKPOINT_VOICE_DIRS]
        return cls(find_voice_files(folders))

    @property
    def names(self) -> list[str]:
        """Available voice names, the default first."""
        return sorted(self.files, key=lambda name: (name != DEFAULT_VOICE, name))

    def get(self, voice: str | os.PathLike | torch.Tensor) -> torch.Tensor:
        """A voice name, a path to a `.pt` file, or a tensor -> float32 [1, 192]."""
        if isinstance(voice, torch.Tensor):
            return as_speaker_embedding(voice, "the given tensor")
        key = os.fspath(voice)
        if key in self.files:
            if key not in self._loaded:
                self._loaded[key] = load_voice_file(self.files[key])
            return self._loaded[key]
        if os.path.isfile(key):
            return load_voice_file(key)
        raise ValueError(f"unknown voice {key!r}; available voices: {', '.join(self.names) or 'none'}")
