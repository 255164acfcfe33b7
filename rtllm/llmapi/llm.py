"""The user-facing ``LLM`` class (TensorRT-LLM's LLM API)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from rtllm.executor.inproc_executor import InProcessExecutor
from rtllm.executor.request import GenerationRequest
from rtllm.executor.result import GenerationResult
from rtllm.llmapi.build import build_engine
from rtllm.llmapi.llm_args import LlmArgs
from rtllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RequestOutput = GenerationResult
"""The result of one request: ``prompt``, ``prompt_token_ids``, ``outputs``, ``finished``."""

PromptInput = str | list[int] | dict[str, Any]


class LLM:
    """Loads a model and generates text with inflight batching.

    Example::

        llm = LLM()  # the embedded default model
        out = llm.generate("The capital of France is", SamplingParams(max_tokens=16))
        print(out.outputs[0].text)

    Args:
        model: Hugging Face model directory or ``.gguf`` file; None for the
            embedded default model (SmolLM2-135M-Instruct).
        tokenizer: Tokenizer source when it differs from ``model``.
        **kwargs: Any other field of :class:`rtllm.llmapi.llm_args.LlmArgs`
            (``dtype``, ``max_batch_size``, ``max_num_tokens``, ``max_seq_len``,
            ``kv_cache_config``, ``scheduler_config``, ``skip_tokenizer_init``, ...).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, **kwargs: Any) -> None:
        allowed = {f.name for f in dataclasses.fields(LlmArgs)}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {unknown}; allowed: {sorted(allowed)}")
        self.args = LlmArgs(model=model, tokenizer=tokenizer, **kwargs)
        self._executor: InProcessExecutor | None = None
        built = build_engine(self.args)
        self.model_config = built.model_config
        self.model_path = built.model_path
        self.tokenizer = built.tokenizer
        self.dtype = built.dtype
        self.device = built.device
        self._executor = InProcessExecutor(built.engine, built.tokenizer, built.end_ids)

    @property
    def executor(self) -> InProcessExecutor:
        if self._executor is None:
            raise RuntimeError("the LLM has been shut down")
        return self._executor

    def generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt or a batch, blocking until all finish.

        ``inputs`` is a string, a list of token ids, a dict with ``prompt`` or
        ``prompt_token_ids``, or a list of these. ``sampling_params`` is one
        :class:`SamplingParams` for all or a list with one per prompt. Returns one
        :data:`RequestOutput` for a single prompt, else a list in input order.
        """
        single = _is_single_prompt(inputs)
        if not single and not isinstance(inputs, list | tuple):
            raise ValueError(
                "a prompt must be a string, a list of token ids or a dict (or a list of these); "
                f"got {type(inputs).__name__}"
            )
        prompts: list[PromptInput] = [inputs] if single else list(inputs)  # type: ignore[list-item]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts"
                )
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        results: list[RequestOutput] = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                results.append(self.generate_async(prompt, params))
        except BaseException:
            for result in results:
                result.abort()
            raise
        show = use_tqdm and len(results) > 1
        for result in tqdm(results, desc="Processed requests", disable=not show):
            result.result()
        return results[0] if single else results

    def generate_async(
        self,
        inputs: PromptInput,
        sampling_params: SamplingParams | None = None,
        streaming: bool = False,
    ) -> RequestOutput:
        """Submit one prompt and return at once.

        The result can be awaited (``await out``), waited on (``out.result()``) or
        iterated (``async for out in ...``); with ``streaming=True`` each iteration
        carries ``outputs[0].text_diff`` and ``token_ids_diff``.
        """
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        prompt_text, token_ids = self._tokenize(inputs, params)
        request = GenerationRequest(token_ids, params, prompt=prompt_text, streaming=streaming)
        return self.executor.submit(request)

    def _tokenize(self, inputs: PromptInput, params: SamplingParams) -> tuple[str | None, list[int]]:
        if isinstance(inputs, dict):
            if "prompt_token_ids" in inputs:
                inputs = list(inputs["prompt_token_ids"])
            elif "prompt" in inputs:
                inputs = inputs["prompt"]
            else:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key")
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids with skip_tokenizer_init=True")
            if not inputs:
                raise ValueError("prompt is empty")
            return inputs, self.tokenizer.encode(inputs, add_special_tokens=params.add_special_tokens)
        if isinstance(inputs, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in inputs
        ):
            return None, list(inputs)
        raise ValueError(
            f"a prompt must be a string, a list of token ids or a dict, got {type(inputs).__name__}"
        )

    def shutdown(self) -> None:
        """Stop the engine; unfinished requests finish as cancelled."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _is_single_prompt(inputs: object) -> bool:
    if isinstance(inputs, str | dict):
        return True
    return isinstance(inputs, list | tuple) and (
        len(inputs) == 0 or isinstance(inputs[0], int) and not isinstance(inputs[0], bool)
    )
