"""Prompt encoding: exact for short prompts (vs diffusers), chunked long prompts, weighting, clip skip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from latentdiff.generation.prompts import count_chunks, encode_prompts, parse_weights, tokenize_prompt


def clip_encode(pipe, ids: list[int], skip: int = 0) -> torch.Tensor:
    """Our own straight CLIP call on one 77-id row: the reference for chunk contents."""
    out = pipe.text_encoder(torch.tensor([ids]), output_hidden_states=True)
    if not skip:
        return out.last_hidden_state[0]
    return pipe.text_encoder.final_layer_norm(out.hidden_states[-(skip + 1)])[0]


def wrapped(pipe, tokens: list[int]) -> list[int]:
    tok = pipe.tokenizer
    return [tok.bos_token_id, *tokens, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(tokens))


@pytest.mark.parametrize("text", ["a photograph of an astronaut riding a horse", "", "red, green; blue!"])
def test_short_prompts_equal_diffusers(tiny, reference, text):
    ours = encode_prompts(tiny.tokenizer, tiny.text_encoder, [text])
    theirs, _ = reference.encode_prompt(text, "cpu", 1, False)
    assert ours.shape == theirs.shape == (1, 77, 32)
    assert torch.equal(ours, theirs)


def test_clip_skip_is_an_earlier_layer_through_the_final_norm(tiny):
    # (diffusers 0.42's own clip_skip reaches for text_encoder.text_model, which transformers 5
    # no longer has, so the reference here is the computation written out.)
    ours = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a castle"], clip_skip=1)
    ids = tiny.tokenizer("a castle", add_special_tokens=False).input_ids
    assert torch.allclose(ours[0], clip_encode(tiny, wrapped(tiny, ids), skip=1), atol=1e-6)
    assert not torch.allclose(ours, encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a castle"]), atol=1e-3)


def test_weight_one_is_no_weight(tiny):
    enc = lambda p: encode_prompts(tiny.tokenizer, tiny.text_encoder, [p])  # noqa: E731
    assert torch.equal(enc("a (cat:1.0) on a mat"), enc("a cat on a mat"))


def test_long_prompt_is_chunked(tiny):
    words = [f"word{i}" for i in range(200)]
    text = " ".join(words)
    tokens = tiny.tokenizer(text, add_special_tokens=False).input_ids[:150]
    text150 = tiny.tokenizer.decode(tokens)
    assert len(tiny.tokenizer(text150, add_special_tokens=False).input_ids) == 150
    out = encode_prompts(tiny.tokenizer, tiny.text_encoder, [text150])
    assert out.shape == (1, 154, 32)
    # first chunk = the first 75 tokens alone; second chunk = the next 75 alone
    assert torch.allclose(out[0, :77], clip_encode(tiny, wrapped(tiny, tokens[:75])), atol=1e-6)
    assert torch.allclose(out[0, 77:], clip_encode(tiny, wrapped(tiny, tokens[75:])), atol=1e-6)


def test_break_starts_a_new_chunk(tiny):
    chunks = tokenize_prompt(tiny.tokenizer, "a red apple BREAK a green pear")
    assert [len(c) for c in chunks] == [3, 3]
    out = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a red apple BREAK a green pear"])
    apple = tiny.tokenizer("a red apple", add_special_tokens=False).input_ids
    assert out.shape == (1, 154, 32)
    assert torch.allclose(out[0, :77], clip_encode(tiny, wrapped(tiny, apple)), atol=1e-6)
    assert count_chunks(tiny.tokenizer, "BREAK lone") == 1  # a BREAK before anything does nothing
    assert count_chunks(tiny.tokenizer, "breaking news") == 1  # only the word BREAK, in capitals


@pytest.fixture(scope="module")
def biased(tiny):
    """The tiny text encoder with a non-zero final layer-norm bias, as real CLIP has: its
    embeddings have a clearly non-zero mean, so mean restoration is visible."""
    import copy
    from types import SimpleNamespace

    encoder = copy.deepcopy(tiny.text_encoder)
    with torch.no_grad():
        encoder.final_layer_norm.bias.copy_(torch.linspace(-0.2, 0.6, encoder.config.hidden_size))
    return SimpleNamespace(tokenizer=tiny.tokenizer, text_encoder=encoder)


def test_weighting_scales_tokens_then_restores_the_mean(biased):
    text, plain = "a (red:1.5) apple", "a red apple"
    ids = biased.tokenizer(plain, add_special_tokens=False).input_ids
    z = clip_encode(biased, wrapped(biased, ids))  # (77, 32)
    assert abs(z.mean()) > 0.05
    w = torch.ones(77)
    w[2] = 1.5  # BOS, "a", "red" -> position 2
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    out = encode_prompts(biased.tokenizer, biased.text_encoder, [text])[0]
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(out, z, atol=1e-3)  # the weight did something


def test_weighting_with_a_zero_mean_embedding_stays_finite(tiny):
    """The tiny encoder's layer norm has no bias: the mean is ~0 and cannot be restored."""
    plain = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a red apple"])[0]
    assert abs(float(plain.mean())) < 1e-6
    for text in ("a (red) apple", "a [red] apple", "a (red:1.5) apple"):
        out = encode_prompts(tiny.tokenizer, tiny.text_encoder, [text])[0]
        assert bool(torch.isfinite(out).all()) and float(out.abs().mean()) > 0.1
    image = tiny("a [red] apple", seed=1, num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


def test_extreme_weights_and_trailing_break(tiny):
    assert parse_weights("(x:1e999)") == [("(x:1e999)", 1.0)]
    assert parse_weights("(" * 9000 + "x" + ")" * 9000)[0][1] == 100.0  # clamped, not inf
    assert count_chunks(tiny.tokenizer, "a cat BREAK") == 1


def test_negative_prompt_is_padded_to_the_prompts_length(tiny):
    long = " ".join(["castle"] * 100)
    both = encode_prompts(tiny.tokenizer, tiny.text_encoder, [long, "blurry"])
    assert both.shape == (2, 154, 32)
    empty = encode_prompts(tiny.tokenizer, tiny.text_encoder, [""])[0]
    short = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["blurry"])[0]
    assert torch.allclose(both[1, :77], short, atol=1e-6)
    assert torch.allclose(both[1, 77:], empty, atol=1e-6)  # padding = the empty prompt's encoding


