"""Headless Chromium for the browser tests, with Gradio's own recipe for media: a test-pattern camera, and a wav
file as the microphone (played from the start of the page)."""

from __future__ import annotations

import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch(playwright, microphone_wav: str, *extra_args: str):
    """A headless Chromium whose microphone plays `microphone_wav`; `extra_args` are more command-line switches."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", *extra_args,
              "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
              f"--use-file-for-fake-audio-capture={microphone_wav}"],
    )
