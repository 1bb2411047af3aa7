"""Front adapters: low-rank corrections of the front blocks, trained in one form and served in another."""

from __future__ import annotations

import pytest
import torch
from splitwire.split.cut import Cut, SplitModel
from splitwire.split.models import LoadedModel

SPLIT = 2


def _random_adapter(model: LoadedModel, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    _, parameters = SplitModel(model).with_trainable_front(SPLIT, rank)
    return {key: 0.1 * torch.randn(p.shape, generator=generator) for key, p in parameters.items()}


def test_the_merged_front_computes_what_the_trained_form_does(tiny_llama: LoadedModel) -> None:
    split_model = SplitModel(tiny_llama)
    cut = Cut(tiny_llama.num_blocks, SPLIT)
    ids, mask = tiny_llama.tokenize(["A red fox jumps over the lazy dog.", "Short one."])
    own_weights = {name: t.clone() for name, t in tiny_llama.hf_model.state_dict().items()}
    trainable, parameters = split_model.with_trainable_front(SPLIT, rank=2)
    with torch.no_grad():
        plain = split_model.run_front(cut, ids, mask)
        assert torch.equal(trainable.run_front(cut, ids, mask), plain)  # B starts at zero: the identity
        adapter = _random_adapter(tiny_llama)
        for key, parameter in parameters.items():
            parameter.copy_(adapter[key])
        trained = trainable.run_front(cut, ids, mask)
        merged = split_model.with_front_adapter(adapter).run_front(cut, ids, mask)
    assert not torch.allclose(trained[mask], plain[mask], atol=1e-3)
    torch.testing.assert_close(merged[mask], trained[mask], atol=1e-5, rtol=1e-5)
    # Neither form touched the model's own weights, which the cloud's back half runs.
    assert all(torch.equal(t, own_weights[name]) for name, t in tiny_llama.hf_model.state_dict().items())


def test_a_split_model_builds_each_adapters_front_once(tiny_llama: LoadedModel) -> None:
    split_model = SplitModel(tiny_llama)
    assert split_model.with_front_adapter(None) is split_model
    adapter = _random_adapter(tiny_llama)
    first = split_model.with_front_adapter(adapter)
    assert first is not split_model and split_model.with_front_adapter(adapter) is first
    assert split_model.with_front_adapter(_random_adapter(tiny_llama, seed=1)) is not first


def test_an_adapter_that_does_not_fit_the_model_is_refused(tiny_llama: LoadedModel, tiny_bert: LoadedModel) -> None:
    split_model = SplitModel(tiny_llama)
    adapter = _random_adapter(tiny_llama)
    missing = {key: t for key, t in adapter.items() if not key.startswith("1.mlp.down_proj")}
    with pytest.raises(ValueError, match="a pair of tensors per linear layer"):
        split_model.with_front_adapter(missing)
    wrong_shape = {**adapter, "0.self_attn.q_proj.a": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="shape does not match"):
        split_model.with_front_adapter(wrong_shape)
    too_deep = {f"{tiny_llama.num_blocks + 1}.{key.split('.', 1)[1]}": t for key, t in adapter.items()}
    with pytest.raises(ValueError, match="the model has"):
        split_model.with_front_adapter(too_deep)
    with pytest.raises(ValueError, match="encoder"):
        SplitModel(tiny_bert).with_trainable_front(SPLIT, rank=2)
