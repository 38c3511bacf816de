"""Every knob of the worker, read once from the environment (and a ``.env`` file).

All variables start with ``MARVIN_``; ``Settings.model_fields`` is the reference and the README
lists each one with its default. A bad value stops the start with :class:`SettingsError`, whose
message names the variable and says what is wrong with it.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, FilePath, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .partitioners import PartitionerName

ENV_PREFIX = "MARVIN_"

PERSONA = (
    "You are a very bored robot with the personality of Marvin the Paranoid Android "
    "from The Hitchhiker's Guide to the Galaxy."
)
GREETING = "Hello, my name is Marvin. What do you want?"


class SettingsError(Exception):
    """A setting is missing or has a bad value; the message says which and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        extra="ignore",
        frozen=True,
        populate_by_name=True,  # load_settings(broker=...) as well as MARVIN_BROKER
    )

    # -- Kafka ---------------------------------------------------------------------------------
    app_id: str = Field("marvin-faust", min_length=1, description="Faust app id (consumer group).")
    broker: str = Field(
        "kafka://127.0.0.1:9092",
        # Faust's own variable is honoured too, after ours.
        validation_alias=AliasChoices("MARVIN_BROKER", "BROKER_URL"),
        description="Broker URL(s), ';'-separated, kafka:// scheme; else BROKER_URL.",
    )
    topic: str = Field("chat", min_length=1, description="Topic the chat front ends write to.")
    reply_topic: str | None = Field(None, description="Reply topic; empty = the chat topic.")
    dead_letter_topic: str = Field(
        "chat-dead-letters", min_length=1, description="Bad records go here, with the reason."
    )
    partitions: int = Field(4, ge=1, description="Partitions of the chat topic and the table.")
    ai_role: str = Field("AI", min_length=1, description="Role of the bot's own messages.")
    human_role: str = Field("human", min_length=1, description="Role that gets answered.")
    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        "exactly_once",
        description="exactly_once: reply, history and offset commit in one Kafka transaction.",
    )
    commit_interval: float = Field(
        0.1,
        gt=0,
        description="Seconds between offset commits; with exactly_once replies show on commit.",
    )
    session_timeout: float = Field(
        10.0,
        ge=6.0,
        description="Seconds before a silent (killed) worker's partitions move to the others.",
    )
    partitioner: PartitionerName = Field(
        "murmur2",
        description=(
            "How the fleet's producers place keys: murmur2 (Java, aiokafka, Faust) or crc32 "
            "(librdkafka: confluent-kafka, Quix Streams); routes the conversation views."
        ),
    )
    max_poll_records: int = Field(10, ge=1, description="Records fetched per poll.")
    standby_replicas: int = Field(
        1, ge=0, description="Standby copies of each table partition kept by other workers."
    )
    max_text_chars: int = Field(4000, ge=1, description="Longer human texts are dead-lettered.")
    max_stored_turns: int = Field(200, ge=2, description="History turns kept per conversation.")

    disabled_faust_fixes: str = Field(
        "",
        pattern=r"^\s*([1-7]\s*(,\s*[1-7]\s*)*)?$",
        description=(
            "Faust fixes to turn off, by number (faust_fixes.py), e.g. 6 or 4,6: only to show "
            "what a fix prevents."
        ),
    )

    # -- Kafka security (marvin_faust.security) ----------------------------------------------------
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = Field(
        "PLAINTEXT", description="How clients talk to Kafka."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols)."
    )
    sasl_username: str | None = Field(None, description="SASL user (SASL_* protocols).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (SASL_* protocols); never logged."
    )
    ssl_cafile: FilePath | None = Field(
        None, description="CA bundle that signed the broker's certificate; empty = system CAs."
    )
    ssl_certfile: FilePath | None = Field(
        None, description="Client certificate (PEM) for mutual TLS."
    )
    ssl_keyfile: FilePath | None = Field(
        None, description="Private key (PEM) of the client certificate."
    )

    # -- State and web -------------------------------------------------------------------------
    data_dir: Path = Field(Path(".state"), description="Faust data dir, models and RocksDB.")
    store: str = Field("rocksdb://", description="Table store: rocksdb:// or memory://.")
    web_bind: str = Field("127.0.0.1", description="Address the web server binds to.")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the Faust web server.")
    api_token: str | None = Field(None, description="Bearer token for the conversation views.")

    # -- Web chat front end (``marvin-faust webchat``, a process of its own) -----------------------
    webchat_bind: str = Field("127.0.0.1", description="Address the web chat binds to.")
    webchat_port: int = Field(8080, ge=1, le=65535, description="Port of the web chat.")
    worker_url: str = Field(
        "http://127.0.0.1:6066", description="A worker's web URL: the web chat reads history there."
    )

    # -- Model ---------------------------------------------------------------------------------
    backend: Literal["llamacpp", "standin"] = Field("llamacpp", description="LLM backend.")
    model_source: Literal["offline", "path", "huggingface"] = Field(
        "offline", description="Where the GGUF comes from."
    )
    model_path: Path | None = Field(None, description="Local GGUF file (model_source=path).")
    model_repo: str = Field(
        "TheBloke/Llama-2-7b-Chat-GGUF", min_length=1, description="Hub repo (huggingface)."
    )
    model_file: str = Field(
        "llama-2-7b-chat.Q4_K_M.gguf", min_length=1, description="GGUF file in that repo."
    )
    prompt_format: Literal["auto", "template", "llama-2", "plain"] = Field(
        "auto", description="auto: the GGUF's template, else llama-2 for Llama-2 chat, else plain."
    )
    n_ctx: int = Field(2048, ge=128, description="Context window in tokens.")
    n_gpu_layers: int = Field(-1, ge=-1, description="-1 = all on the GPU.")
    n_threads: int | None = Field(None, ge=1, description="llama.cpp threads; empty = its default.")
    max_tokens: int = Field(250, ge=1, description="Longest reply in tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling.")
    top_k: int = Field(150, ge=0, description="Top-k sampling.")
    repeat_penalty: float = Field(1.2, gt=0.0, description="Repetition penalty.")
    seed: int = Field(-1, description="Sampling seed; -1 = random.")
    history_token_budget: int = Field(300, ge=0, description="History tokens put in the prompt.")
    model_timeout: float = Field(300.0, gt=0, description="Seconds before a reply is given up.")
    persona: str = Field(PERSONA, min_length=1, description="System message of every prompt.")
    greeting: str = Field(GREETING, min_length=1, description="The bot's opening line.")

    # -- Stand-in backend (tests, demos, benchmarks) ---------------------------------------------
    standin_latency: float = Field(0.0, ge=0.0, description="Seconds the stand-in takes to reply.")

    @model_validator(mode="after")
    def _check_model_source(self) -> Settings:
        if self.model_source == "path" and self.model_path is None:
            raise ValueError("MARVIN_MODEL_PATH must be set when MARVIN_MODEL_SOURCE=path")
        if not self.broker.startswith("kafka://"):
            raise ValueError(f"MARVIN_BROKER must start with kafka:// (got {self.broker!r})")
        self._check_security()
        return self

    def _check_security(self) -> None:
        # A credential that would be silently ignored is as wrong as a missing one.
        protocol = self.security_protocol
        if protocol.startswith("SASL_"):
            if not self.sasl_username or not self.sasl_password:
                raise ValueError(
                    f"MARVIN_SECURITY_PROTOCOL={protocol} needs MARVIN_SASL_USERNAME "
                    "and MARVIN_SASL_PASSWORD"
                )
        elif self.sasl_username or self.sasl_password:
            raise ValueError(
                f"MARVIN_SASL_USERNAME/MARVIN_SASL_PASSWORD are set but "
                f"MARVIN_SECURITY_PROTOCOL={protocol} does not use SASL "
                "(SASL_PLAINTEXT or SASL_SSL)"
            )
        tls_files = [
            name
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if getattr(self, name) is not None
        ]
        if tls_files and not protocol.endswith("SSL"):
            raise ValueError(
                f"{ENV_PREFIX}{tls_files[0].upper()} is set but MARVIN_SECURITY_PROTOCOL="
                f"{protocol} does not use TLS (SSL or SASL_SSL)"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("MARVIN_SSL_KEYFILE needs MARVIN_SSL_CERTFILE (the certificate)")
        if protocol.endswith("SSL"):
            from .security import ssl_context  # imported here: it imports Faust

            try:
                ssl_context(self)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    "MARVIN_SSL_CAFILE/MARVIN_SSL_CERTFILE/MARVIN_SSL_KEYFILE cannot be loaded "
                    f"as PEM: {exc}"
                ) from None

    @property
    def faust_fixes_disabled(self) -> frozenset[int]:
        return frozenset(int(n) for n in self.disabled_faust_fixes.split(",") if n.strip())

    @property
    def replies_to(self) -> str:
        return self.reply_topic or self.topic

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def bootstrap_servers(self) -> str:
        """The broker list in the form aiokafka takes."""
        return ",".join(url.removeprefix("kafka://") for url in self.broker.split(";"))


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        if error["loc"]:
            field = str(error["loc"][0])
            name = field if field.startswith(ENV_PREFIX) else ENV_PREFIX + field.upper()
            got = f" (got {error['input']!r})" if "input" in error else ""
            problems.append(f"{name}: {error['msg']}{got}")
        else:  # a cross-field check: its message already names the variables
            problems.append(error["msg"].removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(problems)


def settings_markdown() -> str:
    """docs/settings.md: one row per field of :class:`Settings`, its variable, default and
    description (``tests/test_readme.py`` checks that the file is this text)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def default(value: object) -> str:
        if value is None:
            return "(unset)"
        if value == "":
            return "(empty)"
        return f"`{cell(str(value))}`"

    lines = [
        "# Settings",
        "",
        "<!-- Generated by marvin_faust.settings.settings_markdown(): do not edit by hand. -->",
        "",
        "Every setting is an environment variable (a `.env` file in the working directory is "
        "read too), validated when the worker or a command starts: a bad value stops it with one "
        "line that names the variable. This file is generated from `Settings.model_fields` in "
        "`marvin_faust/settings.py`; after changing a setting, regenerate it from the "
        "repository root:",
        "",
        "```sh",
        '.venv/bin/python -c "from marvin_faust.settings import settings_markdown; '
        'print(settings_markdown())" > docs/settings.md',
        "```",
        "",
        "| variable | default | description |",
        "| --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{ENV_PREFIX}{name.upper()}` | {default(field.default)} "
            f"| {cell(field.description or '')} |"
        )
    return "\n".join(lines)
