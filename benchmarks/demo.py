"""``splitwire-bench demo``: real STS-B pairs scored through a running server, codec by codec,
next to the unsplit model computed locally in the same run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from splitwire.benchmarks import datasets
from splitwire.benchmarks.rd import run_through_codec, spearman_x100, tokenized
from splitwire.codec.catalog import BUILTIN_CODECS
from splitwire.edge.agent import EdgeAgent, EdgeConfig, EdgeError
from splitwire.split.cut import Cut
from splitwire.split.models import load_model


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    pairs = datasets.read_stsb(args.data or datasets.STSB_DEV)[: args.pairs]
    texts = datasets.stsb_sentences(pairs)
    gold = np.array([p.score for p in pairs])
    everything = Cut(model.num_blocks, model.num_blocks)
    reference = run_through_codec(model, everything, None, tokenized(model, texts)).outputs
    unsplit = dict(zip(texts, reference, strict=True))
    unsplit_cos = np.array([float(torch.dot(unsplit[p.first], unsplit[p.second])) for p in pairs])

    probe = EdgeAgent(EdgeConfig(server=args.server, model=args.model), model)
    try:
        probe.connect()
    except EdgeError as exc:
        print(f"splitwire-bench demo: {exc}")
        return 1
    assert probe.server_info is not None and probe.cut is not None
    remote = probe.server_info.models[0]
    split = probe.cut.split
    probe.close()
    if args.codecs:
        names = args.codecs.split(",")
    else:  # raw codecs, then whatever the server ships for this split
        shipped = [c.name for c in remote.codecs if c.name not in BUILTIN_CODECS and split in c.splits]
        names = ["fp32", "fp16", "int8-zstd", *shipped]

    results = {}
    for name in names:
        with EdgeAgent(EdgeConfig(server=args.server, model=args.model, codec=name), model) as agent:
            agent.connect()
            answers = {text: agent.infer(text) for text in texts}
        embeddings = {t: r.embedding for t, r in answers.items()}
        cos = np.array([float(np.dot(embeddings[p.first], embeddings[p.second])) for p in pairs])
        payload = sum(r.payload_bytes for r in answers.values())
        tokens = sum(r.tokens for r in answers.values())
        results[name] = {
            "cosines": cos,
            "spearman": spearman_x100(cos, gold),
            "bytes_per_sentence": payload / len(texts),
            "bits_per_token": payload * 8 / tokens,
            "round_trip_ms": float(np.median([r.timings_ms["round_trip"] for r in answers.values()])),
        }

    print(f"\n{model.name} split at block {split} of {model.num_blocks}, server {args.server}")
    shown = pairs[: args.show]
    print(f"\nFirst {len(shown)} STS-B dev pairs: cosine similarity, unsplit vs through the split")
    for i, pair in enumerate(shown, start=1):
        print(f"  #{i} {pair.first!r} ~ {pair.second!r}")
    # One row per codec and a column per pair: codec names stay whole however many codecs there are.
    print(f"{'pair':>24} " + " ".join(f"{f'#{i}':>7}" for i in range(1, len(shown) + 1)))
    print(f"{'gold score (0-5)':>24} " + " ".join(f"{pair.score:7.2f}" for pair in shown))
    print(f"{'unsplit (local)':>24} " + " ".join(f"{unsplit_cos[i]:7.4f}" for i in range(len(shown))))
    for name in names:
        print(f"{name:>24} " + " ".join(f"{results[name]['cosines'][i]:7.4f}" for i in range(len(shown))))
    unsplit_spearman = spearman_x100(unsplit_cos, gold)
    print(f"\nOver {len(pairs)} pairs ({len(texts)} sentences sent through the server):")
    print(f"{'codec':>24} {'bytes/sentence':>15} {'bits/token':>11} {'Spearman':>9} {'of unsplit':>11} {'RTT ms':>7}")
    print(f"{'unsplit (local)':>24} {'-':>15} {'-':>11} {unsplit_spearman:9.2f} {'100.00%':>11} {'-':>7}")
    for name in names:
        r = results[name]
        print(
            f"{name:>24} {r['bytes_per_sentence']:15.1f} {r['bits_per_token']:11.1f} {r['spearman']:9.2f} "
            f"{100 * r['spearman'] / unsplit_spearman:10.2f}% {r['round_trip_ms']:7.1f}"
        )
    if args.json:
        summary = {n: {k: v for k, v in r.items() if k != "cosines"} for n, r in results.items()}
        args.json.write_text(json.dumps({"unsplit_spearman": unsplit_spearman, "codecs": summary}, indent=2))
    return 0
