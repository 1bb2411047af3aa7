"""Learned and fitted codecs: exact bitstreams, round trips, rejection of malformed bodies, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from splitwire.codec import hyperprior
from splitwire.codec.base import Codec, CodecKind
from splitwire.codec.catalog import CheckpointEntry, load_checkpoint, read_manifest
from splitwire.codec.entropy import CodedStream, DeepFactorizedDensity, categorical, quantize_pmf
from splitwire.codec.errors import BitstreamError
from splitwire.codec.factorized import FactorizedCodec, FactorizedModel
from splitwire.codec.fitted import PcaCodec, PcaModel, UniformCodec, UniformModel
from splitwire.codec.hyperprior import FRACTION_BITS, HyperpriorCodec, HyperpriorModel
from splitwire.codec.learned import LearnedCodec, ResidualTransform, TokenMLP, load_learned_codec, save_checkpoint

WIDTH = 32
SMALL_SCALES = {"scale_count": 24, "scale_max": 16.0}  # small tables keep the golden files small
SMALL_HYPERPRIOR = {"latent_channels": 8, "side_channels": 4, "hidden": 16, "hyper_hidden": 8, **SMALL_SCALES}
HYPERPRIOR_VARIANTS: dict[str, dict[str, object]] = {
    "hyperprior": {},
    "hyperprior-context": {"context_channels": 16},
    "hyperprior-linear-context": {"context_channels": 16, "context_hidden": 0},  # g_c linear in the mean token
    "hyperprior-raw": {"raw_token_threshold": 5.5},  # tokens beyond 5.5 travel as float16 (two of the golden input)
    "hyperprior-temporal": {"temporal": True},  # each token's means predicted from the token before
}


def seeded(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def build(kind: str) -> LearnedCodec:
    """A small codec of each kind with seeded parameters and fitted statistics."""
    torch.manual_seed(3)
    samples = seeded((500, WIDTH), seed=11)
    if kind == "factorized":
        module, cls = FactorizedModel(WIDTH, latent_channels=8, hidden=16), FactorizedCodec
    elif kind == "factorized-identity":
        module, cls = FactorizedModel(WIDTH, latent_channels=0), FactorizedCodec
    elif kind.startswith("hyperprior"):
        module, cls = HyperpriorModel(WIDTH, **SMALL_HYPERPRIOR, **HYPERPRIOR_VARIANTS[kind]), HyperpriorCodec
    elif kind == "uniform":
        module, cls = UniformModel(WIDTH, step=0.5), UniformCodec
    else:
        module, cls = PcaModel(WIDTH, components=8, step=0.5), PcaCodec
    module.fit(samples)
    if kind == "hyperprior-temporal":  # it starts predicting nothing; give it a prediction to make
        with torch.no_grad():
            module.temporal.weight.copy_(0.4 * torch.eye(8) + 0.1 * torch.randn(8, 8))
    module.update_tables()
    return cls(kind, WIDTH, module)


KINDS = [
    "factorized",
    "factorized-identity",
    "hyperprior",
    "hyperprior-context",
    "hyperprior-linear-context",
    "hyperprior-raw",
    "hyperprior-temporal",
    "uniform",
    "pca",
]
CODEC_KINDS = {kind: CodecKind[kind.split("-")[0].upper()] for kind in KINDS}

GOLDEN = Path(__file__).parent / "data" / "golden"  # written by tests/data/golden/regenerate.py


def golden_input() -> torch.Tensor:
    return seeded((12, WIDTH))


def load_golden(kind: str) -> LearnedCodec:
    """The committed golden checkpoint of ``kind``, loaded as a shipped codec is."""
    file = GOLDEN / f"{kind}.safetensors"
    entry = CheckpointEntry(name=kind, kind=CODEC_KINDS[kind], file=file, model="m", model_fingerprint="f", split=1)
    return load_learned_codec(entry, WIDTH)


def assert_decoded_as_each_alone(codec: Codec, parsed: list) -> list:
    """Decode parsed payloads together, as the server decodes a batch; each must get what it gets alone."""
    together = codec.decode_bodies(parsed)
    assert len(together) == len(parsed)
    for (header, body), got in zip(parsed, together, strict=True):
        try:
            alone = codec.decode_body(header, body)
        except BitstreamError:
            assert isinstance(got, BitstreamError) and str(got)
            continue
        assert isinstance(got, torch.Tensor) and got.shape == alone.shape
        # Float rounding only: the products run over the batch's tokens at once, summing in another order.
        assert torch.allclose(got, alone, rtol=0, atol=1e-5 * max(1.0, float(alone.abs().max())))
    return together


@pytest.fixture(scope="module", params=KINDS)
def codec(request) -> LearnedCodec:
    return build(request.param)


def test_quantized_tables_are_positive_and_exact() -> None:
    counts = quantize_pmf(np.array([0.5, 0.5 - 1e-12, 1e-12, 0.0]))
    assert counts.sum() == 1 << 16 and (counts >= 1).all()
    assert counts[0] >= counts[1] > counts[2]


def test_a_collapsed_density_still_gets_a_codable_table() -> None:
    """Training can squeeze a channel onto one value; its table keeps a second symbol so it still codes."""
    density = DeepFactorizedDensity(2)
    with torch.no_grad():  # channel 0: a CDF that steps from 0 to 1 at 0, within one unit
        for matrix, bias in zip(density.matrices, density.biases, strict=True):
            matrix[0].fill_(10.0)
            bias[0].zero_()
    offsets, counts = density.to_tables()
    assert ((counts > 0).sum(1) >= 2).all()
    model = categorical(counts[0][counts[0] > 0])
    writer = CodedStream()
    writer.push(np.full(7, -offsets[0], dtype=np.int32), model)
    assert CodedStream(writer.to_bytes()).pop(7, model).tolist() == [-offsets[0]] * 7


@pytest.mark.parametrize("length", [0, 1, 3, 10, 100, 1000])
def test_coded_stream_trims_and_restores_its_last_word(length: int) -> None:
    rng = np.random.default_rng(length)
    counts = quantize_pmf(np.array([0.7, 0.1, 0.1, 0.05, 0.05]))
    model = categorical(counts)
    symbols = rng.choice(5, size=length, p=[0.7, 0.1, 0.1, 0.05, 0.05]).astype(np.int32)
    writer = CodedStream()
    writer.push(symbols, model)
    body = writer.to_bytes()
    reader = CodedStream(body)
    assert reader.pop(length, model).tolist() == symbols.tolist()
    reader.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_golden_payloads_still_encode_and_decode_the_same(kind: str) -> None:
    """A committed checkpoint and payload pin the bitstream format: a change here breaks deployed peers."""
    codec = load_golden(kind)
    payload = (GOLDEN / f"{kind}.payload").read_bytes()
    assert codec.encode_payload(golden_input()) == payload
    decoded = codec.decode_payload(payload)[1].numpy()
    np.testing.assert_allclose(decoded, np.load(GOLDEN / f"{kind}.decoded.npy"), rtol=0, atol=1e-5)


def test_round_trip_is_exactly_the_quantised_reconstruction(codec: LearnedCodec) -> None:
    hidden = seeded((12, WIDTH))
    payload = codec.encode_payload(hidden)
    header, decoded = codec.decode_payload(payload)
    assert header.tokens == 12 and decoded.shape == (12, WIDTH)
    again = codec.decode_payload(payload)[1]
    assert torch.equal(decoded, again)
    # The same input always gives the same bytes.
    assert codec.encode_payload(hidden) == payload


def test_real_size_is_close_to_the_estimate(codec: LearnedCodec) -> None:
    hidden = seeded((40, WIDTH), seed=9)
    real_bits = 8 * len(codec.encode(hidden))
    estimated = codec.estimate_bits(hidden)
    assert estimated <= real_bits <= 1.01 * estimated + 64


def test_truncated_or_corrupted_bodies_are_rejected_or_harmless(codec: LearnedCodec) -> None:
    """An entropy-coded body has no redundancy to check, so some corruptions decode to other valid
    symbols; what must hold is that none crashes or yields anything but finite values of the declared shape."""
    payload = codec.encode_payload(seeded((12, WIDTH)))
    candidates = [payload[:-1], payload[:-4], payload + b"\x01\x02\x03\x04", payload[:3]]
    candidates += [payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1 :] for i in range(3, len(payload), 5)]
    rejected = 0
    for bad in candidates:
        try:
            _, decoded = codec.decode_payload(bad)
        except BitstreamError:
            rejected += 1
            continue
        assert decoded.shape == (12, WIDTH) and torch.isfinite(decoded).all()
    assert rejected > 0


def test_random_bodies_never_crash(codec: LearnedCodec) -> None:
    rng = np.random.default_rng(1)
    header = codec.encode_payload(seeded((5, WIDTH)))[:3]
    for size in range(0, 200, 7):
        try:
            _, decoded = codec.decode_payload(header + rng.bytes(size))
        except BitstreamError:
            continue
        assert decoded.shape == (5, WIDTH) and torch.isfinite(decoded).all()


def test_a_batch_of_bodies_decodes_as_each_does_alone(codec: LearnedCodec) -> None:
    """decode_bodies (the server decodes a batch's payloads together) gives each payload what decode_body
    gives it alone, a malformed one's BitstreamError included, whatever its neighbours."""
    payloads = [codec.encode_payload(seeded((n, WIDTH), seed=n)) for n in (12, 1, 7, 30, 12)]
    payloads[1] = payloads[1][:-1]  # truncated
    payloads.insert(3, payloads[0][:3] + np.random.default_rng(4).bytes(40))  # random body
    payloads.append(payloads[0][:-4] + bytes([payloads[0][-4] ^ 0x5A]) + payloads[0][-3:])  # corrupted
    together = assert_decoded_as_each_alone(codec, [codec.parse_payload(payload) for payload in payloads])
    assert sum(isinstance(got, BitstreamError) for got in together) >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_golden_payloads_decode_the_same_in_a_batch(kind: str) -> None:
    codec = load_golden(kind)
    payload = (GOLDEN / f"{kind}.payload").read_bytes()
    other = codec.encode_payload(seeded((5, WIDTH), seed=8))
    first, _, last = codec.decode_bodies([codec.parse_payload(p) for p in (payload, other, payload)])
    for decoded in (first, last):
        np.testing.assert_allclose(decoded.numpy(), np.load(GOLDEN / f"{kind}.decoded.npy"), rtol=0, atol=1e-5)


def test_checkpoint_round_trip_keeps_fingerprint_and_bytes(codec: LearnedCodec, tmp_path: Path) -> None:
    path = tmp_path / "codec.safetensors"
    save_checkpoint(codec.module, codec.kind, path)
    entry = CheckpointEntry(name=codec.name, kind=codec.kind, file=path, model="m", model_fingerprint="f", split=1)
    loaded = load_learned_codec(entry, WIDTH)
    assert loaded.fingerprint() == codec.fingerprint()
    hidden = seeded((7, WIDTH), seed=2)
    assert loaded.encode_payload(hidden) == codec.encode_payload(hidden)
    assert loaded.splits == (1,)


def test_raw_tokens_travel_apart_as_float16() -> None:
    codec = build("hyperprior-raw")
    hidden = seeded((12, WIDTH))
    hidden[0, 3] = 24000.0  # an attention sink's value
    hidden[7, 1] = -900.0
    raw = codec.module.raw_tokens(hidden)
    assert raw[0] and raw[7]
    decoded = codec.decode_payload(codec.encode_payload(hidden))[1]
    assert torch.equal(decoded[raw], hidden[raw].half().float())
    assert torch.isfinite(decoded).all()
    everything_raw = torch.full((3, WIDTH), 100.0)
    assert torch.equal(codec.decode_payload(codec.encode_payload(everything_raw))[1], everything_raw)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x09", "claims 9 raw tokens"),
        (b"\x01\x05", "position 5 is outside"),
        (b"\x01\x00" + b"\x00" * 10, "truncated body"),
        (b"\x01\x00" + b"\x00\x7c" * WIDTH, "not finite"),  # float16 infinity
        (b"\x05\x00\x00\x00\x00\x00" + b"\x00" * (10 * WIDTH) + b"\x01", "bytes after the last raw token"),
    ],
)
def test_malformed_raw_token_sections_are_rejected(body: bytes, message: str) -> None:
    with pytest.raises(BitstreamError, match=message):
        build("hyperprior-raw").module.decompress(body, 5)


