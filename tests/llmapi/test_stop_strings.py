"""Tests for rtllm.llmapi.stop_strings.StopStringMatcher."""

from __future__ import annotations

import random

import pytest

from rtllm.llmapi.stop_strings import StopStringMatcher


def reference(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Non-incremental reference: cut at the earliest occurrence (ties: shortest)."""
    best: tuple[int, int, str] | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or (i, len(s)) < (best[0], best[1])):
            best = (i, len(s), s)
    if best is None:
        return text, None
    start, length, s = best
    return text[: start + length] if include else text[:start], s


def run(deltas: list[str], stop: list[str], include: bool = False) -> tuple[list[str], str, bool]:
    """Feed deltas (stopping the stream like the executor does); return outputs."""
    m = StopStringMatcher(stop, include_stop_str_in_output=include)
    outs: list[str] = []
    stopped = False
    for d in deltas:
        out, stopped = m.process(d)
        outs.append(out)
        if stopped:
            break
    if not stopped:
        outs.append(m.flush())
    return outs, "".join(outs), m.matched is not None


def test_empty_stop_list_is_pass_through() -> None:
    m = StopStringMatcher([])
    text = "anything at all \ufffd"
    out, stopped = m.process(text)
    assert out is text
    assert stopped is False
    assert m.flush() == ""
    assert m.matched is None
    # Empty strings are not stop strings.
    m = StopStringMatcher(["", ""])
    assert m.process("abc") == ("abc", False)


def test_single_delta_exclude_and_include() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.process("Hello STOP world") == ("Hello ", True)
    assert m.matched == "STOP"
    assert m.stopped
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert m.process("Hello STOP world") == ("Hello STOP", True)


def test_stop_across_deltas_with_hold_back() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.process("Hello Wo") == ("Hello Wo", False)
    # "STO" may be the start of "STOP": held back.
    assert m.process("rld! STO") == ("rld! ", False)
    assert m.pending == "STO"
    assert m.process("P now") == ("", True)
    assert m.matched == "STOP"
    # Further input after the stop is ignored.
    assert m.process("more") == ("", True)
    assert m.flush() == ""


def test_include_stop_across_deltas() -> None:
    outs, text, stopped = run(["ab", "c<", "/s", "> tail"], ["</s>"], include=True)
    assert stopped
    assert outs == ["ab", "c", "", "</s>"]
    assert text == "abc</s>"


def test_hold_back_released_on_mismatch_and_flush() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.process("abc ST") == ("abc ", False)
    assert m.process("Xyz S") == ("STXyz ", False)
    assert m.flush() == "S"
    assert m.matched is None


def test_finished_by_length_flushes_partial_stop() -> None:
    outs, text, stopped = run(["x", "y", "<|im_", "en"], ["<|im_end|>"])
    assert not stopped
    assert outs == ["x", "y", "", "", "<|im_en"]
    assert text == "xy<|im_en"


def test_earliest_occurrence_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.process("Hello world") == ("Hel", True)
    assert m.matched == "lo"
    # Same result whatever the order of the stop list.
    m = StopStringMatcher(["lo", "world"])
    assert m.process("Hello world") == ("Hel", True)


def test_earlier_start_beats_earlier_end() -> None:
    # "bc" completes first, but "abcd" starts earlier and wins once it completes.
    outs, text, stopped = run(list("xabcdy"), ["abcd", "bc"])
    assert stopped
    assert text == "x"
    # ... and if the longer one fails to complete, the shorter one is the match.
    m = StopStringMatcher(["abcd", "bc"])
    got = [m.process(c) for c in "xabcz"]
    assert got == [("x", False), ("", False), ("", False), ("", False), ("a", True)]
    assert m.matched == "bc"
    # A pending decision at the end of the output is resolved by flush().
    m = StopStringMatcher(["abcd", "bc"])
    assert "".join(m.process(c)[0] for c in "xabc") == "x"
    assert m.flush() == "a"
    assert m.matched == "bc"


def test_stop_string_prefix_of_another() -> None:
    outs, text, stopped = run(["Hel", "lo wor", "ld"], ["Hello world", "Hello"])
    assert stopped and text == ""
    m = StopStringMatcher(["Hello world", "Hello"], include_stop_str_in_output=True)
    assert m.process("Say Hello world") == ("Say Hello", True)
    assert m.matched == "Hello"


def test_stop_at_very_beginning() -> None:
    m = StopStringMatcher(["<tool>"])
    assert m.process("<") == ("", False)
    assert m.process("tool> x") == ("", True)
    assert m.matched == "<tool>"
    m = StopStringMatcher(["<tool>"], include_stop_str_in_output=True)
    assert m.process("<tool> x") == ("<tool>", True)


def test_multiple_stops_and_duplicates() -> None:
    m = StopStringMatcher(["\n\n", "User:", "User:", ""])
    assert m.stop == ("\n\n", "User:")
    assert m.process("one\n") == ("one", False)
    assert m.process("two U") == ("\ntwo ", False)
    assert m.process("ser") == ("", False)
    assert m.process(": hi") == ("", True)
    assert m.matched == "User:"


def test_self_overlapping_stop() -> None:
    # After "aa" fails to continue with "b", the hold-back must restart mid-way.
    outs, text, stopped = run(list("aaab!"), ["aab"])
    assert stopped and text == "a"
    outs, text, stopped = run(["ab", "abab", "c"], ["ababc"])
    assert stopped and text == "ab"


def test_unicode_stops() -> None:
    outs, text, stopped = run(["你好", "世", "界😀!"], ["世界😀"], include=True)
    assert stopped and text == "你好世界😀"


def test_empty_deltas() -> None:
    m = StopStringMatcher(["ab"])
    assert m.process("") == ("", False)
    assert m.process("a") == ("", False)
    assert m.process("") == ("", False)
    assert m.process("c") == ("ac", False)


def _safe_prefix_len(fed: str, stop: list[str]) -> int:
    """Longest prefix of ``fed`` that no stop string can touch (oracle for hold-back)."""
    for j in range(len(fed)):
        tail = fed[j:]
        if any(s and (s.startswith(tail) or tail.startswith(s)) for s in stop):
            return j
    return len(fed)


@pytest.mark.parametrize("include", [False, True])
def test_random_splits_match_reference(include: bool) -> None:
    rng = random.Random(1234 + include)
    alphabet = "ab c\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 4))
        ]
        # Random split into deltas (empty deltas allowed).
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 8)))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        m = StopStringMatcher(stop, include_stop_str_in_output=include)
        emitted = ""
        fed = ""
        stopped = False
        for d in deltas:
            out, stopped = m.process(d)
            fed += d
            emitted += out
            if stopped:
                break
            # Nothing is held back that could not be part of a stop string.
            assert emitted == fed[: _safe_prefix_len(fed, stop)], (text, stop, deltas)
        if not stopped:
            emitted += m.flush()
        want_text, want_stop = reference(text, stop, include)
        assert emitted == want_text, (text, stop, deltas)
        assert m.matched == want_stop, (text, stop, deltas)
