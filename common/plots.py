"""The few plot shapes the experiments share, written as PNG files.

Figures are built with matplotlib's object interface (`Figure`, rendered by the Agg backend on save): no pyplot, so
no GUI backend, no global figure registry to leak, and ~0.6 s less start-up for every run that plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def figure(nrows: int = 1, ncols: int = 1, **kw):
    """(fig, axes) like pyplot.subplots, without pyplot."""
    fig = Figure(figsize=kw.pop("figsize", (6.4, 4.2)))
    return fig, fig.subplots(nrows, ncols, **kw)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def line_plot(path, x: Sequence[float], series: Mapping[str, tuple], *, xlabel: str, ylabel: str, title: str = "",
              hline: float | None = None) -> Path:
    """One line per series; a series is (mean,) or (mean, std) over x, std drawn as error bars."""
    fig, ax = figure(figsize=(6.4, 4.2))
    for label, values in series.items():
        mean = np.asarray(values[0], dtype=float)
        std = np.asarray(values[1], dtype=float) if len(values) > 1 and values[1] is not None else None
        ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter_plot(path, series: Mapping[str, tuple], *, xlabel: str, ylabel: str, title: str = "",
                 means: Mapping[str, tuple] | None = None) -> Path:
    """Scatter of (x, y) per series (small, translucent), optionally with per-group means (x̄, ȳ, ȳ_std) on top."""
    fig, ax = figure(figsize=(6.4, 4.2))
    for i, (label, (x, y)) in enumerate(series.items()):
        color = f"C{i}"
        ax.scatter(x, y, s=6, alpha=0.25, color=color)
        if means and label in means:
            mx, my, sy = means[label]
            ax.errorbar(mx, my, yerr=sy, fmt="o-", color=color, capsize=3, label=label)
        else:
            ax.scatter([], [], color=color, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(path, groups: Sequence[str], series: Mapping[str, tuple], *, ylabel: str, title: str = "") -> Path:
    """Bars for each group, one bar per series; a series is (values,) or (values, errors)."""
    fig, ax = figure(figsize=(max(6.4, 0.9 * len(groups) * max(1, len(series)) / 2), 4.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        err = values[1] if len(values) > 1 else None
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values[0], width, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, groups)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def vector_plot(path, values, *, title: str = "", marked: Sequence[int] = (), mark_label: str = "marked",
                sorted_panel: bool = True, ylabel: str = "saliency") -> Path:
    """A per-channel vector (e.g. an Algorithm-1 saliency vector): raw, and sorted, with chosen channels marked."""
    values = np.asarray(values, dtype=float)
    marked = np.asarray(list(marked), dtype=int)
    panels = 2 if sorted_panel else 1
    fig, axes = figure(1, panels, figsize=(6.4 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.bar(np.arange(len(values)), values, color="C0", width=1.0)
    if marked.size:
        ax.bar(marked, values[marked], color="C3", width=1.0, label=mark_label)
        ax.legend(fontsize=8)
    ax.set(xlabel="channel", ylabel=ylabel, title=title or "raw")
    if sorted_panel:
        order = np.argsort(values)
        ax = axes[0, 1]
        colors = np.where(np.isin(order, marked), "C3", "C0")
        ax.bar(np.arange(len(values)), values[order], color=colors, width=1.0)
        ax.set(xlabel="rank (ascending)", ylabel=ylabel, title="sorted")
    return _save(fig, path)
