"""OpenAI request -> SamplingParams: every mapped parameter, its 400s, and the engine-pending ones."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from serve_helpers import SERVED_NAME, call, make_llm, sse_events

import rtllm.sampling_params
from rtllm import LLM, SamplingParams
from rtllm.executor.result import GenerationResult, Logprob, Response
from rtllm.serve import build_app
from rtllm.serve import sampling as serve_sampling
from rtllm.serve.errors import OpenAIError
from rtllm.serve.protocol import ChatCompletionRequest, CompletionRequest
from rtllm.serve.sampling import check_unsupported, engine_refuses, to_sampling_params

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
    monkeypatch.setattr(serve_sampling, "engine_refuses", lambda _: False)
    monkeypatch.setattr(rtllm.sampling_params, "_NOT_YET_WIRED", frozenset(), raising=False)


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


PENDING = [("n", 3), ("best_of", 2), ("use_beam_search", True), ("length_penalty", 0.5),
           ("early_stopping", False), ("prompt_logprobs", 0), ("truncate_prompt_tokens", 3)]


@pytest.mark.parametrize(("name", "value"), PENDING)
def test_engine_pending_refusal(monkeypatch: pytest.MonkeyPatch, name: str, value: Any) -> None:
    monkeypatch.setattr(serve_sampling, "engine_refuses", lambda _: True)
    with pytest.raises(OpenAIError) as info:
        completion_params(**{name: value})
    assert (info.value.param, info.value.code) == (name, "unsupported_parameter")
    assert name in info.value.message


@pytest.mark.parametrize(("name", "value"), PENDING)
def test_engine_refuses_asks_sampling_params(name: str, value: Any) -> None:
    try:
        SamplingParams(**{name: value})
        refused = False
    except NotImplementedError:
        refused = True
    assert serve_sampling.engine_refuses(name) == refused


@pytest.mark.usefixtures("engine_pending_lifted")
def test_echo_with_logprobs_asks_for_prompt_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert completion_params(echo=True, logprobs=2).prompt_logprobs == 2
    assert completion_params(echo=True, logprobs=2, prompt_logprobs=4).prompt_logprobs == 4
    assert completion_params(echo=True).prompt_logprobs is None
    monkeypatch.setattr(serve_sampling, "engine_refuses", lambda name: name == "prompt_logprobs")
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


# ---- several outputs per prompt (n > 1) -------------------------------------------------


def _lp(token_id: int, value: float) -> dict[int, Logprob]:
    return {token_id: Logprob(value, 1)}


def _script(prompt_ids: list[int]) -> list[Response]:
    """Two outputs whose updates interleave; the second ends on a token without text."""
    return [
        Response([5], "a", index=0, logprobs=[_lp(5, -0.5)], request_finished=False,
                 prompt_logprobs=[None] + [_lp(t, -1.0) for t in prompt_ids[1:]]),
        Response([6, 7], "bc", index=1, logprobs=[_lp(6, -0.25), _lp(7, -0.75)], request_finished=False),
        Response([8], "d", index=0, finished=True, finish_reason="length", logprobs=[_lp(8, -1.5)],
                 request_finished=False),
        Response([9], "", index=1, finished=True, finish_reason="stop", stop_reason="!",
                 logprobs=[_lp(9, -2.0)], request_finished=True),
    ]


@pytest.fixture
def two_outputs(llm: LLM, monkeypatch: pytest.MonkeyPatch, engine_pending_lifted: None) -> None:
    """The engine accepts n > 1 and answers every request with :func:`_script`."""
    ids = itertools.count(10_000)

    def fake(inputs: dict[str, Any], params: SamplingParams, streaming: bool = False) -> GenerationResult:
        assert params.n == 2
        prompt_ids = inputs["prompt_token_ids"]
        result = GenerationResult(next(ids), None, prompt_ids, lambda _: None)
        for response in _script(prompt_ids):
            result._push(response)
        return result

    monkeypatch.setattr(llm, "generate_async", fake)


def _by_index(choices: list[dict[str, Any]], key: str) -> dict[int, Any]:
    merged: dict[int, Any] = {}
    for choice in choices:
        value = choice[key]
        if value not in (None, ""):
            merged[choice["index"]] = merged.get(choice["index"], type(value)()) + value
    return merged


@pytest.mark.usefixtures("two_outputs")
def test_n_completions_one_choice_per_output(app: Any, llm: LLM) -> None:
    body = {"prompt": ["Hello", "Hi there"], "n": 2, "max_tokens": 4, "logprobs": 0, "prompt_logprobs": 0}
    response = call(app, "POST", "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [(c["index"], c["text"], c["finish_reason"], c["stop_reason"]) for c in choices] == [
        (0, "ad", "length", None), (1, "bc", "stop", "!"), (2, "ad", "length", None), (3, "bc", "stop", "!")]
    assert choices[1]["logprobs"]["token_logprobs"] == [-0.25, -0.75, -2.0]
    assert choices[1]["logprobs"]["tokens"] == [llm.tokenizer.decode([t], skip_special_tokens=False)
                                                for t in (6, 7, 9)]
    assert choices[2]["prompt_logprobs"][0] is None and len(choices[2]["prompt_logprobs"]) == 5
    assert response.json()["usage"]["completion_tokens"] == 10
    events = sse_events(call(app, "POST", "/v1/completions", json={**body, "stream": True}).text)[:-1]
    streamed = [c for e in events for c in e["choices"]]
    assert _by_index(streamed, "text") == {c["index"]: c["text"] for c in choices}
    assert {c["index"]: c["finish_reason"] for c in streamed if c["finish_reason"]} == {
        0: "length", 1: "stop", 2: "length", 3: "stop"}
    tokens = {}
    for c in streamed:
        if c["logprobs"]:
            tokens.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    assert tokens == {c["index"]: c["logprobs"]["token_logprobs"] for c in choices}
    assert sum(1 for c in streamed if c.get("prompt_logprobs")) == 4  # once per choice


@pytest.mark.usefixtures("two_outputs")
def test_n_chat_one_choice_per_output(app: Any) -> None:
    body = {**_CHAT, "n": 2, "max_tokens": 4, "logprobs": True}
    response = call(app, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "ad", "length"), (1, "bc", "stop")]
    assert [t["logprob"] for t in choices[1]["logprobs"]["content"]] == [-0.25, -0.75, -2.0]
    events = sse_events(call(app, "POST", "/v1/chat/completions", json={**body, "stream": True}).text)[:-1]
    streamed = [c for e in events for c in e["choices"]]
    assert [c["delta"] for c in streamed[:2]] == [{"role": "assistant", "content": ""}] * 2
    texts: dict[int, str] = {}
    logprobs: dict[int, list[float]] = {}
    for c in streamed:
        texts[c["index"]] = texts.get(c["index"], "") + c["delta"].get("content", "")
        if c["logprobs"]:
            logprobs.setdefault(c["index"], []).extend(t["logprob"] for t in c["logprobs"]["content"])
    assert texts == {0: "ad", 1: "bc"}
    assert logprobs == {0: [-0.5, -1.5], 1: [-0.25, -0.75, -2.0]}


@pytest.mark.skipif(engine_refuses("n"), reason="the engine does not do n > 1 yet")
def test_n_with_the_engine(app: Any) -> None:
    sampling = {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    body = {"prompt": ["Hello", "Hi there"], **sampling}
    choices = call(app, "POST", "/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    events = sse_events(call(app, "POST", "/v1/completions", json={**body, "stream": True}).text)[:-1]
    assert _by_index([c for e in events for c in e["choices"]], "text") == {c["index"]: c["text"] for c in choices}
    chat = call(app, "POST", "/v1/chat/completions", json={**_CHAT, **sampling}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["usage"]["completion_tokens"] == 12


@pytest.mark.skipif(engine_refuses("use_beam_search"), reason="the engine has no beam search yet")
def test_beam_search_with_the_engine(model_dir: str, app: Any) -> None:
    body = {"prompt": "Hello", "max_tokens": 5, "use_beam_search": True, "n": 2, "ignore_eos": True}
    too_wide = call(app, "POST", "/v1/completions", json=body)  # the shared LLM has max_beam_width=1
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "n"
    refused = call(app, "POST", "/v1/completions", json={**body, "logprobs": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    llm = make_llm(model_dir, max_beam_width=3)
    try:
        wide = build_app(llm, SERVED_NAME)
        expected = llm.generate("Hello", SamplingParams(max_tokens=5, use_beam_search=True, n=2, best_of=3,
                                                        length_penalty=0.5, ignore_eos=True))
        body = {**body, "best_of": 3, "length_penalty": 0.5}
        choices = call(app=wide, method="POST", path="/v1/completions", json=body).json()["choices"]
        assert [c["text"] for c in choices] == [out.text for out in expected.outputs]
        events = sse_events(call(wide, "POST", "/v1/completions", json={**body, "stream": True}).text)[:-1]
        assert _by_index([c for e in events for c in e["choices"]], "text") == {
            i: out.text for i, out in enumerate(expected.outputs)}
    finally:
        llm.shutdown()
