"""Fixtures shared by the test modules that drive the Space: `app` (the Space serving on localhost, and its URL) and
`client` (a gradio_client for it). A module may override `app` (e.g. with patched settings); `client` follows it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def app():
    from tests.test_app import serve  # one server per test process (see serve)

    space = serve()
    return space, space.demo.local_url


@pytest.fixture
def client(app):
    from gradio_client import Client

    return Client(app[1], verbose=False)
