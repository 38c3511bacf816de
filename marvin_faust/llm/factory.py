"""Build the backend the settings ask for."""

from __future__ import annotations

from functools import partial

from ..settings import Settings
from .base import ChatBackend
from .standin import StandInBackend


def create_backend(settings: Settings) -> ChatBackend:
    """The configured backend, not yet loaded: the worker ``load()``s it when it starts."""
    if settings.backend == "standin":
        return StandInBackend(latency=settings.standin_latency, parallel=settings.parallel)
    from .llamacpp import LlamaCppBackend
    from .sources import resolve_model_file

    return LlamaCppBackend(
        partial(
            resolve_model_file,
            settings.model_source,
            models_dir=settings.models_dir,
            path=settings.model_path,
            repo=settings.model_repo,
            filename=settings.model_file,
        ),
        parallel=settings.parallel,
        prompt_format=settings.prompt_format,
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.n_threads,
        seed=settings.seed,
        sampling={
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "repeat_penalty": settings.repeat_penalty,
        },
    )
