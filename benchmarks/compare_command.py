"""``splitwire-bench compare``: end-to-end latency, quality, bytes and cloud compute per request, for
splitting with each codec against the two ways of not splitting, on emulated links.

::

    for each link profile (bandwidth / round trip):
        cloud server in a network namespace behind the link (benchmarks/link.py), started by this run
        device process (CPU quota) --front + encode--> link --> server: split + fp16, int8-zstd, learned
        device process --token ids, 15 bits each--> link --> server runs every block: cloud only
    device process runs the whole model itself, no link:                          device only

The device is one process with one torch thread whose CPU time is capped by a cgroup quota
(``--device-cpu``, by default a quarter of a core), so it is slower than the server, as phones and
gateways are; without a writable cgroup it runs uncapped and the results say so. Requests go one at
a time (no batching, no contention), each sentence of ``--pairs`` STS-B dev pairs once after a
warm-up, and quality is the Spearman of those pairs beside the unsplit model's on the same pairs.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from splitwire.benchmarks import datasets
from splitwire.benchmarks.device import device_model, device_process
from splitwire.benchmarks.link import LinkProfile, NamespaceLink, SimulatedLink, open_link
from splitwire.benchmarks.load_command import ServerProcess
from splitwire.benchmarks.rd import stsb_quality
from splitwire.codec.token_ids import TOKEN_IDS_CODEC

log = logging.getLogger(__name__)


# -- the device ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePlan:
    """What one device run does: a split with a codec through ``server``, or (``server`` None) everything."""

    texts: list[str]
    model: str
    server: str | None = None
    split: int | None = None
    codec: str | None = None
    warmup: int = 5


@dataclass
class DeviceRun:
    """Per request, in the order of ``texts``."""

    embeddings: list[np.ndarray]
    total_ms: list[float]  # end to end, as the application sees it
    device_ms: list[float]  # tokenise + front + encode (split), or the whole model (device only)
    network_server_ms: list[float]  # send to answer received; 0 for device only
    server_ms: list[float]  # the server's own decode + queue + compute
    payload_bytes: list[int] = field(default_factory=list)
    message_bytes: list[int] = field(default_factory=list)
    response_bytes: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    codec: str = ""
    split: int = 0


def _device_run(plan: DevicePlan) -> DeviceRun:
    from splitwire.edge.agent import EdgeAgent, EdgeConfig
    from splitwire.split.cut import SplitModel

    model = device_model()
    run = DeviceRun([], [], [], [], [])
    if plan.server is None:
        split_model = SplitModel(model)  # type: ignore[arg-type]
        for index, text in enumerate(plan.texts[: plan.warmup] + plan.texts):
            started = time.perf_counter()
            input_ids, token_mask = model.tokenize([text])  # type: ignore[attr-defined]
            with torch.inference_mode():
                embedding = split_model.run_unsplit(input_ids, token_mask)[0].numpy()
            elapsed = 1000 * (time.perf_counter() - started)
            if index >= plan.warmup:
                run.embeddings.append(embedding)
                run.total_ms.append(elapsed)
                run.device_ms.append(elapsed)
                run.network_server_ms.append(0.0)
                run.server_ms.append(0.0)
                run.tokens.append(int(token_mask.sum()))
        run.codec, run.split = "", model.num_blocks  # type: ignore[attr-defined]
        return run
    config = EdgeConfig(server=plan.server, model=plan.model, split=plan.split, codec=plan.codec, timeout_s=120)
    with EdgeAgent(config, model) as agent:  # type: ignore[arg-type]
        agent.connect()
        for index, text in enumerate(plan.texts[: plan.warmup] + plan.texts):
            result = agent.infer(text)
            if index < plan.warmup:
                continue
            timings = result.timings_ms
            assert result.embedding is not None
            run.embeddings.append(result.embedding)
            run.total_ms.append(timings["total"])
            run.device_ms.append(timings["tokenize"] + timings["front"] + timings["encode"])
            run.network_server_ms.append(timings["round_trip"])
            run.server_ms.append(timings["server_total"])
            run.payload_bytes.append(result.payload_bytes)
            run.message_bytes.append(result.message_bytes)
            run.response_bytes.append(result.response_bytes)
            run.tokens.append(result.tokens)
        assert agent.codec is not None and agent.cut is not None
        run.codec, run.split = agent.codec.name, agent.cut.split
    return run


# -- the comparison ------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.array(values) if values else np.zeros(1)
    return {
        "p50": round(float(np.percentile(array, 50)), 3),
        "p90": round(float(np.percentile(array, 90)), 3),
        "p99": round(float(np.percentile(array, 99)), 3),
        "mean": round(float(array.mean()), 3),
    }


def _label(run: DeviceRun) -> str:
    if not run.codec:
        return "device only (whole model)"
    if run.codec == TOKEN_IDS_CODEC:
        return "cloud only (token ids)"
    return f"split {run.split} + {run.codec}"


def _row(
    run: DeviceRun,
    pairs: list[datasets.SentencePair],
    texts: list[str],
    unsplit: float,
    link: NamespaceLink | SimulatedLink | None,
    wire: dict[str, float] | None,
    server_cpu_ms: float | None,
) -> dict[str, object]:
    total = list(run.total_ms)
    network = list(run.network_server_ms)
    if isinstance(link, SimulatedLink):  # nothing was shaped: add what the link would have cost
        added = [
            1000 * link.profile.transmission_s(up, down)
            for up, down in zip(run.message_bytes, run.response_bytes, strict=True)
        ]
        total = [t + a for t, a in zip(total, added, strict=True)]
        network = [n + a for n, a in zip(network, added, strict=True)]
    quality = stsb_quality({t: torch.from_numpy(e) for t, e in zip(texts, run.embeddings, strict=True)}, pairs)
    tokens = sum(run.tokens)
    payload = sum(run.payload_bytes)
    return {
        "config": _label(run),
        "split": run.split,
        "codec": run.codec or None,
        "requests": len(run.total_ms),
        "latency_ms": _percentiles(total),
        "device_ms": _percentiles(run.device_ms),
        "network_and_server_ms": _percentiles(network),
        "server_ms": _percentiles(run.server_ms),
        "server_cpu_ms_per_request": None if server_cpu_ms is None else round(server_cpu_ms, 3),
        "payload_bytes_per_request": round(payload / max(len(run.payload_bytes), 1), 1),
        "bits_per_token": round(payload * 8 / tokens, 2) if payload else 0.0,
        "wire_bytes_per_request": wire,
        "quality": round(quality, 3),
        "unsplit_quality": round(unsplit, 3),
        "relative_quality": round(quality / unsplit, 5),
    }


def _interface_bytes(device: str) -> tuple[int, int]:
    stats = Path("/sys/class/net", device, "statistics")
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def _through_link(
    profile: LinkProfile,
    args: argparse.Namespace,
    device: ProcessPoolExecutor,
    configs: list[tuple[int, str | None]],
    texts: list[str],
) -> tuple[str, list[tuple[DeviceRun, dict[str, float] | None, float]], dict[str, dict[str, int]] | None]:
    """Every split configuration through a server behind ``profile``: the link's mode, the runs, and what
    the link did to the packets (the user-space emulator counts them; None for other links)."""
    runs = []
    with open_link(profile, allow_namespaces=not args.simulate_link) as link:
        server_arguments = [
            "--host", link.far_address, "--model", args.model, "--metrics-port", "-1",
            "--max-queue-delay-ms", "0", "--log-level", "WARNING",
        ]  # fmt: skip
        with ServerProcess(server_arguments, launcher=link.wrap([])) as server:
            address = link.client_address(int(server.address.rsplit(":", 1)[1]))
            requests = len(texts) + args.warmup
            for split, codec in configs:
                plan = DevicePlan(texts, args.model, address, split, codec, args.warmup)
                counters = _interface_bytes(link.near_device) if isinstance(link, NamespaceLink) else None
                cpu_before = server.cpu_seconds()
                run = device.submit(_device_run, plan).result()
                server_cpu_ms = 1000 * (server.cpu_seconds() - cpu_before) / requests
                wire = None
                if counters is not None:
                    after = _interface_bytes(link.near_device)
                    wire = {
                        "up": round((after[0] - counters[0]) / requests, 1),
                        "down": round((after[1] - counters[1]) / requests, 1),
                    }
                log.info("%s over %s: p50 %.1f ms", _label(run), profile.name, float(np.median(run.total_ms)))
                runs.append((run, wire, server_cpu_ms))
    packets = (link.packet_counts or None) if isinstance(link, NamespaceLink) else None
    return link.mode, runs, packets


def run(args: argparse.Namespace) -> dict[str, object]:
    from splitwire.split.cut import SplitModel
    from splitwire.split.models import load_model

    model = load_model(args.model)
    pairs = datasets.read_stsb(args.data or datasets.STSB_DEV)[: args.pairs]
    texts = datasets.stsb_sentences(pairs)
    split_model = SplitModel(model)
    unsplit_embeddings = {}
    with torch.inference_mode():
        for text in texts:
            input_ids, token_mask = model.tokenize([text])
            unsplit_embeddings[text] = split_model.run_unsplit(input_ids, token_mask)[0]
    unsplit = stsb_quality(unsplit_embeddings, pairs)
    split = model.spec.default_split if args.split is None else args.split
    # None: the server's default codec for the split, as an edge naming none would get it
    codecs = args.codecs.split(",") if args.codecs else ["fp16", "int8-zstd", None]
    configs: list[tuple[int, str | None]] = [(split, codec) for codec in codecs]
    configs.append((0, TOKEN_IDS_CODEC))
    profiles = [LinkProfile.parse(text) for text in args.links.split(",")]
    print(f"unsplit {model.name} on {len(pairs)} STS-B dev pairs: Spearman {unsplit:.2f}")

    links = []
    with device_process(args.model, args.device_cpu) as (device, cgroup):
        local = device.submit(_device_run, DevicePlan(texts, args.model, warmup=args.warmup)).result()
        device_row = _row(local, pairs, texts, unsplit, None, None, None)
        for profile in profiles:
            mode, runs, packets = _through_link(profile, args, device, configs, texts)
            rows = [_row(r, pairs, texts, unsplit, _link_for(mode, profile), wire, cpu) for r, wire, cpu in runs]
            rows.append(device_row)
            links.append({"link": profile.name, "mode": mode, "packets": packets, "rows": rows})
            _print_table(profile.name, mode, rows)
        device_description = cgroup.describe()
    result = {
        "model": model.name,
        "pairs": len(pairs),
        "sentences": len(texts),
        "unsplit_quality": round(unsplit, 3),
        "quality_name": "STS-B dev Spearman x 100 (first --pairs pairs)",
        "device": device_description,
        "device_cpu_cores": args.device_cpu if cgroup.path else None,
        "server": "splitwire-cloud serve, default threads and compute process, --max-queue-delay-ms 0",
        "links": links,
    }
    if args.plot:
        _plot(result, args.plot)
        result["plot"] = str(args.plot)
    return result


def _link_for(mode: str, profile: LinkProfile) -> SimulatedLink | None:
    return SimulatedLink(profile) if mode == SimulatedLink.mode else None


def _print_table(link: str, mode: str, rows: list[dict[str, object]]) -> None:
    """The link's rows as the Markdown table the README shows."""
    print(f"\n**{link}** ({mode})\n")
    print(
        "| configuration | end to end p50 (p90 / p99), ms | device, ms | network + server, ms | payload, B "
        "| on the wire up / down, B | server CPU, ms | Spearman (of unsplit) |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        latency, device, network = row["latency_ms"], row["device_ms"], row["network_and_server_ms"]
        wire, cpu = row["wire_bytes_per_request"], row["server_cpu_ms_per_request"]
        on_wire = "-" if wire is None else f"{wire['up']:,.0f} / {wire['down']:,.0f}"  # type: ignore[index]
        print(
            f"| {row['config']} | {latency['p50']:.1f} ({latency['p90']:.1f} / {latency['p99']:.1f}) "  # type: ignore[index]
            f"| {device['p50']:.1f} "  # type: ignore[index]
            f"| {network['p50']:.1f} | {row['payload_bytes_per_request']:,.0f} "  # type: ignore[index]
            f"| {on_wire} "
            f"| {'-' if cpu is None else f'{cpu:.1f}'} "
            f"| {row['quality']:.2f} ({100 * row['relative_quality']:.1f}%) |"  # type: ignore[operator]
        )


def _plot(result: dict[str, object], path: Path) -> None:
    """Median end-to-end latency per configuration, one group of bars per link, split into device time
    and network + server time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = result["links"]
    assert isinstance(links, list)
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4.8), sharey=False, squeeze=False)
    for ax, link in zip(axes[0], links, strict=True):
        names = [row["config"] for row in link["rows"]]
        device = [row["device_ms"]["p50"] for row in link["rows"]]
        network = [row["network_and_server_ms"]["p50"] for row in link["rows"]]
        positions = np.arange(len(names))
        ax.bar(positions, device, color="tab:orange", label="device (front + encode, or whole model)")
        ax.bar(positions, network, bottom=device, color="tab:blue", label="network + server")
        ax.set_xticks(positions, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{link['link']}", fontsize=10)
        ax.set_ylabel("median end-to-end latency, ms")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    cores = result["device_cpu_cores"]
    device = f"{cores:g} of a core" if cores else "uncapped"
    fig.suptitle(f"{result['model']}, one request at a time; device: 1 thread, {device}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
