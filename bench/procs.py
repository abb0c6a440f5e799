"""Child processes: start them, talk to them line by line, and always stop them."""

from __future__ import annotations

import contextlib
import ctypes
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel kills it should the benchmark itself die."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildError(RuntimeError):
    """A child process exited early, or did not answer in time."""


class Child:
    """One child process; with `talk=True` it reads commands on stdin and answers on stdout.

    Whatever a child writes to stderr (and stdout, when it does not talk) goes to its log file.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        talk: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
                stdout=subprocess.PIPE if talk else log,
                stderr=log,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                text=True,
                bufsize=1,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops us in order
                preexec_fn=_die_with_parent,
            )
        if talk:
            threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ChildError(f"{self.name} is gone ({self.proc.poll()}){self.tail()}") from exc

    def expect(self, word: str, timeout: float) -> str:
        """Wait for a line `word ...` and return the rest of it; other lines are skipped."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self.proc.wait(timeout=5)
                raise ChildError(
                    f"{self.name} exited ({self.proc.returncode}) before saying {word}{self.tail()}"
                )
            head, _, rest = line.partition(" ")
            if head == word:
                return rest
        raise ChildError(f"{self.name} did not say {word} within {timeout:.0f} s{self.tail()}")

    def ask(self, command: str, timeout: float = 10) -> str:
        """Send a command; the child answers with a line starting with the same word."""
        self.send(command)
        return self.expect(command, timeout)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n  " + "\n  ".join(text) if text else ""

    def stop(self, timeout: float = 10) -> None:
        """Close stdin, then SIGTERM, then SIGKILL: whichever ends the process first."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdout.close()


class Processes:
    """Every child the benchmark starts; leaving the `with` block stops those still running."""

    def __init__(self, log_dir: Path, *, cwd: Path | None = None) -> None:
        self.log_dir = log_dir
        self.cwd = cwd  # where `python -m bench...` finds the package
        self._children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        talk: bool = False,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        child = Child(name, argv, log_path=log_path, env=env, talk=talk, cwd=self.cwd)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        while self._children:
            self._children.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
