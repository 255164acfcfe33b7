"""User-facing sampling parameters, with TensorRT-LLM's field names.

Decoding is greedy when ``temperature == 0`` or ``top_k == 1``, and also (as in
TensorRT-LLM) when none of ``temperature``, ``top_k`` and ``top_p`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite int or float (bools and NaN/inf excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingParams:
    """How to sample the continuation of one prompt.

    Attributes:
        max_tokens: Maximum number of tokens to generate (>= 1).
        temperature: Softmax temperature (>= 0); 0 means greedy.
        top_k: Sample among the k most likely tokens (>= 0); 0 or None disables it.
        top_p: Nucleus sampling mass in (0, 1]; None disables it.
        seed: Seed of this request's own random generator: the same seed gives the
            same tokens whatever else is in the batch.
        end_id: End-of-sequence token id; defaults to the model's EOS token(s).
        pad_id: Padding token id (accepted for API compatibility).
        stop: String(s) that end generation when they appear in the output text.
        stop_token_ids: Token ids that end generation when generated.
        include_stop_str_in_output: Keep a matched stop string in the output text.
        ignore_eos: Keep generating past the EOS token (up to ``max_tokens``).
        detokenize: Produce output text (otherwise only token ids).
        skip_special_tokens: Leave special tokens out of the output text.
        spaces_between_special_tokens: Put spaces between special tokens in the text.
        add_special_tokens: Add the tokenizer's special tokens (e.g. BOS) to text prompts.
        n: Number of sequences to return per prompt (only 1 is supported yet).
    """

    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    add_special_tokens: bool = True
    n: int = 1
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.stop is None:
            self._stop_list = []
        elif isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop)

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature is not None and (not _is_real(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a token id >= 0, got {value!r}")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, list | tuple) or not all(
                isinstance(s, str) and s for s in stops
            ):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list | tuple)
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise ValueError(
                f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}"
            )
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.n != 1:
            raise NotImplementedError("n > 1 (several sequences per prompt) is not supported yet")

    @property
    def is_greedy(self) -> bool:
        """True when decoding picks the most likely token at every step."""
        if self.temperature == 0 or self.top_k == 1:
            return True
        return self.temperature is None and not self.top_k and self.top_p is None

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings as a list (empty when none)."""
        return self._stop_list
