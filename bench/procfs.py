"""Readings from /proc: a process's CPU time and peak memory, the machine's busy share."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of `pid` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for pid {pid}")


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time counters (all cores), in clock ticks."""

    busy: int
    total: int

    @classmethod
    def now(cls) -> CpuTimes:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])  # guest time is already counted in user
        return cls(total - idle, total)

    def busy_percent_since(self, earlier: CpuTimes) -> float:
        """Share of all cores busy between `earlier` and this reading, in percent."""
        total = self.total - earlier.total
        return 100.0 * (self.busy - earlier.busy) / total if total else 0.0
