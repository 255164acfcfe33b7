"""Bad and unsupported requests get 400 in OpenAI's error format, before reaching the engine."""

from __future__ import annotations

from typing import Any

import pytest
from serve_helpers import MAX_SEQ_LEN, SERVED_NAME, call, make_llm

from rtllm.serve import build_app
from rtllm.serve.sampling import engine_refuses

_HELLO = {"prompt": "Hello"}
_CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def assert_error(response: Any, param: str | None, *words: str, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


UNSUPPORTED_COMPLETION = [("suffix", "!"), ("detokenize", False)]
UNSUPPORTED_CHAT = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
]
# Mapped by the server, refused while the engine's SamplingParams does not apply them.
ENGINE_PENDING = [
    ("n", 2), ("best_of", 3), ("use_beam_search", True), ("length_penalty", 0.8), ("early_stopping", False),
    ("prompt_logprobs", 1), ("truncate_prompt_tokens", 4),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("name", "value"), ENGINE_PENDING)
def test_engine_pending_parameter(app: Any, submissions: list[Any], path: str, name: str, value: Any) -> None:
    body = {**(_HELLO if path == "/v1/completions" else _CHAT), name: value, "max_tokens": 2}
    if name == "prompt_logprobs" and path != "/v1/completions":
        assert_error(call(app, "POST", path, json=body), name, "Unrecognized")
        return
    response = call(app, "POST", path, json=body)
    if engine_refuses(name):
        error = assert_error(response, name, name)
        assert error["code"] == "unsupported_parameter"
        assert not submissions
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED_COMPLETION)
def test_unsupported_completion_parameter(app: Any, submissions: list[Any], name: str, value: Any) -> None:
    error = assert_error(call(app, "POST", "/v1/completions", json={**_HELLO, name: value}), name, name)
    assert error["code"] == "unsupported_parameter"
    assert not submissions


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED_CHAT)
def test_unsupported_chat_parameter(app: Any, submissions: list[Any], name: str, value: Any) -> None:
    assert_error(call(app, "POST", "/v1/chat/completions", json={**_CHAT, name: value}), name, name)
    assert not submissions


def test_null_and_default_values_are_accepted(app: Any, submissions: list[Any]) -> None:
    defaults = {"n": 1, "best_of": 1, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "suffix": None, "stop": None, "seed": None, "user": "me", "echo": False,
                "temperature": None, "top_p": None, "stream": False, "response_format": {"type": "text"},
                "use_beam_search": False, "length_penalty": 1.0, "early_stopping": True,
                "prompt_logprobs": None, "truncate_prompt_tokens": None}
    response = call(app, "POST", "/v1/completions", json={**_HELLO, **defaults, "max_tokens": 2})
    assert response.status_code == 200, response.text
    chat = {"n": 1, "logprobs": False, "top_logprobs": None, "tools": None, "tool_choice": "none",
            "parallel_tool_calls": True, "store": False, "max_completion_tokens": 2}
    response = call(app, "POST", "/v1/chat/completions", json={**_CHAT, **chat})
    assert response.status_code == 200, response.text
    assert len(submissions) == 2


BAD_COMPLETIONS = [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"max_tokens": 4}, "prompt", "required"),
    ({**_HELLO, "temperature": "hot"}, "temperature", "temperature"),
    ({**_HELLO, "max_tokens": "7"}, "max_tokens", "max_tokens"),
    ({**_HELLO, "stream": "yes"}, "stream", "stream"),
    ({**_HELLO, "top_k": 2.5}, "top_k", "top_k"),
    ({**_HELLO, "seed": True}, "seed", "seed"),
    ({**_HELLO, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({**_HELLO, "temperature": -1.0}, "temperature", "temperature"),
    ({**_HELLO, "top_p": 1.5}, "top_p", "top_p"),
    ({**_HELLO, "stop": [""]}, "stop", "stop"),
    ({**_HELLO, "stop": 5}, "stop", "expected str or list[str]"),
    ({**_HELLO, "stop_token_ids": [1.5]}, "stop_token_ids[0]", "integer"),
    ({**_HELLO, "seed": 2**70}, "seed", "64 bits"),
    ({**_HELLO, "model": "gpt-4"}, "model", "gpt-4"),
    ({**_HELLO, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({**_HELLO, "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus", "bogus"),
    ({**_HELLO, "frobnicate": 1}, "frobnicate", "Unrecognized"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": 42}, "prompt", "token ids"),
    ({"prompt": [1, "a"]}, "prompt", "token ids"),
    ({"prompt": [[1, 2], []]}, "prompt[1]", "empty"),
    ({"prompt": [1, 2, 100000]}, "prompt", "100000"),
    ({"prompt": [[1, 2], [3, 100000]]}, "prompt[1]", "100000"),
    ({"prompt": "word " * MAX_SEQ_LEN}, "prompt", "maximum context length"),
    ({"prompt": "Hello", "max_tokens": MAX_SEQ_LEN}, "max_tokens", "maximum context length"),
]


@pytest.mark.parametrize(("body", "param", "word"), BAD_COMPLETIONS)
def test_bad_completion_request(app: Any, submissions: list[Any], body: Any, param: str | None, word: str) -> None:
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    assert_error(call(app, "POST", "/v1/completions", **kwargs), param, word)
    assert not submissions


BAD_CHATS = [
    ({"messages": []}, "messages", "at least one"),
    ({}, "messages", "required"),
    ({"messages": "hi"}, "messages", "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "required"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "wizard"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected str"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "image_url"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls", "tool_calls"),
    ({**_CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({**_CHAT, "max_tokens": -3}, "max_tokens", "at least 1"),
    ({**_CHAT, "max_tokens": MAX_SEQ_LEN}, "max_tokens", "maximum context length"),
    ({**_CHAT, "continue_final_message": True}, "continue_final_message", "assistant"),
    ({**_CHAT, "model": "nope"}, "model", "nope"),
]


@pytest.mark.parametrize(("body", "param", "word"), BAD_CHATS)
def test_bad_chat_request(app: Any, submissions: list[Any], body: Any, param: str, word: str) -> None:
    assert_error(call(app, "POST", "/v1/chat/completions", json=body), param, word)
    assert not submissions


def test_no_chat_template(model_dir: str) -> None:
    llm = make_llm(model_dir)  # its own tokenizer object
    try:
        llm.tokenizer.chat_template = None
        app = build_app(llm, SERVED_NAME)
        assert_error(call(app, "POST", "/v1/chat/completions", json=_CHAT), "messages", "chat template")
    finally:
        llm.shutdown()


def test_shut_down_engine_is_503(model_dir: str) -> None:
    llm = make_llm(model_dir)
    app = build_app(llm, SERVED_NAME)
    llm.shutdown()
    response = call(app, "POST", "/v1/completions", json=_HELLO)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable_error"
