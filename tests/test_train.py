"""Codec training on the tiny model: it runs, learns, writes a checkpoint, and resumes after interruption."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from splitwire.benchmarks.cli import main as bench_main
from splitwire.benchmarks.datasets import row_slice
from splitwire.benchmarks.train_command import initial_checkpoint, training_texts
from splitwire.codec.base import CodecKind
from splitwire.codec.hyperprior import HyperpriorModel
from splitwire.codec.learned import FRONT_ADAPTER_PREFIX, read_checkpoint, split_front_adapter
from splitwire.codec.train import (
    TrainConfig,
    covariance_distortion,
    covariance_metric,
    emphasised_metric,
    encoder_distortion,
    train_codec,
)
from splitwire.split.adapter import adapter_blocks
from splitwire.split.models import LoadedModel

TEXTS = [f"sentence {i} about {w} things" for i, w in enumerate(["red", "big", "old", "new", "odd", "fun"] * 8)]

DECODER_CONFIG = TrainConfig(
    kind=CodecKind.HYPERPRIOR,
    split=2,
    lmbda=200.0,
    steps=40,
    batch_tokens=64,
    max_tokens=16,
    lr=3e-3,
    module={"latent_channels": 16, "side_channels": 2, "hidden": 16, "hyper_hidden": 8},
)


def config(steps: int, **module: object) -> TrainConfig:
    return TrainConfig(
        kind=CodecKind.HYPERPRIOR,
        split=2,
        lmbda=50.0,
        steps=steps,
        batch_tokens=96,
        checkpoint_every=5,
        module={"latent_channels": 8, "side_channels": 2, "hidden": 16, "hyper_hidden": 8, **module},
    )


def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    losses: list[float] = []

    def record(step: int, total: int, stats: dict[str, float]) -> None:
        losses.append(stats["bpt"] + 50.0 * stats["dist"])

    module = train_codec(tiny_bert, TEXTS, config(40), tmp_path, progress=record)
    assert (tmp_path / "codec.safetensors").exists()
    assert sum(losses[-10:]) < sum(losses[:10])
    assert module.scale_counts.numel() > 0  # integer tables were built


@pytest.mark.parametrize("shared_step", [False, True])
def test_the_initial_fit_gets_the_configured_step(
    tiny_bert: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_step: bool
) -> None:
    seen: list[tuple[float, bool]] = []
    original = HyperpriorModel.fit

    def recording_fit(self: HyperpriorModel, samples: torch.Tensor, latent_scale: float, step: bool) -> None:
        seen.append((latent_scale, step))
        original(self, samples, latent_scale, step)

    monkeypatch.setattr(HyperpriorModel, "fit", recording_fit)
    train_codec(tiny_bert, TEXTS, replace(config(0), latent_scale=3.0, shared_step=shared_step), tmp_path)
    assert seen == [(3.0, shared_step)]


def test_training_resumes_from_its_last_state(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    seen: list[int] = []

    def interrupt_after_seven(step: int, total: int, stats: dict[str, float]) -> None:
        seen.append(step)
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_codec(tiny_bert, TEXTS, config(12), tmp_path, progress=interrupt_after_seven)
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 5
    seen.clear()
    train_codec(tiny_bert, TEXTS, config(12), tmp_path, progress=lambda step, total, stats: seen.append(step))
    assert seen == list(range(6, 13))


def test_resuming_with_another_configuration_is_refused(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    train_codec(tiny_bert, TEXTS, config(5), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        train_codec(tiny_bert, TEXTS, config(6), tmp_path)


def test_training_from_a_trained_checkpoint_continues_where_it_stopped(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    trained = train_codec(tiny_bert, TEXTS, config(40), tmp_path / "first")
    first_losses: dict[str, float] = {}

    def first_loss(label: str):
        def record(step: int, total: int, stats: dict[str, float]) -> None:
            first_losses.setdefault(label, stats["bpt"] + 50.0 * stats["dist"])

        return record

    start = str(tmp_path / "first" / "codec.safetensors")
    unchanged = train_codec(tiny_bert, TEXTS, replace(config(0), init_from=start), tmp_path / "zero")
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(unchanged.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    train_codec(tiny_bert, TEXTS, replace(config(1), seed=3), tmp_path / "fresh", progress=first_loss("fresh"))
    more = replace(config(1), seed=3, init_from=start)
    train_codec(tiny_bert, TEXTS, more, tmp_path / "more", progress=first_loss("more"))
    assert first_losses["more"] < first_losses["fresh"]


def test_training_from_a_checkpoint_of_another_configuration_is_refused(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    train_codec(tiny_bert, TEXTS, config(2), tmp_path / "first")
    other = replace(config(2, hidden=24), init_from=str(tmp_path / "first" / "codec.safetensors"))
    with pytest.raises(ValueError, match="give the options it was trained with"):
        train_codec(tiny_bert, TEXTS, other, tmp_path / "other")


def test_init_from_names_a_shipped_codec_of_the_same_model_kind_and_split(tiny_bert: LoadedModel) -> None:
    with pytest.raises(SystemExit, match="no shipped codec named nothing-such"):
        initial_checkpoint(tiny_bert, CodecKind.HYPERPRIOR, 5, "nothing-such")
    with pytest.raises(SystemExit, match="codec for all-MiniLM-L6-v2 at split 5; this run trains"):
        initial_checkpoint(tiny_bert, CodecKind.HYPERPRIOR, 5, "hyperprior-s5-c400")


def test_token_gate_training_keeps_the_first_token(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    module = train_codec(tiny_bert, TEXTS, config(10, token_gate=True), tmp_path)
    hidden = torch.randn(7, tiny_bert.hidden_size)
    keep = module.keep_mask(hidden)
    assert keep is not None and keep.shape == (7,) and keep[0]


def test_decoder_training_with_kl_to_the_unsplit_next_token_distribution_learns(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    distortions: list[float] = []
    losses: list[float] = []

    def record(step: int, total: int, stats: dict[str, float]) -> None:
        distortions.append(stats["dist"])
        losses.append(stats["bpt"] + 200.0 * stats["dist"])

    module = train_codec(tiny_llama, TEXTS, DECODER_CONFIG, tmp_path, progress=record)
    assert not (tmp_path / "teacher.pt").exists()  # per-position distributions are computed per batch
    assert all(d >= 0 for d in distortions)  # a KL divergence
    assert sum(losses[-10:]) < sum(losses[:10])
    hidden = torch.randn(9, tiny_llama.hidden_size)
    with torch.inference_mode():
        assert module.decompress(module.compress(hidden), 9).shape == (9, tiny_llama.hidden_size)


def test_decoder_training_refuses_a_token_gate(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token gate needs an encoder"):
        train_codec(tiny_llama, TEXTS, config(3, token_gate=True), tmp_path)


def test_covariance_distortion_charges_like_cosine_for_spread_errors_and_more_along_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    # Embeddings that vary mostly along the first axis.
    embeddings = torch.randn(4000, 16, generator=generator) * torch.tensor([4.0] + [0.5] * 15) + 10.0
    metric = covariance_metric(embeddings)
    target = F.normalize(embeddings[:500], dim=-1)
    spread = F.normalize(target + 0.02 * torch.randn(500, 16, generator=generator), dim=-1)
    cosine, covariance = encoder_distortion(spread, target).mean(), covariance_distortion(spread, target, metric).mean()
    assert 0.6 < covariance / cosine < 1.6  # an error spread over every direction costs about the same
    directions = torch.linalg.eigh(metric.double()).eigenvectors.float()
    along = F.normalize(target + 0.02 * directions[:, -1], dim=-1)  # the direction of most variance
    across = F.normalize(target + 0.02 * directions[:, 0], dim=-1)  # the direction of least
    along_cost = covariance_distortion(along, target, metric).mean()
    assert along_cost > 5 * covariance_distortion(across, target, metric).mean()


def test_training_on_the_covariance_distortion_lowers_the_loss(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    losses: list[float] = []
    covariance_config = replace(config(30), embedding_distortion="covariance")
    train_codec(tiny_bert, TEXTS, covariance_config, tmp_path, progress=lambda *args: losses.append(args[2]["dist"]))
    assert sum(losses[-10:]) < sum(losses[:10])
    with pytest.raises(ValueError, match="unknown embedding distortion"):
        train_codec(tiny_bert, TEXTS, replace(config(1), embedding_distortion="l2"), tmp_path / "other")


@pytest.mark.parametrize("rows", [1, 2])
def test_emphasis_multiplies_the_cost_inside_the_heads_span_and_leaves_the_rest(rows: int) -> None:
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(16, 16, generator=generator)
    metric = factor @ factor.t() / 16 + 0.1 * torch.eye(16)
    head = torch.randn(rows, 16, generator=generator)
    emphasised = emphasised_metric(metric, head, 5.0)
    inside = torch.randn(rows, generator=generator) @ head  # an error the head reads
    basis, _ = torch.linalg.qr(head.t())
    outside = torch.randn(16, generator=generator)
    outside -= basis @ (basis.t() @ outside)  # an error the head cannot see

    def cost(m: torch.Tensor, e: torch.Tensor) -> float:
        return float(e @ m @ e)

    assert cost(emphasised, inside) == pytest.approx(5.0 * cost(metric, inside), rel=1e-4)
    assert cost(emphasised, outside) == pytest.approx(cost(metric, outside), rel=1e-4)
    assert torch.allclose(emphasised, emphasised.t())
    assert torch.linalg.eigvalsh(emphasised.double() - metric.double()).min() > -1e-5  # never cheaper


def test_head_emphasis_raises_the_distortion_the_codec_trains_on(tiny_bert: LoadedModel, tmp_path: Path) -> None:
    first: dict[str, float] = {}
    covariance = replace(config(1), embedding_distortion="covariance")
    head = torch.randn(1, tiny_bert.hidden_size, generator=torch.Generator().manual_seed(2))
    for label, run in [("plain", covariance), ("emphasised", replace(covariance, head_emphasis=50.0))]:
        record = lambda step, total, stats, label=label: first.setdefault(label, stats["dist"])  # noqa: E731
        train_codec(tiny_bert, TEXTS, run, tmp_path / label, progress=record, head=head)
    # Same seed, so the same batch and starting codec: only the metric differs, and it charges more.
    assert first["emphasised"] > 1.05 * first["plain"]
    with pytest.raises(ValueError, match="head emphasis needs"):
        train_codec(tiny_bert, TEXTS, replace(covariance, head_emphasis=4.0), tmp_path / "no-head")
    with pytest.raises(ValueError, match="head emphasis needs"):
        train_codec(tiny_bert, TEXTS, replace(config(1), head_emphasis=4.0), tmp_path / "cosine", head=head)


def test_train_codec_fits_the_emphasised_head_on_the_labelled_rows(tmp_path: Path) -> None:
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"{text}\t{'pos' if i % 2 else 'neg'}\n" for i, text in enumerate(TEXTS)))
    out = tmp_path / "run"
    argv = ["--threads", "1", "train-codec", "--model", "tiny-bert", "--kind", "hyperprior", "--split", "2"]
    argv += ["--lambda", "50", "--steps", "2", "--batch-tokens", "96", "--latent-channels", "8", "--hidden", "16"]
    argv += ["--train-data", str(labelled), "--embedding-distortion", "covariance", "--head-emphasis", "4"]
    argv += ["--head-data", str(labelled), "--out", str(out), "--no-progress"]
    assert bench_main(argv) == 0
    training = json.loads((out / "entry.json").read_text())["training"]
    assert training["head_emphasis"] == 4.0 and training["head_data"] == str(labelled)
    assert torch.load(out / "state.pt", weights_only=False)["config"]["head_emphasis"] == 4.0
    without_emphasis = [a for a in argv if a not in ("--head-emphasis", "4")]
    with pytest.raises(SystemExit, match="give K"):
        bench_main(without_emphasis)
    fitted = [a if a != "hyperprior" else "uniform" for a in argv]
    with pytest.raises(SystemExit, match="uniform codec is fitted instead"):
        bench_main(fitted)


def wikitext(tmp_path: Path, lines: int) -> Path:
    path = tmp_path / "wiki.test.tokens"
    path.write_text("".join(f" = Heading {i} =\n\n {TEXTS[i % len(TEXTS)]} , and then some .\n" for i in range(lines)))
    return path


def test_a_wikitext_file_trains_as_one_running_text_of_the_rows_asked_for(tmp_path: Path) -> None:
    path = wikitext(tmp_path, 10)  # 20 non-empty lines: heading, paragraph, heading, ...
    texts, sources, counts = training_texts([path], row_slice("12:"))
    expected = [line for i in range(6, 10) for line in (f"= Heading {i} =", f"{TEXTS[i]} , and then some .")]
    assert texts == ["\n".join(expected)]
    assert sources == [f"{path} rows [12, 20)"] and counts == {"running_texts": 1}
    whole, whole_sources, _ = training_texts([path])
    assert whole[0].startswith("= Heading 0 =") and whole_sources == [str(path)]


def test_the_train_slice_picks_rows_of_every_kind_of_file(tmp_path: Path) -> None:
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("".join(f"{text}\t{i % 2}\n" for i, text in enumerate(TEXTS)))
    texts, sources, counts = training_texts([labelled], slice(2, 5))
    assert texts == TEXTS[2:5] and sources == [f"{labelled} rows [2, 5)"] and counts == {"sentences": 3}
    with pytest.raises(SystemExit, match="name them"):
        training_texts(None, slice(0, 10))


@pytest.mark.parametrize("text", ["5", "a:b", "1:2:3"])
def test_a_row_range_that_is_not_start_stop_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="START:STOP"):
        row_slice(text)
    assert row_slice(":7") == slice(None, 7) and row_slice("3:") == slice(3, None)


def test_train_codec_records_the_wikitext_rows_a_decoder_codec_trained_on(tmp_path: Path) -> None:
    path = wikitext(tmp_path, 120)
    out = tmp_path / "run"
    argv = ["--threads", "1", "train-codec", "--model", "tiny-llama", "--kind", "hyperprior", "--split", "2"]
    argv += ["--lambda", "50", "--steps", "2", "--batch-tokens", "32", "--max-tokens", "16", "--latent-channels", "8"]
    argv += ["--hidden", "16", "--train-data", str(path), "--train-slice", "40:", "--out", str(out), "--no-progress"]
    assert bench_main(argv) == 0
    training = json.loads((out / "entry.json").read_text())["training"]
    assert training["data"] == [f"{path} rows [40, 240)"]
    assert training["running_texts"] == 1 and "sentences" not in training
    encoder = [a if a != "tiny-llama" else "tiny-bert" for a in argv]
    with pytest.raises(SystemExit, match="trains decoders only"):
        bench_main(encoder)
    with pytest.raises(SystemExit) as refused:
        bench_main([a if a != "40:" else "forty" for a in argv])
    assert refused.value.code == 2  # argparse's refusal, naming the expected form


def test_decoder_training_starts_a_temporal_prediction_from_least_squares(
    tiny_llama: LoadedModel, tmp_path: Path
) -> None:
    temporal = replace(DECODER_CONFIG, steps=3, module={**DECODER_CONFIG.module, "temporal": True})
    module = train_codec(tiny_llama, TEXTS, temporal, tmp_path)
    assert module.config["temporal"] is True
    assert module.temporal.weight.abs().sum() > 0  # fitted before training: it starts at zero
    hidden = torch.randn(9, tiny_llama.hidden_size)
    with torch.inference_mode():
        assert module.decompress(module.compress(hidden), 9).shape == (9, tiny_llama.hidden_size)


def test_a_front_adapter_trains_with_the_codec_and_ships_in_its_checkpoint(
    tiny_llama: LoadedModel, tiny_bert: LoadedModel, tmp_path: Path
) -> None:
    adapted = replace(DECODER_CONFIG, steps=20, front_adapter_rank=2, checkpoint_every=7)
    train_codec(tiny_llama, TEXTS, adapted, tmp_path / "run")
    _, _, tensors = read_checkpoint(tmp_path / "run" / "codec.safetensors")
    module_tensors, adapter = split_front_adapter(tensors)
    assert set(module_tensors) == set(
        HyperpriorModel(width=tiny_llama.hidden_size, **DECODER_CONFIG.module).state_dict()
    )
    # Blocks [0, split) only; B moved away from its zero start, so the front changed.
    assert adapter is not None and adapter_blocks(adapter) == DECODER_CONFIG.split
    assert any(key.endswith(".b") and tensor.abs().max() > 0 for key, tensor in adapter.items())
    # Resuming from the saved state (here: already at the last step) restores the adapter too.
    train_codec(tiny_llama, TEXTS, adapted, tmp_path / "run")
    _, _, resumed = read_checkpoint(tmp_path / "run" / "codec.safetensors")
    assert all(torch.equal(resumed[FRONT_ADAPTER_PREFIX + key], tensor) for key, tensor in adapter.items())
    # Continuing from it starts from its adapter (zero steps: the adapter comes back as it was).
    again = replace(adapted, steps=0, init_from=str(tmp_path / "run" / "codec.safetensors"))
    train_codec(tiny_llama, TEXTS, again, tmp_path / "again")
    _, _, more = read_checkpoint(tmp_path / "again" / "codec.safetensors")
    assert all(torch.equal(more[FRONT_ADAPTER_PREFIX + key], tensor) for key, tensor in adapter.items())
    # A run without an adapter refuses to drop one; an encoder cannot have one.
    with pytest.raises(ValueError, match="holds a front adapter"):
        train_codec(tiny_llama, TEXTS, replace(again, front_adapter_rank=0), tmp_path / "dropped")
    with pytest.raises(ValueError, match="correct decoder blocks"):
        train_codec(tiny_bert, TEXTS, replace(config(1), front_adapter_rank=2), tmp_path / "encoder")
