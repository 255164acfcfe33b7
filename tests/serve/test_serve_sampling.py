"""OpenAI request -> SamplingParams: every mapped parameter, its 400s, and the engine-pending ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from serve_helpers import SERVED_NAME, call

import rtllm.sampling_params
from rtllm import LLM, SamplingParams
from rtllm.serve import build_app
from rtllm.serve import sampling as serve_sampling
from rtllm.serve.errors import OpenAIError
from rtllm.serve.protocol import ChatCompletionRequest, CompletionRequest
from rtllm.serve.sampling import check_unsupported, to_sampling_params

VOCAB = 420  # the tiny model's logits width
_HELLO = {"prompt": "Hello"}
_CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def completion_params(max_tokens: int = 16, **body: Any) -> SamplingParams:
    request = CompletionRequest.model_validate({**_HELLO, **body})
    check_unsupported(request)
    return to_sampling_params(request, max_tokens, True, VOCAB)


def chat_params(max_tokens: int = 16, **body: Any) -> SamplingParams:
    request = ChatCompletionRequest.model_validate({**_CHAT, **body})
    check_unsupported(request)
    return to_sampling_params(request, max_tokens, False, VOCAB)


def test_defaults_leave_the_new_fields_off() -> None:
    for params in (completion_params(), chat_params()):
        default = SamplingParams()
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
                     "no_repeat_ngram_size", "bad", "embedding_bias", "logprobs", "guided_decoding", "n",
                     "best_of", "use_beam_search", "length_penalty", "early_stopping", "prompt_logprobs",
                     "truncate_prompt_tokens"):
            assert getattr(params, name) == getattr(default, name), name


@pytest.mark.parametrize("build", [completion_params, chat_params])
def test_penalties_and_bans_reach_sampling_params(build: Any) -> None:
    params = build(presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.3, min_p=0.1,
                   min_tokens=3, no_repeat_ngram_size=2, bad_words=["Paris", "Bob"])
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -1.25
    assert params.repetition_penalty == 1.3 and params.min_p == 0.1
    assert params.min_tokens == 3 and params.no_repeat_ngram_size == 2
    assert params.bad == ["Paris", "Bob"]
    assert build(bad="x").bad == "x"  # TensorRT-LLM's name
    assert build(presence_penalty=1).presence_penalty == 1.0  # an integer is a number too


def test_logit_bias_becomes_an_embedding_bias_of_vocab_size() -> None:
    bias = completion_params(logit_bias={"5": 10, "419": -100, "0": 0.5}).embedding_bias
    assert isinstance(bias, torch.Tensor) and bias.shape == (VOCAB,) and bias.dtype == torch.float32
    expected = torch.zeros(VOCAB)
    expected[5], expected[419], expected[0] = 10, -100, 0.5
    assert torch.equal(bias, expected)
    assert chat_params(logit_bias={"7": -3.5}).embedding_bias[7] == -3.5
    assert completion_params(logit_bias={}).embedding_bias is None


def test_logprobs_counts() -> None:
    assert completion_params(logprobs=3).logprobs == 3
    assert completion_params(logprobs=0).logprobs == 0
    assert completion_params().logprobs is None
    assert chat_params(logprobs=True, top_logprobs=4).logprobs == 4
    assert chat_params(logprobs=True).logprobs == 0
    assert chat_params(logprobs=False, top_logprobs=0).logprobs is None
    assert chat_params(top_logprobs=0).logprobs is None


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("body", "kind", "spec"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA,
                                                                      "strict": True}}},
         "json", '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'),
        ({"guided_json": SCHEMA}, "json", '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'),
        ({"guided_json": '{"type": "object"}'}, "json", '{"type":"object"}'),
        ({"guided_regex": r"\d+"}, "regex", r"\d+"),
        ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
        ({"guided_choice": ["yes", 'a "b"', "c\\d", "yes"]}, "grammar", r'root ::= "yes" | "a \"b\"" | "c\\d"'),
        ({"response_format": {"type": "text"}}, None, None),
    ],
)
def test_structured_output_options(body: dict[str, Any], kind: str | None, spec: str | None) -> None:
    for build in (completion_params, chat_params):
        guide = build(**body).guided_decoding
        if kind is None:
            assert guide is None
        else:
            assert guide is not None and (guide.kind, guide.spec) == (kind, spec)


@pytest.fixture
def engine_pending_lifted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the engine applies every pending parameter (both refusals removed)."""
    monkeypatch.setattr(serve_sampling, "_ENGINE_PENDING", {})
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset())


@pytest.mark.usefixtures("engine_pending_lifted")
def test_engine_pending_parameters_are_mapped() -> None:
    body = {"n": 2, "best_of": 3, "use_beam_search": True, "length_penalty": 0.7, "early_stopping": False,
            "truncate_prompt_tokens": 5}
    params = completion_params(**body, prompt_logprobs=2)
    assert (params.n, params.best_of, params.use_beam_search) == (2, 3, True)
    assert (params.length_penalty, params.early_stopping) == (0.7, False)
    assert (params.prompt_logprobs, params.truncate_prompt_tokens) == (2, 5)
    chat = chat_params(**body)
    assert (chat.n, chat.best_of, chat.use_beam_search, chat.truncate_prompt_tokens) == (2, 3, True, 5)


@pytest.mark.parametrize(("name", "value"), [("n", 3), ("best_of", 2), ("use_beam_search", True),
                                           ("length_penalty", 0.5), ("early_stopping", False),
                                           ("prompt_logprobs", 0), ("truncate_prompt_tokens", 3)])
