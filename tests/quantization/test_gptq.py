"""GPTQ rounding (rtllm.quantization.gptq) and the layer-by-layer calibration that uses
it (W4A16_GPTQ, and W4A16_AWQ's AWQ scale search + GPTQ rounding) on tiny inputs."""

from __future__ import annotations

import os

import pytest
import torch

from rtllm.layers.linear import Linear
from rtllm.models.loader import build_model, load_model_config
from rtllm.quantization import QuantConfig, WeightOnlyGroupwiseLinear, gptq
from rtllm.quantization.calibration import dense_forward
from rtllm.quantization.gptq import SHRINK_GRID, gptq_quantize, hessian, output_error
from rtllm.quantization.linear_method import needs_calibration
from rtllm.quantization.packing import pack_awq, unpack_awq
from rtllm.quantization.rtn import (
    dequantize,
    quantize_groupwise_asymmetric,
    quantize_groupwise_symmetric,
)

CPU = torch.device("cpu")
HELD_OUT = os.path.join(os.path.dirname(__file__), "..", "data", "held_out_english.txt")
SMALL_CALIB = {"calib_size": 2, "calib_max_seq_length": 192}


def _problem(seed: int = 0, out: int = 48, inp: int = 256, n: int = 512):
    """A weight and correlated inputs with a few loud channels (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(n, 32, generator=gen) @ torch.randn(32, inp, generator=gen)
    x = x + 0.5 * torch.randn(n, inp, generator=gen)
    x[:, :4] *= 6.0
    return w, x, hessian(x.t() @ x, n)


def _rtn(w: torch.Tensor, group: int, zero_point: bool, bits: int = 4):
    """Round-to-nearest in the internal layout: (q uint8, scale, zero int32)."""
    if zero_point:
        return quantize_groupwise_asymmetric(w, group, bits)
    signed, scale = quantize_groupwise_symmetric(w, group, bits)
    offset = 1 << (bits - 1)
    q = (signed.to(torch.int16) + offset).to(torch.uint8)
    return q, scale, torch.full_like(scale, offset, dtype=torch.int32)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("group", [64, -1])
def test_gptq_beats_round_to_nearest_on_calibration_inputs(zero_point, group):
    w, x, h = _problem()
    result = gptq_quantize(w, h, 4, group, zero_point)
    q, scale, zero = _rtn(w, group, zero_point)
    rtn_err = float((x @ (dequantize(q, scale, zero) - w).t()).pow(2).sum())
    gptq_err = float((x @ (result.dequantized - w).t()).pow(2).sum())
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)
    # output_error is the same quantity through the Hessian (H = 2 X^T X / n).
    d = result.dequantized - w
    assert output_error(d, h) == pytest.approx(2 * gptq_err / x.shape[0], rel=1e-3)


@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_round_to_nearest(act_order):
    """With uncorrelated inputs no other column can compensate an error: GPTQ's codes
    are round-to-nearest's (the feedback flows only through H's off-diagonal), in any
    column order (static grids are then RTN's grids of the input weights)."""
    w, _, _ = _problem()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    for zero_point in (True, False):
        result = gptq_quantize(w, h, 4, 64, zero_point, act_order=act_order, grid_shrinks=())
        q, scale, zero = _rtn(w, 64, zero_point)
        assert torch.equal(result.weights.q, q)
        assert torch.equal(result.weights.zeros, zero)
        torch.testing.assert_close(result.weights.scales, scale, rtol=0, atol=0)


OPTIONS = {  # gptq_quantize's keyword options: natural / act order, plain / searched grids
    "natural": {"act_order": False, "grid_shrinks": ()},
    "act_order": {"act_order": True, "grid_shrinks": ()},
    "grid": {"act_order": False, "grid_shrinks": SHRINK_GRID},
    "act_order_grid": {"act_order": True, "grid_shrinks": SHRINK_GRID},
    "act_order_narrow": {"act_order": True, "grid_shrinks": (0.9, 0.7, 0.5)},
}


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("bits", "zero_point"), [(4, True), (4, False), (8, True), (8, False)])
def test_codes_in_range_and_grid_reproduced_by_round_to_nearest(bits, zero_point, options):
    w, _, h = _problem(seed=2)
    # First groups of their rows (no error feedback has reached them at grid time):
    w[3, :64] = 0.0  # an all-zero group
    w[5, :64] = w[5, :64].abs() + 0.1  # no negative weight: zero point 0
    w[6, :64] = -w[6, :64].abs() - 0.1  # no positive weight: zero point 2**bits - 1
    result = gptq_quantize(w, h, bits, 64, zero_point, **OPTIONS[options])
    q, zeros, scales = result.weights
    assert q.dtype == torch.uint8 and zeros.dtype == torch.int32 and scales.dtype == torch.float32
    assert q.shape == w.shape and zeros.shape == scales.shape == (w.shape[0], w.shape[1] // 64)
    top = (1 << bits) - 1
    if zero_point:
        assert int(q.max()) <= top and int(zeros.min()) >= 0 and int(zeros.max()) <= top
        assert int(zeros[5, 0]) == 0 and int(zeros[6, 0]) == top
    else:  # symmetric: [-qmax, qmax] around the constant zero
        half = 1 << (bits - 1)
        assert (zeros == half).all() and int(q.min()) >= 1 and int(q.max()) <= top
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.equal(result.dequantized, dequantize(q, scales, zeros))
    assert (result.dequantized[3, :64] == 0).all()
    _assert_reproduced_by_round_to_nearest(result, 64, zero_point, bits)


def _assert_reproduced_by_round_to_nearest(result, group: int, zero_point: bool, bits: int = 4):
    """The float weight GPTQ hands on is re-quantized by RTN to the very same codes."""
    q, zeros, scales = result.weights
    q2, scale2, zero2 = _rtn(result.dequantized, group, zero_point, bits)
    assert torch.equal(q2, q) and torch.equal(zero2, zeros)
    torch.testing.assert_close(scale2, scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("options", ["act_order", "act_order_grid", "act_order_narrow", "grid"])
@pytest.mark.parametrize("zero_point", [True, False])
def test_end_codes_survive_strong_feedback(zero_point, options):
    """Small groups, loud correlated inputs (large error feedback between columns that
    act order visits far apart) and shrunk ranges: every (row, group) still holds its
    grid's end codes, so RTN re-quantization reproduces the result."""
    for seed in range(3):
        w, _, h = _problem(seed=10 + seed, out=32, inp=128, n=256)
        h = h + 4.0 * torch.diag(torch.linspace(0.0, 1.0, 128) ** 4) * h.diagonal().mean()
        for group in (8, 32, -1):
            result = gptq_quantize(w, h, 4, group, zero_point, **OPTIONS[options])
            _assert_reproduced_by_round_to_nearest(result, group, zero_point)


def _spread_problem(seed: int, out: int = 64, inp: int = 256, n: int = 1024):
    """Correlated inputs whose channel magnitudes span a factor ~50 in a random order:
    a strongly non-uniform diag(H) that natural column order ignores."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(n, 32, generator=gen) @ torch.randn(32, inp, generator=gen)
    x = (x + 0.5 * torch.randn(n, inp, generator=gen)) * torch.exp(4.0 * torch.rand(inp, generator=gen))
    return w, hessian(x.t() @ x, n)


@pytest.mark.parametrize("zero_point", [True, False])
def test_act_order_with_static_groups_beats_natural_order(zero_point):
    """Measured on these problems: act order's output error is 0.10-0.15x natural
    order's; the bound leaves a wide margin."""
    for seed in range(3):
        w, h = _spread_problem(seed)
        natural = gptq_quantize(w, h, 4, 64, zero_point, act_order=False, grid_shrinks=())
        ordered = gptq_quantize(w, h, 4, 64, zero_point, act_order=True, grid_shrinks=())
        err_natural = output_error(natural.dequantized - w, h)
        err_ordered = output_error(ordered.dequantized - w, h)
        assert err_ordered < 0.5 * err_natural, (seed, err_ordered, err_natural)
        # Static groups: the layout is plain contiguous groups, one grid per group.
        assert ordered.weights.scales.shape == natural.weights.scales.shape == (64, 4)


@pytest.mark.parametrize("act_order", [False, True])
def test_act_order_grids_come_from_the_input_weights(act_order):
    """Static groups: a group whose input weights are all 0 is quantized to exactly 0
    wherever it lies in the row (natural order computes its grid from weights the
    error feedback has moved, unless it is the row's first group)."""
    w, _, h = _problem(seed=5)
    w[:, 128:192] = 0.0
    result = gptq_quantize(w, h, 4, 64, True, act_order=act_order, grid_shrinks=())
    assert (result.dequantized[:, 128:192] == 0).all() == act_order
    _assert_reproduced_by_round_to_nearest(result, 64, True)


@pytest.mark.parametrize("zero_point", [True, False])
def test_grid_search_never_raises_the_weighted_group_error(zero_point):
    """With a diagonal Hessian GPTQ is round-to-nearest, on the grid the search picks:
    each (row, group)'s importance-weighted error sum_i H[i, i] (w_i - q_i)**2 is the
    smallest over the range factors, so never larger than the plain grid's (factor
    1.0), and smaller for some groups."""
    w, _, _ = _problem(seed=6)
    w[:, 3] *= 6.0  # outlier weights: shrinking their groups' ranges pays off
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(7)) * 4.0 + 0.1
    h = torch.diag(d)

    def group_error(dequantized: torch.Tensor) -> torch.Tensor:  # [out, G]
        return (d * (dequantized - w).square()).view(w.shape[0], -1, 64).sum(dim=2)

    plain = gptq_quantize(w, h, 4, 64, zero_point, grid_shrinks=())
    candidates = []
    for factor in SHRINK_GRID:
        lo = w.view(w.shape[0], -1, 64).amin(dim=2, keepdim=True).clamp(max=0.0) * factor
        hi = w.view(w.shape[0], -1, 64).amax(dim=2, keepdim=True).clamp(min=0.0) * factor
        if not zero_point:
            hi = w.view(w.shape[0], -1, 64).abs().amax(dim=2, keepdim=True) * factor
            lo = -hi
        clipped = torch.maximum(torch.minimum(w.view(w.shape[0], -1, 64), hi), lo).view_as(w)
        candidates.append(group_error(dequantize(*_rtn(clipped, 64, zero_point))))
    best = torch.stack(candidates).amin(dim=0)
    for act_order in (False, True):
        searched = gptq_quantize(w, h, 4, 64, zero_point, act_order=act_order, grid_shrinks=SHRINK_GRID)
        err, err_plain = group_error(searched.dequantized), group_error(plain.dequantized)
        assert (err <= err_plain * (1 + 1e-5)).all()
        assert (err < err_plain * 0.99).any()
        torch.testing.assert_close(err, best, rtol=1e-4, atol=1e-6)
        _assert_reproduced_by_round_to_nearest(searched, 64, zero_point)


def test_module_defaults_and_keyword_options(monkeypatch):
    """None means the module default (gptq.ACT_ORDER, gptq.GRID_SHRINKS), which a
    benchmark may set; an explicit keyword wins."""
    w, _, h = _problem(seed=8)
    explicit = gptq_quantize(w, h, 4, 64, True, act_order=True, grid_shrinks=SHRINK_GRID)
    plain = gptq_quantize(w, h, 4, 64, True, act_order=False, grid_shrinks=())
    assert gptq.ACT_ORDER is True and gptq.GRID_SHRINKS == SHRINK_GRID  # the defaults
    assert torch.equal(gptq_quantize(w, h, 4, 64, True).dequantized, explicit.dequantized)
    monkeypatch.setattr(gptq, "ACT_ORDER", False)
    monkeypatch.setattr(gptq, "GRID_SHRINKS", ())
    assert torch.equal(gptq_quantize(w, h, 4, 64, True).weights.q, plain.weights.q)
    overridden = gptq_quantize(w, h, 4, 64, True, act_order=False, grid_shrinks=())
    assert torch.equal(overridden.dequantized, plain.dequantized)
    assert not torch.equal(explicit.weights.q, plain.weights.q)


def test_layout_round_trips_through_awq_packing_and_the_layer():
    w, x, h = _problem(seed=3, out=64)
    result = gptq_quantize(w, h, 4, 64, True)
    weights = unpack_awq(*pack_awq(*result.weights))
    assert torch.equal(weights.q, result.weights.q) and torch.equal(weights.zeros, result.weights.zeros)
    layer = WeightOnlyGroupwiseLinear.from_quantized(result.weights, None, 4, None, torch.float32)
    torch.testing.assert_close(layer(x), x @ result.dequantized.t())


def test_deterministic_and_dead_channels():
    w, _, h = _problem(seed=4)
    h[7, :] = 0.0
    h[:, 7] = 0.0  # an input channel calibration never saw
    a, b = gptq_quantize(w, h, 4, 64, True), gptq_quantize(w.clone(), h.clone(), 4, 64, True)
    assert torch.equal(a.weights.q, b.weights.q) and torch.equal(a.dequantized, b.dequantized)
    assert (a.dequantized[:, 7] == 0).all() and torch.isfinite(a.dequantized).all()


def test_bad_arguments():
    w, _, h = _problem()
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, h, 4, 96, True)
    with pytest.raises(ValueError, match="disagree"):
        gptq_quantize(w, h[:10, :10], 4, 64, True)
    for bad in ((0.0,), (1.5, 0.9)):
        with pytest.raises(ValueError, match="range factors"):
            gptq_quantize(w, h, 4, 64, True, grid_shrinks=bad)


