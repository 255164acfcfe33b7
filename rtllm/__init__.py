"""rtllm: an LLM inference engine in Python, with TensorRT-LLM's API."""

from rtllm.executor.result import Logprob
from rtllm.llmapi import (
    LLM,
    CapacitySchedulerPolicy,
    CompletionOutput,
    CudaGraphConfig,
    KvCacheConfig,
    LlmArgs,
    RequestError,
    RequestOutput,
    SchedulerConfig,
)
from rtllm.sampling_params import SamplingParams
from rtllm.structured.params import GuidedDecodingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CapacitySchedulerPolicy",
    "CompletionOutput",
    "CudaGraphConfig",
    "GuidedDecodingParams",
    "KvCacheConfig",
    "LlmArgs",
    "Logprob",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "__version__",
]
