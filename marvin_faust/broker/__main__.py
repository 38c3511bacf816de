"""``python -m marvin_faust.broker start|stop|status``."""

from .cli import cli

if __name__ == "__main__":
    cli()
