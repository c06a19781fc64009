"""The benchmarks' two plot shapes, written as PNG with matplotlib's Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bar_chart(
    path: Path,
    *,
    title: str,
    groups: Mapping[str, Mapping[str, float]],
    ylabel: str,
    hlines: Mapping[str, float] | None = None,
    log: bool = False,
) -> Path:
    """Grouped bars: ``groups[group][series]``, one colour per series, value on each bar."""
    series = list(dict.fromkeys(s for bars in groups.values() for s in bars))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(len(series), 1) * 0.5), 4))
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        values = [bars.get(name, float("nan")) for bars in groups.values()]
        drawn = ax.bar(xs, values, width, label=name)
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    for k, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{len(series) + k}", label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def line_chart(
    path: Path,
    *,
    title: str,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line with markers per series over the same ``x``."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.set_xticks(list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def scatter_chart(
    path: Path,
    *,
    title: str,
    points: Mapping[str, tuple[float, float]],
    xlabel: str,
    ylabel: str,
    hline: float | None = None,
) -> Path:
    """One labelled point per entry of ``points`` (x, y); ``hline`` draws a dashed goal line.

    A label ``"name (kind)"`` takes ``name``'s colour and ``kind``'s marker, so one method
    reads alike across corpora."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    names = list(dict.fromkeys(label.split(" (")[0] for label in points))
    kinds = list(dict.fromkeys(label.partition(" (")[2] for label in points))
    for label, (x, y) in points.items():
        name, _, kind = label.partition(" (")
        color, marker = f"C{names.index(name) % 10}", "o^sDv"[kinds.index(kind) % 5]
        ax.scatter([x], [y], color=color, marker=marker, label=label)
    if hline is not None:
        ax.axhline(hline, linestyle="--", linewidth=1, color="grey", label=f"goal: {hline:g}")
    ax.axhline(0.0, linewidth=0.5, color="black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def panel_lines(
    path: Path,
    *,
    title: str,
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    xlabel: str,
    log: bool = False,
    xlog: bool = False,
) -> Path:
    """Side by side, one panel per entry of ``panels``: a line per series through its own
    (x, y) points; a series named "... p99" is dashed, in the colour of its "... p50".
    ``log``, ``xlog``: logarithmic y, x axes."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        owners = list(dict.fromkeys(s.rsplit(" ", 1)[0] for s in series))
        for label, points in series.items():
            owner, _, q = label.rpartition(" ")
            xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
            style = "--" if q == "p99" else "-"
            ax.plot(xs, ys, style, marker="o", color=f"C{owners.index(owner)}", label=label)
        if log:
            ax.set_yscale("log")
        if xlog:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
