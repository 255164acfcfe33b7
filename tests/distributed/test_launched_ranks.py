"""Launcher-started ranks (``torchrun``): every process runs the same command, rank 0
drives the engine, the others follow and exit when it shuts down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtllm import SamplingParams
from rtllm.executor.launched_ranks import LaunchedRank, launched_rank

from .test_parallel_llm import PROMPTS, _llm, _save_llama

SCRIPT = Path(__file__).with_name("launched_generate.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _save_llama(tmp_path_factory.mktemp("launched"), num_key_value_heads=2)


def _torchrun(*command: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_launched_rank_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_rank() is None  # no rendezvous address
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_rank() == LaunchedRank(3, 4, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched_rank() == LaunchedRank(5, 8, 1)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_torchrun_ranks_match_one_process(model, tmp_path, tp, pp):
    with _llm(model) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    expected = [o.outputs[0].token_ids for o in outs]
    out = tmp_path / "ids.json"
    done = _torchrun(str(SCRIPT), model, str(out), str(tp), str(pp))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {"ids": expected, "alive": True}


def test_torchrun_rtllm_entry_point(model, tmp_path):
    rtllm = str(Path(sys.executable).with_name("rtllm"))
    report = tmp_path / "report.json"
    done = _torchrun("--no-python", rtllm, "bench", "throughput", "--model", model, "--load-format", "dummy",
                     "--tp-size", "2", "--num-requests", "4", "--input-len", "8", "--output-len", "4",
                     "--warmup", "0", "--report-json", str(report), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["num_failed"] == 0 and data["total_output_tokens"] == 16


def test_world_size_must_match_the_parallel_degrees(model, tmp_path):
    done = _torchrun(str(SCRIPT), model, str(tmp_path / "x.json"), "2", "2")
    assert done.returncode != 0
    assert "tensor_parallel_size * pipeline_parallel_size = 2 * 2 = 4" in done.stderr
