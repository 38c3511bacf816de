"""The command line of the local broker: ``marvin-faust broker start|stop|status``, also
``python -m marvin_faust.broker``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .config import DEFAULT_HOST, DEFAULT_PORT, BrokerConfig, BrokerError, default_home
from .process import LocalBroker

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MARVIN_KAFKA_HOME",
    default=None,
    help="Broker home: jars, data, logs, pid file. [default: ./.kafka; env MARVIN_KAFKA_HOME]",
)


def _broker(home: Path | None, **settings) -> LocalBroker:
    try:
        config = BrokerConfig(home=home or default_home(), **settings)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    return LocalBroker(config, progress=lambda message: click.echo(message, err=True))


@click.group(help="A local single-node Apache Kafka broker for development and tests.")
def cli() -> None:
    pass


@cli.command(help="Start the broker and wait until it answers.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--controller-port", type=click.IntRange(1, 65535), default=None, help="[default: port + 1]"
)
@home_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait.")
def start(
    port: int, host: str, controller_port: int | None, home: Path | None, timeout: float
) -> None:
    broker = _broker(home, host=host, port=port, controller_port=controller_port)
    began = time.monotonic()
    try:
        status = broker.start(timeout=timeout)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"Kafka {status.kafka_version} broker running on {status.bootstrap_servers} "
        f"(pid {status.pid}, ready in {time.monotonic() - began:.1f} s, "
        f"log {broker.config.log_file})"
    )


@cli.command(help="Stop the broker (SIGTERM, then SIGKILL after the timeout).")
@home_option
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait.")
def stop(home: Path | None, timeout: float) -> None:
    broker = _broker(home)
    before = broker.status()
    try:
        stopped = broker.stop(timeout=timeout)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    if stopped:
        click.echo(f"stopped the broker on {before.bootstrap_servers} (pid {before.pid})")
    else:
        click.echo(f"no broker running (home {broker.config.home})")


@cli.command(help="Say whether the broker runs, with its pid and address.")
@home_option
def status(home: Path | None) -> None:
    click.echo(str(_broker(home).status()))
