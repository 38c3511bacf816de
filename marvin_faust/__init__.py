"""marvin-faust: a Faust worker that answers chat messages from Kafka with a local LLM.

``faust -A marvin_faust worker`` takes ``marvin_faust.app``: the worker app, built on that first
use (``app.current_app``). Importing the package, or any module of it, builds nothing.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        # Importing the module binds the package attribute ``app`` to it, so this runs once:
        # what Faust's ``-A marvin_faust`` asks for first is the app.
        from .app import current_app

        return current_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
