"""What can be checked of docker/ without a Docker engine: the files' structure, and that they
name the project's real paths, commands and settings. (The images were not built here.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.fixtures import REPO

DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
COMPOSE = DOCKER / "compose.yaml"
ENV_FILE = DOCKER / "marvin.env"  # the token, made by the operator (compose.yaml says how)
STATE_DIR = "/var/lib/marvin"
WORKER_COMMAND = ["faust", "-A", "marvin_faust", "worker", "-l", "info"]
MARVIN_FAUST = Path(sys.executable).parent / "marvin-faust"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path} ends inside a continued line"
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the ARGs before the first FROM are left out)."""
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, arguments))
    return found


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for keyword, arguments in instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, value = arguments.partition("=")
            args[name] = value.strip('"')
    return args


def stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    return {
        name: value.strip('"')
        for keyword, arguments in stage
        if keyword == "ARG"
        for name, _, value in [arguments.partition("=")]
    }


def base_image(stage: list[tuple[str, str]], args: dict[str, str]) -> str:
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    [arguments] = [a for k, a in stage if k == keyword]
    return arguments


def ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**/`` any folders, ``*`` and ``?`` within one."""
    regex = ""
    for token in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
        regex += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(regex)


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore leaves ``relative`` (or a folder above it) out of the context."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not handled here"
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(ignore_pattern(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


@pytest.fixture(scope="module")
def cli_commands() -> set[str]:
    """The subcommands ``marvin-faust --help`` lists."""
    result = subprocess.run(
        [str(MARVIN_FAUST), "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    commands = result.stdout.split("Commands:", 1)[1]
    return {line.split()[0] for line in commands.splitlines() if line.startswith("  ")}


def assert_runs_a_project_command(command: list[str] | str, cli_commands: set[str]) -> None:
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:3] == ["faust", "-A", "marvin_faust"]:
        subcommand = words[3]
    else:
        assert words[0] == "marvin-faust", f"not a marvin-faust command: {words}"
        subcommand = words[1]
    assert subcommand in cli_commands, f"{subcommand!r} is not a marvin-faust command"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_is_in_the_repo_and_the_context(kind):
    copied = []
    for keyword, arguments in instructions(DOCKERFILES[kind]):
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            assert not arguments.startswith("--from"), "a stage's files need no repo path"
            copied += words[:-1]
    assert {"pyproject.toml", "README.md", "marvin_faust"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
        assert not dockerignored(source), f"COPY {source}: left out by .dockerignore"
    # what is left out is really left out: no secrets, no venv, no broker data
    for private in (".env", ".venv/bin/python", ".git/HEAD", ".kafka/lib", "tests/conftest.py"):
        assert dockerignored(private), private


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_stage(kind):
    path = DOCKERFILES[kind]
    build, runtime = stages(path)
    assert one(build, "FROM").endswith(" AS build") and one(runtime, "FROM").endswith(" AS runtime")
    # the runtime stage installs the wheels made in the build stage, and compiles nothing
    assert any("--mount=type=bind,from=build" in a for k, a in runtime if k == "RUN")
    assert not any("build-essential" in a for k, a in runtime if k == "RUN")
    assert any("pip wheel" in a and "llama-cpp-python" in a for k, a in build if k == "RUN")
    env = env_of(runtime)
    assert env["MARVIN_DATA_DIR"] == STATE_DIR
    assert env["MARVIN_WEB_BIND"] == "0.0.0.0"
    assert json.loads(one(runtime, "VOLUME")) == [STATE_DIR]
    user = one(runtime, "USER").split(":")[0]
    assert user not in ("root", "0"), user
    assert any(
        k == "RUN" and "useradd" in a and f"--uid {user}" in a and STATE_DIR in a
        for k, a in runtime
    )
    healthcheck = one(runtime, "HEALTHCHECK")
    assert "/health/" in healthcheck and "MARVIN_WEB_PORT" in healthcheck
    assert json.loads(one(runtime, "CMD")) == WORKER_COMMAND
    # every MARVIN_* the image sets is a real setting
    from marvin_faust.settings import ENV_PREFIX, Settings

    for name in env:
        if name.startswith(ENV_PREFIX):
            assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name


def test_cpu_image_is_python_slim_with_the_supported_python():
    path = DOCKERFILES["cpu"]
    build, runtime = stages(path)
    image = base_image(runtime, global_args(path))
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image), image
    assert base_image(build, global_args(path)) == image  # wheels built for the same Python
    python = image.split(":")[1].split("-")[0]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{python}.0" in SpecifierSet(requires), (python, requires)
    assert python == "3.11"


def test_cuda_image_builds_llama_cpp_with_cuda_and_offloads_every_layer():
    path = DOCKERFILES["cuda"]
    build, runtime = stages(path)
    args = global_args(path)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-ubuntu[\d.]+", base_image(build, args))
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", base_image(runtime, args))
    cmake_args = stage_args(build)["LLAMA_CMAKE_ARGS"]
    assert "-DGGML_CUDA=on" in cmake_args.split()
    assert any('CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"' in a for k, a in build if k == "RUN")
    assert env_of(runtime)["MARVIN_N_GPU_LAYERS"] == "-1"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_pinned_llama_cpp_python_is_in_the_project_range(kind):
    [build, _] = stages(DOCKERFILES[kind])
    pinned = stage_args(build)["LLAMA_CPP_PYTHON_VERSION"]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [requirement] = [d for d in dependencies if d.startswith("llama-cpp-python")]
    assert pinned in SpecifierSet(requirement.removeprefix("llama-cpp-python")), requirement


# -- compose.yaml ------------------------------------------------------------------------------


def test_compose_runs_kafka_in_kraft_mode_with_the_official_image(compose):
    kafka = compose["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.1\.\d+", kafka["image"]), kafka["image"]
    env = {name: str(value) for name, value in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka{listeners['CONTROLLER']}"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocol_map) == set(listeners)
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
    ):
        assert env[name] == "1", name
    # a KRaft cluster id: 16 bytes in URL-safe base64
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])
    # the worker's broker URL is an advertised listener of the broker
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    broker_url = compose["services"]["worker"]["environment"]["MARVIN_BROKER"]
    assert broker_url.removeprefix("kafka://") in advertised.values()
    assert [v for v in kafka["volumes"] if v.endswith(":" + env["KAFKA_LOG_DIRS"])]


def test_compose_worker_and_web_chat_run_the_project_image_and_commands(compose, cli_commands):
    services = compose["services"]
    worker, web = services["worker"], services["web"]
    for service in (worker, web):
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert service["image"] == "marvin-faust:cpu"
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == (
        DOCKERFILES["cpu"]
    )
    assert worker["command"] == WORKER_COMMAND
    assert web["command"] == ["marvin-faust", "webchat"]
    # the web chat reaches the worker's view by the worker's host name and port
    port = worker["environment"].get("MARVIN_WEB_PORT", 6066)
    assert web["environment"]["MARVIN_WORKER_URL"] == f"http://{worker['hostname']}:{port}"
    assert web["environment"]["MARVIN_WEBCHAT_BIND"] == "0.0.0.0"
    for name, service in services.items():
        if "command" in service:
            assert_runs_a_project_command(service["command"], cli_commands)
        if "build" in service or service.get("image", "").startswith("marvin-faust"):
            for variable in service.get("environment", {}):
                from marvin_faust.settings import Settings

                assert variable.removeprefix("MARVIN_").lower() in Settings.model_fields, (
                    name,
                    variable,
                )


def test_compose_takes_the_token_from_an_ignored_env_file_never_a_literal(compose):
    """Both services listen on 0.0.0.0 in their containers, which needs MARVIN_API_TOKEN: it
    comes from docker/marvin.env, which git ignores and the build context leaves out."""
    services = compose["services"]
    for name in ("worker", "web"):
        assert services[name]["env_file"] == ENV_FILE.name, name
    for name, service in services.items():
        environment = service.get("environment", {})
        assert "MARVIN_API_TOKEN" not in environment, name
        assert "MARVIN_ALLOW_UNAUTHENTICATED" not in environment, name
    relative = str(ENV_FILE.relative_to(REPO))
    ignored = subprocess.run(["git", "check-ignore", "-q", relative], cwd=REPO, timeout=60)
    assert ignored.returncode == 0, f"{relative} is not ignored by git"
    assert dockerignored(relative)


def test_compose_state_on_named_volumes_and_health_gated_start(compose):
    services = compose["services"]
    declared = set(compose["volumes"])
    state_mounts = [v for v in services["worker"]["volumes"] if v.endswith(":" + STATE_DIR)]
    assert len(state_mounts) == 1
    assert state_mounts[0].split(":")[0] in declared
    for name, service in services.items():
        assert "test" in service["healthcheck"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name}: {source} is not a named volume"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    assert services["worker"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert services["web"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "worker": {"condition": "service_healthy"},
    }
    # published ports only on the loopback address
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_procfile_commands_exist(cli_commands):
    from honcho.environ import parse_procfile

    processes = parse_procfile((REPO / "Procfile").read_text()).processes
    assert processes
    for command in processes.values():
        assert_runs_a_project_command(command, cli_commands)


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose``, if installed; no engine needed."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = compose_cli()
    if command is None:
        pytest.skip("no docker compose CLI here")
    # A copy beside a token file of its own: compose refuses a missing env_file.
    (tmp_path / "docker").mkdir()
    shutil.copy(COMPOSE, tmp_path / "docker" / COMPOSE.name)
    (tmp_path / "docker" / ENV_FILE.name).write_text("MARVIN_API_TOKEN=compose-config-test\n")
    result = subprocess.run(
        [*command, "-f", str(tmp_path / "docker" / COMPOSE.name), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert set(resolved["services"]) == {"kafka", "worker", "web"}
    assert resolved["services"]["worker"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "web"):
        assert resolved["services"][name]["environment"]["MARVIN_API_TOKEN"] == (
            "compose-config-test"
        )