def test_which_algorithms_calibrate():
    assert needs_calibration(QuantConfig(quant_algo="W4A16_GPTQ", group_size=64))
    assert needs_calibration(QuantConfig(quant_algo="W8A16_GPTQ"))
    assert not needs_calibration(QuantConfig(quant_algo="W4A16"))  # stays RTN
    assert not needs_calibration(QuantConfig.from_gguf())  # GGUF float tensors: RTN


# --- on a tiny random Llama (conftest) -------------------------------------------------


def _build(path: str, quant_config: QuantConfig | None):
    return build_model(path, load_model_config(path), torch.float32, CPU, quant_config=quant_config)


def _decoder_linears(model) -> dict[str, Linear]:
    return {m.prefix: m for m in model.modules()
            if isinstance(m, Linear) and m.prefix.startswith("model.layers.")}


@pytest.fixture(scope="module")
def english(tiny_llama):
    """Held-out English text as the tiny model's tokens (calibration is English too)."""
    from rtllm.llmapi.tokenizer import load_tokenizer

    with open(HELD_OUT, encoding="utf-8") as f:
        text = f.read()[:256]
    return torch.tensor(load_tokenizer(tiny_llama[0])(text, add_special_tokens=False)["input_ids"])


def _rel(model, float_logits, ids) -> float:
    return float((dense_forward(model, ids) - float_logits).norm() / float_logits.norm())


