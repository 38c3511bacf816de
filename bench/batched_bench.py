"""llama.cpp's own ``llama-batched-bench``, built from the llama.cpp that llama-cpp-python vendors.

The batching section compares our engine with it: the same llama.cpp sources, the same GGUF,
threads, context and batch sizes, so a gap between the two is our engine's (Python, the
sampler chains, the scheduling), not the library's.

The binary is built on first use from llama-cpp-python's sdist on PyPI (``pip download
--no-binary :all:``), ``-DGGML_NATIVE=OFF`` as the Makefile builds the wheel, only the
``llama-batched-bench`` target, statically linked, and cached outside the checkout (in
``~/.cache/marvin-faust/llama-batched-bench/<version>/``) for later runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BINARY = "llama-batched-bench"
CACHE_DIR = Path.home() / ".cache" / "marvin-faust" / BINARY
# As the Makefile builds the wheel: portable, no -march=native. Static, so the cached binary
# needs nothing from the build tree; no network or TLS code, which a benchmark never uses.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)


class BuildError(RuntimeError):
    """The binary could not be built; the message says what is missing."""


@dataclass(frozen=True)
class BenchRow:
    """One row of llama-batched-bench's table (its own column names in the comments)."""

    prompt_tokens: int  # PP, per sequence
    generated_tokens: int  # TG, per sequence
    sequences: int  # B
    kv_cells: int  # N_KV
    prompt_seconds: float  # T_PP
    prompt_per_second: float  # S_PP
    generation_seconds: float  # T_TG
    generation_per_second: float  # S_TG: B * TG / T_TG
    seconds: float  # T = T_PP + T_TG
    tokens_per_second: float  # S: all tokens, prompt and generated, / T

    @property
    def generated_per_second(self) -> float:
        """Generated tokens over the whole time, prompts included: B * TG / T."""
        return self.sequences * self.generated_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "generated_per_second": round(self.generated_per_second, 2)}


_NUMBER = r"\s*([\d.]+)\s*"
_ROW = re.compile(r"^\|" + r"\|".join([_NUMBER] * 10) + r"\|\s*$")
_SETTINGS = re.compile(r"\b(n_kv_max = .*)$")


def parse_table(output: str) -> tuple[list[BenchRow], dict[str, str]]:
    """The rows of llama-batched-bench's markdown table and the settings line above it."""
    rows = []
    settings: dict[str, str] = {}
    for line in output.splitlines():
        if match := _ROW.match(line.strip()):
            pp, tg, b, n_kv, *times = match.groups()
            rows.append(BenchRow(int(pp), int(tg), int(b), int(n_kv), *map(float, times)))
        elif match := _SETTINGS.search(line):
            for pair in match.group(1).split(","):
                key, _, value = pair.partition("=")
                settings[key.strip()] = value.strip()
    return rows, settings


def installed_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def cached_binary(version: str) -> Path:
    return CACHE_DIR / version / BINARY


def ensure_binary(version: str, say: Callable[[str], None] = print) -> Path:
    """The cached binary for llama-cpp-python ``version``, built first if it is not there."""
    target = cached_binary(version)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    missing = [tool for tool in ("cmake", "make") if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    if missing:
        raise BuildError(
            f"cannot build {BINARY} (the batching section's baseline): missing "
            + ", ".join(missing)
            + "; install them (Debian: apt-get install cmake make g++) or pass --no-batched-bench"
        )
    say(f"building {BINARY} from llama-cpp-python {version}'s sdist (a few minutes, once)")
    with tempfile.TemporaryDirectory(prefix="batched-bench-build-") as scratch:
        work = Path(scratch)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--dest",
                str(work),
                f"llama-cpp-python=={version}",
            ],
            "download the llama-cpp-python sdist",
        )
        archive = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], "configure llama.cpp")
        jobs = str(min(os.cpu_count() or 1, 2))
        _run(
            ["cmake", "--build", str(build), "--target", BINARY, "-j", jobs],
            f"build {BINARY}",
        )
        built = next(build.rglob(BINARY), None)
        if built is None or not built.is_file():
            raise BuildError(f"the build finished without a {BINARY} binary in {build}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # whole or not at all, for the next run
    say(f"built {target}")
    return target


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise BuildError(f"could not {what} ({' '.join(command[:4])} ...): {tail}")


def command(
    binary: Path,
    model: Path,
    *,
    prompt_tokens: int,
    generated_tokens: int,
    sequences: list[int],
    n_ctx: int,
    n_batch: int,
    threads: int,
    threads_batch: int,
    gpu_layers: int,
    swa_full: bool,
) -> list[str]:
    """The command line with the engine's settings: unified KV cache, as the engine."""
    return [
        str(binary),
        "-m",
        str(model),
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(generated_tokens),
        "-npl",
        ",".join(map(str, sequences)),
        "-c",
        str(n_ctx),
        "-b",
        str(n_batch),
        "-ub",
        str(min(n_batch, 512)),
        "-t",
        str(threads),
        "-tb",
        str(threads_batch),
        "-ngl",
        str(gpu_layers),
        "--kv-unified",
        *(["--swa-full"] if swa_full else []),
    ]


def run(cmd: list[str], timeout: float = 1800.0) -> tuple[list[BenchRow], dict[str, str], str]:
    """Run llama-batched-bench; its rows, settings line and whole output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + "\n" + done.stderr
    rows, settings = parse_table(output)
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"{BINARY} failed ({done.returncode}): {output.strip()[-2000:]}")
    return rows, settings, output
