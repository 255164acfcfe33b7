"""Tests for rtllm.sampling_params.SamplingParams validation and derived properties."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from rtllm import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_tokens == 32
    assert p.temperature is None and p.top_k is None and p.top_p is None
    assert p.n == 1
    assert p.is_greedy
    assert p.stop_strings == []
    assert not p.ignore_eos


@pytest.mark.parametrize("value", [0, -1, 1.5, 2.0, True, "3", None])
def test_bad_max_tokens(value: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens") as info:
        SamplingParams(max_tokens=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [1, 4096])
def test_good_max_tokens(value: int) -> None:
    assert SamplingParams(max_tokens=value).max_tokens == value


@pytest.mark.parametrize("value", [-0.1, -1, "1.0", [1.0]])
def test_bad_temperature(value: Any) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=value)


@pytest.mark.parametrize("value", [0, 0.0, 0.7, 1, 2.5])
def test_good_temperature(value: float) -> None:
    assert SamplingParams(temperature=value).temperature == value


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.0001, 2, "0.5", float("nan")])
def test_bad_top_p(value: Any) -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=value)


@pytest.mark.parametrize("value", [1e-6, 0.5, 1.0, 1])
def test_good_top_p(value: float) -> None:
    assert SamplingParams(top_p=value).top_p == value


@pytest.mark.parametrize("value", [-1, 1.5, "5", True])
def test_bad_top_k(value: Any) -> None:
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=value)


@pytest.mark.parametrize("value", [0, 1, 50])
def test_good_top_k(value: int) -> None:
    assert SamplingParams(top_k=value).top_k == value


@pytest.mark.parametrize("value", ["1", 1.0, True])
def test_bad_seed(value: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=value)


@pytest.mark.parametrize("name", ["end_id", "pad_id"])
@pytest.mark.parametrize("value", [-1, "2", 2.0, False])
def test_bad_token_ids(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_good_token_ids() -> None:
    p = SamplingParams(end_id=0, pad_id=5, stop_token_ids=[0, 7])
    assert (p.end_id, p.pad_id, p.stop_token_ids) == (0, 5, [0, 7])


@pytest.mark.parametrize("value", [2, 3, 10])
def test_n_greater_than_one(value: int) -> None:
    assert SamplingParams(n=value).n == value
    assert SamplingParams(n=value, best_of=value + 1).best_of == value + 1


@pytest.mark.parametrize("value", [0, -1, 1.0, "1"])
def test_bad_n(value: Any) -> None:
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=value)


@pytest.mark.parametrize("value", ["", [""], ["a", ""], [1], ["a", None], 5, {"a"}, b"stop"])
def test_bad_stop(value: Any) -> None:
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, []), ("x", ["x"]), (["a", "bc"], ["a", "bc"]), (("a", "b"), ["a", "b"]), ([], [])],
)
def test_stop_strings(value: Any, expected: list[str]) -> None:
    p = SamplingParams(stop=value)
    assert p.stop_strings == expected
    assert isinstance(p.stop_strings, list)


def test_stop_strings_is_a_copy_of_the_list() -> None:
    stops = ["a"]
    p = SamplingParams(stop=stops)
    stops.append("b")
    assert p.stop_strings == ["a"]


@pytest.mark.parametrize("value", [[-1], ["a"], [1.0], [True], [1, -2], "ab"])
def test_bad_stop_token_ids(value: Any) -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=value)


def test_stop_token_ids_not_a_list() -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=5)


def test_nan_temperature_rejected() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({}, True),
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_p": 0.5, "top_k": 10}, True),
        ({"top_k": 1}, True),
        ({"top_k": 1, "temperature": 1.5}, True),
        ({"top_k": 0}, True),  # 0 disables top-k: nothing is set, so greedy (as TensorRT-LLM)
        ({"temperature": 1.0}, False),
        ({"temperature": 0.5}, False),
        ({"top_p": 0.9}, False),
        ({"top_p": 1.0}, False),
        ({"top_k": 5}, False),
        ({"top_k": 0, "temperature": 0.8}, False),
        ({"seed": 3}, True),
    ],
)
def test_is_greedy(kwargs: dict[str, Any], greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_error_messages_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -2"):
        SamplingParams(temperature=-2)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 0.*got -3"):
        SamplingParams(top_k=-3)


# --- Fields the engine does not apply yet (validated, then rejected) --------------------

NEW_FIELDS = {
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "no_repeat_ngram_size",
    "bad",
    "bad_token_ids",
    "min_tokens",
    "embedding_bias",
    "logits_processor",
    "truncate_prompt_tokens",
    "exclude_input_from_output",
    "return_context_logits",
    "return_generation_logits",
    "logprobs",
    "prompt_logprobs",
    "best_of",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
}


nan, inf = float("nan"), float("inf")
BAD_VALUES: list[tuple[str, Any]] = [
    *[("min_p", v) for v in (-0.1, 1.5, nan, "0.1", True, None)],
    *[("repetition_penalty", v) for v in (0, -1.0, inf, nan, "1.2", None, True)],
    *[("presence_penalty", v) for v in (2.5, -3, nan, inf, "0.5", None)],
    *[("frequency_penalty", v) for v in (2.01, -2.5, nan, False)],
    *[("no_repeat_ngram_size", v) for v in (-1, 2.0, True, None)],
    *[("bad", v) for v in ("", [""], [1], 5, ["a", None], b"x")],
    *[("bad_token_ids", v) for v in ([-1], ["a"], [True], 5, "ab")],
    *[("min_tokens", v) for v in (-1, 1.5, True, None)],
    *[("logits_processor", v) for v in (5, [print, 5], "f")],
    *[("truncate_prompt_tokens", v) for v in (0, -1, 1.5, True)],
    *[("exclude_input_from_output", v) for v in (1, None, "yes")],
    *[("return_context_logits", v) for v in (0, None)],
    *[("return_generation_logits", v) for v in (1, "True")],
    *[("logprobs", v) for v in (-1, 1.5, True, "2")],
    *[("prompt_logprobs", v) for v in (-1, 2.0)],
    *[("best_of", v) for v in (0, 1.5, True)],
    *[("use_beam_search", v) for v in (1, None)],
    *[("length_penalty", v) for v in (nan, inf, "1", None, True)],
    *[("early_stopping", v) for v in (-1, 1.5, None, "never")],
    *[("embedding_bias", v) for v in ([0.0, 1.0], torch.zeros(2, 2), torch.zeros(3).long())],
    *[("embedding_bias", torch.tensor(v)) for v in ([0.0, nan], [inf], 1.0)],
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_new_field_values(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be ") as info:
        SamplingParams(**{name: value})
    assert repr(value) in str(info.value)


GOOD_VALUES: list[tuple[str, Any]] = [
    *[("min_p", v) for v in (0.1, 1.0, 1)],
    *[("repetition_penalty", v) for v in (1.2, 0.5, 3)],
    *[("presence_penalty", v) for v in (-2, 2.0, 0.5)],
    *[("frequency_penalty", v) for v in (-1.5, 2)],
    ("no_repeat_ngram_size", 3),
    *[("bad", v) for v in ("x", ["a", "b"], ("a",))],
    ("bad_token_ids", [0, 5]),
    *[("min_tokens", v) for v in (1, 32)],
    *[("embedding_bias", v) for v in (torch.zeros(10), torch.ones(4, dtype=torch.float16))],
    *[("logits_processor", v) for v in (print, [print, len])],
    ("truncate_prompt_tokens", 1),
    ("exclude_input_from_output", False),
    ("return_context_logits", True),
    ("return_generation_logits", True),
    *[("logprobs", v) for v in (0, 5)],
    ("prompt_logprobs", 0),
    *[("best_of", v) for v in (1, 4)],
    ("use_beam_search", True),
    *[("length_penalty", v) for v in (0.5, -1, 2.0)],
    *[("early_stopping", v) for v in (False, 0, 2)],
]


@pytest.mark.parametrize(("name", "value"), GOOD_VALUES)
def test_valid_new_field_is_kept(name: str, value: Any) -> None:
    assert getattr(SamplingParams(**{name: value}), name) is value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetition_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "min_p": 0},
        {"bad_words": [], "bad_token_ids": [], "logits_processor": []},
        {"early_stopping": True, "length_penalty": 1, "exclude_input_from_output": True},
        {"n": 1, "min_tokens": 0, "no_repeat_ngram_size": 0, "use_beam_search": False},
        {"return_context_logits": False, "return_generation_logits": False, "logprobs": None},
    ],
)
def test_default_values_given_explicitly_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_invalid_value_among_valid_ones() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(n=2, top_p=5.0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(repetition_penalty=1.2, min_tokens=-1)


def test_min_tokens_at_most_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"^min_tokens must be <= max_tokens \(8\), got 9$"):
        SamplingParams(max_tokens=8, min_tokens=9)


def test_best_of_at_least_n() -> None:
    with pytest.raises(ValueError, match=r"^best_of must be an integer >= n \(3\).*got 2$"):
        SamplingParams(n=3, best_of=2)


def test_error_messages_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"presence_penalty must be a number in \[-2, 2\], got 3"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(ValueError, match=r"repetition_penalty must be a finite number > 0, got 0"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\], got -1"):
        SamplingParams(min_p=-1)


def test_vllm_aliases() -> None:
    p = SamplingParams(bad_words=["x", "y"], logits_processors=[print])
    assert p.bad == ["x", "y"] and p.bad_words is None
    assert p.bad_strings == ["x", "y"]
    assert p.logits_processor == [print] and p.logits_processors is None
    # The alias was folded away, so replace() does not see both names.
    assert dataclasses.replace(p, max_tokens=3).bad == ["x", "y"]
    assert SamplingParams(bad="z").bad_strings == ["z"]


def test_vllm_alias_is_validated_like_its_field() -> None:
    assert SamplingParams(bad_words="x").bad == "x"
    assert SamplingParams(logits_processors=print).logits_processor is print
    with pytest.raises(ValueError, match="^bad must be"):
        SamplingParams(bad_words=[3])


@pytest.mark.parametrize(
    "kwargs",
    [{"bad": "x", "bad_words": "y"}, {"logits_processor": print, "logits_processors": [len]}],
)
def test_alias_and_field_both_given(kwargs: dict[str, Any]) -> None:
    name, alias = kwargs
    with pytest.raises(ValueError, match=rf"^{name} and its vLLM alias {alias} were both given"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needed"),
    [
        ({}, False),
        ({"repetition_penalty": 1.1}, True),
        ({"presence_penalty": -0.5}, True),
        ({"frequency_penalty": 0.5}, True),
        ({"no_repeat_ngram_size": 2}, True),
        ({"bad": "two words"}, True),
        ({"bad_words": ["x"]}, True),
        ({"logits_processor": print}, True),
        ({"logits_processors": [print]}, True),
        ({"logits_processor": []}, False),
        ({"bad": []}, False),
        ({"bad_token_ids": [3]}, False),
        ({"min_tokens": 4}, False),
        ({"embedding_bias": torch.zeros(4)}, False),
        ({"min_p": 0.2, "temperature": 1.0}, False),
    ],
)
def test_needs_token_history(kwargs: dict[str, Any], needed: bool) -> None:
    assert SamplingParams(**kwargs).needs_token_history is needed


def test_slots_still_work() -> None:
    p = SamplingParams()
    assert not hasattr(p, "__dict__")
    with pytest.raises(AttributeError):
        p.not_a_field = 1  # type: ignore[attr-defined]
