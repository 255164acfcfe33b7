"""Graph timing of short kernels (``rtllm.kernels.graph_timing``) and the quantized-GEMV
tuner that uses it (``rtllm.kernels.quant_tuning``)."""

from __future__ import annotations

import math

import pytest
import torch

from rtllm.kernels.graph_timing import MAX_COPIES, graph_time_us, l2_overflow_copies

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_no_copies_off_the_gpu() -> None:
    assert l2_overflow_copies(1 << 20, torch.device("cpu")) == 1


def test_graph_time_rejects_empty_inputs() -> None:
    with pytest.raises(ValueError, match="reps >= 1"):
        graph_time_us([], 4, 1)
    with pytest.raises(ValueError, match="trials >= 1"):
        graph_time_us([lambda: None], 4, 0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_copies_overflow_l2() -> None:
    device = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    size = 8 << 20
    copies = l2_overflow_copies(size, device)
    assert copies * size >= 3 * l2 or copies == MAX_COPIES
    assert l2_overflow_copies(10 * l2, device) == 1


@pytest.mark.gpu
@requires_cuda
def test_gpu_graph_time_grows_with_the_work() -> None:
    small = [torch.randn(1 << 16, device="cuda") for _ in range(2)]
    large = [torch.randn(1 << 24, device="cuda") for _ in range(2)]
    t_small = graph_time_us([lambda t=t: t.mul_(1.0) for t in small], 16, 3)
    t_large = graph_time_us([lambda t=t: t.mul_(1.0) for t in large], 16, 3)
    assert 0 < t_small < t_large


@pytest.mark.gpu
@requires_cuda
def test_gpu_error_in_a_call_surfaces_before_capture() -> None:
    def bad() -> None:
        raise RuntimeError("does not launch")

    with pytest.raises(RuntimeError, match="does not launch"):
        graph_time_us([bad], 4, 1)
    assert not torch.cuda.is_current_stream_capturing()


@pytest.mark.gpu
@requires_cuda
def test_gpu_tuner_times_every_candidate_and_keeps_the_fastest() -> None:
    from rtllm.kernels import quant_tuning
    from rtllm.kernels.quant_gemm import prepack_int4, quant_linear
    from rtllm.quantization.rtn import quantize_groupwise_asymmetric

    w = torch.randn(1536, 2048, device="cuda") * 0.02
    q, s, z = quantize_groupwise_asymmetric(w, 128, bits=4)
    packed = prepack_int4(q, z, s, 128)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    quant_linear(x, packed)
    keys = [k for k in quant_tuning.tuning_timings() if k[3:6] == (1536, 2048, 4) and k[2] == 1]
    assert len(keys) == 1
    timed = quant_tuning.tuning_timings()[keys[0]]
    from rtllm.kernels.quant_gemv_mma import mma_gemv_supported

    mma = mma_gemv_supported(x, packed)  # the tensor-core GEMV's tiles join where it runs
    expected = quant_tuning.candidates(1, 1536, 2048, 4, quant_tuning.num_sms(0), mma_gemv=mma)
    assert len(timed) == len(expected)
    assert all(math.isfinite(t) and t > 0 for _, t in timed)
    assert quant_tuning.tuned_configs()[keys[0]] == min(timed, key=lambda ct: ct[1])[0]
