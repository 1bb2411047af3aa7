"""Rate-distortion training of a learned codec at a model's split point.

::

    text -> front [0, k) (frozen) -> hidden -> codec(noise/STE) -> hidden_hat -> back [k, L) (frozen) -> output
                                                   |                                            |
                                                 bits                       distortion vs. the unsplit output
    loss = bits per token + lambda * distortion

Distortion is task-level: for encoders 1 - cosine to the unsplit sentence embedding, for decoders the
KL divergence from the unsplit next-token distribution at every position (in nats per token; the
teacher is the back half run on the uncoded hidden state, which is exactly the unsplit model). The
model stays frozen (one served model fits every codec); gradients flow through the back half's
activations only, and with a front adapter (decoders, see :mod:`splitwire.split.adapter`) through the
front's too, into the adapter. Training is seeded and resumable: state is saved every
``checkpoint_every`` steps and picked up again by the same call.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from splitwire.codec.base import CodecKind
from splitwire.codec.factorized import FactorizedModel
from splitwire.codec.hyperprior import HyperpriorModel
from splitwire.codec.learned import CodingModel, read_checkpoint, save_checkpoint, split_front_adapter
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel, ModelFamily

log = logging.getLogger(__name__)

FIT_BATCHES = 20  # batches whose hidden states start the transforms (PCA) and the standardiser
# A temporal prediction has a weight per pair of latents: its least-squares start reads more tokens.
TEMPORAL_FIT_BATCHES = 80

TRAINABLE: dict[CodecKind, type[CodingModel]] = {
    CodecKind.FACTORIZED: FactorizedModel,
    CodecKind.HYPERPRIOR: HyperpriorModel,
}


@dataclass(frozen=True)
class TrainConfig:
    kind: CodecKind
    split: int
    lmbda: float  # weight of the distortion against bits per token
    steps: int = 3000
    batch_tokens: int = 1024  # tokens per batch (sequences of similar length are grouped)
    lr: float = 1e-3
    seed: int = 0
    max_tokens: int = 64  # encoders: longer sentences are truncated; decoders: the window length
    checkpoint_every: int = 250
    latent_scale: float = 1.0  # initial latents: whitened components times this (see CodingModel.fit)
    shared_step: bool = False  # initial latents: principal components rounded with one step (hyperprior)
    warmup_steps: int = 0  # linear learning-rate warm-up: Adam's first steps move every weight by ~lr
    # Learning rate of the analysis/synthesis transforms (g_*) relative to the entropy models. Adam moves
    # every weight by about lr per step whatever its size; a wide PCA-initialised transform has small
    # weights, and noisy KL gradients then random-walk it away from a good basis.
    transform_lr_scale: float = 1.0
    # Encoders: "cosine" (1 - cosine to the unsplit embedding) or "covariance" (see covariance_metric).
    embedding_distortion: str = "cosine"
    # Covariance distortion: the weight of errors inside the span of a downstream head's weight vectors
    # (see emphasised_metric), as a multiple of what the covariance alone gives them; 1 leaves it alone.
    head_emphasis: float = 1.0
    module: dict[str, object] = field(default_factory=dict)  # constructor arguments of the codec module
    # A trained codec's checkpoint to start from instead of fitting a fresh module to the data: more
    # training for a shipped codec (same architecture; its tables are rebuilt at the end).
    init_from: str | None = None
    # Decoders: rank of a front adapter trained with the codec (see splitwire.split.adapter); 0 for none.
    front_adapter_rank: int = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    token_mask: torch.Tensor  # (B, T) bool
    index: torch.Tensor  # (B,) rows of the teacher table


def _batches(model: LoadedModel, texts: list[str], config: TrainConfig, rng: random.Random) -> Iterator[Batch]:
    """Endless batches of similar-length sequences, in a seeded random order."""
    encoded = model.tokenizer(texts, truncation=True, max_length=config.max_tokens)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        current.append(i)
        if len(current) * len(encoded[i]) >= config.batch_tokens:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    while True:
        rng.shuffle(groups)
        for group in groups:
            longest = max(len(encoded[i]) for i in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long)
            mask = torch.zeros(len(group), longest, dtype=torch.bool)
            for row, i in enumerate(group):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = True
            yield Batch(ids, mask, torch.tensor(group))


def _decoder_batches(model: LoadedModel, texts: list[str], config: TrainConfig, rng: random.Random) -> Iterator[Batch]:
    """Endless batches of ``max_tokens``-long windows of the texts joined end to end (end-of-text between
    them), in a seeded random order: language models see long contexts, not lone sentences."""
    tokenizer = model.tokenizer
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    joined: list[int] = []
    for ids in tokenizer(texts)["input_ids"]:
        joined += [*ids, separator]
    length = config.max_tokens
    windows = torch.tensor(joined[: len(joined) // length * length]).view(-1, length)
    per_batch = max(1, config.batch_tokens // length)
    if len(windows) < per_batch:
        raise ValueError(f"the training texts make {len(windows)} windows of {length} tokens; need {per_batch}")
    order = list(range(len(windows)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - per_batch + 1, per_batch):
            index = torch.tensor(order[start : start + per_batch])
            ids = windows[index]
            yield Batch(ids, torch.ones_like(ids, dtype=torch.bool), index)


def encoder_distortion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity to the unsplit sentence embedding, per sequence."""
    return 1.0 - F.cosine_similarity(output, target, dim=-1)