def _rtn_model(path: str, config: QuantConfig, smooth: bool = False):
    """The float model with RTN-rounded decoder weights (after AWQ's folded scales when
    ``smooth``), to compare against."""
    from rtllm.llmapi.tokenizer import load_tokenizer
    from rtllm.quantization.awq import fake_quantize
    from rtllm.quantization.calibration import calibration_samples, collect_activation_stats
    from rtllm.quantization.smoothing import smooth_model

    model = _build(path, None)
    linears = _decoder_linears(model)
    if smooth:  # a plain list of samples: smooth_model only folds
        samples = list(calibration_samples(load_tokenizer(path), config))
        smooth_model(model, config, collect_activation_stats(model, samples, linears))
    for m in linears.values():
        m.weight.data = fake_quantize(m.weight.data, config)
    return model


def test_gptq_on_load_beats_round_to_nearest(tiny_llama, english):
    config = QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, has_zero_point=True, **SMALL_CALIB)
    float_logits = dense_forward(_build(tiny_llama[0], None), english)
    gptq = _build(tiny_llama[0], config)
    assert all(isinstance(m.quant, WeightOnlyGroupwiseLinear) for m in _decoder_linears(gptq).values())
    err_gptq = _rel(gptq, float_logits, english)
    err_rtn = _rel(_rtn_model(tiny_llama[0], config), float_logits, english)
    assert 0 < err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def test_awq_with_gptq_rounding_beats_awq_with_rtn(tiny_llama, english):
    config = QuantConfig(quant_algo="W4A16_AWQ", group_size=64, has_zero_point=True, **SMALL_CALIB)
    float_logits = dense_forward(_build(tiny_llama[0], None), english)
    err_gptq = _rel(_build(tiny_llama[0], config), float_logits, english)
    err_rtn = _rel(_rtn_model(tiny_llama[0], config, smooth=True), float_logits, english)
    assert 0 < err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def test_hessians_come_from_the_quantized_layers_before(tiny_llama, monkeypatch):
    """Layer 1's Hessians are those of the inputs the model with layer 0 already
    rounded produces, not the float model's; and a second run gives the same weights."""
    from rtllm.llmapi.tokenizer import load_tokenizer
    from rtllm.quantization import smoothing
    from rtllm.quantization.calibration import (
        calibration_samples,
        decoder_layer_inputs,
        linear_input_stats,
        run_decoder_layer,
    )

    config = QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, **SMALL_CALIB)
    samples = calibration_samples(load_tokenizer(tiny_llama[0]), config)
    seen: dict[int, torch.Tensor] = {}
    real = smoothing.gptq_quantize

    def spy(weight, h, *args):
        seen[weight.data_ptr()] = h.clone()
        return real(weight, h, *args)

    monkeypatch.setattr(smoothing, "gptq_quantize", spy)
    model = _build(tiny_llama[0], None)
    linears = _decoder_linears(model)
    smoothing.calibrate_sequentially(model, config, samples, linears)
    qkv1 = model.model.layers[1].self_attn.qkv_proj

    def qkv1_hessian(m) -> torch.Tensor:
        inputs = run_decoder_layer(m, m.model.layers[0], decoder_layer_inputs(m, samples))
        target = m.model.layers[1].self_attn.qkv_proj
        st = linear_input_stats(m, m.model.layers[1], inputs, {"qkv": target}, target)["qkv"]
        return hessian(st.gram, st.count)

    recorded = seen[qkv1.weight.data_ptr()]
    torch.testing.assert_close(recorded, qkv1_hessian(model), rtol=1e-5, atol=1e-5)
    float_h = qkv1_hessian(_build(tiny_llama[0], None))
    assert (recorded - float_h).norm() > 1e-3 * float_h.norm()
    again = _build(tiny_llama[0], None)
    smoothing.calibrate_sequentially(again, config, samples, _decoder_linears(again))
    for name, m in _decoder_linears(again).items():
        assert torch.equal(m.weight, linears[name].weight), name
