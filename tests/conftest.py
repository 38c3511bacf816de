"""Test set-up: the Kafka broker and worker fixtures (``tests.fixtures``) and the unit tests'
app.

``tests/unit`` mirrors the package and needs no broker; ``tests/e2e`` starts brokers and worker
processes. The helpers both use (and the bench too) are in ``marvin_faust.testing``.

Importing ``marvin_faust`` builds nothing; a unit test that needs the app takes the
``unit_app`` fixture: the stand-in model, an in-memory store, no broker contacted. End-to-end
tests start real worker processes with their own environment.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures"]


@pytest.fixture(scope="session")
def unit_app(tmp_path_factory: pytest.TempPathFactory):
    from marvin_faust.app import create_app
    from marvin_faust.settings import load_settings

    settings = load_settings(
        _env_file=None,
        backend="standin",
        store="memory://",
        data_dir=tmp_path_factory.mktemp("unit-app"),
        # No stream producer to start: test_agents.py streams to a list instead.
        stream_topic="",
    )
    return create_app(settings)
