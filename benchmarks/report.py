"""``splitwire-bench report``: the rate-distortion JSON files as the Markdown tables the README shows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rd_table(payload: dict[str, object]) -> str:
    """One Markdown table of an ``rd`` result, rows sorted by split then rate."""
    quality = payload["quality_name"]
    rows = sorted(payload["rows"], key=lambda r: (r["split"], r["bits_per_token"]))
    changed = any("answers_changed" in row["extra"] for row in rows)  # classify results
    lines = [
        f"{payload['task']} on `{Path(str(payload['data'])).name}` ({payload['rows_evaluated']} inputs), "
        f"unsplit {quality}: **{payload['unsplit_quality']:.2f}**",
        "",
        f"| split | codec | bits/token | estimated | fewer bits than fp16 | {quality} | of unsplit "
        f"| 95% interval |{' answers changed |' if changed else ''} enc+dec / front (32 tokens) |",
        f"|---:|---|---:|---:|---:|---:|---:|---:|{'---:|' if changed else ''}---:|",
    ]
    for row in rows:
        overhead = row["extra"].get("codec_time_over_front_time_32_tokens", float("nan"))
        low, high = row["extra"].get("relative_quality_ci95_low"), row["extra"].get("relative_quality_ci95_high")
        interval = "" if low is None else f"{100 * low:.2f}-{100 * high:.2f}%"  # absent from older files
        answers = f" {row['extra'].get('answers_changed', '')} |" if changed else ""
        lines.append(
            f"| {row['split']} | `{row['codec']}` | {row['bits_per_token']:.1f} "
            f"| {row['estimated_bits_per_token']:.1f} | {row.get('fewer_bits_than_fp16', 0):.0f}x "
            f"| {row['quality']:.2f} | {100 * row['relative_quality']:.2f}% | {interval} |{answers}"
            f" {100 * overhead:.1f}% |"
        )
    return "\n".join(lines)


def bd_table(payload: dict[str, object]) -> str:
    lines = ["| split | codec family | BD-rate vs fp16 | BD-rate vs uniform |", "|---:|---|---:|---:|"]

    def cell(value: object) -> str:
        return "n/a" if value is None else f"{value:+.1f}%"

    for entry in payload["bd_rate"]:
        if entry["vs_fp16_percent"] is None and entry["vs_uniform_percent"] is None:
            continue
        lines.append(
            f"| {entry['split']} | {entry['kind']} | {cell(entry['vs_fp16_percent'])} "
            f"| {cell(entry['vs_uniform_percent'])} |"
        )
    return "\n".join(lines)


def replot(payload: dict[str, object]) -> Path:
    """Draw an ``rd`` result's PNG again (where its ``plot`` field says) from its rows."""
    from splitwire.benchmarks.plots import plot_rate_distortion, rows_from_json
    from splitwire.benchmarks.rd_command import QUALITY_NAMES, plot_title

    path = Path(str(payload["plot"]))
    task = str(payload["task"])
    title = plot_title(str(payload["model"]), task, Path(str(payload["data"])))
    plot_rate_distortion(rows_from_json(payload["rows"]), path, title, QUALITY_NAMES[task])
    return path


def run(args: argparse.Namespace) -> int:
    for path in args.files:
        payload = json.loads(Path(path).read_text())
        if args.plot:
            print(f"<!-- redrew {replot(payload)} -->")
        print(f"<!-- {payload.get('command', '')} -->")
        print(rd_table(payload))
        print()
        print(bd_table(payload))
        print()
    return 0
