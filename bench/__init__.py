"""Benchmarks of marvin-faust against baselines measured in the same run (``make bench``).

Importing :mod:`marvin_faust` builds the Faust app from ``MARVIN_*`` settings, so the bench
process gives itself harmless ones first (stand-in model, in-memory store, a scratch data dir),
as ``tests/conftest.py`` does. Every worker it starts gets its settings explicitly.
"""

from __future__ import annotations

import os
import tempfile

for _name, _value in {
    "MARVIN_BACKEND": "standin",
    "MARVIN_STORE": "memory://",
    # Never written: the bench process builds the app but does not run it.
    "MARVIN_DATA_DIR": os.path.join(tempfile.gettempdir(), "marvin-bench-unused"),
}.items():
    os.environ.setdefault(_name, _value)
