"""The one error type the serving layer raises for things a visitor can fix; app.py shows it as a message."""

from __future__ import annotations

import os
import re

# "(... [Errno 1094995529] Invalid data found when processing input: '/tmp/gradio/<sha>/clip.mp4')": a library's own
# words, with a temp path; and any quoted absolute path that is left.
_INTERNAL_DETAIL = re.compile(r"\s*\((?:[^()]*(?:Errno|Error:|/tmp/|\\\\|[A-Za-z]:\\)[^()]*)\)")
_QUOTED_PATH = re.compile(r"""(['"])(/[^'"]*?/|[A-Za-z]:\\[^'"]*?\\)([^/\\'"]+)\1""")


def plain(message: str) -> str:
    """The message without internals: library error details and temp paths go; a quoted path keeps its file name."""
    message = _INTERNAL_DETAIL.sub("", message)
    return _QUOTED_PATH.sub(lambda m: f"{m.group(1)}{m.group(3)}{m.group(1)}", message)


class UserError(Exception):
    """A plain-language message about the visitor's own request (never a path, a traceback or an internal name),
    with a short title for the toast. Details a library put in brackets and temp paths are taken out (`plain`)."""

    def __init__(self, message: str, title: str = "Cannot do that"):
        message = plain(message)
        super().__init__(message)
        self.message = message
        self.title = title

    def __str__(self) -> str:
        return self.message