def test_raw_tokens_are_left_out_of_the_fitted_statistics() -> None:
    samples = seeded((500, WIDTH), seed=11)
    samples[::50, 0] = 24000.0
    module = HyperpriorModel(WIDTH, latent_channels=8, side_channels=4, hidden=16, raw_token_threshold=1000.0)
    module.fit(samples)
    assert float(module.standardize.std[0]) < 10.0


def _unequal_samples() -> torch.Tensor:
    """Samples whose principal components spread from about 8 down to 0.02, in mixed-up directions."""
    mixing = torch.linalg.qr(seeded((WIDTH, WIDTH), seed=2))[0]
    spread = torch.logspace(0.6, -1.7, WIDTH)
    return (seeded((4000, WIDTH), seed=12) * spread) @ mixing + 3.0


@pytest.mark.parametrize("shared_step", [False, True])
def test_hyperprior_starts_as_pca_with_a_step_per_component_or_one_for_all(shared_step: bool) -> None:
    samples = _unequal_samples()
    module = HyperpriorModel(WIDTH, latent_channels=WIDTH, side_channels=4, hidden=16)
    module.fit(samples, latent_scale=2.0, shared_step=shared_step)
    with torch.no_grad():
        latents = module.g_a(module.standardize(samples))
        restored = module.standardize.inverse(module.g_s(latents))
    torch.testing.assert_close(restored, samples, atol=1e-3, rtol=1e-4)  # the full basis loses nothing
    spread = latents.std(0)
    if shared_step:  # one step, 1/2 of the components' root-mean-square deviation: weak components get few bits
        assert float(spread.square().mean().sqrt()) == pytest.approx(2.0, rel=1e-3)
        assert float(spread.max() / spread.min()) > 50.0
        step = float((samples - samples.mean(0)).square().sum(1).mean().div(WIDTH).sqrt()) / 2.0
        projected = torch.linalg.svdvals(samples - samples.mean(0)) / (len(samples) - 1) ** 0.5 / step
        torch.testing.assert_close(spread.sort().values, projected.float().sort().values, rtol=1e-3, atol=1e-4)
    else:  # whitened: every component rounded at 1/2 of its own deviation
        torch.testing.assert_close(spread, torch.full((WIDTH,), 2.0), rtol=1e-3, atol=1e-3)


