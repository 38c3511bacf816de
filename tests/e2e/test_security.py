"""SASL/PLAIN against a real broker with a SASL listener: right password -> Ready and a round
trip; wrong -> one line. (The settings' mapping and checks: ``tests/unit/test_security.py``.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from marvin_faust.security import credentials_problem
from marvin_faust.settings import load_settings
from marvin_faust.testing.kafka import shared_jars
from marvin_faust.testing.ports import LOOPBACK, free_ports
from marvin_faust.testing.processes import FAUST, WorkerProcess

USER, PASSWORD = "marvin", 'brain the "size" of a planet'


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    from marvin_faust.broker import BrokerConfig, LocalBroker

    port, controller_port, sasl_port = free_ports(3)
    broker = LocalBroker(
        BrokerConfig(
            host=LOOPBACK,
            port=port,
            controller_port=controller_port,
            sasl_port=sasl_port,
            sasl_users={USER: PASSWORD, "other": "secret"},
            home=tmp_path_factory.mktemp("sasl-kafka"),
            jars_dir=shared_jars(),
        )
    )
    broker.start(timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


def sasl_env(broker, password: str, tmp_path: Path) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {
        "MARVIN_BROKER": f"kafka://{broker.config.sasl_bootstrap_servers}",
        "MARVIN_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MARVIN_SASL_MECHANISM": "PLAIN",
        "MARVIN_SASL_USERNAME": USER,
        "MARVIN_SASL_PASSWORD": password,
        "MARVIN_APP_ID": f"marvin-sasl-{suffix}",
        "MARVIN_TOPIC": f"chat-sasl-{suffix}",
        "MARVIN_DEAD_LETTER_TOPIC": f"chat-sasl-{suffix}-dead-letters",
        "MARVIN_PARTITIONS": "2",
        "MARVIN_BACKEND": "standin",
        "MARVIN_STORE": "rocksdb://",
        "MARVIN_DATA_DIR": str(tmp_path / "state"),
    }


def env_settings(env: dict[str, str]):
    fields = {name.removeprefix("MARVIN_").lower(): value for name, value in env.items()}
    return load_settings(_env_file=None, **fields)


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_sasl_broker_keeps_its_plaintext_listener(sasl_broker):
    from marvin_faust.broker import metadata_brokers

    properties = sasl_broker.config.properties_file.read_text()
    assert f"SASL_PLAINTEXT://{sasl_broker.config.sasl_bootstrap_servers}" in properties
    assert "listener.name.sasl_plaintext.plain.sasl.jaas.config=" in properties
    assert sasl_broker.status().bootstrap_servers == sasl_broker.bootstrap_servers
    assert metadata_brokers(LOOPBACK, sasl_broker.config.port) == [
        (1, LOOPBACK, sasl_broker.config.port)
    ]


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_credentials_check_tells_a_wrong_password_from_a_right_one(sasl_broker, tmp_path):
    right = env_settings(sasl_env(sasl_broker, PASSWORD, tmp_path))
    wrong = env_settings(sasl_env(sasl_broker, "wrong", tmp_path))
    assert asyncio.run(credentials_problem(right)) is None
    problem = asyncio.run(credentials_problem(wrong))
    assert problem is not None
    assert problem.startswith(
        f"Kafka at {sasl_broker.config.sasl_bootstrap_servers} rejected the credentials of "
        f"user '{USER}' (SASL_PLAINTEXT, PLAIN): "
    )
    assert "Authentication failed" in problem
    assert "wrong" not in problem  # the password is not repeated


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_worker_with_a_wrong_password_stops_with_one_clear_line(sasl_broker, tmp_path):
    env = sasl_env(sasl_broker, "not the password", tmp_path)
    result = subprocess.run(
        [FAUST, "-A", "marvin_faust", "worker", "-l", "info"],
        cwd=tmp_path,
        env={**os.environ, **env, "MARVIN_WEB_PORT": str(free_ports()[0])},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    expected = (
        "marvin-faust: cannot start: Kafka at "
        f"{sasl_broker.config.sasl_bootstrap_servers} rejected the credentials of user "
        f"'{USER}' (SASL_PLAINTEXT, PLAIN): [Error 58] SaslAuthenticationFailed: "
        "Authentication failed: Invalid username or password"
    )
    assert expected in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "[^Worker]: Ready" not in output


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_worker_with_the_right_password_answers_over_sasl(sasl_broker, tmp_path):
    from marvin_faust.client import ChatClient, ChatClientError

    env = sasl_env(sasl_broker, PASSWORD, tmp_path)
    worker = WorkerProcess(env=env, data_dir=tmp_path / "state", log_path=tmp_path / "w.log")
    try:
        worker.start(timeout=120)
        client_settings = env_settings(env)

        async def conversation() -> str:
            async with ChatClient(client_settings, listen=False) as greeter:
                greeting = await greeter.greet()
            async with ChatClient(client_settings) as client:
                reply = await client.ask(greeting.conversation_id, "Anyone there?", timeout=90)
                return reply.text

        text = asyncio.run(conversation())
        assert text.endswith("human: Anyone there?")  # the stand-in's echo of its prompt

        # the front end with a wrong password gets the same one clear reason
        async def greet_with_a_wrong_password() -> None:
            wrong = env_settings({**env, "MARVIN_SASL_PASSWORD": "nope"})
            async with ChatClient(wrong, listen=False) as client:
                await client.greet()

        with pytest.raises(ChatClientError, match=r"rejected the credentials of user 'marvin'"):
            asyncio.run(greet_with_a_wrong_password())
    finally:
        worker.stop()
    assert worker.process is not None and worker.process.returncode == 0, worker.tail()
