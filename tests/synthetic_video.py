"""Synthetic videos for the long-video tests, written with PyAV: a frame function of the frame's index, a low frame
rate (an hour encodes in seconds) and a fixed keyframe interval (so that seeking has something to skip)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np


def write_video(path: Path, minutes: float, frame_of: Callable[[int], np.ndarray], fps: int, gop: int,
                size: tuple[int, int], qp: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": "ultrafast", "qp": str(qp)})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(minutes * 60 * fps)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_of(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def static_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """The same detailed picture in every frame."""
    y, x = np.mgrid[: size[1], : size[0]]
    return np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)


def noise_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """A new random picture in every frame (nothing to drop)."""
    return np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
