"""``splitwire-bench train-codec``: train a learned codec (or fit a baseline) and optionally ship it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from splitwire.benchmarks import datasets
from splitwire.benchmarks.rd import fit_linear_head
from splitwire.benchmarks.shipping import install_checkpoint, load_manifest
from splitwire.codec.base import CodecKind
from splitwire.codec.catalog import CHECKPOINT_DIR, CheckpointEntry
from splitwire.codec.fitted import PcaModel, UniformModel
from splitwire.codec.learned import CodingModel, save_checkpoint
from splitwire.codec.train import TrainConfig, train_codec
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily, load_model

# STS-B train pairs kept out of codec training, for choosing between codecs without touching dev.
STSB_SELECTION_PAIRS = 500
SST2_TRAIN_SENTENCES = 20_000
ENCODER_TRUNCATION = 64  # training sentences are cut here (STS-B and SST-2 sentences rarely reach it)
DECODER_WINDOW = 128  # decoders train on windows of the joined texts this long
FIT_SENTENCES = 4000  # sentences whose hidden states the non-learned baselines are fitted on


def training_texts(files: list[Path] | None, rows: slice | None = None) -> tuple[list[str], list[str], dict[str, int]]:
    """Training texts, a description of where they came from, and how many of each kind there are
    (``sentences``, ``running_texts``). ``rows``: the part of each file used. A WikiText file becomes one
    running text, its lines joined by newlines as ``rd --task lm`` reads them, so a decoder trains on
    windows of running text."""
    if files is None:
        if rows is not None:
            raise SystemExit("--train-slice applies to --train-data files; name them")
        pairs = datasets.read_stsb(datasets.STSB_TRAIN)[:-STSB_SELECTION_PAIRS]
        sst = [text for text, _ in datasets.read_labelled(datasets.SST2_TRAIN)[:SST2_TRAIN_SENTENCES]]
        sources = [
            f"{datasets.STSB_TRAIN.name} pairs [0, {len(pairs)}) (last {STSB_SELECTION_PAIRS} held out for selection)",
            f"{datasets.SST2_TRAIN.name} first {len(sst)} sentences",
        ]
        sentences = list(dict.fromkeys(datasets.stsb_sentences(pairs) + sst))
        return sentences, sources, {"sentences": len(sentences)}
    rows = rows or slice(None)
    texts: list[str] = []
    sources: list[str] = []
    running: set[str] = set()
    for path in files:
        chosen, total, is_running_text = _file_texts(path, rows)
        texts += chosen
        if is_running_text:
            running.update(chosen)
        start, stop, _ = rows.indices(total)
        sources.append(str(path) if (start, stop) == (0, total) else f"{path} rows [{start}, {stop})")
    texts = list(dict.fromkeys(texts))
    counts = {"sentences": len(texts) - len(running), "running_texts": len(running)}
    return texts, sources, {kind: n for kind, n in counts.items() if n}


def _file_texts(path: Path, rows: slice) -> tuple[list[str], int, bool]:
    """The training texts in rows ``rows`` of one file, how many rows the file has, and whether the texts
    are running text (a WikiText file) rather than sentences."""
    if path.suffix == ".csv":
        pairs = datasets.read_stsb(path)
        return datasets.stsb_sentences(pairs[rows]), len(pairs), False
    if path.suffix == ".tokens":
        lines = datasets.read_wikitext(path)
        return ["\n".join(lines[rows])], len(lines), True
    labelled = datasets.read_labelled(path)
    return [text for text, _ in labelled[rows]], len(labelled), False


def head_rows(path: Path | None) -> tuple[list[tuple[str, str]], str]:
    """Labelled rows a head is fitted on for ``--head-emphasis``, and where they came from. Default: the
    SST-2 train sentences the default training texts include, so the codec sees no other labels."""
    if path is None:
        return datasets.read_labelled(datasets.SST2_TRAIN)[:SST2_TRAIN_SENTENCES], (
            f"{datasets.SST2_TRAIN.name} first {SST2_TRAIN_SENTENCES} rows"
        )
    return datasets.read_labelled(path), str(path)


def _hidden_samples(model: LoadedModel, split: int, texts: list[str]) -> torch.Tensor:
    split_model = SplitModel(model)
    cut = Cut(model.num_blocks, split)
    samples = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            ids, mask = model.tokenize(texts[start : start + 64])
            samples.append(split_model.run_front(cut, ids, mask)[mask])
    return torch.cat(samples)


def initial_checkpoint(model: LoadedModel, kind: CodecKind, split: int, name: str) -> tuple[Path, dict[str, object]]:
    """The checkpoint ``--init-from`` names (a shipped codec of ``model``, or a file) and what the training
    record says of it."""
    path = Path(name)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise SystemExit(f"--init-from: no such file {path}")
        return path, {"file": str(path)}
    shipped = {e["name"]: e for e in load_manifest()["checkpoints"]}
    if name not in shipped:
        raise SystemExit(f"--init-from: no shipped codec named {name}")
    entry = CheckpointEntry.from_json(shipped[name], CHECKPOINT_DIR)
    if entry.model_fingerprint != model.fingerprint or entry.kind is not kind or entry.split != split:
        raise SystemExit(
            f"--init-from: {name} is a {entry.kind.label} codec for {entry.model} at split {entry.split}; "
            f"this run trains a {kind.label} codec for {model.name} at split {split}"
        )
    return entry.file, {"codec": name, "steps": shipped[name].get("training", {}).get("steps")}


def _default_name(args: argparse.Namespace) -> str:
    if args.kind == "uniform":
        return f"uniform-s{args.split}-q{args.step:g}"
    if args.kind == "pca":
        return f"pca{args.components}-s{args.split}-q{args.step:g}"
    return f"{args.kind}-s{args.split}-l{args.lmbda:g}"


def run(args: argparse.Namespace, run_info: dict[str, object]) -> None:
    model = load_model(args.model)
    kind = CodecKind[args.kind.upper()]
    name = args.name or _default_name(args)
    out = args.out or Path("runs") / name
    if args.head_data is not None and args.head_emphasis == 1.0:
        raise SystemExit("--head-data names the rows of a head for --head-emphasis K; give K (not 1) as well")
    if args.head_emphasis != 1.0 and kind in (CodecKind.UNIFORM, CodecKind.PCA):
        raise SystemExit(f"--head-emphasis shapes a learned codec's training; a {kind.label} codec is fitted instead")
    if args.front_adapter_rank < 0:
        raise SystemExit("--front-adapter-rank must be 0 (no adapter) or more")
    if args.front_adapter_rank and kind in (CodecKind.UNIFORM, CodecKind.PCA):
        raise SystemExit(f"--front-adapter-rank trains with a learned codec; a {kind.label} codec is fitted instead")
    texts, sources, counts = training_texts(args.train_data, args.train_slice)
    if model.family is ModelFamily.ENCODER and "running_texts" in counts:
        raise SystemExit("a WikiText .tokens file trains decoders only: an encoder reads sentences, not running text")
    training: dict[str, object] = {"data": sources, **counts}
    if kind in (CodecKind.UNIFORM, CodecKind.PCA):
        module: CodingModel = (
            UniformModel(model.hidden_size, step=args.step)
            if kind is CodecKind.UNIFORM
            else PcaModel(model.hidden_size, components=args.components, step=args.step)
        )
        fit_texts = texts[:FIT_SENTENCES]
        module.fit(_hidden_samples(model, args.split, fit_texts))
        training.update(fitted_on_sentences=len(fit_texts))
        save_checkpoint(module, kind, out / "codec.safetensors")
    else:
        module_args: dict[str, object] = {
            "latent_channels": args.latent_channels,
            "hidden": args.hidden,
            "layers": args.layers,
            "token_gate": args.token_gate,
        }
        if kind is CodecKind.HYPERPRIOR:
            module_args.update(
                side_channels=args.side_channels,
                scale_count=args.scale_count,
                scale_max=args.scale_max,
                context_channels=args.context_channels,
                raw_token_threshold=args.raw_token_threshold,
            )
            if args.context_hidden is not None:
                module_args["context_hidden"] = args.context_hidden
            if args.temporal_prediction:
                module_args["temporal"] = True
        initial = None
        if args.init_from:
            initial, training["initialised_from"] = initial_checkpoint(model, kind, args.split, args.init_from)
        config = TrainConfig(
            kind=kind,
            split=args.split,
            lmbda=args.lmbda,
            steps=args.steps,
            batch_tokens=args.batch_tokens,
            max_tokens=args.max_tokens
            or (DECODER_WINDOW if model.family is ModelFamily.DECODER else ENCODER_TRUNCATION),
            lr=args.lr,
            latent_scale=args.latent_scale,
            shared_step=args.shared_step,
            warmup_steps=args.warmup_steps,
            transform_lr_scale=args.transform_lr_scale,
            embedding_distortion=args.embedding_distortion,
            head_emphasis=args.head_emphasis,
            seed=args.seed,
            module=module_args,
            init_from=None if initial is None else str(initial),
            front_adapter_rank=args.front_adapter_rank,
        )
        if args.front_adapter_rank:
            training["front_adapter_rank"] = args.front_adapter_rank
        head = None
        if args.head_emphasis != 1.0:
            rows, head_source = head_rows(args.head_data)
            head = torch.from_numpy(fit_linear_head(model, rows).coef_)
            training.update(head_emphasis=args.head_emphasis, head_data=head_source)
        module = train_codec(
            model, texts, config, out, progress=None if args.no_progress else _progress_bar(), head=head
        )
        training.update(
            steps=args.steps, lr=args.lr, seed=args.seed, batch_tokens=args.batch_tokens, max_tokens=config.max_tokens
        )
        if model.family is ModelFamily.ENCODER:
            training.update(embedding_distortion=args.embedding_distortion)
    entry = {
        "name": name,
        "kind": kind.label,
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "split": args.split,
        "lambda": args.lmbda if kind in (CodecKind.FACTORIZED, CodecKind.HYPERPRIOR) else None,
        "config": module.config,
        "training": training,
        "command": run_info["command"],
    }
    (out / "entry.json").write_text(json.dumps(entry, indent=2) + "\n")
    print(f"wrote {out / 'codec.safetensors'}")
    if args.install:
        target = install_checkpoint(out / "codec.safetensors", entry)
        print(f"shipped {name} as {target}")


def _progress_bar():
    from tqdm import tqdm

    bar = None

    def update(step: int, total: int, stats: dict[str, float]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, unit="step", dynamic_ncols=True)
        bar.update(1)
        bar.set_postfix(bits_per_token=f"{stats['bpt']:.1f}", distortion=f"{stats['dist']:.4f}")
        if step == total:
            bar.close()

    return update
