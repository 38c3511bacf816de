"""Sample a running worker with py-spy and say where its CPU time goes.

``py-spy record --gil --format raw`` samples only the thread holding the GIL (so idle threads
and a loop waiting in ``select`` drop out: what is left is Python using the CPU) and writes
collapsed stacks ("frame;frame;... count"), one line per distinct stack. The summary turns
them into inclusive and self shares per function, the share under our own package, and the
share per event-loop callback (the frame under ``Handle._run``: our agent, aiokafka's sender,
Faust's services...). The raw file loads in speedscope or flamegraph.pl.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# "function (path/to/file.py:123)" -> function, file; py-spy omits the line with --function
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
OUR_PACKAGE = "marvin_faust/"


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: pip install 'marvin-faust[bench]'")
    return found


def start_recording(pid: int, output: Path, seconds: float, rate: int = 100) -> subprocess.Popen:
    """py-spy attached to ``pid`` for ``seconds``; wait on the returned process."""
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--gil",  # on-CPU Python only
            "--function",  # aggregate by function, not by line
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def short_frame(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    if OUR_PACKAGE in file:
        file = OUR_PACKAGE + file.split(OUR_PACKAGE, 1)[1]
    return f"{match['function']} ({file})"


@dataclass
class Profile:
    samples: int
    inclusive: Counter[str]
    self_time: Counter[str]
    ours: int  # samples with a frame of our package on the stack
    callbacks: Counter[str]  # samples by the event-loop callback they ran under

    def share(self, count: int) -> float:
        return round(100.0 * count / self.samples, 1) if self.samples else 0.0

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "our_package_percent": self.share(self.ours),
            "top_inclusive_percent": {
                name: self.share(count) for name, count in self.inclusive.most_common(top)
            },
            "by_event_loop_callback_percent": {
                name: self.share(count) for name, count in self.callbacks.most_common(10)
            },
            "top_self_percent": {
                name: self.share(count) for name, count in self.self_time.most_common(top)
            },
            "our_functions_inclusive_percent": {
                name: self.share(count)
                for name, count in self.inclusive.most_common()
                if OUR_PACKAGE in name
            },
        }


def summarize(raw: Path) -> Profile:
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    callbacks: Counter[str] = Counter()
    samples = ours = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";")]
        # The first frame is the thread ("process 123:..." / "thread (0x..)"): not a function.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        for name in set(frames):
            inclusive[name] += count
        self_time[frames[-1]] += count
        if any(OUR_PACKAGE in frame for frame in frames):
            ours += count
        callbacks[_callback(frames)] += count
    return Profile(
        samples=samples, inclusive=inclusive, self_time=self_time, ours=ours, callbacks=callbacks
    )


def _callback(frames: list[str]) -> str:
    """The frame an event-loop callback started in, or the thread's entry point."""
    runs = [index for index, frame in enumerate(frames) if frame.startswith("Handle._run ")]
    if runs and runs[-1] + 1 < len(frames):
        return frames[runs[-1] + 1]
    if runs:
        return "(event loop itself)"
    return frames[min(2, len(frames) - 1)] if frames[0].startswith("Thread.") else frames[-1]
