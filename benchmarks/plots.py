"""Rate-distortion plots (PNG) from benchmark rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from splitwire.benchmarks.rd import RateRow

SPLIT_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1)))]


def plot_rate_distortion(rows: Sequence[RateRow], path: Path, title: str, quality_name: str) -> None:
    """Quality against bits per token (log axis): one colour per codec family, one marker and line style
    per split point; families with one point per split (the float and int8 codecs) are markers only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], list[RateRow]] = defaultdict(list)
    for row in rows:
        curves[(row.kind, row.split)].append(row)
    kinds = sorted({kind for kind, _ in curves})
    splits = sorted({split for _, split in curves})
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (kind, split), members in sorted(curves.items()):
        members.sort(key=lambda r: r.bits_per_token)
        marker, line = SPLIT_STYLES[splits.index(split) % len(SPLIT_STYLES)]
        ax.plot(
            [r.bits_per_token for r in members],
            [r.quality for r in members],
            color=palette(kinds.index(kind) % 10),
            marker=marker,
            linestyle=line if len(members) > 1 else "none",
            label=f"{kind}, split {split}",
        )
    if rows:
        unsplit = rows[0].unsplit_quality
        ax.axhline(unsplit, color="black", linestyle="--", linewidth=1, label=f"unsplit ({unsplit:.2f})")
        if rows[0].higher_is_better:
            ax.axhline(0.99 * unsplit, color="grey", linestyle=":", linewidth=1, label="99% of unsplit")
        else:
            ax.axhline(1.02 * unsplit, color="grey", linestyle=":", linewidth=1, label="unsplit + 2%")
    ax.set_xscale("log")
    ax.set_xlabel("bits per token (real payload bytes x 8 / input tokens)")
    ax.set_ylabel(quality_name)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rows_from_json(rows: Sequence[dict[str, object]]) -> list[RateRow]:
    """``RateRow`` objects back from an ``rd`` JSON file's ``rows``."""
    fields = set(RateRow.__dataclass_fields__)
    return [RateRow(**{k: v for k, v in row.items() if k in fields}) for row in rows]
