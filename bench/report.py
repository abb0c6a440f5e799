"""What a run leaves: the Markdown table, the JSON results and the PNG chart."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.cell import Cell
from bench.pyspy import Profile
from bench.ratios import Check
from bench.scenarios import SCENARIOS, Plan, Scenario

HEADER = (
    "| scenario | in flight | calls | errors | sends/s | p50 ms | p95 ms | p99 ms "
    "| server CPU µs/call | server peak RSS MB |"
)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def table(cells: Iterable[Cell], scenarios: Sequence[Scenario] = SCENARIOS) -> str:
    """One row per cell, in the order of the scenarios, then of concurrency."""
    order = {s.key: i for i, s in enumerate(scenarios)}
    titles = {s.key: s.title for s in scenarios}
    rows = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for c in sorted(cells, key=lambda c: (order[c.scenario], c.concurrency)):
        errors = sum(c.errors.values())
        rows.append(
            f"| {titles[c.scenario]} | {c.concurrency} | {c.calls} | {errors} "
            f"| {_num(c.sends_per_s, 0)} | {_num(c.p50_ms, 2)} | {_num(c.p95_ms, 2)} "
            f"| {_num(c.p99_ms, 2)} | {_num(c.server_cpu_us_per_call, 0)} "
            f"| {_num(c.server_peak_rss_mb)} |"
        )
    return "\n".join(rows)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """Everything one run found."""

    stamp: str
    duration_s: float
    plan: Plan
    cells: list[Cell]
    checks: list[Check]
    correctness: list[str]
    profiles: list[Profile]
    notes: list[str] = field(default_factory=list)


def markdown(outcome: Outcome) -> str:
    busy = [c.machine_busy_pct for c in outcome.cells]
    plan = outcome.plan
    lines = [
        f"## mailsvc benchmark — {outcome.stamp}",
        "",
        f"{os.cpu_count()} cores, 127.0.0.1; {plan.calls} calls per cell after {plan.warmup} "
        "warm-up (fewer for single-call and connection-per-mail cells); all cores were "
        f"{min(busy, default=0):.0f} to {max(busy, default=0):.0f}% busy during the measured "
        f"phases; the run took {outcome.duration_s:.0f} s.",
        "",
        table(outcome.cells),
        "",
        "### Targets",
        "",
        *(check.line() for check in outcome.checks),
        *outcome.correctness,
        *(f"- {note}" for note in outcome.notes),
    ]
    for profile in outcome.profiles:
        lines += ["", f"### Profile of the server: {profile.title}", "", "```"]
        lines += [*profile.lines(), "```"]
    return "\n".join(lines) + "\n"


def save(results: Path, outcome: Outcome) -> list[Path]:
    """latest.json with a timestamped copy, latest.md and latest.png; each whole or not at all."""
    payload = {
        "started": outcome.stamp,
        "duration_s": round(outcome.duration_s, 1),
        "cores": os.cpu_count(),
        "plan": asdict(outcome.plan),
        "cells": [asdict(c) for c in outcome.cells],
        "targets": [asdict(c) for c in outcome.checks],
        "correctness": outcome.correctness,
        "notes": outcome.notes,
        "profiles": {p.title: p.lines() for p in outcome.profiles},
    }
    results.mkdir(parents=True, exist_ok=True)
    data = json.dumps(_without_nan(payload), indent=2, ensure_ascii=False) + "\n"
    texts = {"latest.json": data, f"{outcome.stamp}.json": data, "latest.md": markdown(outcome)}
    written = []
    for name, text in texts.items():
        path = results / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    written.append(results / "latest.png")
    chart(outcome.cells, written[-1])
    return written


def _without_nan(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(v) for v in value]
    return value


def chart(cells: Iterable[Cell], path: Path, scenarios: Sequence[Scenario] = SCENARIOS) -> None:
    """Throughput and p99 against calls in flight, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_scenario: dict[str, list[Cell]] = {}
    for c in cells:
        by_scenario.setdefault(c.scenario, []).append(c)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    for scenario in scenarios:
        points = sorted(by_scenario.get(scenario.key, []), key=lambda c: c.concurrency)
        if not points:
            continue
        xs = [c.concurrency for c in points]
        style = "--" if scenario.key.endswith("ceiling") or scenario.key == "noop" else "-"
        left.plot(xs, [c.sends_per_s for c in points], style, marker="o", label=scenario.title)
        right.plot(xs, [c.p99_ms for c in points], style, marker="o", label=scenario.title)
    for ax, title, unit in ((left, "throughput", "calls/s"), (right, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 16, 64], labels=["1", "16", "64"])
        ax.set_xlabel("calls in flight")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"mailsvc benchmark (127.0.0.1, {os.cpu_count()} cores)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