def covariance_metric(embeddings: torch.Tensor) -> torch.Tensor:
    """``(N, E)`` unsplit embeddings -> ``(E, E)``: their covariance scaled to mean eigenvalue 1/2.

    Under it an error spread evenly over all directions costs what 1 - cosine charges, while an
    error along a direction the embeddings hardly vary in costs less: downstream heads (a linear
    probe, a similarity ranking) read the directions sentences differ along.
    """
    normalised = F.normalize(embeddings.double(), dim=-1)
    covariance = torch.cov(normalised.t())
    return (covariance * (0.5 * covariance.shape[0] / torch.trace(covariance))).float()


def covariance_distortion(output: torch.Tensor, target: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """``e^T M e`` per sequence, ``e`` the error between the normalised embeddings."""
    error = F.normalize(output, dim=-1) - F.normalize(target, dim=-1)
    return ((error @ metric) * error).sum(-1)


def emphasised_metric(metric: torch.Tensor, head: torch.Tensor, emphasis: float) -> torch.Tensor:
    """``metric`` with errors inside the row space of ``head`` (``(K, E)``, a linear head's weights)
    weighted ``emphasis`` times as much: ``M + (emphasis - 1) P M P``, ``P`` the projector onto the rows.

    A linear head turns the embedding error into a logit error through those rows only, so this is
    where an error flips an answer; outside them the metric is unchanged.
    """
    basis, _ = torch.linalg.qr(head.double().t())  # (E, K), orthonormal columns spanning the rows
    projector = basis @ basis.t()
    inside = projector @ metric.double() @ projector
    return (metric.double() + (emphasis - 1.0) * inside).float()


def decoder_distortion(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(unsplit || coded) of the next-token distributions, in nats, per position ``(B, T)``."""
    teacher = F.log_softmax(teacher_logits, dim=-1)
    return (teacher.exp() * (teacher - F.log_softmax(logits, dim=-1))).sum(-1)


def build_module(model: LoadedModel, config: TrainConfig) -> CodingModel:
    if config.kind not in TRAINABLE:
        raise ValueError(f"{config.kind.label} is not trainable; choose {', '.join(k.label for k in TRAINABLE)}")
    return TRAINABLE[config.kind](width=model.hidden_size, **config.module)


def train_codec(
    model: LoadedModel,
    texts: list[str],
    config: TrainConfig,
    out_dir: Path,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    head: torch.Tensor | None = None,
) -> CodingModel:
    """Train (or resume training) a codec and write ``out_dir/codec.safetensors``. Returns the module.

    ``head``: the ``(K, E)`` weights of a linear head on the embeddings, needed when
    ``config.head_emphasis`` is not 1 (see emphasised_metric)."""
    decoder = model.family is ModelFamily.DECODER
    if decoder and config.module.get("token_gate"):
        raise ValueError("a token gate needs an encoder: a decoder must see every token to predict the next")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    split_model = SplitModel(model)
    cut = Cut(model.num_blocks, config.split)
    module = build_module(model, config)
    # The front the codec reads: the model's own, or copies of its blocks with a trainable adapter.
    adapter: dict[str, torch.nn.Parameter] = {}
    front_model = split_model
    if config.front_adapter_rank:
        front_model, adapter = split_model.with_trainable_front(config.split, config.front_adapter_rank)
    # Started from a fit to the data (PCA, least squares): trained at their own, usually slower, rate.
    fitted = ("g_", "temporal.")
    transforms = [p for name, p in module.named_parameters() if name.startswith(fitted)]
    others = [p for name, p in module.named_parameters() if not name.startswith(fitted)]
    optimizer = torch.optim.Adam(
        [
            {"params": others + list(adapter.values()), "lr_scale": 1.0},
            {"params": transforms, "lr_scale": config.transform_lr_scale},
        ],
        lr=config.lr,
    )
    state_path = out_dir / "state.pt"
    step = 0

    make_batches = _decoder_batches if decoder else _batches
    teacher = None
    teacher_path = out_dir / "teacher.pt"
    if decoder:
        pass  # next-token distributions at every position are too big to keep: computed per batch
    elif teacher_path.exists():
        teacher = torch.load(teacher_path)
    else:
        teacher = split_model.run_unsplit_texts(texts, max_tokens=config.max_tokens)
        torch.save(teacher, teacher_path)

    if config.embedding_distortion not in ("cosine", "covariance"):
        raise ValueError(f"unknown embedding distortion {config.embedding_distortion!r}; choose cosine or covariance")
    metric = covariance_metric(teacher) if teacher is not None and config.embedding_distortion == "covariance" else None
    if config.head_emphasis != 1.0:
        if metric is None or head is None:
            raise ValueError("head emphasis needs the covariance distortion of an encoder and a head's weights")
        metric = emphasised_metric(metric, head, config.head_emphasis)

    batches = make_batches(model, texts, config, rng)
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was written with another configuration; use a fresh --out folder")
        module.load_state_dict(state["module"])
        _copy_adapter(adapter, state["front_adapter"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        batches = make_batches(model, texts, config, rng)
        log.info("resumed %s at step %d", out_dir, step)
    elif config.init_from is not None:
        _load_initial(module, config.kind, Path(config.init_from), adapter)
    else:
        _fit_to_data(module, split_model, cut, batches, config.latent_scale, config.shared_step)

    def lr_at(s: int) -> float:  # linear warm-up, then cosine decay to 5%
        warm = min(1.0, (s + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        return warm * config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / config.steps)))

    module.train()
    while step < config.steps:
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        with torch.no_grad():
            hidden = split_model.run_front(cut, batch.input_ids, batch.token_mask)
        # What the codec codes: with an adapter, the adapted front's output (the teacher stays the model's).
        coded = front_model.run_front(cut, batch.input_ids, batch.token_mask) if adapter else hidden
        hidden_hat, bits = module(coded, batch.token_mask)
        weights = None
        if module.gate is not None:  # dropped tokens cost no bits; the back half sees them fade out
            weights = module.gate.sample(module.standardize(coded))
            bits = bits * weights
        if decoder:
            with torch.no_grad():
                teacher_logits = split_model.token_logits(cut, hidden, batch.token_mask)
            logits = split_model.token_logits(cut, hidden_hat, batch.token_mask)
            distortion = decoder_distortion(logits, teacher_logits)[batch.token_mask].mean()
        else:
            output = split_model.run_back(cut, hidden_hat, batch.token_mask, token_weights=weights)
            target = teacher[batch.index]
            if metric is None:
                distortion = encoder_distortion(output, target).mean()
            else:
                distortion = covariance_distortion(output, target, metric).mean()
        tokens = batch.token_mask.sum()
        bits_per_token = (bits * batch.token_mask).sum() / tokens
        loss = bits_per_token + config.lmbda * distortion
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*module.parameters(), *adapter.values()], 5.0)
        optimizer.step()
        step += 1
        if progress is not None:
            stats = {"bpt": bits_per_token.item(), "dist": distortion.item()}
            if weights is not None:
                stats["kept"] = ((weights > 0.5) & batch.token_mask).sum().item() / tokens.item()
            progress(step, config.steps, stats)
        if step % config.checkpoint_every == 0 or step == config.steps:
            state = {
                "config": asdict(config),
                "module": module.state_dict(),
                "front_adapter": _adapter_tensors(adapter),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "python_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
            }
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
    module.eval()
    save_checkpoint(module, config.kind, out_dir / "codec.safetensors", _adapter_tensors(adapter) or None)
    return module


def _adapter_tensors(adapter: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {key: parameter.detach().clone() for key, parameter in adapter.items()}


def _copy_adapter(adapter: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    if set(tensors) != set(adapter):
        raise ValueError("the saved front adapter does not match this run's (its rank or blocks differ)")
    with torch.no_grad():
        for key, parameter in adapter.items():
            parameter.copy_(tensors[key])


def _load_initial(module: CodingModel, kind: CodecKind, path: Path, adapter: dict[str, torch.nn.Parameter]) -> None:
    """Start from the weights in ``path`` (and its front adapter, when this run trains one: a checkpoint
    without one starts it at the identity); refuse a checkpoint of another kind or configuration."""
    label, config, tensors = read_checkpoint(path)
    if label != kind.label or config != module.config:
        raise ValueError(
            f"{path} holds a {label} codec configured {config}; this run builds a {kind.label} codec configured "
            f"{module.config}: give the options it was trained with"
        )
    tensors, initial_adapter = split_front_adapter(tensors)
    if initial_adapter is not None and not adapter:
        raise ValueError(f"{path} holds a front adapter; give --front-adapter-rank to train it further")
    module.load_state_dict(tensors)
    if initial_adapter is not None:
        _copy_adapter(adapter, initial_adapter)
    log.info("starting from %s", path)


def _fit_to_data(
    module: CodingModel,
    split_model: SplitModel,
    cut: Cut,
    batches: Iterator[Batch],
    latent_scale: float,
    shared_step: bool,
) -> None:
    temporal = isinstance(module, HyperpriorModel) and module.temporal is not None
    samples, sequences = [], []
    with torch.no_grad():
        for index in range(TEMPORAL_FIT_BATCHES if temporal else FIT_BATCHES):
            batch = next(batches)
            hidden = split_model.run_front(cut, batch.input_ids, batch.token_mask)
            if index < FIT_BATCHES:
                samples.append(hidden[batch.token_mask])
            if temporal:
                sequences += [rows[mask] for rows, mask in zip(hidden, batch.token_mask, strict=True)]
    module.fit(torch.cat(samples), latent_scale, shared_step)
    if temporal:
        module.fit_temporal(sequences)
