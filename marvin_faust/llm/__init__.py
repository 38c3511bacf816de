"""LLM backends: one small interface, a llama.cpp implementation and a stand-in for tests."""

from .base import ChatBackend, Generation, ModelError, ModelLoadError, ModelTimeout
from .factory import create_backend
from .standin import StandInBackend

__all__ = [
    "ChatBackend",
    "Generation",
    "ModelError",
    "ModelLoadError",
    "ModelTimeout",
    "StandInBackend",
    "create_backend",
]
