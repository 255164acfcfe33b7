"""Structured output over HTTP: ``response_format`` and the ``guided_*`` options, end to end on
the tiny model (its byte-level BPE tokenizer goes through xgrammar like any other), and their 400s."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import jsonschema
import pytest
from serve_helpers import call, run, sse_events

from rtllm import LLM, GuidedDecodingParams, SamplingParams
from rtllm.serve.generation import Prompt

_CHAT = {"messages": [{"role": "user", "content": "Describe a person as JSON"}]}
_PROMPT = {"prompt": "Answer:"}
# Random weights and temperature 1 wander through the grammar; the cap leaves room to finish.
_SAMPLED = {"temperature": 1.0, "max_tokens": 200}
SEEDS = [0, 1, 2]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


def outputs(app: Any, path: str, body: dict[str, Any], stream: bool) -> list[str]:
    """The text of each choice (joined from the chunks when streamed); every one finished on "stop"."""
    response = call(app, "POST", path, json={**body, "stream": stream})
    assert response.status_code == 200, response.text
    key = "message" if path.endswith("chat/completions") else None
    if not stream:
        choices = response.json()["choices"]
        assert all(c["finish_reason"] == "stop" for c in choices), choices
        return [c[key]["content"] if key else c["text"] for c in choices]
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for event in events[:-1]:
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "" if key else c["text"])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert set(finish.values()) == {"stop"}, finish
    return [texts[i] for i in sorted(texts)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_response_format_json_schema(app: Any, seed: int, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    [text] = outputs(app, "/v1/chat/completions", {**_CHAT, **_SAMPLED, "seed": seed, "response_format": fmt},
                     stream)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("seed", SEEDS)
def test_response_format_json_object_and_guided_json(app: Any, llm: LLM, seed: int) -> None:
    # Free-form JSON: keys and strings end only when '"' is drawn, so favour it (and '}').
    closing = {str(llm.tokenizer.convert_tokens_to_ids(t)): 6 for t in ('"', "}")}
    [text] = outputs(app, "/v1/chat/completions",
                     {**_CHAT, **_SAMPLED, "seed": seed, "response_format": {"type": "json_object"},
                      "logit_bias": closing}, stream=seed == 0)
    assert isinstance(json.loads(text), dict)
    for guide in (SCHEMA, json.dumps(SCHEMA)):
        [text] = outputs(app, "/v1/completions", {**_PROMPT, **_SAMPLED, "seed": seed, "guided_json": guide},
                         stream=seed % 2 == 1)
        jsonschema.validate(json.loads(text), SCHEMA)


REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,5} [0-9]{1,2}!"]


@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_guided_regex(app: Any, path: str, regex: str) -> None:
    base = _PROMPT if path == "/v1/completions" else _CHAT
    for seed in SEEDS:
        [text] = outputs(app, path, {**base, **_SAMPLED, "seed": seed, "guided_regex": regex}, stream=seed == 1)
        assert re.fullmatch(regex, text), (regex, text)


def test_guided_choice_and_grammar(app: Any) -> None:
    choices = ["yes", "no", 'say "hi"', "back\\slash", "naïve 🙂", "tab\there"]
    seen = set()
    for seed in range(8):
        [text] = outputs(app, "/v1/completions", {**_PROMPT, **_SAMPLED, "seed": seed, "guided_choice": choices},
                         stream=seed % 2 == 0)
        assert text in choices
        seen.add(text)
    assert len(seen) > 1  # the sampler does pick among them
    grammar = 'root ::= ("ab" | "cd") [0-9] ("!" | "?")'
    for seed in SEEDS:
        [text] = outputs(app, "/v1/chat/completions", {**_CHAT, **_SAMPLED, "seed": seed, "guided_grammar": grammar},
                         stream=seed == 2)
        assert re.fullmatch(r"(ab|cd)[0-9][!?]", text), text


def test_guided_output_with_other_options(app: Any) -> None:
    # Several prompts, logprobs and a stop token id alongside a guide.
    body = {"prompt": ["Answer:", "Reply:"], **_SAMPLED, "seed": 4, "guided_regex": "(red|green|blue)",
            "logprobs": 1}
    response = call(app, "POST", "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["text"] in ("red", "green", "blue")
        assert "".join(choice["logprobs"]["tokens"][:-1]) == choice["text"]


ERRORS = [
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_regex": ""}, "guided_regex", "regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "grammar"),
    ({"guided_grammar": 'start ::= "x"'}, "guided_grammar", "root"),
    ({"guided_json": {"type": "frobnicate"}}, "guided_json", "frobnicate"),
    ({"guided_json": "[1, 2]"}, "guided_json", "JSON schema object"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": 5}, "guided_json", "guided_json"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"guided_choice": "yes"}, "guided_choice", "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "guided_regex and guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json",
     "response_format and guided_json"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": SCHEMA}}},
     "response_format.json_schema", "only allowed"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra", "Unrecognized"),
    ({"response_format": "json"}, "response_format", "response_format"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("body", "param", "word"), ERRORS)
def test_bad_structured_output(app: Any, submissions: list[Any], body: dict[str, Any], param: str, word: str,
                               stream: bool) -> None:
    for path, base in (("/v1/chat/completions", _CHAT), ("/v1/completions", {"prompt": ["a", "b"]})):
        response = call(app, "POST", path, json={**base, **body, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and word in error["message"], error
        assert error["type"] == "invalid_request_error"
    assert not submissions


def test_guided_submission_cancelled_while_compiling_is_aborted(app: Any, llm: LLM,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = app.state.ctx
    original = ctx._submit_results
    started, submitted = threading.Event(), []

    def slow(*args: Any) -> Any:  # grammar compilation that takes a while
        started.set()
        time.sleep(0.3)
        submitted.extend(original(*args))
        return submitted

    monkeypatch.setattr(ctx, "_submit_results", slow)
    params = SamplingParams(max_tokens=400, ignore_eos=True, guided_decoding=GuidedDecodingParams(regex="[a-z]+"))

    async def go() -> None:
        task = asyncio.ensure_future(ctx.submit_async([(Prompt([0, 40, 73]), params)]))
        await asyncio.to_thread(started.wait)
        assert not task.done()  # the event loop is free while the grammar compiles
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(time.sleep, 0.5)  # the submission completes in the background

    run(go())
    [result] = submitted
    assert result.result(timeout=20).outputs[0].finish_reason == "cancelled"
