"""PNG plots logged as MLflow artifacts: per-shard accuracy, shard sizes, and the shards x stages heat map of
what an operation retrained.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global backend is chosen for the
caller's process). Each function returns PNG bytes and takes only counts and accuracies, never rows.
`sisa.tracking.runs` imports this module only when it logs a plot, so matplotlib loads only then.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def shard_accuracy(acc: dict[int, float], ensemble: float | None, before: dict[int, float] | None = None) -> bytes:
    """Bar per shard of its test accuracy (and the accuracy before the operation, when given)."""
    shards = sorted(set(acc) | set(before or {}))
    fig = _figure(max(5.0, 0.5 * len(shards) + 3.2), 3.2)
    ax = fig.add_subplot()
    width = 0.4 if before else 0.8
    if before:
        ax.bar(
            [s - width / 2 for s in shards], [before.get(s, 0.0) for s in shards], width, label="before", color="#bbb"
        )
    ax.bar(
        [s + (width / 2 if before else 0) for s in shards],
        [acc.get(s, 0.0) for s in shards],
        width,
        label="after" if before else "shard",
        color="#1f77b4",
    )
    if ensemble is not None:
        ax.axhline(ensemble, color="#d62728", linestyle="--", label=f"ensemble {ensemble:.3f}")
    ax.set(xlabel="shard", ylabel="test accuracy", ylim=(0, 1.05), title="Accuracy per shard")
    ax.set_xticks(shards)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    return _png(fig)


def shard_sizes(slice_rows: list[list[int]]) -> bytes:
    """Stacked bar per shard: rows in each slice."""
    fig = _figure(max(5.0, 0.5 * len(slice_rows) + 3.2), 3.2)
    ax = fig.add_subplot()
    R = max((len(r) for r in slice_rows), default=0)
    bottom = [0] * len(slice_rows)
    for j in range(R):
        vals = [r[j] if j < len(r) else 0 for r in slice_rows]
        ax.bar(range(len(slice_rows)), vals, bottom=bottom, label=f"slice {j + 1}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="shard", ylabel="rows", title=f"Shard sizes ({sum(bottom)} rows)")
    ax.set_xticks(range(len(slice_rows)))
    if R <= 12:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    return _png(fig)


def retrained_stages(shards: int, slices: int, start: dict[int, int], hit: set[tuple[int, int]] | None = None) -> bytes:
    """Shards x stages heat map: kept (checkpoint reused), retrained, and retrained slices that held
    the deleted rows. ``start[s]`` is the first retrained stage of shard s (1-based); ``hit`` holds
    (shard, slice) pairs, 0-based."""
    hit = hit or set()
    grid = [[0] * slices for _ in range(shards)]
    for s, r in start.items():
        for j in range(r - 1, slices):
            grid[s][j] = 2 if (s, j) in hit else 1
    fig = _figure(max(4.0, 0.6 * slices + 2.5), max(2.5, 0.35 * shards + 1.5))
    ax = fig.add_subplot()
    colours = ["#e8e8e8", "#fdae61", "#d7191c"]
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(slices), [str(j + 1) for j in range(slices)])
    ax.set_yticks(range(shards), [str(s) for s in range(shards)])
    ax.set(xlabel="stage (slice)", ylabel="shard", title=f"Retrained: {len(start)} of {shards} shards")
    labels = ["kept (checkpoint reused)", "retrained", "retrained, held deleted rows"]
    ax.legend(
        handles=[Patch(color=c, label=lab) for c, lab in zip(colours, labels)],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=7,
    )
    return _png(fig)
