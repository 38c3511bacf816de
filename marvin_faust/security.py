"""Kafka security settings turned into what Faust and aiokafka take.

``MARVIN_SECURITY_PROTOCOL`` picks the protocol; the SASL and TLS settings beside it (validated in
``settings.Settings``) fill it in. The worker gets :func:`broker_credentials` as Faust's
``broker_credentials``; the front ends' aiokafka clients (``client.ChatClient``) and the start-up
check get :func:`aiokafka_options`, which is Faust's own translation of those credentials, so
both sides always connect the same way.

A rejected login makes aiokafka log one error and Faust then stop with a traceback about not
being able to bootstrap; :class:`CredentialsCheck` (a dependency of the app, so it starts before
Faust's producer) connects once first and stops the worker with one line that says what is wrong.
"""

from __future__ import annotations

import logging
import ssl
import sys
from typing import TYPE_CHECKING, Any

from aiokafka import errors
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.helpers import create_ssl_context
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import CredentialsT
from mode import Service

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

# Seconds one connection attempt of the start-up check may take.
CHECK_TIMEOUT = 30.0

# The broker's answers that mean "these credentials will never work".
_REJECTED = (
    errors.SaslAuthenticationFailed,
    errors.UnsupportedSaslMechanismError,
    errors.IllegalSaslStateError,
)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for the SSL and SASL_SSL protocols, else None.

    It verifies the broker's certificate and host name against ``MARVIN_SSL_CAFILE`` (the
    system's CAs when unset) and presents ``MARVIN_SSL_CERTFILE``/``MARVIN_SSL_KEYFILE`` when
    set. Raises ``ssl.SSLError``/``OSError`` when a file is not a usable PEM.
    """
    if not settings.security_protocol.endswith("SSL"):
        return None
    return create_ssl_context(
        cafile=settings.ssl_cafile,
        certfile=settings.ssl_certfile,
        keyfile=settings.ssl_keyfile,
    )


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's ``broker_credentials`` for the settings; None for PLAINTEXT."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        assert context is not None
        return SSLCredentials(context)
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    # SASLCredentials means SASL_SSL when it has a TLS context, SASL_PLAINTEXT without one.
    return SASLCredentials(
        username=settings.sasl_username,
        password=password,
        mechanism=settings.sasl_mechanism,
        ssl_context=context,
    )


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """aiokafka client keywords: ``security_protocol``, ``sasl_*``, ``ssl_context``."""
    return dict(credentials_to_aiokafka_auth(broker_credentials(settings)))


async def credentials_problem(settings: Settings) -> str | None:
    """Why the broker rejects the settings' credentials, or None.

    Connects to each bootstrap server once, with the same options as the clients, until one
    answers. None too when no server answers at all (that is Faust's to report, as without
    credentials) and for PLAINTEXT, which has no credentials to reject.
    """
    if settings.security_protocol == "PLAINTEXT":
        return None
    options = aiokafka_options(settings)
    who = (
        f"user {settings.sasl_username!r} ({settings.security_protocol}, {settings.sasl_mechanism})"
        if settings.security_protocol.startswith("SASL_")
        else "this client (SSL)"
    )
    for host, port, _ in collect_hosts(settings.bootstrap_servers, randomize=False):
        address = f"{host}:{port}"
        try:
            conn = await create_conn(
                host, port, request_timeout_ms=int(CHECK_TIMEOUT * 1000), **options
            )
        except _REJECTED as exc:
            return f"Kafka at {address} rejected the credentials of {who}: {exc}"
        except ssl.SSLError as exc:
            return f"TLS with Kafka at {address} failed for {who}: {exc}"
        except (OSError, TimeoutError, errors.KafkaError) as exc:
            log.warning("Credentials check: cannot reach Kafka at %s: %r", address, exc)
            continue
        conn.close()
        return None
    return None


class CredentialsCheck(Service):
    """Stops the worker's start with one line when the broker rejects its credentials."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        problem = await credentials_problem(self.settings)
        if problem is not None:
            log.error("marvin-faust: cannot start: %s", problem)
            print(f"marvin-faust: cannot start: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)
