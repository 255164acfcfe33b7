"""``rtllm serve``: arguments, --config YAML merging and the app it runs."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from serve_helpers import call

from rtllm import KvCacheConfig
from rtllm.serve.cli import add_serve_parser, llm_kwargs, run_serve, served_model_name


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rtllm")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_help_lists_the_engine_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for option in ("MODEL", "--host", "--port", "--max-batch-size", "--max-num-tokens", "--max-seq-len",
                   "--kv-cache-free-gpu-memory-fraction", "--config", "--extra-llm-api-options",
                   "--served-model-name"):
        assert option in out


def test_defaults() -> None:
    args = parse()
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert args.func is run_serve
    kwargs = llm_kwargs(args)
    from rtllm import CudaGraphConfig

    assert kwargs == {"kv_cache_config": KvCacheConfig(), "cuda_graph_config": CudaGraphConfig()}
    assert served_model_name(args, kwargs) == "SmolLM2-135M-Instruct"


def test_config_yaml_then_command_line(tmp_path: Any) -> None:
    config = tmp_path / "llm.yaml"
    config.write_text(
        "max_batch_size: 8\nmax_num_tokens: 1024\ndtype: float32\n"
        "kv_cache_config:\n  tokens_per_block: 16\n  free_gpu_memory_fraction: 0.5\n"
        "scheduler_config:\n  capacity_scheduler_policy: GUARANTEED_NO_EVICT\n",
        encoding="utf-8",
    )
    args = parse("some/model", "--config", str(config), "--max-batch-size", "4", "--max-seq-len", "300",
                 "--kv-cache-free-gpu-memory-fraction", "0.7", "--enable-chunked-prefill")
    kwargs = llm_kwargs(args)
    assert kwargs["model"] == "some/model"
    assert kwargs["max_batch_size"] == 4 and kwargs["max_num_tokens"] == 1024 and kwargs["max_seq_len"] == 300
    assert kwargs["dtype"] == "float32" and kwargs["enable_chunked_prefill"] is True
    assert kwargs["kv_cache_config"] == KvCacheConfig(tokens_per_block=16, free_gpu_memory_fraction=0.7)
    assert kwargs["scheduler_config"].capacity_scheduler_policy == "GUARANTEED_NO_EVICT"
    assert served_model_name(args, kwargs) == "some/model"
    assert served_model_name(parse("m", "--served-model-name", "alias"), kwargs) == "alias"


@pytest.mark.parametrize(("text", "match"), [("- 1\n- 2\n", "mapping"), ("kv_cache_config: 3\n", "mapping"),
                                             ("kv_cache_config:\n  bogus: 1\n", "bogus")])
def test_bad_config(tmp_path: Any, text: str, match: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        llm_kwargs(parse("--config", str(config)))
    with pytest.raises(FileNotFoundError):
        llm_kwargs(parse("--config", str(tmp_path / "missing.yaml")))


def test_run_serve_builds_one_engine_and_serves_it(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:  # instead of listening on a port
        served.update(kwargs)
        served["health"] = call(app, "GET", "/health").status_code
        served["models"] = call(app, "GET", "/v1/models").json()
        served["completion"] = call(app, "POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 3,
                                                                         "ignore_eos": True}).json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    args = parse(model_dir, "--device", "cpu", "--port", "8123", "--max-batch-size", "2", "--max-seq-len", "128",
                 "--kv-cache-max-tokens", "512", "--tokens-per-block", "8")
    assert run_serve(args) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    assert served["health"] == 200
    assert served["models"]["data"][0]["id"] == model_dir and served["models"]["data"][0]["max_model_len"] == 128
    assert served["completion"]["usage"]["completion_tokens"] == 3


def test_cuda_graph_and_overlap_options(tmp_path: Any) -> None:
    from rtllm import CudaGraphConfig

    config = tmp_path / "graphs.yaml"
    config.write_text("cuda_graph_config:\n  batch_sizes: [1, 4, 2]\n  enable_padding: false\n", encoding="utf-8")
    kwargs = llm_kwargs(parse("--config", str(config), "--disable-overlap-scheduler"))
    assert kwargs["cuda_graph_config"] == CudaGraphConfig(batch_sizes=(1, 2, 4), enable_padding=False)
    assert kwargs["disable_overlap_scheduler"] is True
    kwargs = llm_kwargs(parse("--cuda-graph-max-batch-size", "32"))
    assert kwargs["cuda_graph_config"] == CudaGraphConfig(max_batch_size=32)
    assert "disable_overlap_scheduler" not in kwargs
    assert llm_kwargs(parse("--disable-cuda-graphs"))["cuda_graph_config"] is None
    config.write_text("cuda_graph_config: null\n", encoding="utf-8")
    assert llm_kwargs(parse("--config", str(config)))["cuda_graph_config"] is None


def test_reuse_host_tier_and_policy_options(tmp_path: Any) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("kv_cache_config:\n  host_cache_size: 1024\nscheduler_config:\n  capacity_scheduler_policy: STATIC_BATCH\n")
    kwargs = llm_kwargs(parse("--config", str(config), "--capacity-scheduler-policy", "MAX_UTILIZATION"))
    assert kwargs["kv_cache_config"].host_cache_size == 1024
    assert kwargs["kv_cache_config"].enable_block_reuse is True
    assert kwargs["scheduler_config"].capacity_scheduler_policy == "MAX_UTILIZATION"
    kwargs = llm_kwargs(parse("--no-enable-block-reuse"))
    assert kwargs["kv_cache_config"].enable_block_reuse is False
    with pytest.raises(ValueError, match="host_cache_size"):
        llm_kwargs(parse("--no-enable-block-reuse", "--host-cache-size", "4096"))


def test_max_beam_width_option() -> None:
    assert llm_kwargs(parse("--max-beam-width", "4"))["max_beam_width"] == 4
    assert "max_beam_width" not in llm_kwargs(parse())


def test_quantization_options(tmp_path: Any) -> None:
    kwargs = llm_kwargs(parse("--quant-algo", "W8A16", "--kv-cache-quant-algo", "INT8"))
    assert kwargs["quant_config"].quant_algo == "W8A16"
    assert kwargs["quant_config"].kv_cache_quant_algo == "INT8"
    config = tmp_path / "q.yaml"
    config.write_text("quant_config:\n  quant_algo: W4A16_GPTQ\n  group_size: 64\n")
    assert llm_kwargs(parse("--config", str(config)))["quant_config"].group_size == 64
    with pytest.raises(ValueError, match="quant_algo"):
        llm_kwargs(parse("--quant-algo", "W3A16"))


def test_parallel_options() -> None:
    kwargs = llm_kwargs(parse("--tp-size", "2"))
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["cuda_graph_config"] is not None
    kwargs = llm_kwargs(parse("--tp-size", "2", "--pp-size", "2"))
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 2)
    assert kwargs["cuda_graph_config"] is None  # not captured with pipeline stages
    assert "tensor_parallel_size" not in llm_kwargs(parse())
