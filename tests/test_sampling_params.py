"""Tests for rtllm.sampling_params.SamplingParams validation and derived properties."""

from __future__ import annotations

from typing import Any

import pytest

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
def test_n_greater_than_one_not_implemented(value: int) -> None:
    with pytest.raises(NotImplementedError, match="n > 1"):
        SamplingParams(n=value)


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
