"""Kafka's jars, fetched once from Maven Central with Maven (the POM is ``resources/pom.xml``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .config import POM, SCALA_VERSION, BrokerConfig, BrokerError
from .files import locked
from .java import find_java

# Written into the jars dir by ensure_jars once Maven has copied every jar.
JARS_MARKER = ".marvin-kafka-version"

MAVEN_HINT = "install Maven (apt-get install maven)"


def installed_version(jars: Path) -> str | None:
    """The Kafka version whose jars are in the jars dir, if they are complete."""
    marker = jars / JARS_MARKER
    if marker.is_file():
        version = marker.read_text().strip()
        return version if (jars / f"kafka_{SCALA_VERSION}-{version}.jar").is_file() else None
    # A jars dir not made by us (e.g. a Kafka distribution's libs/): take it as it is.
    found = sorted(jars.glob(f"kafka_{SCALA_VERSION}-*.jar"))
    for jar in found:
        match = re.fullmatch(rf"kafka_{SCALA_VERSION}-(\d[\w.]*)\.jar", jar.name)
        if match:
            return match.group(1)
    return None


def ensure_jars(cfg: BrokerConfig, progress: Callable[[str], None]) -> Path:
    """Fetch Kafka's jars with Maven unless the jars dir already has them."""
    jars = cfg.jars_dir
    installed = installed_version(jars)
    if installed == cfg.kafka_version or (
        installed is not None and not (jars / JARS_MARKER).is_file()
    ):
        return jars
    if jars.is_dir() and any(jars.iterdir()) and not (jars / JARS_MARKER).is_file():
        raise BrokerError(
            f"{jars} has files but no Kafka jars: empty it or choose another jars dir"
        )
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"Maven not found: {MAVEN_HINT} to fetch Kafka's jars into {jars}")
    find_java(min_major=8)  # Maven runs on it too; say so in our words rather than Maven's
    jars.parent.mkdir(parents=True, exist_ok=True)
    with locked(jars.parent / f".{jars.name}.lock"):
        if installed_version(jars) == cfg.kafka_version:  # fetched while we waited
            return jars
        progress(f"Fetching the jars of Kafka {cfg.kafka_version} with Maven...")
        staging = Path(tempfile.mkdtemp(prefix=f".{jars.name}-", dir=jars.parent))
        try:
            result = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-Dstyle.color=never",
                    "-f",
                    str(POM),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging}",
                    f"-Dkafka.version={cfg.kafka_version}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            kafka_jar = staging / f"kafka_{SCALA_VERSION}-{cfg.kafka_version}.jar"
            if result.returncode != 0 or not kafka_jar.is_file():
                raise BrokerError(
                    f"Maven could not fetch the jars of Kafka {cfg.kafka_version} "
                    f"(exit {result.returncode}): " + _maven_error(result.stdout + result.stderr)
                )
            (staging / JARS_MARKER).write_text(cfg.kafka_version + "\n")
            if jars.exists():  # ours, of another version
                shutil.rmtree(jars)
            staging.rename(jars)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return jars


def _maven_error(output: str) -> str:
    """The first line of Maven's output that says what went wrong."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("[ERROR]") and line != "[ERROR]"]
    return (errors or [line for line in lines if line] or ["no output"])[0]
