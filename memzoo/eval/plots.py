"""The recall / state-size plane: MQAR accuracy against inference-state size, with the Pareto
frontier (the models no other model beats with a state at most as large)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["pareto_frontier", "plot_recall_vs_state"]

_MARKERS = "osD^vP*Xh<>p"


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (state size, accuracy) on the frontier, by increasing state size.

    A point is on it when no other point has a state at most as large and a higher accuracy,
    or a smaller state and the same accuracy; of identical points the first given is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    frontier, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def plot_recall_vs_state(summary: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """One panel per test slice: accuracy against state size (floats per sequence, log x) of
    each (mixer, width) in `summary` (memzoo.eval.sweep.best_per_model), a colour per mixer
    and a marker per width, the Pareto frontier dashed. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(dict.fromkeys(name for s in summary for name in s["accuracy"]))
    mixers = sorted({s["mixer"] for s in summary})
    widths = sorted({s["d_model"] for s in summary})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(mixers)}
    markers = {w: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(widths)}

    fig, axes = plt.subplots(
        1, len(slices), figsize=(6.5 * len(slices), 4.5), dpi=120, squeeze=False
    )
    for ax, name in zip(axes[0], slices, strict=True):
        entries = [s for s in summary if name in s["accuracy"]]
        points = [(s["state_size"][name], s["accuracy"][name]) for s in entries]
        for s, (x, y) in zip(entries, points, strict=True):
            ax.scatter(
                x,
                y,
                color=colors[s["mixer"]],
                marker=markers[s["d_model"]],
                s=48,
                edgecolors="black",
                linewidths=0.5,
                zorder=3,
            )
        frontier = [points[i] for i in pareto_frontier(points)]
        if frontier:
            xs, ys = zip(*frontier, strict=True)
            ax.step(xs, ys, where="post", linestyle="--", color="gray", linewidth=1, zorder=2)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("inference state (floats per sequence)")
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)

    handles = [
        plt.Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in mixers
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            color="black",
            marker=markers[w],
            linestyle="",
            markerfacecolor="none",
            label=f"d_model {w}",
        )
        for w in widths
    ]
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="Pareto frontier"))
    axes[0][-1].legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False
    )
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
