"""Figures for `vlmsafe report`: grouped bars of a headline metric, and a metric's curve over layers.

Builds `matplotlib.figure.Figure` objects on the Agg canvas directly (no pyplot, so no display,
no global figure state); the caller saves them.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def safe_name(*parts: str) -> str:
    """A file name from `parts` joined by `__`, with anything but letters, digits, `.`, `-`, `_` as `_`."""
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)).strip("._") or "_" for part in parts)


def _new_figure(width: float, height: float = 3.6) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def bar_chart(cells: pd.DataFrame, title: str) -> Figure:
    """Grouped bars: one group per (model, compress), one bar per `series`, CI error bars where present.

    `cells` has columns model, compress, series, value, ci_low, ci_high (one row per bar, in order).
    """
    combos = list(dict.fromkeys(zip(cells["model"], cells["compress"], strict=True)))
    series = list(dict.fromkeys(cells["series"]))
    width = 0.8 / len(series)
    fig = _new_figure(max(5.0, 2.0 + len(combos) * (0.35 + 0.25 * len(series))))  # room for the legend
    ax = fig.add_subplot()
    for index, name in enumerate(series):
        part = cells[cells["series"] == name]
        positions = np.array(
            [combos.index(combo) for combo in zip(part["model"], part["compress"], strict=True)]
        )
        positions = positions + (index - (len(series) - 1) / 2) * width
        values = part["value"].to_numpy(dtype=float)
        ax.bar(positions, values, width, label=name)
        low, high = part["ci_low"].to_numpy(dtype=float), part["ci_high"].to_numpy(dtype=float)
        has_ci = ~(np.isnan(low) | np.isnan(high))
        if has_ci.any():
            error = np.clip(np.vstack([values - low, high - values])[:, has_ci], 0, None)
            ax.errorbar(positions[has_ci], values[has_ci], yerr=error, fmt="none", ecolor="black", capsize=3)
    labels = [f"{model}\n{compress}" for model, compress in combos]
    ax.set_xticks(range(len(combos)), labels=labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside right upper", fontsize=7)
    return fig


def layer_chart(curves: pd.DataFrame, title: str) -> Figure:
    """Value against layer, one line per `series` (model / compress / variant ...).

    `curves` has columns series, layer, value (one row per point).
    """
    fig = _new_figure(7.5, 4.0)
    ax = fig.add_subplot()
    for name, part in curves.groupby("series", sort=False):
        part = part.sort_values("layer")
        ax.plot(part["layer"], part["value"], marker="o", markersize=3, linewidth=1.2, label=str(name))
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7)
    return fig
