"""Plots of the ingest benchmark against agents, from bench/results/latest.json, as PNGs in docs/bench/.

    python -m bench.plots [--results bench/results/latest.json] [--out docs/bench]

One line per target, encoding and batch size, saturated rows only (the paced row is one point).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no backend, no display, files only

from bench.harness import RESULTS

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench"
TARGETS = {"bare": "bare python-socketio", "hub": "hub (socket)", "http": "hub (HTTP per batch)"}
COLORS = {"bare": "tab:gray", "hub": "tab:blue", "http": "tab:orange"}
STYLES = {"json": "-", "msgpack": "--"}
Series = dict[tuple[str, str], list[dict[str, Any]]]


def _series(rows: Iterable[dict[str, Any]], batch: int) -> Series:
    """Saturated rows of batches of `batch`, by (target, encoding), in order of agents."""
    lines: Series = {}
    for row in rows:
        if row["load"] == "saturated" and row["batch"] == batch:
            lines.setdefault((row["target"], row["encoding"]), []).append(row)
    return {key: sorted(points, key=lambda row: row["agents"]) for key, points in lines.items()}


def _plot(axes: Axes, lines: Series, metric: str) -> None:
    plotted = False
    for (target, encoding), points in sorted(lines.items()):
        shown = [row for row in points if row.get(metric)]  # a target that accepted nothing has no point
        plotted = plotted or bool(shown)
        axes.plot(
            [row["agents"] for row in shown],
            [row[metric] for row in shown],
            STYLES.get(encoding, ":"),
            marker="o",
            color=COLORS.get(target),
            label=f"{TARGETS.get(target, target)}, {encoding}",
        )
    axes.set_xscale("log")
    if plotted:  # a log scale of nothing fails
        axes.set_yscale("log")
    axes.set_xlabel("agents (one mTLS connection each)")
    axes.grid(True, which="both", alpha=0.3)


def _figure(rows: list[dict[str, Any]], metrics: list[tuple[str, str]], title: str, path: Path) -> None:
    """A row of panels per metric ((row key, axis label)), a column per batch size."""
    batches = sorted({row["batch"] for row in rows})
    agents = sorted({row["agents"] for row in rows})
    figure = Figure(figsize=(5.5 * len(batches), 4 * len(metrics)))
    grid = figure.subplots(len(metrics), len(batches), squeeze=False)
    for panels, (metric, label) in zip(grid, metrics, strict=True):
        for axes, batch in zip(panels, batches, strict=True):
            _plot(axes, _series(rows, batch), metric)
            axes.set_xticks(agents, [f"{count:,}" for count in agents])
            axes.set_title(f"batches of {batch}")
            axes.set_ylabel(label)
    grid[0][0].legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description="PNG plots of the ingest benchmark.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    figures = json.loads(args.results.read_text())
    rows: list[dict[str, Any]] = figures["rows"]
    args.out.mkdir(parents=True, exist_ok=True)
    where = f"{figures.get('machine', '')}; {figures.get('command', '')}"
    _figure(
        rows,
        [("events_per_s", "accepted events/s"), ("events_per_cpu_s", "events per second of server CPU")],
        f"Ingest throughput, saturated ({where})",
        args.out / "ingest_throughput.png",
    )
    _figure(
        rows,
        [("ack_p99_ms", "ack p99 (ms)"), ("push_p99_ms", "emit-to-dashboard push p99 (ms)")],
        f"Ingest latency, saturated ({where})",
        args.out / "ingest_latency.png",
    )


if __name__ == "__main__":
    main()
