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
        (
            ["marvin-faust", "webchat", "--port", "8081", "--bind=0.0.0.0"],
            {"webchat_port": "8081", "webchat_bind": "0.0.0.0"},
        ),
        # another command's options are its own
        (["marvin-faust", "webchat", "-b", "0.0.0.0"], {}),
        (["marvin-faust", "worker", "--bind", "0.0.0.0"], {}),
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
    monkeypatch.setenv("MARVIN_DISABLED_FAUST_FIXES", "9,10,11")
    assert load_settings(_env_file=None).faust_fixes_disabled == {9, 10, 11}
    monkeypatch.setenv("MARVIN_DISABLED_FAUST_FIXES", "12")
    with pytest.raises(SettingsError, match="MARVIN_DISABLED_FAUST_FIXES"):
        load_settings(_env_file=None)


def test_another_faust_version_stops_the_start_naming_both():
    from marvin_faust.faust_fixes import FaustVersionError, check_faust_version

    with pytest.raises(FaustVersionError, match=r"verified on faust-streaming 0\.15\.3.*0\.16\.0"):
        check_faust_version("0.16.0")
    check_faust_version()  # the installed one is the verified one


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.4.5.6", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("128.0.0.1", False),
        ("fe80::1", False),
        ("localhost.example.com", False),
        ("marvin-worker", False),
    ],
)
def test_loopback_addresses(host, loopback):
    from marvin_faust.settings import is_loopback

    assert is_loopback(host) is loopback


WORKER = ["faust", "-A", "marvin_faust", "worker", "-l", "info"]
WEBCHAT = ["marvin-faust", "webchat"]


@pytest.fixture()
def no_web_settings(monkeypatch, tmp_path):
    """No web or token settings from the environment or a .env file."""
    monkeypatch.chdir(tmp_path)
    for name in ("WEB_BIND", "WEBCHAT_BIND", "API_TOKEN", "ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(f"MARVIN_{name}", raising=False)


def refusal(variable: str, address: str) -> str:
    return (
        f"invalid settings: {variable}={address!r} is not a loopback address and "
        "MARVIN_API_TOKEN is not set: set it, or MARVIN_ALLOW_UNAUTHENTICATED=1 to serve without "
        "it (unsafe: whoever reaches the port can read the conversations)"
    )


@pytest.mark.parametrize(
    ("argv", "variable"), [(WORKER, "MARVIN_WEB_BIND"), (WEBCHAT, "MARVIN_WEBCHAT_BIND")]
)
def test_a_server_on_a_public_address_needs_the_token_or_the_override(
    no_web_settings, monkeypatch, argv, variable
):
    from marvin_faust.app import command_settings

    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        monkeypatch.setenv(variable, loopback)
        command_settings(argv)
    monkeypatch.setenv(variable, "0.0.0.0")
    with pytest.raises(SettingsError) as caught:
        command_settings(argv)
    assert str(caught.value) == refusal(variable, "0.0.0.0")
    monkeypatch.setenv("MARVIN_API_TOKEN", "")  # an empty token guards nothing
    with pytest.raises(SettingsError):
        command_settings(argv)
    monkeypatch.setenv("MARVIN_API_TOKEN", "s3cret")
    assert command_settings(argv).api_token == "s3cret"
    monkeypatch.delenv("MARVIN_API_TOKEN")
    monkeypatch.setenv("MARVIN_ALLOW_UNAUTHENTICATED", "1")
    assert command_settings(argv).allow_unauthenticated is True
    monkeypatch.setenv("MARVIN_ALLOW_UNAUTHENTICATED", "0")
    with pytest.raises(SettingsError):
        command_settings(argv)


@pytest.mark.parametrize(
    ("argv", "variable", "address"),
    [
        ([*WORKER, "-b", "0.0.0.0"], "MARVIN_WEB_BIND", "0.0.0.0"),
        ([*WORKER, "--web-bind=::"], "MARVIN_WEB_BIND", "::"),
        ([*WEBCHAT, "--bind", "10.1.2.3", "--port", "8081"], "MARVIN_WEBCHAT_BIND", "10.1.2.3"),
        (
            ["marvin-faust", "-D", "/s", "webchat", "--bind=example.com"],
            "MARVIN_WEBCHAT_BIND",
            "example.com",
        ),
    ],
)
def test_the_address_from_the_command_line_is_checked_too(no_web_settings, argv, variable, address):
    from marvin_faust.app import command_settings

    with pytest.raises(SettingsError) as caught:
        command_settings(argv)
    assert str(caught.value) == refusal(variable, address)


def test_commands_that_serve_nothing_need_no_token(no_web_settings, monkeypatch):
    """The image sets MARVIN_WEB_BIND=0.0.0.0: `marvin-faust say` in it binds nothing."""
    from marvin_faust.app import command_settings

    monkeypatch.setenv("MARVIN_WEB_BIND", "0.0.0.0")
    monkeypatch.setenv("MARVIN_WEBCHAT_BIND", "0.0.0.0")
    for argv in (["marvin-faust", "say", "worker", "hi"], ["marvin-faust", "chat"], ["faust"]):
        assert command_settings(argv).web_bind == "0.0.0.0"
    with pytest.raises(SettingsError, match="MARVIN_WEB_BIND="):
        command_settings(WORKER)
    with pytest.raises(SettingsError, match="MARVIN_WEBCHAT_BIND="):
        command_settings(WEBCHAT)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (WORKER, (3, "worker")),
        (
            ["faust", "-A", "marvin_faust", "--datadir=/s", "-L", "uvloop", "webchat"],
            (6, "webchat"),
        ),
        (["marvin-faust", "--debug", "-q", "say", "worker", "hi"], (3, "say")),
        (["marvin-faust", "--json"], (2, "")),
    ],
)
def test_the_command_of_a_command_line(argv, command):
    from marvin_faust.app import cli_command

    assert cli_command(argv) == command
