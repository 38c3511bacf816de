import pytest

from marvin_faust.settings import GREETING, SettingsError, load_settings


def test_defaults_match_the_design():
    settings = load_settings(_env_file=None)
    assert settings.topic == "chat"
    assert settings.n_ctx == 2048 and settings.n_gpu_layers == -1 and settings.max_tokens == 250
    assert (settings.top_p, settings.top_k, settings.temperature) == (0.95, 150, 0.7)
    assert settings.repeat_penalty == 1.2 and settings.history_token_budget == 300
    assert settings.web_bind == "127.0.0.1"
    assert settings.greeting == GREETING


def test_environment_variables_override(monkeypatch):
    monkeypatch.setenv("MARVIN_N_GPU_LAYERS", "20")
    monkeypatch.setenv("MARVIN_REPLY_TOPIC", "chat-replies")
    settings = load_settings(_env_file=None)
    assert settings.n_gpu_layers == 20
    assert settings.replies_to == "chat-replies"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MARVIN_N_CTX", "lots", "MARVIN_N_CTX: Input should be a valid integer"),
        ("MARVIN_TOP_P", "1.5", "MARVIN_TOP_P: Input should be less than or equal to 1"),
        ("MARVIN_BACKEND", "gpt", "MARVIN_BACKEND: Input should be 'llamacpp' or 'standin'"),
        ("MARVIN_MODEL_SOURCE", "path", "MARVIN_MODEL_PATH must be set"),
        ("MARVIN_BROKER", "127.0.0.1:9092", "MARVIN_BROKER must start with kafka://"),
        ("MARVIN_PARTITIONER", "fnv1a", "MARVIN_PARTITIONER: Input should be 'murmur2' or 'crc32'"),
    ],
)
def test_bad_settings_name_the_variable_and_the_reason(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings(_env_file=None)
    assert "\n" not in str(caught.value)


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("MARVIN_TOPIC=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().topic == "from-dotenv"


def test_a_worker_notices_a_topic_created_after_it_joined_within_seconds():
    """A worker that joined before its new chat topic reached the metadata gets the topic's
    partitions at the next refresh: seconds, not Faust's default 5 minutes."""
    from marvin_faust.app import create_app

    app = create_app(load_settings(_env_file=None, backend="standin", store="memory://"))
    assert app.conf.consumer_metadata_max_age_ms <= 10_000


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["faust", "-A", "marvin_faust", "worker"], {}),
        (["faust", "-A", "marvin_faust", "--datadir", "/s", "worker"], {"data_dir": "/s"}),
        (["faust", "-A", "marvin_faust", "-D", "/s", "worker", "-l", "info"], {"data_dir": "/s"}),
        (
            ["marvin-faust", "--datadir=/s", "worker", "--web-port", "7000", "-b", "0.0.0.0"],
            {"data_dir": "/s", "web_port": "7000", "web_bind": "0.0.0.0"},
        ),
        # -p before the command is not the worker's web port.
        (["faust", "-A", "marvin_faust", "-p", "1", "chat"], {}),
    ],
)
def test_faust_command_line_options_become_settings(argv, expected):
    from marvin_faust.app import cli_overrides

    assert cli_overrides(argv) == expected


def test_faust_broker_url_is_taken_when_marvin_broker_is_unset(monkeypatch):
    monkeypatch.delenv("MARVIN_BROKER", raising=False)
    monkeypatch.setenv("BROKER_URL", "kafka://faust-style:9092")
    assert load_settings(_env_file=None).broker == "kafka://faust-style:9092"
    monkeypatch.setenv("MARVIN_BROKER", "kafka://ours:9092")
    assert load_settings(_env_file=None).broker == "kafka://ours:9092"


def test_faust_fixes_are_switched_off_by_number(monkeypatch):
    monkeypatch.setenv("MARVIN_DISABLED_FAUST_FIXES", "4, 6")
    assert load_settings(_env_file=None).faust_fixes_disabled == {4, 6}
    monkeypatch.setenv("MARVIN_DISABLED_FAUST_FIXES", "9")
    with pytest.raises(SettingsError, match="MARVIN_DISABLED_FAUST_FIXES"):
        load_settings(_env_file=None)


def test_another_faust_version_stops_the_start_naming_both():
    from marvin_faust.faust_fixes import FaustVersionError, check_faust_version

    with pytest.raises(FaustVersionError, match=r"verified on faust-streaming 0\.15\.3.*0\.16\.0"):
        check_faust_version("0.16.0")
    check_faust_version()  # the installed one is the verified one
