"""Kafka security settings: the mapping to Faust and aiokafka, and the checks of bad settings.

SASL/PLAIN against a real broker is in ``tests/e2e/test_security.py``.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
from faust.auth import SASLCredentials, SSLCredentials
from faust.types.auth import AuthProtocol

from marvin_faust.security import aiokafka_options, broker_credentials
from marvin_faust.settings import SettingsError, load_settings

USER, PASSWORD = "marvin", 'brain the "size" of a planet'


def settings(**overrides):
    return load_settings(_env_file=None, **overrides)


def sasl(protocol: str = "SASL_PLAINTEXT", **overrides):
    return settings(
        security_protocol=protocol, sasl_username=USER, sasl_password=PASSWORD, **overrides
    )


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate and its key (PEM), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a test certificate")
    home = tmp_path_factory.mktemp("pem")
    cert, key = home / "cert.pem", home / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    command += ["-subj", "/CN=marvin-test-ca", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    garbage = home / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"cert": cert, "key": key, "garbage": garbage}


def test_plaintext_by_default_has_no_credentials():
    plain = settings()
    assert plain.security_protocol == "PLAINTEXT"
    assert broker_credentials(plain) is None
    assert aiokafka_options(plain) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_is_faust_sasl_credentials(mechanism):
    credentials = broker_credentials(sasl(sasl_mechanism=mechanism))
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_PLAINTEXT
    assert credentials.mechanism.value == mechanism
    assert (credentials.username, credentials.password) == (USER, PASSWORD)
    assert credentials.ssl_context is None
    assert aiokafka_options(sasl(sasl_mechanism=mechanism)) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": USER,
        "sasl_plain_password": PASSWORD,
        "ssl_context": None,
    }


def test_sasl_ssl_verifies_the_broker_with_the_ca_file(pem):
    chosen = sasl("SASL_SSL", sasl_mechanism="SCRAM-SHA-512", ssl_cafile=pem["cert"])
    credentials = broker_credentials(chosen)
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_SSL
    context = credentials.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    [ca] = context.get_ca_certs()
    assert ca["subject"] == ((("commonName", "marvin-test-ca"),),)
    options = aiokafka_options(chosen)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_ssl_with_a_client_certificate_is_faust_ssl_credentials(pem):
    chosen = settings(
        security_protocol="SSL",
        ssl_cafile=pem["cert"],
        ssl_certfile=pem["cert"],
        ssl_keyfile=pem["key"],
    )
    credentials = broker_credentials(chosen)
    assert isinstance(credentials, SSLCredentials)
    assert credentials.protocol is AuthProtocol.SSL
    assert credentials.context.verify_mode == ssl.CERT_REQUIRED
    options = aiokafka_options(chosen)
    assert options == {"security_protocol": "SSL", "ssl_context": options["ssl_context"]}
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_the_password_is_never_in_a_repr():
    chosen = sasl()
    assert PASSWORD not in repr(chosen) and PASSWORD not in str(chosen)
    assert PASSWORD not in repr(broker_credentials(chosen))


def test_create_app_passes_credentials_and_standby_replicas():
    from marvin_faust.app import create_app

    chosen = sasl(app_id=f"security-{uuid.uuid4().hex[:6]}", standby_replicas=2)
    app = create_app(chosen)
    assert isinstance(app.conf.broker_credentials, SASLCredentials)
    assert app.conf.broker_credentials.username == USER
    assert app.conf.table_standby_replicas == 2
    assert settings().standby_replicas == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MARVIN_SECURITY_PROTOCOL": "SASL_SSL", "MARVIN_SASL_USERNAME": "u"},
            "MARVIN_SECURITY_PROTOCOL=SASL_SSL needs MARVIN_SASL_USERNAME and MARVIN_SASL_PASSWORD",
        ),
        (
            {"MARVIN_SASL_USERNAME": "u", "MARVIN_SASL_PASSWORD": "p"},
            "are set but MARVIN_SECURITY_PROTOCOL=PLAINTEXT does not use SASL",
        ),
        ({"MARVIN_SECURITY_PROTOCOL": "TLS"}, "MARVIN_SECURITY_PROTOCOL: Input should be"),
        (
            {"MARVIN_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "MARVIN_SASL_MECHANISM": "GSSAPI"},
            "MARVIN_SASL_MECHANISM: Input should be 'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'",
        ),
        (
            {"MARVIN_SECURITY_PROTOCOL": "SSL", "MARVIN_SSL_CAFILE": "/nonexistent/ca.pem"},
            "MARVIN_SSL_CAFILE: Path does not point to a file (got '/nonexistent/ca.pem')",
        ),
    ],
)
def test_bad_security_settings_say_what_is_wrong(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=re.escape(message)) as caught:
        settings()
    assert "\n" not in str(caught.value)


def test_bad_tls_files_say_what_is_wrong(pem):
    with pytest.raises(SettingsError, match=r"MARVIN_SSL_CAFILE is set but .*=SASL_PLAINTEXT"):
        sasl(ssl_cafile=pem["cert"])
    with pytest.raises(SettingsError, match="MARVIN_SSL_KEYFILE needs MARVIN_SSL_CERTFILE"):
        settings(security_protocol="SSL", ssl_keyfile=pem["key"])
    with pytest.raises(SettingsError, match="cannot be loaded as PEM"):
        settings(security_protocol="SSL", ssl_cafile=pem["garbage"])
    with pytest.raises(SettingsError, match="cannot be loaded as PEM"):
        settings(security_protocol="SSL", ssl_certfile=pem["cert"], ssl_keyfile=pem["garbage"])


def test_broker_config_sasl_listener_defaults_and_checks(tmp_path):
    from marvin_faust.broker import BrokerConfig, BrokerError

    plain = BrokerConfig(port=19092, home=tmp_path)
    assert plain.sasl_port is None and plain.sasl_bootstrap_servers is None
    config = BrokerConfig(port=19092, home=tmp_path, sasl_users={"a": "b"})
    assert config.sasl_users == (("a", "b"),) and config.sasl_port == 19094
    assert config.sasl_bootstrap_servers == "127.0.0.1:19094"
    with pytest.raises(BrokerError, match="SASL port must differ"):
        BrokerConfig(port=19092, home=tmp_path, sasl_users={"a": "b"}, sasl_port=19093)
    with pytest.raises(BrokerError, match="SASL user names"):
        BrokerConfig(port=19092, home=tmp_path, sasl_users={"a b": "c"})
