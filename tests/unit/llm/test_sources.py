"""Where the GGUF comes from; each failure is one clear ModelLoadError line."""

from __future__ import annotations

import pytest

from marvin_faust.llm import ModelLoadError, create_backend
from marvin_faust.llm.sources import OFFLINE_MODEL_FILE, resolve_model_file
from marvin_faust.settings import load_settings


def test_a_missing_local_file_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model file not found: .*nope\.gguf"):
        resolve_model_file(
            "path", models_dir=tmp_path, path=tmp_path / "nope.gguf", repo="r", filename="f"
        )


def test_an_unreadable_model_is_a_load_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    backend = create_backend(
        load_settings(_env_file=None, backend="llamacpp", model_source="path", model_path=junk)
    )
    with pytest.raises(ModelLoadError, match=r"could not load model .*junk\.gguf"):
        backend.load()


def test_a_failed_download_is_a_load_error(tmp_path, monkeypatch):
    # no hub is reachable here; offline mode makes huggingface_hub fail at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        resolve_model_file(
            "huggingface",
            models_dir=tmp_path,
            path=None,
            repo="TheBloke/Llama-2-7b-Chat-GGUF",
            filename="llama-2-7b-chat.Q4_K_M.gguf",
        )
    message = str(caught.value)
    assert message.startswith(
        "could not download llama-2-7b-chat.Q4_K_M.gguf from Hugging Face repo "
        "TheBloke/Llama-2-7b-Chat-GGUF"
    )
    assert "\n" not in message


def test_a_downloaded_file_is_reused_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    found = resolve_model_file(
        "huggingface", models_dir=tmp_path, path=None, repo="o/r", filename="model.gguf"
    )
    assert found == tmp_path / "model.gguf"


def test_the_offline_model_is_assembled_into_the_state_directory(tmp_path):
    found = resolve_model_file("offline", models_dir=tmp_path, path=None, repo="", filename="")
    assert found == tmp_path / OFFLINE_MODEL_FILE
    assert found.stat().st_size > 200_000_000
    assert found.read_bytes()[:4] == b"GGUF"
