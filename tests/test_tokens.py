"""Placeholder words: validation, writing per-sample embeddings, multi-vector words, export."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_system
from guided_concepts.tokens import PlaceholderSpec, PlaceholderTable, TokenError, encode_prompts, tokenize


def table_for(backbone, *specs):
    return PlaceholderTable(backbone.text_side, list(specs))


@pytest.mark.parametrize("specs, message", [
    ([PlaceholderSpec("shape", "chair", "object")], "already a word of the vocabulary"),
    ([PlaceholderSpec("shape", "*s", "leopardprint")], "initializer word 'leopardprint' is"),
    ([PlaceholderSpec("shape", "*s", "object"), PlaceholderSpec("pose", "*s", "pose")], "collides with concept 'shape'"),
    ([PlaceholderSpec("shape", "*s", "object", 2), PlaceholderSpec("pose", "*s_1", "pose")], "collides"),
    ([PlaceholderSpec("shape", "* s", "object")], "one word without spaces"),
])
def test_bad_placeholders_are_clear_errors(fresh_backbone, specs, message):
    with pytest.raises(TokenError, match=message):
        table_for(fresh_backbone, *specs)


def test_fresh_words_reproduce_the_base_model_exactly(fresh_backbone):
    """Zero offsets: '... shape of *s' encodes exactly like '... shape of object' (the initializer)."""
    tokenizer, text_encoder = fresh_backbone.text_side[0]
    base_ids = tokenizer(["a photo of a chair in the shape of object"] * 2, padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(base_ids)[0]
    system = make_system(fresh_backbone)
    chair_mask = torch.zeros(2, 1, 64, 64)
    chair_mask[:, :, 20:40, 10:50] = 1
    with torch.no_grad():
        encoded = system.encode({"mask": chair_mask, "image": torch.zeros(2, 3, 64, 64)})
        got, _ = system.text_conditioning(["a photo of a chair in the shape of *s"] * 2, encoded)[:2]
    assert torch.equal(got, expected)


def test_per_sample_embeddings_at_every_occurrence(fresh_backbone):
    """Each sample's vector lands wherever the word appears: same result as a textual-inversion
    style encoder whose placeholder row is that vector."""
    table = table_for(fresh_backbone, PlaceholderSpec("shape", "*s", "object"))
    tokenizer, text_encoder = fresh_backbone.text_side[0]
    prompts = ["*s chair", "a photo of a chair in the shape of *s", "*s and *s again *s"]
    vectors = torch.randn(3, 1, table.embedding_dim)
    ids = tokenize(table, prompts)
    with torch.no_grad():
        got = encode_prompts(table, ids, {"shape": vectors})
        row = table.token_ids[0]["shape"][0]
        weight = text_encoder.get_input_embeddings().weight
        for b in range(3):
            saved = weight[row].clone()
            weight[row] = vectors[b, 0]
            reference = text_encoder(ids[0][b:b + 1])[0]
            weight[row] = saved
            assert torch.allclose(got[b:b + 1], reference, atol=1e-6), prompts[b]
    assert not torch.allclose(got[0], got[1])


def test_multi_vector_words_expand_and_write_each_vector(fresh_backbone):
    table = table_for(fresh_backbone, PlaceholderSpec("shape", "*s", "object", num_vectors=3))
    assert table.expand("a chair like *s, red") == "a chair like *s *s_1 *s_2, red"
    ids = tokenize(table, ["a chair like *s"])[0][0]
    token_ids = table.token_ids[0]["shape"]
    positions = [int((ids == t).nonzero()[0]) for t in token_ids]
    assert positions == sorted(positions) and positions[1] == positions[0] + 1
    vectors = torch.zeros(1, 3, table.embedding_dim)
    vectors[0, 1] = 5.0                                   # only the middle vector differs
    with torch.no_grad():
        a = encode_prompts(table, [ids[None]], {"shape": vectors})
        b = encode_prompts(table, [ids[None]], {"shape": torch.zeros_like(vectors)})
    changed = (a - b).abs().amax(-1)[0] > 1e-6
    # Causal text encoder: positions before the middle vector are untouched, from it on they change.
    assert not changed[:positions[1]].any() and changed[positions[1]]


def test_prompt_with_an_untrained_word_is_an_error(fresh_backbone):
    table = table_for(fresh_backbone, PlaceholderSpec("shape", "*s", "object"))
    with pytest.raises(TokenError, match=r"'\*p', which this run did not train"):
        table.expand("a chair in the shape of *s with pose *p")


def test_exported_token_loads_in_diffusers_textual_inversion(fresh_backbone, tiny_model_dir, tmp_path):
    """tokens/<object>/shape.safetensors works with pipe.load_textual_inversion as it is."""
    from diffusers import StableDiffusionPipeline
    from guided_concepts.tokens.export import load_token, save_token

    table = table_for(fresh_backbone, PlaceholderSpec("shape", "*s", "object", num_vectors=2))
    vectors = torch.randn(1, 2, table.embedding_dim) * 0.05
    prompt = "a photo of a chair in the shape of *s"
    with torch.no_grad():
        ours = encode_prompts(table, tokenize(table, [prompt]), {"shape": vectors})
    path = save_token(tmp_path / "obj" / "shape.safetensors", "*s", vectors[0])
    assert load_token(path)[0] == "*s"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_prompt_too_long_for_its_placeholder_is_an_error(fresh_backbone):
    table = table_for(fresh_backbone, PlaceholderSpec("shape", "*s", "object"))
    long_prompt = "a photo of a chair " * 20 + "in the shape of *s"
    with pytest.raises(TokenError, match="past the text encoder's 77-token limit"):
        tokenize(table, [long_prompt])
    assert tokenize(table, ["*s " + "a photo of a chair " * 20])[0].shape == (1, 77)   # early word: fine


def test_a_words_row_is_its_token_embedding(fresh_backbone):
    table = PlaceholderTable(fresh_backbone.text_side, [PlaceholderSpec("shape", "*s", "object", 1)])
    tokenizer, encoder = fresh_backbone.text_side[0]
    chair = tokenizer("chair", add_special_tokens=False).input_ids[0]
    assert torch.equal(table.word_row("chair"), encoder.get_input_embeddings().weight[chair].float())
    assert torch.equal(table.word_row("object"), table.initializer_rows["shape"])
