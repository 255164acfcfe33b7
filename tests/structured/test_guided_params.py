"""GuidedDecodingParams: the exactly-one rule, type checks, schema normalisation."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pytest
from pydantic import BaseModel

from rtllm.structured import GuidedDecodingParams

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def test_exactly_one_field_none_set() -> None:
    with pytest.raises(ValueError, match=r"exactly one of json, regex, grammar, json_object.*none"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="got none"):
        GuidedDecodingParams(json_object=False)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"json": SCHEMA, "regex": "a+"}, "json and regex"),
        ({"regex": "a+", "grammar": 'root ::= "a"'}, "regex and grammar"),
        ({"json": SCHEMA, "json_object": True}, "json and json_object"),
        ({"regex": "a", "grammar": 'root ::= "a"', "json_object": True}, "regex and grammar and"),
    ],
)
def test_exactly_one_field_several_set(kwargs, named) -> None:
    with pytest.raises(ValueError, match="exactly one of json, regex, grammar, json_object") as e:
        GuidedDecodingParams(**kwargs)
    assert named in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "kind", "spec"),
    [
        ({"regex": r"\d+"}, "regex", r"\d+"),
        ({"grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
        ({"json_object": True}, "json_object", ""),
        ({"json": {"type": "integer"}}, "json", '{"type":"integer"}'),
    ],
)
def test_kind_and_spec(kwargs, kind, spec) -> None:
    params = GuidedDecodingParams(**kwargs)
    assert (params.kind, params.spec) == (kind, spec)


def test_json_forms_normalise_to_one_string_keeping_property_order() -> None:
    from_dict = GuidedDecodingParams(json=SCHEMA)
    from_str = GuidedDecodingParams(json=json.dumps(SCHEMA, indent=4))
    assert from_dict == from_str and hash(from_dict) == hash(from_str)
    assert isinstance(from_dict.json, str)
    assert json.loads(from_dict.json) == SCHEMA
    # property order is the order the grammar emits keys in: never sorted
    assert list(json.loads(from_dict.json)["properties"]) == ["b", "a"]
    assert GuidedDecodingParams(json={"type": "string", "title": "café"}).json == (
        '{"type":"string","title":"café"}'
    )


def test_json_from_pydantic_model() -> None:
    class Item(BaseModel):
        name: str
        count: int
        kind: Literal["a", "b"]

    params = GuidedDecodingParams(json=Item)
    schema = json.loads(params.json)
    assert schema == Item.model_json_schema()
    assert schema["required"] == ["name", "count", "kind"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", r"GuidedDecodingParams\.json is not valid JSON"),
        ("[1, 2]", r"GuidedDecodingParams\.json must be a JSON schema object.*list"),
        ("5", r"GuidedDecodingParams\.json must be a JSON schema object.*int"),
        (5, r"GuidedDecodingParams\.json must be a JSON schema.*str, a dict, or a pydantic"),
        (int, r"GuidedDecodingParams\.json must be a JSON schema.*got type"),
        ({"x": {1, 2}}, r"GuidedDecodingParams\.json is not JSON-serialisable"),
    ],
)
def test_bad_json_names_the_field(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        GuidedDecodingParams(json=value)


@pytest.mark.parametrize("field", ["regex", "grammar"])
@pytest.mark.parametrize("value", ["", 5, b"a+"])
def test_regex_and_grammar_must_be_non_empty_str(field, value) -> None:
    with pytest.raises(ValueError, match=rf"GuidedDecodingParams\.{field} must be a non-empty str"):
        GuidedDecodingParams(**{field: value})


def test_json_object_must_be_bool() -> None:
    with pytest.raises(ValueError, match=r"GuidedDecodingParams\.json_object must be a bool"):
        GuidedDecodingParams(json_object="yes")  # type: ignore[arg-type]


def test_frozen() -> None:
    params = GuidedDecodingParams(regex="a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.regex = "b"  # type: ignore[misc]
