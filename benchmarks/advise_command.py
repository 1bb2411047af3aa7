"""``splitwire-bench advise``: the split point and codec that minimise latency (or cloud compute) on a
given link, within a quality budget, with the table it decided from.

::

    device (benchmarks/device.py: 1 thread, --device-cpu cores) --> embed, each block, encode per codec
    this process (the server's torch threads)                      --> each block, head, decode per codec
    rd JSON                                                        --> bits per token, quality per codec and split
    link (bandwidth, round trip)

    latency(k, c) = front(k) + encode(c) + (up + down bytes) x 8 / bandwidth + rtt + decode(c) + back(k)
    cloud(k, c)   = decode(c) + back(k)

Every time is the mean over the first ``--sentences`` STS-B dev sentences, one request at a time
(batch 1), so it predicts what ``splitwire-bench compare`` measures. Bytes up are the payload
(bits per token from the rd run x the sentences' mean token count) plus the framing a request costs on
the wire; bytes down are the answer plus its framing (:func:`wire_bytes`). Beside the split
candidates from the rd file come the two ways of not splitting: cloud only (``token-ids``, exact) and
device only (nothing sent, nothing computed in the cloud).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass

import torch
from splitwire.benchmarks import datasets
from splitwire.benchmarks.device import device_model, device_process
from splitwire.benchmarks.link import LinkProfile
from splitwire.split.models import LoadedModel, ModelFamily

log = logging.getLogger(__name__)

# Bytes a one-packet request and its answer add on the wire beyond the payload and the answer (TCP/IP
# and HTTP/2 framing, gRPC metadata with the two fingerprints, ACKs), as the emulated link's counters
# showed in `splitwire-bench compare` (results/compare_minilm.json: 412 bytes up for the learned
# codec's 71-byte payload, 1,820 down for a 1,552-byte answer). A larger request adds the IP and TCP
# headers of each further packet, and the server's ACK of every second one (fp16: 7,231 bytes of
# payload, 7,847 up and 1,954 down; the model gives 7,832 and 1,924).
WIRE_FRAMING_BYTES = {"up": 341, "down": 268}
SEGMENT_BYTES = 1448  # TCP payload of a 1,500-byte packet with timestamps
SEGMENT_HEADER_BYTES = 52  # its IP and TCP headers
REPEATS = 10


def wire_bytes(payload: float, answer: float) -> tuple[float, float]:
    """Bytes on the wire up and down for one request of ``payload`` bytes and its ``answer``."""
    up = payload + WIRE_FRAMING_BYTES["up"]
    further_packets = math.ceil(up / SEGMENT_BYTES) - 1
    up += SEGMENT_HEADER_BYTES * further_packets
    return up, answer + WIRE_FRAMING_BYTES["down"] + SEGMENT_HEADER_BYTES * (further_packets // 2)


@dataclass(frozen=True)
class ModelTimes:
    """Mean milliseconds per request of each part of the model, on one side."""

    tokenize: float
    embed: float
    blocks: list[float]
    head: float

    def front(self, split: int) -> float:
        """What the edge runs before encoding: tokenise, embed, blocks [0, split)."""
        return self.tokenize + self.embed + sum(self.blocks[:split])

    def back(self, split: int) -> float:
        return sum(self.blocks[split:]) + self.head


def _mean_ms(run, *arguments):
    """Mean wall time of ``REPEATS`` back-to-back calls, and the last result. A mean, not a median: under
    a CPU quota short calls often run unthrottled, and only the mean carries the throttling they share."""
    started = time.perf_counter()
    for _ in range(REPEATS):
        out = run(*arguments)
    return 1000 * (time.perf_counter() - started) / REPEATS, out


def time_model(model: LoadedModel, texts: list[str]) -> ModelTimes:
    """Tokenising, embedding, each block and the head, each timed on every text."""
    from splitwire.split.cut import BlockRange, SplitModel

    split_model = SplitModel(model)
    tokenize, embed, head = [], [], []
    blocks: list[list[float]] = [[] for _ in range(model.num_blocks)]
    with torch.inference_mode():
        for text in texts:
            ms, (input_ids, mask) = _mean_ms(model.tokenize, [text])
            tokenize.append(ms)
            ms, hidden = _mean_ms(split_model.embed, input_ids, mask)
            embed.append(ms)
            for index in range(model.num_blocks):
                ms, hidden = _mean_ms(split_model.blocks, hidden, mask, BlockRange(index, index + 1))
                blocks[index].append(ms)
            ms, _ = _mean_ms(split_model.head, hidden, mask)
            head.append(ms)
    mean = statistics.fmean
    return ModelTimes(mean(tokenize), mean(embed), [mean(b) for b in blocks], mean(head))


def time_codecs(model: LoadedModel, texts: list[str], codecs: list[tuple[str, int]], side: str) -> dict[str, float]:
    """Mean ms per request to encode (``side`` "encode") or decode each ``(codec, split)``, keyed
    ``codec@split``. Inputs are the real hidden states of ``texts`` at the codec's split."""
    from splitwire.codec.catalog import CodecCatalog
    from splitwire.edge.agent import codec_input
    from splitwire.split.cut import Cut, SplitModel

    catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size, vocab_size=model.vocab_size)
    split_model = SplitModel(model)
    out: dict[str, float] = {}
    for name, split in codecs:
        codec, cut = catalog.get(name), Cut(model.num_blocks, split)
        means = []
        for text in texts:
            input_ids, mask = model.tokenize([text])
            hidden = codec_input(split_model, cut, codec, input_ids, mask)[0]
            payload = codec.encode_sequence(hidden)
            if side == "encode":
                means.append(_mean_ms(codec.encode_sequence, hidden)[0])
            else:
                means.append(_mean_ms(codec.decode_payload, payload)[0])
        out[f"{name}@{split}"] = statistics.fmean(means)
    return out


