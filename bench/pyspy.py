"""A sampling profile of a running server with py-spy: where the GIL-holding time goes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_SKIP = ("mailsvc/cli.py", "mailsvc/__main__.py")  # on every stack: says nothing


@dataclass(frozen=True)
class Frame:
    func: str
    file: str  # as py-spy shortens it: "email/header.py", "libc.so.6", "_asynciomodule.c"

    @classmethod
    def parse(cls, text: str) -> Frame:
        match = _FRAME.match(text.strip())
        return cls(match["func"], match["file"]) if match else cls(text.strip(), "")

    def __str__(self) -> str:
        return f"{self.func} ({'/'.join(self.file.split('/')[-2:])})"

    @property
    def library(self) -> str | None:
        """mailsvc's module, else the top package ("email", "grpc"); None for a bare C frame."""
        if "/" not in self.file:
            return None
        if self.file.startswith("mailsvc/"):
            return self.file
        return self.file.split("/")[0]


@dataclass(frozen=True)
class Profile:
    title: str
    samples: int
    own: list[tuple[str, int]]  # function, samples where it was the innermost frame
    libraries: list[tuple[str, int]]  # innermost frame with a file (syscalls go to their caller)
    inclusive_mailsvc: list[tuple[str, int]]  # mailsvc functions anywhere on the stack

    def lines(self, top: int = 10) -> list[str]:
        if not self.samples:
            return [f"{self.title}: py-spy took no samples"]

        def share(rows: list[tuple[str, int]]) -> list[str]:
            return [f"  {100 * n / self.samples:5.1f}%  {name}" for name, n in rows[:top]]

        return [
            f"{self.title}: {self.samples} samples holding the GIL, native frames included",
            f"top {top} functions by own time:",
            *share(self.own),
            f"top {top} libraries by own time (a C call counts for the library calling it):",
            *share(self.libraries),
            f"top {top} mailsvc functions by inclusive time:",
            *share(self.inclusive_mailsvc),
        ]


def summarize(title: str, raw: str) -> Profile:
    """Read py-spy's raw (collapsed stacks) output: `frame;frame;... count` per line."""
    own: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [Frame.parse(f) for f in stack.split(";")]
        own[str(frames[-1])] += n
        library = next((f.library for f in reversed(frames) if f.library), "?")
        libraries[library] += n
        for name in {
            str(f) for f in frames if f.file.startswith("mailsvc/") and f.file not in _SKIP
        }:
            inclusive[name] += n
    return Profile(
        title, total, own.most_common(), libraries.most_common(), inclusive.most_common()
    )


class Recorder:
    """`py-spy record` attached to a process until `stop()`.

    --gil keeps the samples of the thread holding the GIL (the work the event loop does);
    --native shows what grpc's Cython and the C library do under it.
    """

    def __init__(self, title: str, pid: int, out: Path, *, rate: int = 200) -> None:
        self.title = title
        self.out = out
        py_spy = Path(sys.executable).with_name("py-spy")
        argv = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "-o", str(out)]
        argv += ["--rate", str(rate), "--duration", "300", "--function", "--gil", "--native"]
        self._log = out.with_suffix(".log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> Profile | None:
        """Stop sampling (py-spy writes its output on SIGINT) and summarize it."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()
        if not self.out.exists():
            return None
        return summarize(self.title, self.out.read_text(errors="replace"))
