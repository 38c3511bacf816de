"""The Java runtime that runs the broker (and Maven): found, and its major version checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .config import BrokerError

JAVA_HINT = "install a Java 17 runtime (apt-get install openjdk-17-jre-headless) or set JAVA_HOME"


def find_java(min_major: int = 17) -> str:
    """The ``java`` to run: ``$MARVIN_JAVA``, ``$JAVA_HOME/bin/java`` or the one on PATH."""
    explicit = os.environ.get("MARVIN_JAVA")
    if explicit:
        java = shutil.which(explicit)
        if java is None:
            raise BrokerError(f"Java not found: MARVIN_JAVA={explicit} is not an executable")
    else:
        java_home = os.environ.get("JAVA_HOME")
        candidate = Path(java_home) / "bin" / "java" if java_home else None
        if candidate is not None and os.access(candidate, os.X_OK):
            java = str(candidate)
        else:
            java = shutil.which("java")
            if java is None:
                raise BrokerError(f"Java not found: {JAVA_HINT}")
    major = java_major_version(java)
    if major is not None and major < min_major:
        raise BrokerError(
            f"{java} is Java {major}; Kafka needs Java {min_major} or newer: {JAVA_HINT}"
        )
    return java


def java_major_version(java: str) -> int | None:
    """17 for ``openjdk version "17.0.15"``, 8 for ``"1.8.0_402"``; None if unknown."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"Java at {java} does not run: {exc}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major