def test_shared_step_is_refused_by_the_factorized_codec() -> None:
    with pytest.raises(ValueError, match="shared_step"):
        FactorizedModel(WIDTH, latent_channels=8, hidden=16).fit(_unequal_samples(), shared_step=True)


@pytest.mark.parametrize("kind", ["hyperprior", "hyperprior-context"])
def test_hyperprior_side_network_is_exact_integer_arithmetic(kind: str) -> None:
    """The float64 evaluation of h_s equals the same network in int64 arithmetic, row by row and batched."""
    module = build(kind).module
    assert module.hs_w1.dtype == torch.int64
    generator = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (50, module.side_channels), generator=generator)
    context = torch.randint(-3, 4, (module.context_channels,), generator=generator)
    inputs = torch.cat([z, context.expand(50, -1)], dim=1)
    out = (inputs @ module.hs_w1.t() + module.hs_b1).clamp_min(0) @ module.hs_w2.t() + module.hs_b2
    channels = module.channels
    expected_index = torch.searchsorted(module.scale_thresholds, out[:, channels:].contiguous())
    side_network = module._coding_models().side_network
    mean_all, index_all = side_network(z.double(), context.double())
    assert torch.equal(mean_all * 2.0 ** (2 * FRACTION_BITS), out[:, :channels].double())
    assert torch.equal(index_all, expected_index)
    for row in range(0, 50, 7):
        mean_one, index_one = side_network(z[row : row + 1].double(), context.double())
        assert torch.equal(mean_one[0], mean_all[row]) and torch.equal(index_one[0], index_all[row])


