"""Logprobs in OpenAI's formats, streamed and not, equal to the engine's own ``Logprob`` values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from serve_helpers import call, sse_events

from rtllm import LLM, SamplingParams
from rtllm.serve.logprobs import LOGPROB_FLOOR
from rtllm.serve.sampling import engine_refuses

_PROMPT = "Once upon a time"
_CHAT = {"messages": [{"role": "user", "content": "Tell me a story"}]}
# Seeded sampling: the generated token is often not the likeliest one.
_SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 10, "ignore_eos": True}


@pytest.fixture
def results(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The engine's GenerationResult of every request submitted during the test."""
    seen: list[Any] = []
    executor = llm.executor
    original = executor.submit

    def spy(request: Any) -> Any:
        result = original(request)
        seen.append(result)
        return result

    monkeypatch.setattr(executor, "submit", spy)
    yield seen


def post(app: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = call(app, "POST", path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_choices(app: Any, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = call(app, "POST", path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    return [choice for event in events[:-1] for choice in event["choices"]]


def token_str(llm: LLM, token_id: int) -> str:
    return llm.tokenizer.decode([token_id], skip_special_tokens=False)


def expected_completion_logprobs(llm: LLM, entries: list[dict[int, Any]], offset: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for entry in entries:
        token_id, chosen = next(iter(entry.items()))
        out["tokens"].append(token_str(llm, token_id))
        out["token_logprobs"].append(chosen.logprob)
        top: dict[str, float] = {}
        for top_id, logprob in entry.items():
            top.setdefault(token_str(llm, top_id), logprob.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1])
    return out


def merge_completion_logprobs(choices: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for choice in choices:
        if choice["logprobs"] is not None:
            for key, values in choice["logprobs"].items():
                merged[key] += values
    return merged


def test_completion_logprobs_are_the_engines(app: Any, llm: LLM, results: list[Any]) -> None:
    body = post(app, "/v1/completions", {"prompt": _PROMPT, "logprobs": 3, **_SAMPLED})
    [choice] = body["choices"]
    entries = results[0].outputs[0].logprobs
    assert len(entries) == 10
    assert choice["logprobs"] == expected_completion_logprobs(llm, entries)
    assert any(next(iter(e.values())).rank != 1 for e in entries)  # not all greedy picks
    for top, entry in zip(choice["logprobs"]["top_logprobs"], entries, strict=True):
        assert 3 <= len(entry) <= 4  # the generated token and the 3 likeliest
        assert 1 <= len(top) <= len(entry)  # ids with the same string (e.g. U+FFFD) share a key
    # The same request through the LLM API gives the same tokens and values.
    direct = llm.generate(_PROMPT, SamplingParams(logprobs=3, **_SAMPLED)).outputs[0]
    assert direct.token_ids == results[0].outputs[0].token_ids
    assert direct.logprobs == entries
    streamed = stream_choices(app, "/v1/completions", {"prompt": _PROMPT, "logprobs": 3, **_SAMPLED})
    assert results[1].outputs[0].token_ids == direct.token_ids
    assert merge_completion_logprobs(streamed) == choice["logprobs"]
    assert "".join(c["text"] for c in streamed) == choice["text"]
    for c in streamed:  # a chunk's logprobs are those of the tokens whose text it brings
        if c["text"]:
            assert c["logprobs"]["tokens"], c


def test_completion_logprobs_zero_and_off(app: Any, results: list[Any]) -> None:
    body = post(app, "/v1/completions", {"prompt": _PROMPT, "logprobs": 0, **_SAMPLED})
    logprobs = body["choices"][0]["logprobs"]
    assert [list(top.values()) for top in logprobs["top_logprobs"]] == [[lp] for lp in logprobs["token_logprobs"]]
    assert post(app, "/v1/completions", {"prompt": _PROMPT, **_SAMPLED})["choices"][0]["logprobs"] is None
    streamed = stream_choices(app, "/v1/completions", {"prompt": _PROMPT, **_SAMPLED})
    assert all(c["logprobs"] is None for c in streamed)
    assert results[2].outputs[0].logprobs is None


def expected_chat_content(llm: LLM, entries: list[dict[int, Any]], k: int) -> list[dict[str, Any]]:
    content = []
    for entry in entries:
        token_id, chosen = next(iter(entry.items()))
        tops = sorted((lp.rank, top_id) for top_id, lp in entry.items() if lp.rank <= k)
        content.append({
            "token": token_str(llm, token_id), "logprob": chosen.logprob,
            "top_logprobs": [{"token": token_str(llm, t), "logprob": entry[t].logprob} for _, t in tops],
        })
    return content


def without_bytes(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": c["token"], "logprob": c["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in c["top_logprobs"]]}
            for c in content]


def test_chat_logprobs_are_the_engines(app: Any, llm: LLM, results: list[Any]) -> None:
    request = {**_CHAT, "logprobs": True, "top_logprobs": 3, **_SAMPLED}
    body = post(app, "/v1/chat/completions", request)
    content = body["choices"][0]["logprobs"]["content"]
    entries = results[0].outputs[0].logprobs
    assert without_bytes(content) == expected_chat_content(llm, entries, 3)
    for item, entry in zip(content, entries, strict=True):
        assert len(item["top_logprobs"]) == 3
        values = [t["logprob"] for t in item["top_logprobs"]]
        assert values == sorted(values, reverse=True) and item["logprob"] <= values[0]
        chosen_rank = next(iter(entry.values())).rank
        assert (item["token"] in [t["token"] for t in item["top_logprobs"]]) >= (chosen_rank <= 3)
        if "\ufffd" not in item["token"]:
            assert bytes(item["bytes"]) == item["token"].encode()
    streamed = stream_choices(app, "/v1/chat/completions", request)
    assert results[1].outputs[0].token_ids == results[0].outputs[0].token_ids
    assert [item for c in streamed if c["logprobs"] for item in c["logprobs"]["content"]] == content
    assert streamed[0]["logprobs"] is None  # the role chunk
    only = post(app, "/v1/chat/completions", {**_CHAT, "logprobs": True, **_SAMPLED})
    assert [c["top_logprobs"] for c in only["choices"][0]["logprobs"]["content"]] == [[]] * 10
    off = post(app, "/v1/chat/completions", {**_CHAT, "logprobs": False, "top_logprobs": 0, **_SAMPLED})
    assert off["choices"][0]["logprobs"] is None


def test_bytes_rebuild_split_characters(app: Any, results: list[Any]) -> None:
    # "ж" and "✓" are not in the tokenizer's training text: byte tokens, each a U+FFFD alone.
    text = "жa✓"
    body = post(app, "/v1/chat/completions", {**_CHAT, "guided_choice": [text], "logprobs": True,
                                               "max_tokens": 20})
    choice = body["choices"][0]
    assert choice["message"]["content"] == text and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert content[-1]["token"] == "</s>"  # the EOS that ended the output is a token too
    assert b"".join(bytes(c["bytes"]) for c in content[:-1]) == text.encode()
    assert any(c["token"] == "\ufffd" for c in content)


def test_masked_alternatives_are_floored(app: Any, results: list[Any]) -> None:
    body = post(app, "/v1/chat/completions", {**_CHAT, "guided_regex": "yes", "logprobs": True,
                                               "top_logprobs": 4, "max_tokens": 10, "temperature": 1.0})
    content = body["choices"][0]["logprobs"]["content"]
    entries = results[0].outputs[0].logprobs
    floored = [lp.logprob == float("-inf") for entry in entries for lp in entry.values()]
    assert any(floored)
    values = [item["logprob"] for c in content for item in c["top_logprobs"]]
    assert LOGPROB_FLOOR in values and all(v >= LOGPROB_FLOOR for v in values)


needs_prompt_logprobs = pytest.mark.skipif(engine_refuses("prompt_logprobs"),
                                           reason="the engine does not return prompt logprobs yet")


@needs_prompt_logprobs
def test_echo_with_logprobs_covers_the_prompt(app: Any, llm: LLM, results: list[Any]) -> None:
    request = {"prompt": _PROMPT, "echo": True, "logprobs": 2, **_SAMPLED}
    body = post(app, "/v1/completions", request)
    logprobs = body["choices"][0]["logprobs"]
    result = results[0]
    prompt_ids = result.prompt_token_ids
    assert logprobs["tokens"][: len(prompt_ids)] == [token_str(llm, t) for t in prompt_ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(prompt_ids)):
        assert logprobs["token_logprobs"][i] == result.prompt_logprobs[i][prompt_ids[i]].logprob
    prompt_len = sum(len(token_str(llm, t)) for t in prompt_ids)
    generated = expected_completion_logprobs(llm, result.outputs[0].logprobs, prompt_len)
    assert {k: v[len(prompt_ids):] for k, v in logprobs.items()} == generated
    streamed = stream_choices(app, "/v1/completions", request)
    assert streamed[0]["text"] == _PROMPT and len(streamed[0]["logprobs"]["tokens"]) == len(prompt_ids)
    assert merge_completion_logprobs(streamed) == logprobs


@needs_prompt_logprobs
def test_prompt_logprobs_field(app: Any, llm: LLM, results: list[Any]) -> None:
    body = post(app, "/v1/completions", {"prompt": _PROMPT, "prompt_logprobs": 1, "max_tokens": 2})
    field = body["choices"][0]["prompt_logprobs"]
    result = results[0]
    assert len(field) == len(result.prompt_token_ids) and field[0] is None
    for got, entry in zip(field[1:], result.prompt_logprobs[1:], strict=True):
        assert got == {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": token_str(llm, t)}
                       for t, lp in entry.items()}
    plain = post(app, "/v1/completions", {"prompt": _PROMPT, "max_tokens": 2})
    assert "prompt_logprobs" not in plain["choices"][0]
