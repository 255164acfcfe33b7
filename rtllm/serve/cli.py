"""``rtllm serve [MODEL]``: the OpenAI-compatible server on FastAPI + uvicorn.

Engine options are those of the LLM API. ``--config`` (alias ``--extra-llm-api-options``,
TensorRT-LLM's name) reads a YAML mapping of :class:`rtllm.LlmArgs` fields, with
``kv_cache_config`` / ``scheduler_config`` / ``cuda_graph_config`` as nested mappings; options given on the
command line win over the file. FastAPI, uvicorn and PyYAML are imported only when
the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

# CLI option dest -> LlmArgs field (None values are "not given").
_LLM_FIELDS = ("tokenizer", "dtype", "device", "max_batch_size", "max_num_tokens", "max_seq_len",
               "enable_chunked_prefill", "load_format", "seed", "max_beam_width")
# CLI option dest -> KvCacheConfig field.
_KV_FIELDS = {"tokens_per_block": "tokens_per_block", "kv_cache_max_tokens": "max_tokens",
              "kv_cache_free_gpu_memory_fraction": "free_gpu_memory_fraction"}


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    from rtllm.cli import add_cache_and_scheduler_args, add_parallel_args
    from rtllm.llmapi.llm_args import KvCacheConfig, LlmArgs
    from rtllm.serve import DEFAULT_STALL_TIMEOUT_S

    d, kv = LlmArgs(), KvCacheConfig()
    parser = subparsers.add_parser(
        "serve", help="run an OpenAI-compatible HTTP server",
        description="Serve MODEL over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics, /version). One engine serves all requests.",
    )
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="Hugging Face model directory or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name in the API (default: MODEL as given)")
    engine = parser.add_argument_group("engine (LLM API arguments)")
    engine.add_argument("--tokenizer", default=None, help="tokenizer source, if not the model's")
    engine.add_argument("--dtype", default=None, help=f"auto, float32, float16 or bfloat16 (default: {d.dtype})")
    engine.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    engine.add_argument("--max-batch-size", type=int, default=None,
                        help=f"most requests in one engine step (default: {d.max_batch_size})")
    engine.add_argument("--max-num-tokens", type=int, default=None,
                        help=f"most tokens in one engine step (default: {d.max_num_tokens})")
    engine.add_argument("--max-seq-len", type=int, default=None,
                        help="longest prompt + output (default: the model's)")
    engine.add_argument("--tokens-per-block", type=int, default=None,
                        help=f"tokens per KV-cache block (default: {kv.tokens_per_block})")
    engine.add_argument("--kv-cache-max-tokens", type=int, default=None, help="KV pool size in tokens")
    engine.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=None,
                        help=f"fraction of free GPU memory for the KV pool (default: {kv.free_gpu_memory_fraction})")
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                        help="split long prompts across steps")
    add_cache_and_scheduler_args(engine)
    add_parallel_args(engine)
    engine.add_argument("--load-format", default=None, choices=["auto", "dummy"],
                        help="dummy: random weights (benchmarking a shape)")
    engine.add_argument("--seed", type=int, default=None, help=f"engine seed (default: {d.seed})")
    engine.add_argument("--cuda-graph-max-batch-size", type=int, default=None,
                        help="largest generation batch captured as a CUDA graph (CUDA only)")
    engine.add_argument("--disable-cuda-graphs", action="store_true", default=None,
                        help="run every step eagerly")
    engine.add_argument("--disable-overlap-scheduler", action="store_true", default=None,
                        help="finish each step before preparing the next (overlap is on by default on CUDA)")
    engine.add_argument("--config", "--extra-llm-api-options", dest="config", default=None, metavar="YAML",
                        help="YAML file of LLM arguments (command-line options win)")
    server = parser.add_argument_group("server")
    server.add_argument("--health-stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                        help="seconds without a finished engine step (with work queued) after which "
                             f"/health answers 503 (default: {DEFAULT_STALL_TIMEOUT_S:g})")
    server.add_argument("--timeout-keep-alive", type=int, default=5, help="HTTP keep-alive seconds (default: 5)")
    server.add_argument("--uvicorn-log-level", default=None,
                        help="uvicorn's log level (default: rtllm's --log-level)")
    parser.set_defaults(func=run_serve)
    return parser


def _load_config(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of LLM arguments, got {type(data).__name__}")
    return data


def _nested(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.pop(key, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} in --config must be a mapping, got {value!r}")
    return dict(value)


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :class:`rtllm.LLM`: --config, then the command line."""
    from rtllm.cli import (
        cache_and_scheduler_kwargs,
        graphs_allowed,
        parallel_kwargs,
        quant_config_of,
    )
    from rtllm.llmapi.llm_args import CudaGraphConfig, KvCacheConfig, SchedulerConfig

    kwargs = _load_config(args.config) if args.config else {}
    kv = _nested(kwargs, "kv_cache_config")
    sched = _nested(kwargs, "scheduler_config")
    graphs = kwargs.get("cuda_graph_config", {})
    if args.disable_overlap_scheduler:
        kwargs["disable_overlap_scheduler"] = True
    if args.model is not None:
        kwargs["model"] = args.model
    for name in _LLM_FIELDS:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    for dest, field in _KV_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            kv[field] = value
    kwargs.update(parallel_kwargs(args))
    quant = quant_config_of(args)
    if quant is not None:
        kwargs["quant_config"] = quant
    elif isinstance(kwargs.get("quant_config"), dict):
        from rtllm.quantization import QuantConfig

        kwargs["quant_config"] = QuantConfig(**kwargs["quant_config"])
    cli_kv, cli_sched = cache_and_scheduler_kwargs(args)
    kv.update(cli_kv)
    sched.update(cli_sched)
    try:
        kwargs["kv_cache_config"] = KvCacheConfig(**kv)
        if sched:
            kwargs["scheduler_config"] = SchedulerConfig(**sched)
        stages = args.pipeline_parallel_size or kwargs.get("pipeline_parallel_size", 1)
        if not graphs_allowed(args) or stages > 1 or graphs is None:
            kwargs["cuda_graph_config"] = None
        else:
            graphs = dict(_nested(kwargs, "cuda_graph_config"))
            if args.cuda_graph_max_batch_size is not None:
                graphs["max_batch_size"] = args.cuda_graph_max_batch_size
            if graphs.get("batch_sizes") is not None:
                graphs["batch_sizes"] = tuple(graphs["batch_sizes"])
            kwargs["cuda_graph_config"] = CudaGraphConfig(**graphs)
    except TypeError as exc:
        raise ValueError(
            f"bad kv_cache_config / scheduler_config / cuda_graph_config in --config: {exc}"
        ) from None
    return kwargs


def served_model_name(args: argparse.Namespace, kwargs: dict[str, Any]) -> str:
    """``--served-model-name``, else the model as given, else the default model's name."""
    if args.served_model_name:
        return args.served_model_name
    if kwargs.get("model"):
        return str(kwargs["model"])
    from rtllm.models.default_model import DEFAULT_MODEL_FILE

    return DEFAULT_MODEL_FILE.split(".", 1)[0]


def run_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve it until interrupted."""
    import uvicorn

    from rtllm import LLM
    from rtllm.serve.app import build_app

    kwargs = llm_kwargs(args)
    name = served_model_name(args, kwargs)
    llm = LLM(**kwargs)
    try:
        app = build_app(llm, name, stall_timeout_s=args.health_stall_timeout)
        level = args.uvicorn_log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        print(f"rtllm serve: {name} on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=str(level).lower(),
                    timeout_keep_alive=args.timeout_keep_alive, timeout_graceful_shutdown=5)
    finally:
        llm.shutdown()
    return 0
