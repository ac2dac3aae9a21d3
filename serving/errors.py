"""The one error type the serving layer raises for things a visitor can fix; app.py shows it as a message."""

from __future__ import annotations


class UserError(Exception):
    """A plain-language message about the visitor's own request (never a path, a traceback or an internal name),
    with a short title for the toast."""

    def __init__(self, message: str, title: str = "Cannot do that"):
        super().__init__(message)
        self.message = message
        self.title = title

    def __str__(self) -> str:
        return self.message