PARSE_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat) dog", [("a ", 1.0), ("cat", 1.1), (" dog", 1.0)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("(cat:1.3)", [("cat", 1.3)]),
    ("((a:1.2) b)", [("a", 1.2 * 1.1), (" b", 1.1)]),
    ("(a [b] c:0.5)", [("a ", 0.5), ("b", 0.5 / 1.1), (" c", 0.5)]),
    ("a ( cat : 2 ) b", [("a ", 1.0), (" cat ", 2.0), (" b", 1.0)]),
    (r"\(literal\) \[too\]", [("(literal) [too]", 1.0)]),
    ("a (x:abc) b", [("a (x:abc) b", 1.0)]),  # weight not a number: literal
    ("a (b", [("a (b", 1.0)]),  # unbalanced: literal
    ("a b)", [("a b)", 1.0)]),
    ("time: 3pm (x)", [("time: 3pm ", 1.0), ("x", 1.1)]),
    ("([x)]", [("(", 1.0), ("x)", 1 / 1.1)]),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_parse_weights(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_malformed_syntax_never_raises(tiny):
    rng = random.Random(0)
    alphabet = "ab ():[]\\1.5-BREAK,"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        runs = parse_weights(text)
        assert all(isinstance(t, str) and np.isfinite(w) for t, w in runs)
        tokenize_prompt(tiny.tokenizer, text)


def test_long_prompt_batched_with_short_ones_keeps_every_image(tiny):
    """Prompts are grouped by length, so a short prompt's image does not depend on a long neighbour."""
    long = "a watercolour of " + ", ".join(["a lighthouse by the sea"] * 20)
    kwargs = dict(num_inference_steps=2, scheduler="euler_a", output_type="np")
    alone = tiny("a red apple", seed=7, **kwargs).images
    mixed = tiny(["a red apple", long], seed=[7, 8], **kwargs).images
    long_alone = tiny(long, seed=8, **kwargs).images
    np.testing.assert_allclose(alone[0], mixed[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(long_alone[0], mixed[1], atol=1e-5, rtol=0)


def test_prompt_embeds_equal_the_text_path(tiny):
    kwargs = dict(seed=3, num_inference_steps=2, scheduler="euler", output_type="np", guidance_scale=5.0)
    text = tiny("a (blue:1.2) bird", negative_prompt="grey", **kwargs).images
    embeds = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a (blue:1.2) bird"])
    negative = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["grey"])
    direct = tiny(prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs).images
    np.testing.assert_allclose(direct, text, atol=1e-6, rtol=0)


def test_clip_skip_is_in_the_recipe_and_changes_the_image(tiny):
    from latentdiff import call_kwargs

    kwargs = dict(seed=3, num_inference_steps=2, output_type="np")
    skipped = tiny("a bird", clip_skip=1, **kwargs)
    assert skipped.params[0]["clip_skip"] == 1
    again = tiny(**call_kwargs(skipped.params[0]), output_type="np")
    np.testing.assert_allclose(again.images, skipped.images, atol=1e-6)
    assert np.abs(tiny("a bird", **kwargs).images - skipped.images).max() > 1e-3