def _device_measure(texts: list[str], codecs: list[tuple[str, int]]) -> tuple[ModelTimes, dict[str, float]]:
    """Runs in the device process."""
    model = device_model()
    return time_model(model, texts), time_codecs(model, texts, codecs, "encode")


@dataclass(frozen=True)
class Candidate:
    split: int
    codec: str  # "" for device only
    bits_per_token: float
    relative_quality: float

    @property
    def label(self) -> str:
        if not self.codec:
            return "device only (whole model)"
        if self.codec == "token-ids":
            return "cloud only (token ids)"
        return f"split {self.split} + {self.codec}"


def _candidates(rd: dict[str, object], available: set[str]) -> tuple[list[Candidate], list[str]]:
    """Split candidates from the rd rows whose codec both sides have, and the names skipped."""
    rows = rd["rows"]
    assert isinstance(rows, list)
    found, skipped = [], []
    for row in rows:
        if row["codec"] not in available:
            skipped.append(row["codec"])
            continue
        found.append(Candidate(int(row["split"]), row["codec"], float(row["bits_per_token"]), row["relative_quality"]))
    return found, sorted(set(skipped))


def run(args: argparse.Namespace) -> dict[str, object]:
    from splitwire.cloud.config import default_torch_threads
    from splitwire.codec.catalog import CodecCatalog
    from splitwire.codec.token_ids import TOKEN_IDS_CODEC, TokenIdsCodec
    from splitwire.split.models import load_model

    if not args.rd.exists():
        raise FileNotFoundError(f"{args.rd} not found: run `splitwire-bench rd --split all --json {args.rd}` first")
    rd = json.loads(args.rd.read_text())
    model = load_model(args.model)
    if rd.get("model") != model.name:
        raise ValueError(f"{args.rd} holds results for {rd.get('model')}, not {model.name}")
    profile = LinkProfile.parse(args.link)
    catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size, vocab_size=model.vocab_size)
    candidates, skipped = _candidates(rd, set(catalog.names()))
    candidates.append(Candidate(0, TOKEN_IDS_CODEC, float(TokenIdsCodec(model.vocab_size).bits), 1.0))
    candidates.append(Candidate(model.num_blocks, "", 0.0, 1.0))
    texts = datasets.stsb_sentences(datasets.read_stsb(args.data or datasets.STSB_DEV))[: args.sentences]
    tokens = statistics.fmean(int(model.tokenize([t])[1].sum()) for t in texts)
    coded = [(c.codec, c.split) for c in candidates if c.codec]

    torch.set_num_threads(args.threads or default_torch_threads())
    log.info("timing the model and %d codecs in the cloud (%d threads)", len(coded), torch.get_num_threads())
    cloud = time_model(model, texts)
    decode = time_codecs(model, texts, coded, "decode")
    log.info("timing the model and the codecs on the device (%g cores)", args.device_cpu)
    with device_process(args.model, args.device_cpu) as (pool, cgroup):
        device, encode = pool.submit(_device_measure, texts, coded).result()
        device_description = cgroup.describe()

    # The answer: an embedding's packed floats (encoders) or a token id and its log-probability, with
    # field tags and the server's timing.
    answer_bytes = 4 * model.hidden_size + 16 if model.family is ModelFamily.ENCODER else 16
    rows = []
    for candidate in candidates:
        key = f"{candidate.codec}@{candidate.split}"
        if candidate.codec:
            up, down = wire_bytes(candidate.bits_per_token * tokens / 8, answer_bytes)
            link_ms = 1000 * profile.transmission_s(int(up), int(down))
            if candidate.codec == TOKEN_IDS_CODEC:  # the edge only tokenises; the cloud embeds
                device_ms = device.tokenize + encode[key]
                cloud_ms = decode[key] + cloud.embed + cloud.back(0)
            else:
                device_ms = device.front(candidate.split) + encode[key]
                cloud_ms = decode[key] + cloud.back(candidate.split)
        else:
            up = down = link_ms = cloud_ms = 0.0
            device_ms = device.front(model.num_blocks) + device.head
        rows.append(
            {
                "configuration": candidate.label,
                "split": candidate.split,
                "codec": candidate.codec or None,
                "bits_per_token": round(candidate.bits_per_token, 2),
                "relative_quality": round(candidate.relative_quality, 5),
                "within_budget": candidate.relative_quality >= 1.0 - args.quality_budget,
                "device_ms": round(device_ms, 3),
                "link_ms": round(link_ms, 3),
                "cloud_ms": round(cloud_ms, 3),
                "latency_ms": round(device_ms + link_ms + cloud_ms, 3),
                "bytes_up": round(up, 1),
                "bytes_down": round(down, 1),
            }
        )
    ranked = _rank(rows, args.minimise, args.cloud_tolerance)
    best = ranked[0]
    _print(ranked, best, profile, args, tokens, device_description)
    return {
        "model": model.name,
        "link": profile.name,
        "minimise": args.minimise,
        "quality_budget": args.quality_budget,
        "rd": str(args.rd),
        "quality_name": rd.get("quality_name"),
        "mean_tokens": round(tokens, 2),
        "sentences": len(texts),
        "device": device_description,
        "cloud_torch_threads": torch.get_num_threads(),
        "per_block_ms": {
            "device": dataclasses.asdict(device),
            "cloud": dataclasses.asdict(cloud),
        },
        "skipped_codecs": skipped,
        "recommendation": best,
        "rows": ranked,
    }


