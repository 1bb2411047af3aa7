"""``splitwire-bench decode-step``: one generation step through the split against one unsplit step, same run.

::

    unsplit: token --embed, blocks [0, L), head, argmax--> token                     (this process)
    split:   token --front_step [0, k), encode--> InferStream (loopback) --decode, back_step [k, L), sample--> token
             the time between two tokens arriving at the edge, so front, codec, gRPC and back all count

Both run greedy decoding after the same prompt, with the same torch threads (the server is started by this
run on a free loopback port, its compute alone on the machine while a step crosses it). The unsplit step is
timed on the lean path (:class:`~splitwire.split.cut.SplitModel` over all blocks) and through the Hugging
Face model's own ``forward`` with its cache; the ratio is against the faster of the two, so the split is
never flattered by a slow baseline. ``ratio`` = median split step / median unsplit step, over ``--steps``
steps per round for each, in ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time

import torch
from splitwire.benchmarks.load_command import ServerProcess
from splitwire.cloud.config import default_torch_threads
from splitwire.edge.agent import EdgeAgent, EdgeConfig
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel, load_model
from splitwire.split.sampling import SamplingParams
from splitwire.split.security import ClientSecurity
from transformers import DynamicCache

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The history of the city begins with a small settlement on the river, where"


def _time_steps(step, first_ids: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """Run ``step(ids) -> logits (1, V)`` on the prompt, then ``steps`` greedy steps; the steps' times (ms)
    and every chosen token (the prefill's first)."""
    with torch.inference_mode():
        token = int(step(first_ids).argmax(dim=-1)[0])
        tokens, times = [token], []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = int(step(torch.tensor([[token]])).argmax(dim=-1)[0])
            times.append(1000 * (time.perf_counter() - t0))
            tokens.append(token)
    return times, tokens


def unsplit_lean(model: LoadedModel, prompt_ids: list[int], steps: int) -> tuple[list[float], list[int]]:
    """Unsplit steps on splitwire's own path: all blocks behind one cache, then the head."""
    split_model = SplitModel(model)
    everything = Cut(model.num_blocks, model.num_blocks)
    front, back = split_model.new_cache(everything.front), split_model.new_cache(everything.back)
    return _time_steps(
        lambda ids: split_model.back_step(back, split_model.front_step(front, ids)),
        torch.tensor([prompt_ids]),
        steps,
    )


def unsplit_hf(model: LoadedModel, prompt_ids: list[int], steps: int) -> tuple[list[float], list[int]]:
    """Unsplit steps through the Hugging Face model's ``forward`` with its ``DynamicCache``."""
    hf = model.hf_model
    cache = DynamicCache(config=hf.config)
    return _time_steps(
        lambda ids: hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1],
        torch.tensor([prompt_ids]),
        steps,
    )


def _summary(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {
        "median": round(statistics.median(ordered), 3),
        "p10": round(ordered[len(ordered) // 10], 3),
        "p90": round(ordered[(9 * len(ordered)) // 10], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def _server_arguments(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model,
        "--metrics-port", "-1",
        "--log-level", "WARNING",
        "--threads", str(args.threads or default_torch_threads()),
    ]  # fmt: skip


def run(args: argparse.Namespace, security: ClientSecurity) -> dict[str, object]:
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    prompt = args.prompt or DEFAULT_PROMPT
    model = load_model(args.model)
    # Edge and unsplit steps use the server's thread count: the comparison is per machine, not per core.
    torch.set_num_threads(args.threads or default_torch_threads())
    codecs = [name.strip() for name in args.codec.split(",")] if args.codec else [None]
    rows = []
    with contextlib.ExitStack() as stack:
        server = None if args.server else stack.enter_context(ServerProcess(_server_arguments(args)))
        address = args.server or server.address  # type: ignore[union-attr]
        agents = []
        for name in codecs:
            config = EdgeConfig(server=address, model=args.model, split=args.split, codec=name, security=security)
            agent = stack.enter_context(EdgeAgent(config, model))
            agent.connect()
            agents.append(agent)
        prompt_ids = agents[0].prompt_ids(prompt)
        # Warm both sides (allocator, thread pools, the server's first session) before any clock runs.
        unsplit_lean(model, prompt_ids, 3)
        for agent in agents:
            agent.generate(prompt, SamplingParams(max_new_tokens=3))

        # Rounds interleave every variant, each round in a rotated order, so a slow spell of the machine
        # lands on all of them alike instead of on whichever ran last.
        lean_ms: list[float] = []
        hf_ms: list[float] = []
        split_ms: dict[int, list[float]] = {i: [] for i in range(len(agents))}
        results: dict[int, object] = {}
        reference: list[int] = []  # greedy tokens of the unsplit model, from any lean round
        variants = ["lean", "hf", *range(len(agents))]
        for round_index in range(args.rounds):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if variant == "lean":
                    times, reference = unsplit_lean(model, prompt_ids, args.steps)
                    lean_ms += times
                elif variant == "hf":
                    hf_ms += unsplit_hf(model, prompt_ids, args.steps)[0]
                else:
                    result = agents[variant].generate(prompt, SamplingParams(max_new_tokens=args.steps + 1))
                    split_ms[variant] += result.inter_token_ms
                    results[variant] = result
        for index, agent in enumerate(agents):
            assert agent.codec is not None and agent.cut is not None
            result = results[index]
            rows.append(
                {
                    "codec": agent.codec.name,
                    "split": agent.cut.split,
                    "step_ms": _summary(split_ms[index]),
                    "bits_per_token": round(result.bits_per_token, 2),
                    "same_tokens_as_unsplit": result.token_ids == reference,
                    "step_ms_all": [round(t, 3) for t in split_ms[index]],
                }
            )

    lean = _summary(lean_ms)
    hf = _summary(hf_ms)
    baseline = min(lean["median"], hf["median"])
    for row in rows:
        row["ratio"] = round(row["step_ms"]["median"] / baseline, 4)
        print(
            f"{model.name} split {row['split']} codec {row['codec']}: "
            f"split step median {row['step_ms']['median']:.2f} ms, "
            f"unsplit {baseline:.2f} ms -> ratio {row['ratio']:.3f} ({row['bits_per_token']:.0f} bits/token, "
            f"tokens {'identical to' if row['same_tokens_as_unsplit'] else 'differ from'} unsplit greedy)"
        )
    return {
        "model": model.name,
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "server": args.server or f"{address} (started by this run)",
        "server_command": None if server is None else " ".join(["splitwire-cloud", *server.command[1:]]),
        "unsplit_step_ms": {"splitwire": lean, "transformers": hf, "baseline_median": baseline},
        "rows": rows,
    }