def test_engine_pending_refusal_follows_the_engine(monkeypatch: pytest.MonkeyPatch, name: str, value: Any) -> None:
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset({name}))
    with pytest.raises(OpenAIError) as info:
        completion_params(**{name: value})
    assert (info.value.param, info.value.code) == (name, "unsupported_parameter")
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset())
    assert getattr(completion_params(**{name: value}), name) == value


def test_echo_with_logprobs_asks_for_prompt_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset())
    assert completion_params(echo=True, logprobs=2).prompt_logprobs == 2
    assert completion_params(echo=True, logprobs=2, prompt_logprobs=4).prompt_logprobs == 4
    assert completion_params(echo=True).prompt_logprobs is None
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset({"prompt_logprobs"}))
    with pytest.raises(OpenAIError) as info:
        completion_params(echo=True, logprobs=2)
    assert info.value.param == "echo"


@pytest.mark.parametrize(("body", "param"), [({"presence_penalty": 2.5}, "presence_penalty"),
                                             ({"min_tokens": 17}, "min_tokens"),
                                             ({"logprobs": 21}, "logprobs")])
def test_bad_values_raise_with_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        completion_params(**body)
    assert info.value.status == 400 and info.value.param == param


# ---- over HTTP -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(llm: LLM) -> Any:
    return build_app(llm, SERVED_NAME)


@pytest.fixture
def submitted(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """(request, result) of everything that reached the executor during the test."""
    seen: list[Any] = []
    executor = llm.executor
    original = executor.submit

    def spy(request: Any) -> Any:
        result = original(request)
        seen.append((request, result))
        return result

    monkeypatch.setattr(executor, "submit", spy)
    yield seen


def test_parameters_reach_the_engine(app: Any, submitted: list[Any]) -> None:
    body = {"presence_penalty": 0.25, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_p": 0.05,
            "min_tokens": 2, "no_repeat_ngram_size": 3, "bad_words": ["xyz"], "logit_bias": {"9": 2},
            "max_tokens": 4, "temperature": 1.0, "seed": 7}
    response = call(app, "POST", "/v1/completions", json={**_HELLO, **body, "logprobs": 2})
    assert response.status_code == 200, response.text
    response = call(app, "POST", "/v1/chat/completions",
                    json={**_CHAT, **body, "logprobs": True, "top_logprobs": 5, "guided_regex": "[ab]+"})
    assert response.status_code == 200, response.text
    (completion, _), (chat, _) = submitted
    for request, logprobs in ((completion, 2), (chat, 5)):
        params = request.sampling_params
        assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.25, 0.5, 1.1)
        assert (params.min_p, params.min_tokens, params.no_repeat_ngram_size) == (0.05, 2, 3)
        assert params.bad == ["xyz"] and params.logprobs == logprobs
        assert params.embedding_bias.shape == (VOCAB,) and params.embedding_bias[9] == 2
        assert float(params.embedding_bias.abs().sum()) == 2
    assert chat.sampling_params.guided_decoding.regex == "[ab]+"


def test_logit_bias_steers_greedy_decoding(app: Any, submitted: list[Any]) -> None:
    response = call(app, "POST", "/v1/completions", json={**_HELLO, "max_tokens": 5, "logit_bias": {"77": 100}})
    assert response.status_code == 200, response.text
    assert submitted[0][1].outputs[0].token_ids == [77] * 5
    free = call(app, "POST", "/v1/completions", json={**_HELLO, "max_tokens": 1}).json()
    first = submitted[1][1].outputs[0].token_ids[0]
    banned = call(app, "POST", "/v1/completions",
                  json={**_HELLO, "max_tokens": 1, "logit_bias": {str(first): -100}}).json()
    assert submitted[2][1].outputs[0].token_ids[0] != first
    assert banned["choices"][0]["text"] != free["choices"][0]["text"]


BAD = [
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty", "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"min_p": 1.5}, "min_p", "min_p"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "max_tokens"),
    ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size", "no_repeat_ngram_size"),
    ({"bad_words": [""]}, "bad_words", "bad"),
    ({"bad_words": ["a"], "bad": ["b"]}, "bad", "bad_words"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "abc"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", str(VOCAB)),
    ({"logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": "up"}}, "logit_bias.5", "logit_bias"),
    ({"logprobs": 21}, "logprobs", "20"),
    ({"logprobs": -1}, "logprobs", "logprobs"),
    ({"logprobs": True}, "logprobs", "logprobs"),
    ({"n": 0}, "n", "n"),
    ({"n": 2, "best_of": 1}, "best_of", "best_of"),
]
BAD_CHAT = [
    ({"top_logprobs": 3}, "top_logprobs", "logprobs=true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"logprobs": 1}, "logprobs", "logprobs"),
    ({"presence_penalty": -2.01}, "presence_penalty", "presence_penalty"),
    ({"logit_bias": {"5000": 1}}, "logit_bias", "5000"),
]


@pytest.mark.parametrize(("body", "param", "word"), BAD)
def test_bad_completion_values(app: Any, submitted: list[Any], body: dict[str, Any], param: str, word: str) -> None:
    response = call(app, "POST", "/v1/completions", json={**_HELLO, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and word in error["message"], error
    assert not submitted


@pytest.mark.parametrize(("body", "param", "word"), BAD_CHAT)
def test_bad_chat_values(app: Any, submitted: list[Any], body: dict[str, Any], param: str, word: str) -> None:
    response = call(app, "POST", "/v1/chat/completions", json={**_CHAT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and word in error["message"], error
    assert not submitted
