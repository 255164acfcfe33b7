"""The OpenAI routes on a tiny random Llama through httpx's ASGI transport."""

from __future__ import annotations

from typing import Any

import pytest
from serve_helpers import MAX_SEQ_LEN, SERVED_NAME, call, sse_events

from rtllm import LLM, SamplingParams


def complete(app: Any, **body: Any) -> dict[str, Any]:
    response = call(app, "POST", "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(app: Any, path: str, **body: Any) -> list[Any]:
    response = call(app, "POST", path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_completion_matches_llm_api(app: Any, llm: LLM) -> None:
    body = complete(app, model=SERVED_NAME, prompt="Hello, my name is", max_tokens=12, ignore_eos=True)
    assert body["object"] == "text_completion" and body["model"] == SERVED_NAME
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    expected = llm.generate("Hello, my name is", SamplingParams(max_tokens=12, ignore_eos=True))
    assert choice["text"] == expected.outputs[0].text
    assert choice["finish_reason"] == "length"
    n_prompt = len(expected.prompt_token_ids)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}


def test_prompt_forms_and_echo(app: Any, llm: LLM) -> None:
    ids = llm.tokenizer.encode("The capital of France is")
    text = complete(app, prompt="The capital of France is", max_tokens=6, ignore_eos=True)["choices"][0]["text"]
    by_ids = complete(app, prompt=ids, max_tokens=6, ignore_eos=True)
    assert by_ids["choices"][0]["text"] == text
    many = complete(app, prompt=["The capital of France is", "Hello"], max_tokens=6, ignore_eos=True)
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == text
    assert many["usage"]["completion_tokens"] == 12
    many_ids = complete(app, prompt=[ids, ids[:3]], max_tokens=6, ignore_eos=True)
    assert many_ids["choices"][0]["text"] == text and len(many_ids["choices"]) == 2
    echoed = complete(app, prompt="The capital of France is", max_tokens=6, ignore_eos=True, echo=True)
    assert echoed["choices"][0]["text"] == "The capital of France is" + text


def test_seeded_sampling_is_reproducible(app: Any) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
            "seed": 7, "ignore_eos": True}
    first, second = complete(app, **body), complete(app, **body)
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_stop_string(app: Any) -> None:
    full = complete(app, prompt="Hello, my name is", max_tokens=40, ignore_eos=True)["choices"][0]["text"]
    starts = [i for i in range(1, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].isalpha()]
    if not starts:
        pytest.skip("the random model produced no ASCII word to stop on")
    stop = full[starts[0]:starts[0] + 3]
    body = complete(app, prompt="Hello, my name is", max_tokens=40, ignore_eos=True, stop=[stop])
    choice = body["choices"][0]
    assert choice["text"] == full[:full.find(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


@pytest.mark.parametrize("prompt", ["Hello, my name is", "日本語のテキスト 🙂", "café crème"])
def test_stream_deltas_join_to_the_plain_text(app: Any, prompt: str) -> None:
    body = {"prompt": prompt, "max_tokens": 48, "ignore_eos": True, "temperature": 1.0, "seed": 3}
    plain = complete(app, **body)["choices"][0]
    chunks = stream(app, "/v1/completions", **body)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_random_output_has_multibyte_characters(app: Any, llm: LLM) -> None:
    # The byte-level tokenizer splits these characters over several tokens; streamed
    # text must still be what the tokenizer decodes from all the tokens at once.
    body = {"prompt": "日本語のテキスト 🙂", "max_tokens": 64, "ignore_eos": True, "temperature": 1.0, "seed": 11}
    chunks = stream(app, "/v1/completions", **body)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    result = llm.generate("日本語のテキスト 🙂", SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0, seed=11))
    assert text == llm.tokenizer.decode(result.outputs[0].token_ids, skip_special_tokens=True)
    assert any(ord(ch) > 127 and ch != "\ufffd" for ch in text)


def test_stream_include_usage_and_echo(app: Any) -> None:
    chunks = stream(app, "/v1/completions", prompt=["Hello", "Once upon"], max_tokens=5, ignore_eos=True,
                    echo=True, stream_options={"include_usage": True})
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in content)
    texts = {0: "", 1: ""}
    for c in content:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    plain = complete(app, prompt=["Hello", "Once upon"], max_tokens=5, ignore_eos=True, echo=True)
    assert texts == {c["index"]: c["text"] for c in plain["choices"]}


def test_chat_completion(app: Any, llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    response = call(app, "POST", "/v1/chat/completions",
                    json={"model": SERVED_NAME, "messages": messages, "max_completion_tokens": 8, "ignore_eos": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    rendered = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    expected = llm.generate(rendered, SamplingParams(max_tokens=8, ignore_eos=True, add_special_tokens=False))
    assert choice["message"]["content"] == expected.outputs[0].text
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_chat_without_generation_prompt_and_text_parts(app: Any, llm: LLM) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    response = call(app, "POST", "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": parts}], "max_tokens": 4,
                          "add_generation_prompt": False, "ignore_eos": True,
                          "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(response.text)
    usage = events[-2]["usage"]
    expected = llm.tokenizer.encode("<|user|>Hi\nthere\n", add_special_tokens=False)
    assert usage["prompt_tokens"] == len(expected)


def test_chat_stream(app: Any) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me 🙂"}], "max_tokens": 24, "ignore_eos": True,
            "temperature": 1.0, "seed": 5}
    plain = call(app, "POST", "/v1/chat/completions", json=body).json()["choices"][0]
    chunks = stream(app, "/v1/chat/completions", **body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["message"]["content"]


def test_default_chat_max_tokens_fills_the_context(app: Any) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    usage = sse_events(call(app, "POST", "/v1/chat/completions", json=body).text)[-2]["usage"]
    assert usage["total_tokens"] == MAX_SEQ_LEN


def test_models_version(app: Any, model_dir: str) -> None:
    models = call(app, "GET", "/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == SERVED_NAME and models["data"][0]["root"] == model_dir
    assert models["data"][0]["max_model_len"] == MAX_SEQ_LEN
    import rtllm

    assert call(app, "GET", "/version").json() == {"version": rtllm.__version__}