def test_wrong_kind_in_manifest_is_refused(tmp_path: Path) -> None:
    codec = build("pca")
    path = tmp_path / "c.safetensors"
    save_checkpoint(codec.module, codec.kind, path)
    entry = CheckpointEntry(name="x", kind=CodecKind.UNIFORM, file=path, model="m", model_fingerprint="f", split=1)
    with pytest.raises(ValueError, match="holds a pca codec"):
        load_learned_codec(entry, WIDTH)


@pytest.mark.parametrize(("hidden", "layers"), [(16, 1), (16, 2), (0, 1)])
def test_fused_transform_computes_the_same_function(hidden: int, layers: int) -> None:
    """The transform as coding runs it (affine maps folded in, products merged, per-sequence maps
    applied once) agrees with the training forward pass."""
    torch.manual_seed(0)
    transform = ResidualTransform(12, 10, hidden, layers)
    for parameter in transform.parameters():  # a fresh MLP's last layer is zero: make every part count
        torch.nn.init.normal_(parameter)
    tokens, shared = torch.randn(7, 8), torch.randn(4)
    in_shift, in_scale = torch.randn(12), torch.rand(12) + 0.5
    out_shift, out_scale = torch.randn(10), torch.rand(10) + 0.5
    with torch.inference_mode():
        x = torch.cat([tokens, shared.expand(7, 4)], dim=-1)
        plain = transform.fused()
        torch.testing.assert_close(plain(x), transform(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(plain.token_mean(x), transform(x).mean(-2), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(plain.with_shared(tokens, shared), transform(x), rtol=1e-5, atol=1e-4)
        wrapped = transform.fused(in_shift, in_scale, out_shift, out_scale)
        expected = out_scale * transform((x - in_shift) / in_scale) + out_shift
        torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(wrapped.token_mean(x), expected.mean(-2), rtol=1e-5, atol=1e-4)
        shared_part = x[0, 8:]  # with_shared's shared values enter after the input map, like the tokens
        torch.testing.assert_close(wrapped.with_shared(x[:, :8], shared_part), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("hidden", "layers", "activation"), [(16, 1, "relu"), (16, 2, "gelu"), (0, 1, "gelu")])
def test_frozen_mlp_computes_the_same_function(hidden: int, layers: int, activation: str) -> None:
    torch.manual_seed(0)
    mlp = TokenMLP(12, 5, hidden, layers, activation=activation)
    x = torch.randn(7, 12)
    with torch.inference_mode():
        torch.testing.assert_close(mlp.frozen()(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_bitstream_revision_is_part_of_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that codes the same checkpoint in another revision must be refused, not misread."""
    codec = build("hyperprior-context")
    current = codec.fingerprint()
    monkeypatch.setattr(hyperprior, "BITSTREAM_REVISION", hyperprior.BITSTREAM_REVISION - 1)
    assert codec.fingerprint() != current


def test_warm_up_builds_the_coding_tables_before_the_first_request() -> None:
    codec = build("hyperprior-context")
    assert codec.module._models is None
    codec.warm_up()
    assert codec.module._models is not None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_hidden_states_are_refused_with_a_clear_error(kind: str, bad: float) -> None:
    """Not clamped into a table and sent as wrong values, nor constriction's KeyError: a ValueError that says
    why. The one exception: with raw tokens, an infinite token is sent raw, clamped to float16's range."""
    hidden = seeded((6, WIDTH))
    hidden[2, 3] = bad
    codec = load_golden(kind)
    if kind == "hyperprior-raw" and not math.isnan(bad):
        _, decoded = codec.decode_payload(codec.encode_payload(hidden))
        assert decoded[2, 3] == math.copysign(65504.0, bad)
        return
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_payload(hidden)


@pytest.mark.parametrize(("hidden", "layers"), [(16, 1), (16, 2), (0, 1)])
def test_output_bound_covers_every_output(hidden: int, layers: int) -> None:
    """The bound the hyperprior's finiteness proof rests on holds, at the corners of the input box too,
    where a linear map reaches its largest output."""
    torch.manual_seed(0)
    transform = ResidualTransform(12, 10, hidden, layers)
    for parameter in transform.parameters():
        torch.nn.init.normal_(parameter)
    fused = transform.fused()
    limit = 3.0
    corners = limit * torch.sign(torch.randn(500, 12))
    inside = limit * (2 * torch.rand(500, 12) - 1)
    with torch.inference_mode():
        largest = float(fused(torch.cat([corners, inside])).abs().max())
    bound = fused.output_bound(limit)
    assert largest <= bound * (1 + 1e-6)
    assert bound < 1e6  # a bound, not an overflow waved through


def test_hyperprior_decoders_are_proven_finite_and_unproven_ones_are_checked() -> None:
    """Decoding skips the output check only where bounded symbols and weights prove it finite; a decoder
    the proof does not cover still refuses a body that decodes to infinity, alone and in a batch."""
    for kind in ("hyperprior", "hyperprior-context", "hyperprior-raw", "hyperprior-temporal"):
        assert build(kind).decodes_only_finite(), kind
    for kind in ("factorized", "uniform", "pca"):
        assert not build(kind).decodes_only_finite(), kind
    for entry in read_manifest():
        if entry.kind is CodecKind.HYPERPRIOR:
            assert load_checkpoint(entry, int(entry.config.get("width", 384))).decodes_only_finite(), entry.name
    codec = build("hyperprior-context")
    payloads = [codec.encode_payload(seeded((6, WIDTH), seed=seed)) for seed in range(3)]
    with torch.no_grad():
        codec.module.g_s.linear.weight.fill_(3e38)  # finite weights whose products overflow float32
    codec.module.update_tables()  # rebuilds what coding runs, the proof with it
    assert not codec.decodes_only_finite()
    parsed = [codec.parse_payload(payload) for payload in payloads]
    with pytest.raises(BitstreamError, match="non-finite"):
        codec.decode_body(*parsed[0])
    assert all(isinstance(result, BitstreamError) for result in codec.decode_bodies(parsed))


def test_a_linear_context_leaves_the_encoder_one_product_over_the_tokens() -> None:
    """``context_hidden=0``: g_c has no hidden layer, so the encoder's one product over the tokens serves
    g_a alone; the option is recorded only when given, so codecs trained without it keep their fingerprints."""
    wide, linear = build("hyperprior-context").module, build("hyperprior-linear-context").module
    assert "context_hidden" not in wide.config and linear.config["context_hidden"] == 0
    assert wide._coding_models().analysis.weight.shape == (WIDTH, 8 + 16 + 16)
    assert linear._coding_models().analysis.weight.shape == (WIDTH, 8 + 16)
    hidden = seeded((9, WIDTH))
    with torch.inference_mode():
        _, context = linear._coding_models().analysis(hidden)
        expected = linear.g_c(linear.standardize(hidden)).mean(0)
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-4)


def _temporal_twin(weight: torch.Tensor) -> tuple[LearnedCodec, LearnedCodec]:
    """The plain hyperprior with h_s predicting zero means, and the same weights with a temporal
    prediction of ``weight`` ``(8, 8)``."""
    plain = build("hyperprior")
    with torch.no_grad():
        plain.module.h_s.net[2].weight[:8] = 0.0
        plain.module.h_s.net[2].bias[:8] = 0.0
    plain.module.update_tables()
    module = HyperpriorModel(WIDTH, **SMALL_HYPERPRIOR, temporal=True)
    module.load_state_dict(plain.module.state_dict(), strict=False)
    with torch.no_grad():
        module.temporal.weight.copy_(weight)
    module.update_tables()
    return plain, HyperpriorCodec("hyperprior-temporal", WIDTH, module)


def test_a_temporal_prediction_of_nothing_codes_as_the_plain_hyperprior() -> None:
    """Only the means change: with zero weights the bytes are the plain codec's, and the option is
    recorded only when on, so codecs trained without it keep their fingerprints."""
    plain, temporal = _temporal_twin(torch.zeros(8, 8))
    assert "temporal" not in plain.module.config and temporal.module.config["temporal"] is True
    hidden = seeded((12, WIDTH))
    assert temporal.encode(hidden) == plain.encode(hidden)


def test_a_temporal_prediction_saves_bits_on_correlated_tokens_and_decodes_to_the_same_error() -> None:
    """Tokens that drift slowly leave small symbols when each is predicted from the one before (fewer
    bits even under scales not trained for it), and the decoder rebuilds what the encoder quantised
    against: the error stays what plain rounding gives instead of accumulating along the sequence."""
    plain, temporal = _temporal_twin(torch.eye(8))
    steps = seeded((64, WIDTH), seed=2) * 0.02
    hidden = seeded((1, WIDTH), seed=3) + steps.cumsum(0)  # a slow random walk

    def mean_symbol(codec: LearnedCodec) -> float:  # after the first token, which has no prediction
        symbols = codec.module._symbols(hidden)
        signed = symbols.main - codec.module._coding_models().half_widths[symbols.scale_index]
        return float(np.abs(signed[1:]).mean())

    assert mean_symbol(temporal) < 0.2 * mean_symbol(plain)
    plain_body, temporal_body = plain.encode(hidden), temporal.encode(hidden)
    assert len(temporal_body) < len(plain_body)
    assert temporal.estimate_bits(hidden) <= 8 * len(temporal_body) <= 1.01 * temporal.estimate_bits(hidden) + 64
    plain_error = (plain.decode(plain_body, 64) - hidden).abs().max()
    temporal_error = (temporal.decode(temporal_body, 64) - hidden).abs().max()
    assert temporal_error <= 1.5 * plain_error + 1e-3
    first_only = temporal.decode(temporal.encode(hidden[:1]), 1)  # a one-token payload has no prediction
    torch.testing.assert_close(first_only, plain.decode(plain.encode(hidden[:1]), 1), rtol=0, atol=0)


def test_training_predicts_each_token_from_the_one_before_and_learns_the_prediction() -> None:
    module = HyperpriorModel(WIDTH, **SMALL_HYPERPRIOR, temporal=True, raw_token_threshold=5.5)
    y = torch.arange(1.0, 5.0)[None, :, None].expand(1, 4, 3)
    raw = torch.tensor([[False, True, False, False]])
    previous = module._previous_latents(y, raw)
    assert previous[0, 0].abs().max() == 0 and previous[0, 2].abs().max() == 0  # the first; after a raw one
    assert (previous[0, 3] - 3.0).abs().max() <= 0.5 and (previous[0, 1] - 1.0).abs().max() <= 0.5
    hidden = seeded((2, 10, WIDTH)).clamp(-5, 5)
    module.fit(hidden.reshape(-1, WIDTH))
    _, bits = module(hidden)
    bits.sum().backward()
    assert module.temporal.weight.grad is not None and module.temporal.weight.grad.abs().sum() > 0


def test_the_temporal_fit_predicts_tokens_that_follow_each_other() -> None:
    """fit_temporal starts the prediction as least squares on the sequences it is given: on tokens that
    each keep most of the one before, it removes most of the latents' energy."""
    generator = torch.Generator().manual_seed(6)
    sequences = []
    for _ in range(20):
        rows = [torch.randn(WIDTH, generator=generator)]
        for _ in range(49):
            rows.append(0.9 * rows[-1] + 0.3 * torch.randn(WIDTH, generator=generator))
        sequences.append(torch.stack(rows))
    module = HyperpriorModel(WIDTH, **SMALL_HYPERPRIOR, temporal=True)
    module.fit(torch.cat(sequences))
    module.fit_temporal(sequences)
    with torch.no_grad():
        y = module.g_a(module.standardize(sequences[0]))
        predicted = module.temporal(y[:-1])
    assert (y[1:] - predicted).square().mean() < 0.3 * y[1:].square().mean()


def test_a_stream_of_payloads_carries_the_prediction_from_one_to_the_next() -> None:
    """With a carry on each side, a prompt and then one token per payload decode to what the whole
    sequence gives as one payload: each step is predicted from the token before it, which a payload
    decoded without the carry does not know."""
    _, codec = _temporal_twin(torch.eye(8))
    hidden = seeded((1, WIDTH), seed=3) + (seeded((12, WIDTH), seed=2) * 0.02).cumsum(0)
    whole = codec.decode_payload(codec.encode_payload(hidden))[1]
    sender, receiver = codec.new_carry(), codec.new_carry()
    streamed = []
    for rows in (hidden[:5], *hidden[5:].split(1)):
        header, body = codec.parse_payload(codec.encode_payload(rows, carry=sender))
        streamed.append(codec.decode_body(header, body, carry=receiver))
    # The same latents; the synthesis over 1 token or 12 may round its float32 sums apart.
    torch.testing.assert_close(torch.cat(streamed), whole, rtol=0, atol=1e-5)
    step = codec.encode_payload(hidden[5:6], carry=codec.new_carry())  # predicted from nothing
    assert step != codec.encode_payload(hidden[5:6], carry=sender)
    without_carry = codec.decode_payload(codec.encode_payload(hidden[6:7], carry=sender))[1]
    assert (without_carry - whole[6:7]).abs().max() > 0.1
    assert build("hyperprior").new_carry() is None  # nothing to carry: payloads stand alone


def test_a_body_that_does_not_decode_leaves_the_carry_as_it_was() -> None:
    _, codec = _temporal_twin(torch.eye(8))
    carry = codec.new_carry()
    header, body = codec.parse_payload(codec.encode_payload(seeded((4, WIDTH))))
    codec.decode_body(header, body, carry=carry)
    before = carry.previous.copy()
    with pytest.raises(BitstreamError):
        codec.decode_body(header, bytes(body[:-3]), carry=carry)
    np.testing.assert_array_equal(carry.previous, before)
