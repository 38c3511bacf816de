"""Live processes of this machine, read from /proc, for tests that check nothing is left running."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LiveProcess:
    pid: int
    cmdline: str
    environ: frozenset[str]


def live_processes() -> Iterator[LiveProcess]:
    """Every process but this one that is neither a zombie nor dead (states Z and X)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            yield LiveProcess(int(proc.name), cmdline, frozenset(environ))