def _rank(rows: list[dict[str, object]], minimise: str, cloud_tolerance: float) -> list[dict[str, object]]:
    """Rows within the quality budget first, best first; the rest after them, by the same order.

    ``latency``: by predicted end-to-end latency. ``cloud``: device only is no answer to "how little
    cloud can a split use", so it goes last; configurations whose cloud time is within ``cloud_tolerance``
    of the least count as equal on cloud compute (the same back half, codecs that decode in a few
    hundred microseconds more or less), and among them the fastest wins.
    """
    if minimise == "latency":
        return sorted(rows, key=lambda r: (not r["within_budget"], r["latency_ms"]))
    least = min((r["cloud_ms"] for r in rows if r["codec"] and r["within_budget"]), default=0.0)

    def key(row: dict[str, object]) -> tuple[int, bool, float]:
        if not row["within_budget"]:
            return (2, True, row["cloud_ms"])
        if not row["codec"]:
            return (1, True, 0.0)
        near_least = row["cloud_ms"] <= least * (1 + cloud_tolerance)
        return (0, not near_least, row["latency_ms"] if near_least else row["cloud_ms"])

    return sorted(rows, key=key)


def _print(
    rows: list[dict[str, object]], best: dict[str, object], profile: LinkProfile, args, tokens: float, device: str
) -> None:
    objective = "cloud compute" if args.minimise == "cloud" else "latency"
    print(
        f"link {profile.name}; device: {device}; {tokens:.1f} tokens a request; quality budget "
        f"{100 * args.quality_budget:g}% of unsplit; minimising {objective}\n"
    )
    print("| configuration | bits/token | quality (of unsplit) | device ms | link ms | cloud ms | latency ms |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        mark = "**" if row is best else ""
        budget = "" if row["within_budget"] else " (over budget)"
        print(
            f"| {mark}{row['configuration']}{mark} | {row['bits_per_token']:,.1f} "
            f"| {100 * row['relative_quality']:.2f}%{budget} | {row['device_ms']:.1f} | {row['link_ms']:.1f} "
            f"| {row['cloud_ms']:.1f} | {mark}{row['latency_ms']:.1f}{mark} |"
        )
    print(
        f"\nrecommended: {best['configuration']} ({best['latency_ms']:.1f} ms, {best['cloud_ms']:.1f} ms in the cloud)"
    )
