"""Test set-up: unit tests import the app with the stand-in model and an in-memory store.

The environment is set before ``marvin_faust`` is imported, since the app reads its settings
at import. End-to-end tests start real worker processes with their own environment.
"""

from __future__ import annotations

import os
import tempfile

_UNIT_ENV = {
    "MARVIN_BACKEND": "standin",
    "MARVIN_STORE": "memory://",
    "MARVIN_DATA_DIR": tempfile.mkdtemp(prefix="marvin-unit-"),
}
for _name, _value in _UNIT_ENV.items():
    os.environ.setdefault(_name, _value)

pytest_plugins = ["tests.kafka_fixtures", "tests.worker_fixtures"]
