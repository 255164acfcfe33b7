"""The LLM API: ``LLM``, its arguments and outputs."""

from rtllm.executor.result import CompletionOutput, RequestError
from rtllm.llmapi.llm import LLM, RequestOutput
from rtllm.llmapi.llm_args import (
    CapacitySchedulerPolicy,
    CudaGraphConfig,
    KvCacheConfig,
    LlmArgs,
    SchedulerConfig,
)

__all__ = [
    "LLM",
    "CapacitySchedulerPolicy",
    "CompletionOutput",
    "CudaGraphConfig",
    "KvCacheConfig",
    "LlmArgs",
    "RequestError",
    "RequestOutput",
    "SchedulerConfig",
]
