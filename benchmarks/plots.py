"""Rate-distortion plots (PNG) from benchmark rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from splitwire.benchmarks.rd import RateRow


def plot_rate_distortion(rows: Sequence[RateRow], path: Path, title: str) -> None:
    """Quality against bits per token (log axis), one curve per codec family and split point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], list[RateRow]] = defaultdict(list)
    for row in rows:
        curves[(row.kind, row.split)].append(row)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (kind, split), members in sorted(curves.items()):
        members.sort(key=lambda r: r.bits_per_token)
        ax.plot(
            [r.bits_per_token for r in members],
            [r.quality for r in members],
            marker="o",
            label=f"{kind} (split {split})",
        )
    unsplit = rows[0].unsplit_quality if rows else None
    if unsplit is not None:
        ax.axhline(unsplit, color="black", linestyle="--", linewidth=1, label=f"unsplit ({unsplit:.2f})")
        if rows[0].higher_is_better:
            ax.axhline(0.99 * unsplit, color="grey", linestyle=":", linewidth=1, label="99% of unsplit")
    ax.set_xscale("log")
    ax.set_xlabel("bits per token (real payload bytes x 8 / input tokens)")
    ax.set_ylabel(rows[0].task if rows else "quality")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
