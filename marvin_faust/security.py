"""Kafka security settings turned into what Faust and aiokafka take.

``MARVIN_SECURITY_PROTOCOL`` picks the protocol; the SASL and TLS settings beside it (validated in
``settings.Settings``) fill it in. The worker gets :func:`broker_credentials` as Faust's
``broker_credentials``; the front ends' aiokafka clients (``client.ChatClient``) and the start-up
check get :func:`aiokafka_options`, which is Faust's own translation of those credentials, so
both sides always connect the same way.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aiokafka.helpers import create_ssl_context
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import CredentialsT

if TYPE_CHECKING:
    from .settings import Settings


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
