"""marvin-faust: a Faust worker that answers chat messages from Kafka with a local LLM."""

from .app import app, main

__all__ = ["app", "main"]
__version__ = "0.1.0"
