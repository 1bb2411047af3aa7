"""The model cutter: every split point of both families reproduces the unsplit model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from splitwire.codec.raw import Fp16Codec, Fp32Codec
from splitwire.split.cut import (
    BlockRange,
    Cut,
    InvalidSplitError,
    SplitModel,
    attention_bias,
    positions_from_mask,
)
from splitwire.split.models import LoadedModel

TEXTS = [
    "A man with a hard hat is dancing.",
    "Three dogs run through the snow while their owner, who is wearing a red coat, watches from a bench.",
    "Hi",
]


def transformers_sentence_embedding(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's published recipe, straight from transformers: mean pooling + L2 norm."""
    enc = model.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        out = model.hf_model(**enc).last_hidden_state
    weights = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((out * weights).sum(1) / weights.sum(1), dim=-1)


def transformers_next_token_logits(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    ids, mask = model.tokenize(texts)
    with torch.inference_mode():
        logits = model.hf_model(input_ids=ids, attention_mask=mask.long()).logits
    return logits[torch.arange(len(texts)), mask.sum(1) - 1]


def test_cut_ranges_are_half_open() -> None:
    cut = Cut(num_blocks=6, split=2)
    assert cut.front == BlockRange(0, 2)
    assert cut.back == BlockRange(2, 6)
    assert len(cut.front) + len(cut.back) == 6
    assert Cut(6, 0).front == BlockRange(0, 0)
    assert Cut(6, 6).back == BlockRange(6, 6)


@pytest.mark.parametrize("split", [-1, 7])
def test_cut_rejects_split_outside_model(split: int) -> None:
    with pytest.raises(InvalidSplitError, match="outside"):
        Cut(num_blocks=6, split=split)


def test_block_range_rejects_reversed_range() -> None:
    with pytest.raises(InvalidSplitError):
        BlockRange(3, 2)


def test_positions_and_masks_from_token_mask() -> None:
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 1, 1]]
    bias = attention_bias(mask, positions_from_mask(mask), causal=False, dtype=torch.float32)
    assert bias.shape == (2, 1, 1, 3)
    assert bias[1, 0, 0, 2] == torch.finfo(torch.float32).min and bias[1, 0, 0, 1] == 0
    causal = attention_bias(mask, positions_from_mask(mask), causal=True, dtype=torch.float32)
    assert causal.shape == (2, 1, 3, 3)
    allowed = (causal == 0)[0, 0].tolist()
    assert allowed == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("split", range(5))
def test_tiny_bert_every_split_matches_unsplit(tiny_bert: LoadedModel, split: int) -> None:
    model = SplitModel(tiny_bert)
    cut = Cut(tiny_bert.num_blocks, split)
    ids, mask = tiny_bert.tokenize(TEXTS)
    with torch.inference_mode():
        got = model.run_back(cut, model.run_front(cut, ids, mask), mask)
    expected = transformers_sentence_embedding(tiny_bert, TEXTS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("split", range(5))
def test_tiny_llama_every_split_matches_unsplit(tiny_llama: LoadedModel, split: int) -> None:
    model = SplitModel(tiny_llama)
    cut = Cut(tiny_llama.num_blocks, split)
    ids, mask = tiny_llama.tokenize(TEXTS)
    with torch.inference_mode():
        got = model.run_back(cut, model.run_front(cut, ids, mask), mask)
    torch.testing.assert_close(got, transformers_next_token_logits(tiny_llama, TEXTS), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("split", range(7))
def test_minilm_split_through_raw_codecs_matches_transformers(minilm: LoadedModel, split: int) -> None:
    """fp32 through the codec: cosine >= 0.99999 to transformers' own embedding; fp16: >= 0.9999."""
    model = SplitModel(minilm)
    cut = Cut(minilm.num_blocks, split)
    expected = transformers_sentence_embedding(minilm, TEXTS)
    fp32, fp16 = Fp32Codec("fp32", minilm.hidden_size), Fp16Codec("fp16", minilm.hidden_size)
    for index, text in enumerate(TEXTS):
        ids, mask = minilm.tokenize([text])
        with torch.inference_mode():
            hidden = model.run_front(cut, ids, mask)[0]
            for codec, bound in ((fp32, 0.99999), (fp16, 0.9999)):
                _, decoded = codec.decode_payload(codec.encode_payload(hidden))
                got = model.run_back(cut, decoded[None], mask)
                assert F.cosine_similarity(got, expected[index : index + 1]).item() >= bound, (
                    codec.name,
                    text,
                )


def test_padded_batch_equals_one_by_one(minilm: LoadedModel) -> None:
    model = SplitModel(minilm)
    cut = Cut(minilm.num_blocks, 3)
    ids, mask = minilm.tokenize(TEXTS)
    with torch.inference_mode():
        batched = model.run_back(cut, model.run_front(cut, ids, mask), mask)
        for index, text in enumerate(TEXTS):
            one_ids, one_mask = minilm.tokenize([text])
            alone = model.run_back(cut, model.run_front(cut, one_ids, one_mask), one_mask)
            torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=1e-4)


def test_unsplit_texts_in_batches_equal_the_whole_model_on_each_text(tiny_bert: LoadedModel) -> None:
    model = SplitModel(tiny_bert)
    whole = model.run_unsplit_texts(TEXTS, batch=2)
    assert whole.shape == (len(TEXTS), tiny_bert.hidden_size)
    for index, text in enumerate(TEXTS):
        ids, mask = tiny_bert.tokenize([text])
        with torch.inference_mode():
            torch.testing.assert_close(whole[index : index + 1], model.run_unsplit(ids, mask), atol=1e-5, rtol=1e-4)
    # Cut to three tokens, the long sentence answers as its first three tokens alone do.
    ids, mask = tiny_bert.tokenize([TEXTS[1]])
    with torch.inference_mode():
        first_three = model.run_unsplit(ids[:, :3], mask[:, :3])
    torch.testing.assert_close(model.run_unsplit_texts(TEXTS, max_tokens=3)[1:2], first_three)


def test_fingerprints_are_stable_and_weight_sensitive(tiny_bert: LoadedModel) -> None:
    from splitwire.split.fingerprint import model_fingerprint
    from splitwire.split.models import load_model

    assert load_model("tiny-bert").fingerprint == tiny_bert.fingerprint
    other = load_model("tiny-bert")
    with torch.no_grad():
        other.hf_model.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert model_fingerprint(other.hf_model) != tiny_bert.fingerprint
